"""The C++ CPU backend (``cpu``) against the reference, the chunked kernels and itself.

Tolerances follow the two-step method of the design notes (selhn-loss.md, section 4):
fp64 matches the fp64 reference to 1e-10; fp32 and 16-bit inputs first agree with the fp64
reference on every decision whose fp64 margin is clear, then match the reference evaluated
under the kernel's own decisions.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import require_backend

from selhn_ext import selhn_loss
from selhn_ext.chunked import ChunkedBackend
from selhn_ext.kernel_interface import (
    AnchorWeights,
    Block,
    FullyActive,
    GatedAnchors,
    PyTorchGlue,
    add_fully_active,
    positive_scores,
)
from selhn_ext.options import MODES, REDUCTIONS
from selhn_ext.reference import Decisions, selhn_loss_reference

pytestmark = pytest.mark.backend("cpu")

MARGIN = 0.2
EPS = 0.05  # wide enough that random batches mix gated and hardest-negative anchors


def cpu_ops():
    require_backend("cpu", "cpu", torch.float64)
    from selhn_ext import _cpp

    return _cpp


def make_batch(batch, dim, dtype=torch.float64, seed=0, non_contiguous=False):
    """Unit embeddings whose positives score about as high as their hardest negatives
    (about sqrt(2 ln B / D)), so that the gate splits the anchors."""
    gen = torch.Generator().manual_seed(seed)
    target = min(0.9, math.sqrt(2 * math.log(batch) / dim))
    noise = math.sqrt(1 / target**2 - 1)
    img = torch.nn.functional.normalize(
        torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=1
    )
    scaled_noise = torch.randn(batch, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
    txt = img + noise * scaled_noise
    txt = torch.nn.functional.normalize(txt, dim=1)
    img, txt = img.to(dtype), txt.to(dtype)
    if non_contiguous:  # every other column of a wider tensor, and a transposed copy
        wide = torch.zeros(batch, 2 * dim, dtype=dtype)
        wide[:, ::2] = img
        img = wide[:, ::2]
        txt = txt.T.contiguous().T
        assert dim == 1 or not (img.is_contiguous() or txt.is_contiguous())
    return img, txt


def make_ids(batch, seed=0):
    gen = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(0, max(2, batch // 2), (batch,), generator=gen)


def loss_and_grads(fn, img, txt, reduction, **kwargs):
    x = img.detach().clone().requires_grad_(True)
    y = txt.detach().clone().requires_grad_(True)
    out = fn(x, y, reduction=reduction, **kwargs)
    loss, stats = out if isinstance(out, tuple) else (out, None)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (loss * weights).sum().backward()
    return loss.detach(), x.grad, y.grad, stats


def assert_close(actual, expected, tol, what):
    assert actual.shape == expected.shape, what
    expected = expected.to(actual.dtype)
    same_nan = torch.isnan(actual) == torch.isnan(expected)
    assert bool(same_nan.all()), f"{what}: NaN pattern differs"
    err = (actual - expected).abs().nan_to_num(0.0).max().item() if actual.numel() else 0.0
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


def compare_fp64(img, txt, mode, reduction, ids, deterministic=False):
    got = loss_and_grads(
        selhn_loss, img, txt, reduction, margin=MARGIN, eps=EPS, mode=mode, ids=ids,
        backend="cpu", deterministic=deterministic, return_stats=True,
    )  # fmt: skip
    ref = loss_and_grads(
        selhn_loss_reference, img, txt, reduction, margin=MARGIN, eps=EPS, mode=mode, ids=ids
    )
    for name, a, b in zip(("loss", "grad img", "grad txt"), got[:3], ref[:3], strict=True):
        assert_close(a, b, 1e-10, name)
    stats, ref_stats = got[3], ref[3]
    assert torch.equal(stats.gated, ref_stats["gated"])
    assert torch.equal(stats.hardest_index, ref_stats["hardest_index"])
    assert_close(stats.gap, ref_stats["gap"], 1e-12, "gap")
    return stats


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_ids", [False, True])
def test_fp64_every_mode_and_reduction(mode, reduction, with_ids):
    cpu_ops()
    img, txt = make_batch(129, 96, seed=1, non_contiguous=True)
    ids = make_ids(129, seed=1) if with_ids else None
    stats = compare_fp64(img, txt, mode, reduction, ids)
    if mode == "selhn":  # the batch exercises both branches of the gate
        assert 0 < int(stats.gated.sum()) < stats.gated.numel()


@pytest.mark.parametrize("batch", [2, 3, 17, 127, 128, 129, 300])
@pytest.mark.parametrize("dim", [1, 16, 96, 200])
def test_fp64_awkward_shapes(batch, dim):
    cpu_ops()
    index = batch * 7 + dim
    mode = MODES[index % len(MODES)]
    ids = make_ids(batch, seed=index) if index % 2 else None
    img, txt = make_batch(batch, dim, seed=index, non_contiguous=index % 3 == 0)
    compare_fp64(img, txt, mode, REDUCTIONS[index % 3], ids)


def decisions_agree_where_clear(stats, img, txt, ids, tol):
    """Step 1: decisions match the fp64 reference wherever its margins exceed ``tol``."""
    x, y = img.double(), txt.double()
    _, ref = selhn_loss_reference(x, y, margin=MARGIN, eps=EPS, mode="selhn", ids=ids)
    s = x @ y.T
    invalid = torch.eye(len(x), dtype=torch.bool)
    if ids is not None:
        invalid |= ids[:, None] == ids[None, :]
    for k, scores in enumerate((s, s.T)):
        top2 = scores.masked_fill(invalid, float("-inf")).topk(2, dim=1).values
        # NaN margins (fewer than two valid negatives) leave nothing to tie with: clear.
        clear_index = ~((top2[:, 0] - top2[:, 1]) <= tol)
        gap = ref["gap"][k]
        clear_gate = ((gap.abs() - EPS).abs() > tol) & ~torch.isnan(gap)
        assert torch.equal(
            stats.hardest_index[k][clear_index], ref["hardest_index"][k][clear_index]
        )
        assert torch.equal(stats.near_tie[k][clear_gate], ref["near_tie"][k][clear_gate])
        if len(x) >= 100:  # the comparison covers most anchors
            assert clear_index.float().mean() > 0.5 and clear_gate.float().mean() > 0.5


def two_step(img, txt, mode, reduction, ids, loss_tol, grad_tol, deterministic=False):
    got = loss_and_grads(
        selhn_loss, img, txt, reduction, margin=MARGIN, eps=EPS, mode=mode, ids=ids,
        backend="cpu", deterministic=deterministic, return_stats=True,
    )  # fmt: skip
    loss, grad_img, grad_txt, stats = got
    assert loss.dtype == torch.float32 and grad_img.dtype == img.dtype
    decisions_agree_where_clear(stats, img, txt, ids, tol=1e-4)
    ref = loss_and_grads(
        selhn_loss_reference, img.double(), txt.double(), reduction, margin=MARGIN, eps=EPS,
        mode=mode, ids=ids, decisions=Decisions(stats.gated, stats.hardest_index),
    )  # fmt: skip
    scale = max(1.0, ref[0].abs().max().item())  # the "sum" reduction adds 2B losses
    assert_close(loss.double(), ref[0], loss_tol * scale, "loss")
    assert_close(grad_img.double(), ref[1], grad_tol, "grad img")
    assert_close(grad_txt.double(), ref[2], grad_tol, "grad txt")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch,dim", [(3, 16), (129, 96), (300, 200)])
@pytest.mark.parametrize("with_ids", [False, True])
def test_fp32_two_step(mode, batch, dim, with_ids):
    cpu_ops()
    img, txt = make_batch(batch, dim, torch.float32, seed=batch + dim, non_contiguous=with_ids)
    ids = make_ids(batch) if with_ids else None
    for reduction in REDUCTIONS:
        scale = batch if mode == "sum_hinges" else 1.0
        two_step(img, txt, mode, reduction, ids, loss_tol=1e-5 * scale, grad_tol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["selhn", "all"])
def test_16bit_inputs_are_upcast(dtype, mode):
    cpu_ops()
    require_backend("cpu", "cpu", dtype)
    img, txt = make_batch(130, 64, dtype, seed=5)
    # The reference upcasts the same 16-bit values: decisions then values, in fp32 terms.
    two_step(img, txt, mode, "mean", None, loss_tol=1e-5, grad_tol=2e-3)


def boundary_distance(img, txt, mode):
    """How far fp64 inputs are from every kink of the loss (hinges, argmax, gate)."""
    s = img @ txt.T
    d = s.diagonal()
    off = ~torch.eye(len(s), dtype=torch.bool)
    worst = math.inf
    for scores in (s, s.T):
        args = (MARGIN + scores - d[:, None])[off]
        worst = min(worst, args.abs().min().item())
        masked = scores.masked_fill(~off, float("-inf"))
        top2 = masked.topk(2, dim=1).values
        worst = min(worst, (top2[:, 0] - top2[:, 1]).min().item())
        if mode == "selhn":
            worst = min(worst, ((d - top2[:, 0]).abs() - EPS).abs().min().item())
    return worst


@pytest.mark.parametrize("mode", MODES)
def test_fp64_gradcheck(mode):
    cpu_ops()
    for seed in range(50):  # the first batch clear of every kink
        img, txt = make_batch(7, 5, seed=100 + seed)
        if boundary_distance(img, txt, mode) > 1e-3:
            break
    else:
        pytest.fail("no batch away from the decision boundaries")
    x, y = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)

    def loss(a, b):
        return selhn_loss(a, b, margin=MARGIN, eps=EPS, mode=mode, reduction="none", backend="cpu")

    assert torch.autograd.gradcheck(loss, (x, y), eps=1e-6, atol=1e-8)


EXACT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", EXACT_DTYPES)
def test_exact_ties_take_the_smallest_index(dtype):
    cpu_ops()
    batch = 6
    # img = I, so S = txt.T exactly: S_ij = txt[j, i]. Values are dyadic (exact everywhere).
    s = torch.full((batch, batch), -0.5, dtype=torch.float64)
    s.fill_diagonal_(0.25)
    s[0, 2] = s[0, 4] = 0.5  # row 0: tie between columns 2 and 4
    s[1, 3] = s[5, 3] = 0.75  # column 3: tie between rows 1 and 5
    s[2, 1] = 0.0
    s[4, 1] = -0.0  # column 1: -0.0 ties with +0.0, so row 2 (smaller) wins
    img, txt = torch.eye(batch, dtype=dtype), s.T.contiguous().to(dtype)
    _, stats = selhn_loss(img, txt, eps=0.0078125, backend="cpu", return_stats=True)
    _, ref = selhn_loss_reference(img, txt, eps=0.0078125)
    assert stats.hardest_index[0, 0] == 2
    assert stats.hardest_index[1, 3] == 1
    assert stats.hardest_index[1, 1] == 2
    assert torch.equal(stats.hardest_index, ref["hardest_index"])


@pytest.mark.parametrize("dtype", EXACT_DTYPES)
def test_gap_exactly_at_eps_is_not_gated(dtype):
    cpu_ops()
    batch, eps = 5, 0.0078125  # 2^-7: exact in every dtype
    below = eps * (1 - 2**-7)
    diag = torch.tensor([eps, below, eps, 0.0, -eps], dtype=torch.float64)
    img, txt = torch.eye(batch, dtype=dtype), torch.diag(diag).to(dtype)  # off-diagonal S = 0
    loss, stats = selhn_loss(img, txt, eps=eps, backend="cpu", reduction="none", return_stats=True)
    expected = torch.tensor([False, True, False, True, False])
    assert torch.equal(stats.gated[0], expected)
    assert torch.equal(stats.gated[1], expected)
    assert torch.equal(stats.hardest_index[0], torch.tensor([1, 0, 0, 0, 0]))
    ref_loss, _ = selhn_loss_reference(img, txt, eps=eps, reduction="none")
    assert torch.equal(loss, ref_loss)


def test_nan_propagates_to_max_arg_and_loss():
    ops = cpu_ops()
    for dtype in (torch.float32, torch.float64):
        img, txt = make_batch(70, 8, dtype, seed=3)
        img[3, 0] = float("nan")  # S row 3 is all NaN, so is every column's entry in row 3
        d = positive_scores(img, txt)
        rows, cols = ops.COMPILED_BACKEND.partials(Block(img, txt, d), MARGIN)
        assert torch.isnan(rows.max[3]) and rows.arg[3] == 0  # smallest index among NaNs
        assert torch.isnan(rows.hinge_sum[3])
        others = torch.arange(70) != 3
        assert torch.isnan(cols.max[others]).all() and (cols.arg[others] == 3).all()
        assert not torch.isnan(cols.max[3])
        ref_rows, ref_cols = ChunkedBackend().partials(Block(img, txt, d), MARGIN)
        assert torch.equal(rows.arg, ref_rows.arg) and torch.equal(cols.arg, ref_cols.arg)
        loss = selhn_loss(img, txt, backend="cpu")
        assert torch.isnan(loss)


def op_args(dtype=torch.float32, batch=40, dim=12, with_ids=True, row_offset=0, b=None):
    img, txt = make_batch(batch, dim, dtype, seed=9)
    b = batch if b is None else b
    rows = img[row_offset : row_offset + b]
    ids = make_ids(batch) if with_ids else None
    row_ids = ids[row_offset : row_offset + b] if with_ids else None
    d = positive_scores(img, txt)
    return rows, txt, d, row_offset, row_ids, ids


def test_opcheck_partials_and_dense_backward():
    cpu_ops()
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        rows, cols, d, off, row_ids, col_ids = op_args(dtype, row_offset=8, b=20)
        torch.library.opcheck(
            torch.ops.selhn.partials.default,
            (rows, cols, d, off, row_ids, col_ids, MARGIN, False, False),
        )
        gen = torch.Generator().manual_seed(2)
        cdt = d.dtype
        coef_r, coef_c = (
            torch.rand(20, generator=gen).to(cdt),
            torch.rand(40, generator=gen).to(cdt),
        )
        gated_r, gated_c = torch.rand(20, generator=gen) < 0.5, torch.rand(40, generator=gen) < 0.5
        torch.library.opcheck(
            torch.ops.selhn.dense_backward.default,
            (rows, cols, d, off, row_ids, col_ids, MARGIN, coef_r, coef_c, gated_r, gated_c,
             True, False),
        )  # fmt: skip


def assert_stats_equal(a, b, tol):
    for name in a._fields:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        if name in ("arg", "active"):
            assert torch.equal(x, y), name
        else:
            assert_close(x, y, tol, name)


def tiles_touching_gated(b, n, gated_rows, gated_cols):
    """Tiles the dense backward recomputes: with the gated rows and columns ordered first,
    every tile of the first ceil(gated_rows / BM) row tiles or of the first
    ceil(gated_cols / BN) column tiles, once each; and the tile count of the whole matrix."""
    block_rows, block_cols = torch.ops.selhn._cpu_tile_shape()
    row_tiles, col_tiles = math.ceil(b / block_rows), math.ceil(n / block_cols)
    gated_row_tiles = math.ceil(gated_rows / block_rows)
    touching = gated_row_tiles * col_tiles + (row_tiles - gated_row_tiles) * math.ceil(
        gated_cols / block_cols
    )
    return touching, row_tiles * col_tiles


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("with_ids", [False, True])
@pytest.mark.parametrize("gated_fraction", [0.3, 0.9])
def test_row_block_of_a_bigger_batch_matches_chunked(dtype, tol, with_ids, gated_fraction):
    ops = cpu_ops()
    batch, b, off = 300, 97, 130  # a row block like one rank's share of a global batch
    rows, cols, d, off, row_ids, col_ids = op_args(dtype, batch, 40, with_ids, off, b)
    got = ops.COMPILED_BACKEND.partials(Block(rows, cols, d, off, row_ids, col_ids), MARGIN)
    ref = ChunkedBackend(chunk_rows=32).partials(
        Block(rows, cols, d, off, row_ids, col_ids), MARGIN
    )
    for a, c in zip(got, ref, strict=True):
        assert_stats_equal(a, c, tol)
    gen = torch.Generator().manual_seed(4)
    coef_r, coef_c = (
        torch.rand(b, generator=gen).to(d.dtype),
        torch.rand(batch, generator=gen).to(d.dtype),
    )
    gated_r = torch.rand(b, generator=gen) < gated_fraction
    gated_c = torch.rand(batch, generator=gen) < gated_fraction
    for deterministic in (False, True):
        args = (
            Block(rows, cols, d, off, row_ids, col_ids),
            MARGIN,
            GatedAnchors(coef_r, coef_c, gated_r, gated_c),
        )
        g_rows, g_cols = ops.COMPILED_BACKEND.dense_backward(*args, deterministic=deterministic)
        r_rows, r_cols = ChunkedBackend(chunk_rows=32).dense_backward(*args)
        assert_close(g_rows, r_rows, tol * 10, "grad rows")
        assert_close(g_cols, r_cols, tol * 10, "grad cols")


def backward_tiles(ops, args, deterministic):
    torch.ops.selhn._cpu_backward_tile_count(True)
    ops.COMPILED_BACKEND.dense_backward(*args, deterministic=deterministic)
    return torch.ops.selhn._cpu_backward_tile_count(True)


def test_backward_recomputes_only_gated_tiles():
    ops = cpu_ops()
    batch = 700
    rows, cols, d, off, _, _ = op_args(torch.float32, batch, 16, with_ids=False)
    coef = torch.ones(batch)
    none = torch.zeros(batch, dtype=torch.bool)
    assert (
        backward_tiles(
            ops, (Block(rows, cols, d), MARGIN, GatedAnchors(coef, coef, none, none)), False
        )
        == 0
    )
    assert (
        backward_tiles(
            ops, (Block(rows, cols, d), MARGIN, GatedAnchors(coef, coef, none, none)), True
        )
        == 0
    )
    gen = torch.Generator().manual_seed(0)
    counts = []
    for fraction in (0.01, 0.3, 0.5, 1.0):
        # Scattered gating: the gated anchors are spread over every tile of the input order.
        gated_r = torch.rand(batch, generator=gen) < fraction
        gated_c = torch.rand(batch, generator=gen) < fraction
        touching, every_tile = tiles_touching_gated(
            batch, batch, int(gated_r.sum()), int(gated_c.sum())
        )
        args = (Block(rows, cols, d), MARGIN, GatedAnchors(coef, coef, gated_r, gated_c))
        # Each tile that touches a gated anchor once (W = row part + column part), and no
        # other tile; below the whole matrix unless every anchor is gated.
        count = backward_tiles(ops, args, False)
        assert count == touching
        assert count < every_tile if fraction < 1.0 else count == every_tile
        # Deterministic mode: a row-owner pass and a column-owner pass.
        assert backward_tiles(ops, args, True) == 2 * touching
        counts.append(count)
    # More gated anchors never recompute fewer tiles: half gated costs less than all gated.
    assert counts == sorted(counts) and counts[2] < counts[3]
    # Through the loss: mode "hardest" gates nothing, so the backward recomputes no tile.
    img, txt = make_batch(200, 16, torch.float32)
    img.requires_grad_(True)
    torch.ops.selhn._cpu_backward_tile_count(True)
    selhn_loss(img, txt, mode="hardest", backend="cpu").backward()
    assert torch.ops.selhn._cpu_backward_tile_count(True) == 0


def run_everything(ops, deterministic):
    """Partials, then the dense backward with 10% and 40% of the anchors gated."""
    rows, cols, d, off, row_ids, col_ids = op_args(torch.float32, 333, 24, True)
    partial = ops.COMPILED_BACKEND.partials(
        Block(rows, cols, d, 0, row_ids, col_ids), MARGIN, deterministic=deterministic
    )
    gen = torch.Generator().manual_seed(6)
    coef = torch.rand(333, generator=gen)
    grads = []
    for fraction in (0.1, 0.4):
        gated_r = torch.rand(333, generator=gen) < fraction
        gated_c = torch.rand(333, generator=gen) < fraction
        grads += ops.COMPILED_BACKEND.dense_backward(
            Block(rows, cols, d, 0, row_ids, col_ids),
            MARGIN,
            GatedAnchors(coef, coef, gated_r, gated_c),
            deterministic=deterministic,
        )
    return [t for stats in partial for t in stats] + list(grads)


@pytest.fixture
def reverse_order():
    def set_reverse(flag: bool) -> None:
        torch.ops.selhn._cpu_set_reverse_tile_order(flag)

    yield set_reverse
    torch.ops.selhn._cpu_set_reverse_tile_order(False)


def test_tile_order_and_thread_count_do_not_change_deterministic_bits(reverse_order):
    """deterministic=True sums every output in ascending tile order with one owner per
    output, so reversing the visit order or changing the thread count changes no bit.

    The default mode may differ in the last bits under either change: row hinge sums run
    in visit order, column partial sums per thread, and the gradient side shared between
    threads goes through per-thread buffers merged in thread order. Max, argmax and active
    counts are exact in every mode.
    """
    ops = cpu_ops()
    threads = torch.get_num_threads()
    try:
        forward = run_everything(ops, True)
        reverse_order(True)
        backward = run_everything(ops, True)
        torch.set_num_threads(1)
        single = run_everything(ops, True)
        reverse_order(False)
        default_reversed = run_everything(ops, False)
    finally:
        torch.set_num_threads(threads)
    default = run_everything(ops, False)
    for a, b, c in zip(forward, backward, single, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    for k, (a, b) in enumerate(zip(default, default_reversed, strict=True)):
        if a.dtype in (torch.int64, torch.int32) or k in (0, 4):  # arg, active, max
            assert torch.equal(a, b)
        else:
            assert_close(a, b, 1e-5, f"output {k}")
        assert_close(a.double(), forward[k].double(), 1e-5, f"default vs deterministic {k}")


def test_default_mode_is_reproducible_run_to_run():
    ops = cpu_ops()
    first, second = run_everything(ops, False), run_everything(ops, False)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.fixture
def simd_path():
    yield torch.ops.selhn._cpu_set_simd_path
    torch.ops.selhn._cpu_set_simd_path("best")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_ids", [False, True])
def test_every_simd_path_gives_the_same_bits(simd_path, dtype, with_ids):
    """Each S element and each gradient element is one FMA chain over k in a fixed order on
    every path (AVX-512, AVX2, portable std::fma), and the tile statistics are summed in
    the same order, so every output is bit-identical across paths. The shapes leave partial
    micro blocks, panel slices and vector chunks on every path (D = 77, 211 rows, 333
    columns); the rows are a block of a bigger batch, so the diagonal crosses tiles.

    Where the CPU has no AVX-512, the AVX-512 source runs through SIMDe's portable AVX-512
    intrinsics ("avx512-emulated"), so its packing, blocking and fold are checked too."""
    ops = cpu_ops()
    paths = torch.ops.selhn._cpu_simd_paths()
    assert "portable" in paths
    if "avx512" not in paths and "avx512-emulated" not in paths:
        pytest.skip(
            "the AVX-512 kernels cannot run here: the CPU has no AVX-512 and the build found "
            "no SIMDe headers (Debian package libsimde-dev) to emulate it"
        )
    batch, b, off = 333, 211, 61
    rows, cols, d, off, row_ids, col_ids = op_args(dtype, batch, 77, with_ids, off, b)
    gen = torch.Generator().manual_seed(12)
    coef_r, coef_c = torch.rand(b, generator=gen), torch.rand(batch, generator=gen)
    gates = [(torch.rand(b, generator=gen), torch.rand(batch, generator=gen)) for _ in range(2)]
    outputs = {}
    for path in paths:
        simd_path(path)
        for det in (False, True):
            stats = ops.COMPILED_BACKEND.partials(
                Block(rows, cols, d, off, row_ids, col_ids), MARGIN, deterministic=det
            )
            out = outputs.setdefault(path, [])
            out += [t for direction in stats for t in direction]
        for k, fraction in enumerate((0.1, 0.7)):
            gated_r, gated_c = (g < fraction for g in gates[k])
            for deterministic in (False, True):
                out += ops.COMPILED_BACKEND.dense_backward(
                    Block(rows, cols, d, off, row_ids, col_ids),
                    MARGIN,
                    GatedAnchors(coef_r.to(d.dtype), coef_c.to(d.dtype), gated_r, gated_c),
                    deterministic=deterministic,
                )
    for path in paths:
        for k, (x, y) in enumerate(zip(outputs[path], outputs["portable"], strict=True)):
            assert torch.equal(x, y), f"{path} output {k} differs from the portable path"
    # The outputs are right, not only equal: the chunked kernels agree.
    ref = ChunkedBackend(chunk_rows=32).partials(
        Block(rows, cols, d, off, row_ids, col_ids), MARGIN
    )
    for got, want in zip((stats[0], stats[1]), ref, strict=True):
        assert_stats_equal(got, want, 1e-5 if dtype == torch.float32 else 1e-12)
    grads = ChunkedBackend(chunk_rows=32).dense_backward(
        Block(rows, cols, d, off, row_ids, col_ids),
        MARGIN,
        GatedAnchors(coef_r.to(d.dtype), coef_c.to(d.dtype), gated_r, gated_c),
    )
    for got, want in zip(out[-2:], grads, strict=True):
        scale = want.abs().max().item()  # relative to the gradient's size (not all zero)
        assert scale > 0
        assert_close(got, want, (1e-5 if dtype == torch.float32 else 1e-12) * scale, "gradient")
    with pytest.raises(RuntimeError, match="not available"):
        simd_path("sse9")


def test_bad_inputs_raise_clear_errors():
    cpu_ops()
    rows, cols, d, off, _, _ = op_args(torch.float32, 10, 4, False)
    with pytest.raises(RuntimeError, match="must lie within"):
        torch.ops.selhn.partials(rows, cols, d, 5, None, None, MARGIN, False, False)
    with pytest.raises(RuntimeError, match="share D"):
        torch.ops.selhn.partials(rows[:, :3], cols, d, 0, None, None, MARGIN, False, False)
    with pytest.raises(RuntimeError, match="both row_ids and col_ids"):
        ids = torch.arange(10)
        torch.ops.selhn.partials(rows, cols, d, 0, ids, None, MARGIN, False, False)


def glue_weights(length, n, gen, cdt, hardest_low=-1):
    """AnchorWeights of ``length`` anchors over n candidates: gated and hard weights that
    are zero and nonzero, hardest indices with -1 (no valid negative) among them."""
    gated = torch.rand(length, generator=gen) < 0.4
    return AnchorWeights(
        upstream=torch.rand(length, generator=gen).to(cdt) + 0.5,
        hardest_index=torch.randint(hardest_low, n, (length,), generator=gen),
        dense_weight=torch.where(gated, torch.rand(length, generator=gen).to(cdt), 0),
        hard_weight=((~gated) & (torch.rand(length, generator=gen) < 0.7)).to(cdt),
        active=torch.randint(0, n, (length,), generator=gen, dtype=torch.int32),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sparse_and_diagonal_backward_matches_the_pytorch_glue(dtype):
    """The compiled sparse and diagonal backward adds the glue's terms in the glue's order,
    so it gives the same bits, with 1 thread or several; a row block of a bigger batch
    receives only the column anchors whose hardest image is one of its rows."""
    ops = cpu_ops()
    batch, b, off, dim = 300, 97, 130, 41
    rows, cols, _, off, row_ids, col_ids = op_args(dtype, batch, dim, False, off, b)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(21)
    row, col = glue_weights(b, batch, gen, cdt), glue_weights(batch, batch, gen, cdt)
    dense = (
        torch.randn(b, dim, generator=gen).to(cdt),
        torch.randn(batch, dim, generator=gen).to(cdt),
    )
    block = Block(rows, cols, torch.zeros(batch, dtype=cdt), off)
    kwargs = {"deterministic": False, "out_dtypes": (dtype, cdt)}
    want = PyTorchGlue().sparse_and_diagonal_backward(
        block, tuple(g.clone() for g in dense), row, col, **kwargs
    )
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (threads, 1):
            torch.set_num_threads(count)
            results.append(
                ops.COMPILED_BACKEND.sparse_and_diagonal_backward(
                    block, tuple(g.clone() for g in dense), row, col, **kwargs
                )
            )
    finally:
        torch.set_num_threads(threads)
    for got in results:
        for g, w, name in zip(got, want, ("grad rows", "grad cols"), strict=True):
            assert g.dtype == w.dtype, name
            assert torch.equal(g, w), f"{name}: differs from the PyTorch glue"
    assert not torch.equal(want[1], dense[1].to(want[1].dtype))  # the terms did land
    torch.library.opcheck(
        torch.ops.selhn.sparse_and_diagonal_backward.default,
        (rows, cols, off, dense[0].clone(), dense[1].clone(), *row, *col),
    )
    with pytest.raises(RuntimeError, match="compute dtype"):
        torch.ops.selhn.sparse_and_diagonal_backward(
            rows, cols, off, dense[0].to(torch.float16), dense[1], *row, *col
        )


def test_add_fully_active_equals_the_products_of_its_rank_one_weights():
    """A row block at an offset: the sums equal W @ cols and W.T @ rows with W_ij = c_i
    + e_j off each pair's positive (column offset + i), added to what was there."""
    gen = torch.Generator().manual_seed(3)
    b, n, dim, off = 5, 13, 7, 4

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    rows, cols = randn(b, dim), randn(n, dim)
    c = randn(b) * (torch.rand(b, generator=gen) < 0.6)
    e = randn(n) * (torch.rand(n, generator=gen) < 0.6)
    weights = c[:, None] + e[None, :]
    weights[torch.arange(b), off + torch.arange(b)] = 0.0
    grad_rows, grad_cols = randn(b, dim), randn(n, dim)
    want_rows, want_cols = grad_rows + weights @ cols, grad_cols + weights.T @ rows
    block = Block(rows, cols, torch.zeros(n, dtype=torch.float64), off)
    add_fully_active(block, grad_rows, grad_cols, FullyActive(c, e))
    assert_close(grad_rows, want_rows, 1e-12, "grad rows")
    assert_close(grad_cols, want_cols, 1e-12, "grad cols")


