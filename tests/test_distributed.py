"""The global-batch loss over torch.distributed (gloo, CPU processes) against the reference.

Each test starts its ranks as subprocesses running this file, with the environment torchrun
would set (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT on a free port). A rank runs one
scenario, asserts inside, and prints one ``RESULT {json}`` line of what it checked; the test
requires every rank to exit 0 within a time limit and compares the ranks' lines. Process
start-up costs seconds here, so each scenario batches many checks.

Every rank builds the same global batch from a seed and computes the single-process
reference (``selhn_loss_reference``) on the concatenation, then checks its own rows.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from selhn_ext.options import MODES, REDUCTIONS
from selhn_ext.reference import Decisions, selhn_loss_reference

SPAWN_TIMEOUT_S = 90  # per scenario; a hang fails the test instead of blocking the run

# Rows per block of the chunked backend in the memory scenario (see _scenario_memory).
CHUNK_ROWS = 32

# Local batch sizes per world size: unequal ones exercise the padded collectives.
SIZES = {2: ((4, 4), (1, 8), (23, 41)), 3: ((3, 5, 1), (40, 70, 17))}


# ---------------------------------------------------------------------------------------
# The parent side: start the ranks, collect their results.


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(scenario: str, world: int, backend: str, tmp_path, **extra_env: str) -> list[dict]:
    port = _free_port()
    procs, logs = [], []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            **extra_env,
        }
        out = open(tmp_path / f"{scenario}-{rank}.out", "w+")
        err = open(tmp_path / f"{scenario}-{rank}.err", "w+")
        logs.append((out, err))
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, scenario, backend],
                env=env,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group, so a hang can be killed whole
            )
        )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"scenario {scenario!r} did not finish within {SPAWN_TIMEOUT_S} s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    results = []
    for rank, (proc, (out, err)) in enumerate(zip(procs, logs, strict=True)):
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        out.close()
        err.close()
        assert proc.returncode == 0, f"rank {rank} of {scenario!r} failed:\n{stderr[-6000:]}"
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        assert len(lines) == 1, f"rank {rank} printed no result:\n{stdout[-2000:]}"
        results.append(json.loads(lines[0].removeprefix("RESULT ")))
    return results


def _same_on_every_rank(results: list[dict], key: str):
    first = results[0][key]
    for rank, result in enumerate(results):
        assert result[key] == first, f"rank {rank} differs from rank 0 in {key!r}"
    return first


def _use_backend(backend: str) -> None:
    from conftest import require_backend

    require_backend(backend, "cpu", torch.float64)


@pytest.mark.backend("distributed")
@pytest.mark.parametrize("backend", ["chunked", "cpu"])
@pytest.mark.parametrize("world", [2, 3])
def test_matches_single_process_reference(world, backend, tmp_path):
    """Loss, gradients and statistics of every mode and reduction, fp64 and two-step fp32."""
    _use_backend(backend)
    results = _spawn("correctness", world, backend, tmp_path)
    n_configs = len(SIZES[world]) * 2  # with and without ids
    for rank, result in enumerate(results):
        assert result["fp64_checks"] == n_configs * len(MODES) * len(REDUCTIONS), rank
        assert result["two_step_checks"] >= 2 * len(MODES), rank
        assert result["nan_checks"] == len(SIZES[world]) * 2 * 3, rank
        # The data must reach both branches of the gate, or the selhn checks prove little.
        assert result["gated_anchors"] > 0 and result["hard_anchors"] > 0, rank
    # mean and sum: every rank returns the same global loss, bit for bit.
    _same_on_every_rank(results, "loss_bits")


@pytest.fixture(scope="module")
def robustness_results(tmp_path_factory) -> list[dict]:
    """One 3-rank run of the error, group-of-one and timeout checks."""
    return _spawn("robustness", 3, "chunked", tmp_path_factory.mktemp("robustness"))


@pytest.mark.backend("distributed")
def test_bad_inputs_raise_the_same_error_on_every_rank(robustness_results):
    results = robustness_results
    messages = _same_on_every_rank(results, "messages")
    assert "the embedding dimension D: rank 0 has 6, rank 1 has 7" in messages["dim"]
    assert "the embedding dtype: rank 0 has float64, rank 1 has float32" in messages["dtype"]
    assert "rank 2 has an empty local batch (b_r = 0)" in messages["empty"]
    assert "rank 0 rejected its inputs: ValueError: ids must have shape" in messages["ids"]
    assert "the ranks disagree on mode" in messages["mode"]
    # The group stays usable after these errors: a correct call still matches the reference.
    for result in results:
        assert result["after_errors_ok"]


@pytest.mark.backend("distributed")
def test_group_of_one_and_timeout(robustness_results):
    results = robustness_results
    assert results[0]["group_of_one_matches_plain_loss"]
    for result in results[1:]:
        assert "not a member of the given group" in result["non_member"]
    timeout = results[0]["timeout"]
    assert timeout["raised"] == "CollectiveError"
    assert "Timed out" in timeout["message"]  # gloo's own words: it was the timeout
    assert "init_process_group(timeout=...)" in timeout["message"]
    assert timeout["seconds"] < 30  # the group's 2 s timeout, not a hang


@pytest.fixture(scope="module")
def determinism_results(tmp_path_factory) -> dict[int, list[dict]]:
    """deterministic=True runs on the cpu backend with 2 and 3 ranks (see the scenario)."""
    _use_backend("cpu")
    return {
        world: _spawn("determinism", world, "cpu", tmp_path_factory.mktemp(f"determinism{world}"))
        for world in (2, 3)
    }


@pytest.mark.backend("distributed")
def test_deterministic_bits_do_not_depend_on_threads_or_tile_order(determinism_results):
    """Between runs every rank changes its thread count and tile visit order (and the
    ranks differ from each other): in the default mode such changes move the last bits of
    sums; with deterministic=True no output may change."""
    for world, results in determinism_results.items():
        for rank, result in enumerate(results):
            assert result["differs"] == [], (world, rank, result["differs"])
            assert 0 < result["gated"] < 1, (world, rank, result["gated"])


@pytest.mark.backend("distributed")
def test_image_anchor_bits_do_not_depend_on_the_rank_count(determinism_results):
    """With deterministic=True a rank computes its image anchors' statistics completely,
    against all N captions in ascending tile order, so their per-anchor losses and
    decisions do not depend on how many ranks share the batch. Caption anchors' hinge sums
    are merged over the ranks' partial sums, so those may differ in the last bits: their
    decisions must not, their values must agree to rounding."""
    from conftest import assert_relative_close

    def joined(world, key):
        return [value for result in determinism_results[world] for value in result[key]]

    for key in ("image_loss_bits", "image_decisions", "caption_decisions"):
        assert joined(2, key) == joined(3, key), key
    two = torch.tensor([float.fromhex(h) for h in joined(2, "caption_loss_bits")])
    three = torch.tensor([float.fromhex(h) for h in joined(3, "caption_loss_bits")])
    assert_relative_close(three, two, 1e-5, "caption anchor losses, 3 ranks vs 2")


# Bounds on the peak RSS rise of one loss + backward per rank, as a fraction of one
# b_r x N bool matrix (b_r = 4096, N = 8192, D = 16: 32 MiB). Measured on the 2-core
# development machine (load about 10): the cpu backend rises 3.0-3.2 MiB (the all-gathered
# captions, the caption gradients and the collectives' O(N * D) buffers), the chunked
# backend 8.8-9.9 MiB (its 32-row fp32 panels, about 1 MiB each, several alive at once).
# Each bound is 2.5x (cpu) and 1.6x (chunked) above that, and a b_r x N bool matrix held
# by the distributed layer overshoots it by 4x and 2x.
MEMORY_BOUNDS = [("cpu", 1 / 4), ("chunked", 1 / 2)]


@pytest.mark.backend("distributed")
@pytest.mark.parametrize("backend,fraction", MEMORY_BOUNDS)
def test_no_rank_holds_a_batch_by_batch_matrix(backend, fraction, tmp_path):
    _use_backend(backend)
    # A fixed mmap threshold makes glibc map every block of 64 KiB or more and unmap it when
    # freed, so the RSS follows the live buffers (its default, adaptive threshold keeps
    # freed blocks in the heap, where a later allocation could reuse them unseen).
    results = _spawn("memory", 2, backend, tmp_path, MALLOC_MMAP_THRESHOLD_="65536")
    for rank, result in enumerate(results):
        bool_bytes = result["bool_bytes"]  # one bool b_r x N matrix
        # The probe proves the measurement sees an allocation of that size.
        assert result["probe_growth"] > 0.9 * bool_bytes, (rank, result)
        assert result["loss_growth"] < fraction * bool_bytes, (rank, result)


def test_without_process_group_is_the_plain_loss():
    from selhn_ext import distributed, selhn_loss

    assert not torch.distributed.is_initialized()
    gen = torch.Generator().manual_seed(3)
    img = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    loss = distributed.selhn_loss(img, txt, mode="all", backend="chunked")
    grads = torch.autograd.grad(loss, (img, txt))
    expected = selhn_loss(img, txt, mode="all", backend="chunked")
    expected_grads = torch.autograd.grad(expected, (img, txt))
    assert loss.item() == expected.item()
    for got, want in zip(grads, expected_grads, strict=True):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        distributed.selhn_loss(img[:1], txt[:1])


# ---------------------------------------------------------------------------------------
# The rank side. Everything below runs in the spawned processes.


def _global_batch(sizes, dim: int, seed: int):
    """Near-collapsed pairs (txt close to img), so that some gaps are small."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    img = torch.nn.functional.normalize(torch.randn(total, dim, generator=gen, dtype=torch.float64))
    noise = torch.randn(total, dim, generator=gen, dtype=torch.float64)
    txt = torch.nn.functional.normalize(img + 0.6 * noise)
    upstream = torch.randn(2, total, generator=gen, dtype=torch.float64)
    return img, txt, upstream


def _shared_ids(total: int, dtype) -> torch.Tensor:
    """Pairs i and i + 2N/3 share an id, so duplicates cross rank boundaries."""
    return (torch.arange(total) % max(1, (2 * total) // 3)).to(dtype)


def _eps_between_gaps(img, txt, ids) -> float:
    """A threshold halfway between two middle |gap| values: about half the anchors gated,
    and no gap within rounding of the threshold."""
    _, stats = selhn_loss_reference(img, txt, ids=ids)
    gaps = stats["gap"].abs().flatten()
    gaps = gaps[~torch.isnan(gaps)].sort().values
    mid = gaps.numel() // 2
    return float((gaps[mid - 1] + gaps[mid]) / 2)


def _local(t: torch.Tensor, rows: slice, dtype=None) -> torch.Tensor:
    out = t[rows].detach().clone()
    if dtype is not None:
        out = out.to(dtype)
    return out.requires_grad_()


def _run_both(img, txt, upstream, rows, ids, backend, dtype=torch.float64, **options):
    """The distributed loss on this rank's rows, and the fp64 reference on the whole batch."""
    import selhn_ext.distributed as sd

    decisions = options.pop("decisions", None)
    reduction = options["reduction"]
    x, y = _local(img, rows, dtype), _local(txt, rows, dtype)
    loss, stats = sd.selhn_loss(
        x, y, ids=None if ids is None else ids[rows], backend=backend, return_stats=True,
        **options,
    )  # fmt: skip
    if reduction == "none":
        (loss * upstream[:, rows].to(loss.dtype)).sum().backward()
    else:
        loss.backward()

    ref_img = img.to(dtype).double().clone().requires_grad_()
    ref_txt = txt.to(dtype).double().clone().requires_grad_()
    ref, ref_stats = selhn_loss_reference(ref_img, ref_txt, ids=ids, decisions=decisions, **options)
    if reduction == "none":
        (ref * upstream).sum().backward()
        ref = ref[:, rows]
    else:
        ref.backward()
    return (loss, stats, x.grad, y.grad), (ref, ref_stats, ref_img.grad[rows], ref_txt.grad[rows])


def _all_gather_objects(value):
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _clear_decisions(img, txt, ids, eps: float, tol: float):
    """Where the fp64 reference's gate and hardest index are far from a flip, (2, N) each."""
    s = img @ txt.T
    total = s.shape[0]
    invalid = torch.eye(total, dtype=torch.bool)
    if ids is not None:
        invalid |= ids[:, None] == ids[None, :]
    d = s.diagonal()
    clear_gate, clear_index = [], []
    for scores in (s, s.T):
        top2 = scores.masked_fill(invalid, float("-inf")).topk(2, dim=1).values
        clear_index.append((top2[:, 0] - top2[:, 1]) > tol)
        clear_gate.append(((d - top2[:, 0]).abs() - eps).abs() > tol)
    return torch.stack(clear_gate), torch.stack(clear_index)


def _scenario_correctness(rank: int, world: int, backend: str) -> dict:
    loss_bits, fp64_checks, two_step_checks, nan_checks = [], 0, 0, 0
    gated_anchors = hard_anchors = 0
    for config, sizes in enumerate(SIZES[world]):
        offset = sum(sizes[:rank])
        rows = slice(offset, offset + sizes[rank])
        img, txt, upstream = _global_batch(sizes, dim=6, seed=10 + config)
        for ids in (None, _shared_ids(sum(sizes), (torch.int64, torch.int32)[config % 2])):
            eps = _eps_between_gaps(img, txt, ids)
            for mode in MODES:
                for reduction in REDUCTIONS:
                    options = dict(margin=0.2, eps=eps, mode=mode, reduction=reduction)
                    got, want = _run_both(img, txt, upstream, rows, ids, backend, **options)
                    where = f"sizes={sizes} ids={ids is not None} {mode}/{reduction}"
                    _assert_matches(got, want, rows, where, tol=1e-10)
                    if reduction != "none":
                        loss_bits.append(float(got[0].detach()).hex())
                    if mode == "selhn":
                        gated_anchors += int(got[1].gated.sum())
                        hard_anchors += int((~got[1].gated).sum())
                    fp64_checks += 1
        two_step_checks += _two_step(img, txt, upstream, rows, sizes, backend)
        nan_checks += _check_nan(img, txt, rows, sizes, backend)
        _check_autocast(img, txt, rows, backend)
    return dict(
        loss_bits=loss_bits,
        fp64_checks=fp64_checks,
        two_step_checks=two_step_checks,
        nan_checks=nan_checks,
        gated_anchors=gated_anchors,
        hard_anchors=hard_anchors,
    )


def _close(value, expected, tol: float, what: str) -> None:
    """Within ``tol`` of the largest finite expected entry (the gradients of the mean
    reduction are about 1/(2N)), with the same NaNs; exactly 0 where every expected value
    is 0 (a rank without an active hinge among its anchors)."""
    from conftest import assert_relative_close

    assert_relative_close(value, expected, tol, what)


def _assert_matches(got, want, rows, where: str, tol: float) -> None:
    loss, stats, grad_img, grad_txt = got
    ref, ref_stats, ref_grad_img, ref_grad_txt = want
    _close(loss, ref, tol, f"loss {where}")
    _close(grad_img, ref_grad_img, tol, f"img.grad {where}")
    _close(grad_txt, ref_grad_txt, tol, f"txt.grad {where}")
    for key in ("gated", "near_tie", "hardest_index"):
        assert torch.equal(getattr(stats, key), ref_stats[key][:, rows]), f"{key} {where}"
    torch.testing.assert_close(stats.gap, ref_stats["gap"][:, rows], equal_nan=True)
    torch.testing.assert_close(stats.gated_fraction, stats.gated.float().mean(dim=1))


def _two_step(img, txt, upstream, rows, sizes, backend) -> int:
    """fp32 and bf16 inputs: decisions first, then values under the backend's decisions."""
    checks = 0
    # Tolerances relative to the largest entry, for values under shared decisions: fp32
    # compute (sums over N <= 127 terms); bf16 gradients come back rounded to bf16, at most
    # half an ulp (2^-8 relative) off each entry, so 2^-7 of the largest entry bounds them.
    for dtype, grad_tol in ((torch.float32, 1e-5), (torch.bfloat16, 2**-7)):
        x64, y64 = img.to(dtype).double(), txt.to(dtype).double()  # exactly the inputs
        eps = _eps_between_gaps(x64, y64, None)
        clear_gate, clear_index = _clear_decisions(x64, y64, None, eps, tol=1e-5)
        for mode, reduction in [(m, "mean") for m in MODES] + [("selhn", "none")]:
            options = dict(margin=0.2, eps=eps, mode=mode, reduction=reduction)
            x, y = _local(img, rows, dtype), _local(txt, rows, dtype)
            import selhn_ext.distributed as sd

            loss, stats = sd.selhn_loss(x, y, backend=backend, return_stats=True, **options)
            assert loss.dtype == torch.float32, loss.dtype
            gated = torch.cat(
                [g for g in _all_gather_objects(stats.gated)], dim=1
            )  # (2, N), rank order
            hardest = torch.cat([h for h in _all_gather_objects(stats.hardest_index)], dim=1)

            # Step 1: the decisions agree with fp64 wherever fp64 is far from a flip.
            _, ref_stats = selhn_loss_reference(x64, y64, **options)
            assert torch.equal(gated[clear_gate], ref_stats["gated"][clear_gate]), mode
            assert torch.equal(hardest[clear_index], ref_stats["hardest_index"][clear_index])

            # Step 2: values under the backend's own decisions, against fp64.
            options["decisions"] = Decisions(gated, hardest)
            got, want = _run_both(img, txt, upstream, rows, None, backend, dtype, **options)
            assert got[2].dtype == dtype and got[3].dtype == dtype
            where = f"{dtype} sizes={sizes} {mode}/{reduction}"
            _close(got[0], want[0], 1e-5, f"loss {where}")
            for g, w, name in ((got[2], want[2], "img"), (got[3], want[3], "txt")):
                _close(g, w, grad_tol, f"{name}.grad {where}")
            checks += 1
    return checks


def _check_nan(img, txt, rows, sizes, backend) -> int:
    """One NaN in the last rank's last image and, separately, in its last caption.

    A NaN image row makes that row of S NaN: every caption anchor sees it only in the last
    rank's partial statistics, which the merge over ranks must keep. A NaN caption makes
    a column NaN: every rank's image anchors see it. Per anchor on every rank, the NaN
    pattern of the losses, the finite losses, the hardest indices (the NaN's), the gaps
    and the gates equal the fp64 reference's.
    """
    import selhn_ext.distributed as sd

    checks = 0
    eps = _eps_between_gaps(img, txt, None)
    last = sum(sizes) - 1
    for which in ("img", "txt"):
        x, y = img.clone(), txt.clone()
        (x if which == "img" else y)[last, 0] = float("nan")
        for mode in ("selhn", "hardest", "all"):
            where = f"NaN in {which}[{last}] sizes={sizes} {mode}"
            options = dict(margin=0.2, eps=eps, mode=mode, reduction="none")
            loss, stats = sd.selhn_loss(
                x[rows], y[rows], backend=backend, return_stats=True, **options
            )
            ref, ref_stats = selhn_loss_reference(x, y, **options)
            _close(loss, ref[:, rows], 1e-10, f"loss {where}")
            for key in ("gated", "hardest_index"):
                assert torch.equal(getattr(stats, key), ref_stats[key][:, rows]), f"{key} {where}"
            torch.testing.assert_close(
                stats.gap, ref_stats["gap"][:, rows], rtol=1e-10, atol=0, equal_nan=True
            )
            checks += 1
    return checks


def _check_autocast(img, txt, rows, backend) -> None:
    """Under CPU autocast, fp32 embeddings take the bf16 path, computed in fp32 inside."""
    import selhn_ext.distributed as sd

    x, y = _local(img, rows, torch.float32), _local(txt, rows, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sd.selhn_loss(x, y, mode="all", backend=backend)
    loss.backward()
    xb, yb = _local(x, slice(None), torch.bfloat16), _local(y, slice(None), torch.bfloat16)
    expected = sd.selhn_loss(xb, yb, mode="all", backend=backend)
    expected.backward()
    assert loss.dtype == torch.float32 and torch.equal(loss, expected), (loss, expected)
    assert x.grad.dtype == torch.float32 and torch.equal(x.grad, xb.grad.float())
    assert torch.equal(y.grad, yb.grad.float())


def _error_message(call) -> str:
    from selhn_ext.distributed import DistributedInputError

    try:
        call()
    except DistributedInputError as exc:
        return str(exc)
    raise AssertionError("expected a DistributedInputError")


def _scenario_robustness(rank: int, world: int, backend: str) -> dict:
    import selhn_ext.distributed as sd

    sizes = (3, 5, 1)
    offset = sum(sizes[:rank])
    rows = slice(offset, offset + sizes[rank])
    img, txt, upstream = _global_batch(sizes, dim=6, seed=1)
    x, y = img[rows], txt[rows]

    def wide(t):  # rank 1 passes D = 7
        return torch.cat([t, t[:, :1]], dim=1) if rank == 1 else t

    messages = {
        "dim": _error_message(lambda: sd.selhn_loss(wide(x), wide(y), backend=backend)),
        "dtype": _error_message(
            lambda: sd.selhn_loss(
                x.float() if rank == 1 else x, y.float() if rank == 1 else y, backend=backend
            )
        ),
        "empty": _error_message(
            lambda: sd.selhn_loss(
                x[:0] if rank == 2 else x, y[:0] if rank == 2 else y, backend=backend
            )
        ),
        "ids": _error_message(
            lambda: sd.selhn_loss(
                x, y, ids=torch.arange(sizes[rank] + (rank == 0)), backend=backend
            )
        ),
        "mode": _error_message(
            lambda: sd.selhn_loss(x, y, mode="hardest" if rank == 2 else "selhn", backend=backend)
        ),
    }
    got, want = _run_both(
        img, txt, upstream, rows, None, backend, margin=0.2, eps=0.05, mode="selhn",
        reduction="mean",
    )  # fmt: skip
    _assert_matches(got, want, rows, "after the errors", tol=1e-10)
    return dict(messages=messages, after_errors_ok=True, **_group_checks(rank, world, backend))


def _group_checks(rank: int, world: int, backend: str) -> dict:
    """A group of one, deterministic repeats, and a rank that never calls the loss."""
    import torch.distributed as dist

    import selhn_ext
    import selhn_ext.distributed as sd

    result: dict = {}
    solo = dist.new_group(ranks=[0])  # every rank must take part in creating it
    short = dist.new_group(ranks=[0, 1], timeout=datetime.timedelta(seconds=2))
    img, txt, _ = _global_batch((5,), dim=4, seed=5)
    if rank == 0:
        loss = sd.selhn_loss(img, txt, group=solo, backend=backend)
        plain = selhn_ext.selhn_loss(img, txt, backend=backend)
        result["group_of_one_matches_plain_loss"] = loss.item() == plain.item()
    else:
        try:
            sd.selhn_loss(img, txt, group=solo, backend=backend)
            result["non_member"] = "no error"
        except ValueError as exc:
            result["non_member"] = str(exc)

    sizes = (3, 6, 2)[:world]
    offset = sum(sizes[:rank])
    rows = slice(offset, offset + sizes[rank])
    img, txt, _ = _global_batch(sizes, dim=5, seed=6)

    # Rank 1 never calls the loss on the short-timeout group: rank 0 must get an error.
    if rank == 0:
        start = time.monotonic()
        try:
            sd.selhn_loss(img[rows], txt[rows], group=short, backend=backend)
            result["timeout"] = dict(raised=None)
        except Exception as exc:  # the test inspects whatever was raised
            result["timeout"] = dict(
                raised=type(exc).__name__, message=str(exc), seconds=time.monotonic() - start
            )
    dist.barrier()  # rank 1 stays connected until rank 0 has seen its timeout
    return result


# (threads, reversed tile order) of the C++ kernels, per run; rank r starts at schedule r.
SCHEDULES = ((1, False), (2, True), (3, False))


def _scenario_determinism(rank: int, world: int, backend: str) -> dict:
    import selhn_ext
    import selhn_ext.distributed as sd

    total = 370  # 6 row tiles and 3 column tiles of the C++ kernel in all
    sizes = {2: (200, 170), 3: (150, 97, 123)}[world]
    offset = sum(sizes[:rank])
    rows = slice(offset, offset + sizes[rank])
    img, txt, upstream = _global_batch((total,), dim=24, seed=21)
    ids = _shared_ids(total, torch.int64)
    eps = _eps_between_gaps(img, txt, ids)
    runs = []
    for k in range(len(SCHEDULES)):
        threads, reverse = SCHEDULES[(k + rank) % len(SCHEDULES)]
        torch.set_num_threads(threads)
        torch.ops.selhn._cpu_set_reverse_tile_order(reverse)
        x, y = _local(img, rows, torch.float32), _local(txt, rows, torch.float32)
        loss, stats = sd.selhn_loss(
            x, y, ids=ids[rows], eps=eps, reduction="none", backend=backend,
            deterministic=True, return_stats=True,
        )  # fmt: skip
        (loss * upstream[:, rows].float()).sum().backward()
        runs.append([loss.detach(), *stats, x.grad, y.grad])
    torch.ops.selhn._cpu_set_reverse_tile_order(False)
    torch.set_num_threads(1)
    names = ["loss", *selhn_ext.SelHNStats._fields, "img.grad", "txt.grad"]
    differs = sorted(
        {name for run in runs[1:] for name, a, b in zip(names, run, runs[0], strict=True)
         if not torch.equal(a, b)}
    )  # fmt: skip
    loss, gated, near_tie, _, hardest, gap = runs[0][:6]

    def decisions(k):
        return [gated[k].tolist(), near_tie[k].tolist(), hardest[k].tolist()]

    return dict(
        differs=differs,
        gated=float(gated.float().mean()),
        image_loss_bits=[float(v).hex() for v in loss[0]],
        caption_loss_bits=[float(v).hex() for v in loss[1]],
        image_decisions=list(zip(*decisions(0), strict=True)),
        caption_decisions=list(zip(*decisions(1), strict=True)),
    )


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """The peak RSS since the last ``_reset_peak_rss`` (VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS, so an earlier peak (imports,
    # start-up) cannot pass for the peak of the measured call.
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _peak_growth(run) -> int:
    """How far the peak RSS rises above the current RSS while ``run`` runs."""
    gc.collect()
    _reset_peak_rss()
    before = _rss_bytes()
    run()
    return _peak_rss_bytes() - before


def _scenario_memory(rank: int, world: int, backend: str) -> dict:
    import selhn_ext.distributed as sd
    from selhn_ext import dispatch
    from selhn_ext.chunked import ChunkedBackend

    # Row blocks of CHUNK_ROWS rows: the backend's own panels (CHUNK_ROWS x N) stay far
    # below one b_r x N matrix, so any b_r x N or N x N buffer of the distributed layer,
    # even a bool one, would show.
    if backend == "chunked":
        dispatch._LOADED[backend] = ChunkedBackend(chunk_rows=CHUNK_ROWS)
    local, dim = 4096, 16
    total = local * world
    gen = torch.Generator().manual_seed(rank)
    img = torch.nn.functional.normalize(torch.randn(local, dim, generator=gen))
    txt = torch.nn.functional.normalize(img + 0.5 * torch.randn(local, dim, generator=gen))

    def loss_and_backward(x, y):
        x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
        sd.selhn_loss(x, y, backend=backend, eps=0.05).backward()

    loss_and_backward(img[:8], txt[:8])  # warm up: thread pools, gloo buffers, lazy inits
    loss_growth = _peak_growth(lambda: loss_and_backward(img, txt))
    probe_growth = _peak_growth(lambda: torch.ones(local, total, dtype=torch.bool).all())
    return dict(bool_bytes=local * total, loss_growth=loss_growth, probe_growth=probe_growth)


SCENARIOS = {
    "correctness": _scenario_correctness,
    "robustness": _scenario_robustness,
    "memory": _scenario_memory,
    "determinism": _scenario_determinism,
}


def _rank_main(scenario: str, backend: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = SCENARIOS[scenario](rank, world, backend)
    print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main(sys.argv[1], sys.argv[2])