@pytest.mark.parametrize("backend", ["cpu", "chunked"])
@pytest.mark.parametrize("margin", [1.0, 3.0])
def test_fully_active_gated_anchors_skip_the_dense_pass(backend, margin):
    """Every anchor gated (eps huge); with margin 1 about 70 % of them have every hinge
    active, with margin 3 all. Those take the rank-one sums: the gradients still equal
    the fp64 reference and the deterministic mode (which keeps the dense pass), and the
    CPU dense pass recomputes only the tiles of the others (none when all are)."""
    cpu_ops()
    batch, dim = 150, 8
    gen = torch.Generator().manual_seed(7)
    img, txt = (
        torch.nn.functional.normalize(
            torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=1
        )  # fmt: skip
        for _ in range(2)
    )
    scores = img @ txt.T
    pos = scores.diag()
    full_rows = ((margin + scores - pos[:, None] > 0) | torch.eye(batch, dtype=torch.bool)).all(1)
    full_cols = ((margin + scores - pos[None, :] > 0) | torch.eye(batch, dtype=torch.bool)).all(0)
    if margin == 1.0:
        assert 0.3 < full_rows.float().mean() < 0.95 and 0.3 < full_cols.float().mean() < 0.95
    else:
        assert full_rows.all() and full_cols.all()

    def grads(fn, **kwargs):
        return loss_and_grads(fn, img, txt, "none", margin=margin, eps=1e9, **kwargs)

    torch.ops.selhn._cpu_backward_tile_count(True)
    loss, grad_img, grad_txt, stats = grads(selhn_loss, backend=backend, return_stats=True)
    tiles = torch.ops.selhn._cpu_backward_tile_count(True)
    assert stats.gated.all()
    ref = grads(selhn_loss_reference, decisions=Decisions(stats.gated, stats.hardest_index))
    det = grads(selhn_loss, backend=backend, deterministic=True)
    scale = ref[1].abs().max().item()
    for got, want, what in ((grad_img, ref[1], "img"), (grad_txt, ref[2], "txt")):
        assert_close(got, want, 1e-12 * scale, f"grad {what} vs the reference")
    assert_close(grad_img, det[1], 1e-12 * scale, "grad img vs deterministic")
    assert_close(grad_txt, det[2], 1e-12 * scale, "grad txt vs deterministic")
    if backend == "cpu":
        others_r, others_c = int((~full_rows).sum()), int((~full_cols).sum())
        assert tiles < tiles_touching_gated(batch, batch, batch, batch)[0]
        assert tiles == tiles_touching_gated(batch, batch, others_r, others_c)[0]
