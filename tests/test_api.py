"""The public contract: exact hand-computed cases on every CPU backend, dtypes, NaN,
validation errors, dispatch precedence, drop-in recipes, torch.compile and opcheck."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import assert_relative_close, require_backend

import selhn_ext
from selhn_ext import SelHNLoss, selhn_loss
from selhn_ext.reference import Decisions, selhn_loss_reference

CPU_BACKENDS = ["reference", "chunked", "cpu", "triton"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


# Every (backend, dtype) pair the backend supports by design: the GPU-only fused backends
# decline fp64 (selhn-loss.md §4), which is not a missing build, so that pair is not a case.
BACKEND_DTYPES = [
    (backend, dtype)
    for backend in CPU_BACKENDS
    for dtype in DTYPES
    if not (backend == "triton" and dtype == torch.float64)
]


def runnable(backend, dtype):
    """Skip (or fail under SELHN_REQUIRE) when the backend cannot run here."""
    require_backend(backend, "cpu", dtype)


def exact_batch(s, dtype):
    """img = I and txt = S.T, so img @ txt.T == S exactly in every dtype."""
    batch = s.shape[0]
    img = torch.eye(batch, dtype=dtype)
    txt = s.T.contiguous().to(dtype)
    assert torch.equal(txt.to(torch.float64).T, s.to(torch.float64)), "S must be representable"
    return img, txt


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_gap_exactly_at_eps_is_not_gated(backend, dtype):
    runnable(backend, dtype)
    eps = float(torch.tensor(0.01, dtype=dtype))  # exactly representable in the input dtype
    batch = 5
    s = torch.diag(torch.full((batch,), eps, dtype=torch.float64))
    img, txt = exact_batch(s, dtype)
    _, stats = selhn_loss(img, txt, eps=eps, backend=backend, return_stats=True)
    assert not stats.gated.any()
    assert not stats.near_tie.any()
    assert torch.equal(stats.gap.double(), torch.full((2, batch), eps, dtype=torch.float64))
    # Half the gap is within eps: every anchor is gated.
    s_below = torch.full((batch, batch), eps / 2, dtype=torch.float64)
    s_below.fill_diagonal_(eps)
    img, txt = exact_batch(s_below, dtype)
    _, stats = selhn_loss(img, txt, eps=eps, backend=backend, return_stats=True)
    assert stats.gated.all()


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_exact_tie_goes_to_the_smallest_index(backend, dtype):
    runnable(backend, dtype)
    batch = 6
    s = torch.zeros(batch, batch, dtype=torch.float64)
    s.fill_diagonal_(0.5)
    s[2, 4] = s[2, 1] = 0.375  # image anchor 2: two hardest captions, 1 and 4
    s[5, 3] = s[0, 3] = 0.4375  # caption anchor 3: two hardest images, 0 and 5
    img, txt = exact_batch(s, dtype)
    img.requires_grad_()
    txt.requires_grad_()
    loss, stats = selhn_loss(
        img, txt, mode="hardest", reduction="none", backend=backend, return_stats=True
    )
    assert int(stats.hardest_index[0, 2]) == 1
    assert int(stats.hardest_index[1, 3]) == 0
    up = torch.zeros(2, batch)
    up[0, 2] = 1.0  # only image anchor 2's loss
    up[1, 3] = 1.0  # and caption anchor 3's
    (loss * up).sum().backward()
    # img = I, so dL/dtxt[j, i] = G[i, j] and dL/dimg[i, j] = (G @ txt)[i, j].
    g_txt = txt.grad.to(torch.float64)
    assert float(g_txt[1, 2]) == 1.0 and float(g_txt[4, 2]) == 0.0  # routed to caption 1
    assert float(g_txt[3, 0]) == 1.0 and float(g_txt[3, 5]) == 0.0  # routed to image 0


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_no_active_hinge_gives_zero_loss_and_gradient(backend, dtype):
    runnable(backend, dtype)
    s = torch.eye(4, dtype=torch.float64)  # positives 1, negatives 0: margin 0.2 never met
    img, txt = exact_batch(s, dtype)
    img.requires_grad_()
    txt.requires_grad_()
    for mode in ["selhn", "hardest", "all", "sum_hinges"]:
        loss = selhn_loss(img, txt, mode=mode, backend=backend)
        (g_img, g_txt) = torch.autograd.grad(loss, (img, txt))
        assert float(loss) == 0.0
        assert not g_img.any() and not g_txt.any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_anchor_without_negatives_contributes_nothing(backend):
    dtype = torch.float32
    runnable(backend, dtype)
    g = torch.Generator().manual_seed(0)
    img = torch.randn(5, 3, generator=g)
    txt = torch.randn(5, 3, generator=g)
    ids = torch.tensor([7, 7, 7, 2, 2])  # anchors 0-2 share one id; 3-4 another
    ids_all_same = torch.full((5,), 3)
    for mode in ["selhn", "hardest", "all", "sum_hinges"]:
        loss, stats = selhn_loss(
            img, txt, ids=ids_all_same, mode=mode, reduction="none", backend=backend,
            return_stats=True,
        )  # fmt: skip
        assert torch.equal(loss, torch.zeros(2, 5))
        assert (stats.hardest_index == -1).all()
        assert torch.isnan(stats.gap).all()
        assert not stats.gated.any()
        loss, stats = selhn_loss(
            img, txt, ids=ids, mode=mode, reduction="none", backend=backend, return_stats=True
        )
        assert not torch.isin(stats.hardest_index[0, :3], torch.tensor([0, 1, 2])).any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_16bit_inputs_compute_in_float32(backend, dtype):
    runnable(backend, dtype)
    img, txt = _unit_pairs(1, batch=24, dim=8, collapse=0.9)
    img, txt = img.to(dtype).requires_grad_(), txt.to(dtype).requires_grad_()
    x64, y64 = img.detach().double(), txt.detach().double()  # exactly the inputs
    _, probe = selhn_loss_reference(x64, y64)
    gaps = probe["gap"].abs().flatten().sort().values
    eps = float(gaps[23] + gaps[24]) / 2  # half the anchors gated
    loss, stats = selhn_loss(img, txt, eps=eps, backend=backend, return_stats=True)
    loss.backward()
    assert loss.dtype == torch.float32 and stats.gap.dtype == torch.float32
    assert img.grad.dtype == dtype and txt.grad.dtype == dtype
    assert stats.gated.any() and not stats.gated.all()  # both branches of the gate
    # Two-step (§4): decisions where fp64 is clear of a flip, then the spec on the upcast
    # values under the backend's decisions, relative to the answer's size.
    _, ref_stats = selhn_loss_reference(x64, y64, eps=eps)
    clear_gate = (probe["gap"].abs() - eps).abs() > 1e-4
    assert torch.equal(stats.gated[clear_gate], ref_stats["gated"][clear_gate])
    s = x64 @ y64.T
    off = ~torch.eye(len(s), dtype=torch.bool)
    top2 = torch.stack([m.masked_fill(~off, -2).topk(2, dim=1).values for m in (s, s.T)])
    clear_index = top2[..., 0] - top2[..., 1] > 1e-4
    assert torch.equal(stats.hardest_index[clear_index], ref_stats["hardest_index"][clear_index])
    ref_x, ref_y = x64.clone().requires_grad_(), y64.clone().requires_grad_()
    decisions = Decisions(stats.gated, stats.hardest_index)
    ref, _ = selhn_loss_reference(ref_x, ref_y, eps=eps, decisions=decisions)
    ref.backward()
    assert_relative_close(loss, ref, 1e-5, "loss")
    # Gradient entries come back rounded to the input dtype: half an ulp of each entry
    # (2^-8 relative in bf16, 2^-11 in fp16), so 2^-7 and 2^-10 of the largest entry bound
    # them; fp32 keeps the fp32 compute's error.
    rel = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    assert_relative_close(img.grad, ref_x.grad, rel, "img.grad")
    assert_relative_close(txt.grad, ref_y.grad, rel, "txt.grad")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_never_give_a_finite_loss(backend, bad):
    runnable(backend, torch.float32)
    g = torch.Generator().manual_seed(2)
    for where in [(0, 0), (3, 2), (6, 4)]:
        for target in ("img", "txt"):
            img = torch.randn(7, 5, generator=g)
            txt = torch.randn(7, 5, generator=g)
            (img if target == "img" else txt)[where] = bad
            for mode in ["selhn", "hardest", "all"]:
                loss = selhn_loss(img, txt, mode=mode, backend=backend)
                assert not torch.isfinite(loss), (where, target, mode)


def test_stats_shapes_and_dtypes():
    img, txt = torch.randn(6, 4), torch.randn(6, 4)
    loss, stats = selhn_loss(img, txt, return_stats=True, reduction="none")
    assert loss.shape == (2, 6)
    assert stats.gated.shape == (2, 6) and stats.gated.dtype == torch.bool
    assert stats.near_tie.dtype == torch.bool
    assert stats.gated_fraction.shape == (2,) and stats.gated_fraction.dtype == torch.float32
    assert stats.hardest_index.dtype == torch.int64
    assert stats.gap.dtype == torch.float32
    torch.testing.assert_close(stats.gated_fraction, stats.gated.float().mean(dim=1))
    assert selhn_loss(img, txt, reduction="sum").shape == ()
    assert selhn_loss(img.double(), txt.double()).dtype == torch.float64


def test_near_tie_is_reported_in_hardest_mode():
    s = torch.full((4, 4), 0.5, dtype=torch.float64)
    s.fill_diagonal_(0.5 + 2**-8)
    img, txt = exact_batch(s, torch.float64)
    _, stats = selhn_loss(img, txt, mode="hardest", return_stats=True)
    assert stats.near_tie.all() and not stats.gated.any()


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(4)
    base_img = torch.randn(10, 12, generator=g, dtype=torch.float64)
    base_txt = torch.randn(12, 10, generator=g, dtype=torch.float64)
    img, txt = base_img[:, ::2], base_txt.T[:, 1::2]
    assert not img.is_contiguous() and not txt.is_contiguous()
    for backend in ["reference", "chunked"]:
        got = selhn_loss(img, txt, backend=backend, eps=0.1)
        expected = selhn_loss(img.contiguous(), txt.contiguous(), backend="reference", eps=0.1)
        assert_relative_close(got, expected, 1e-12, backend)


# ----------------------------------------------------------------------------- errors

GOOD = torch.randn(4, 3)


@pytest.mark.parametrize(
    "args,kwargs,error,message",
    [
        ((torch.randn(4), torch.randn(4)), {}, ValueError, "must be 2-D"),
        ((torch.randn(4, 3, 1), GOOD), {}, ValueError, "must be 2-D"),
        ((GOOD, torch.randn(4, 2)), {}, ValueError, "same shape"),
        ((GOOD, torch.randn(5, 3)), {}, ValueError, "same shape"),
        ((torch.randn(1, 3), torch.randn(1, 3)), {}, ValueError, "B >= 2"),
        ((torch.randn(4, 0), torch.randn(4, 0)), {}, ValueError, "D = 0"),
        ((torch.ones(4, 3, dtype=torch.int64), GOOD), {}, TypeError, "float16, bfloat16"),
        ((torch.ones(4, 3, dtype=torch.complex64), GOOD), {}, TypeError, "got torch.complex64"),
        ((torch.ones(4, 3, dtype=torch.bool), GOOD), {}, TypeError, "got torch.bool"),
        ((GOOD, GOOD.double()), {}, TypeError, "share a dtype"),
        ((GOOD, GOOD.to("meta")), {}, ValueError, "one device"),
        (([[1.0]], GOOD), {}, TypeError, "torch.Tensor"),
        ((GOOD, GOOD), {"ids": torch.zeros(4, dtype=torch.bool)}, TypeError, "int32 or int64"),
        ((GOOD, GOOD), {"ids": torch.zeros(4)}, TypeError, "int32 or int64"),
        ((GOOD, GOOD), {"ids": torch.zeros(3, dtype=torch.int64)}, ValueError, r"shape \(B,\)"),
        ((GOOD, GOOD), {"ids": [0, 1, 2, 3]}, TypeError, "ids must be a torch.Tensor"),
        (
            (GOOD, GOOD),
            {"ids": torch.zeros(4, dtype=torch.int64, device="meta")},
            ValueError,
            "inputs' device",
        ),  # fmt: skip
        ((GOOD, GOOD), {"mode": "max"}, ValueError, "unknown mode 'max'"),
        ((GOOD, GOOD), {"reduction": "avg"}, ValueError, "unknown reduction 'avg'"),
        ((GOOD, GOOD), {"backend": "gpu"}, ValueError, "unknown backend 'gpu'"),
        ((GOOD, GOOD), {"margin": -0.1}, ValueError, "margin must be a finite number >= 0"),
        ((GOOD, GOOD), {"eps": -1e-3}, ValueError, "eps must be a finite number >= 0"),
        ((GOOD, GOOD), {"eps": float("nan")}, ValueError, "eps must be a finite number"),
        ((GOOD, GOOD), {"margin": "0.2"}, TypeError, "margin must be a number"),
        ((GOOD, GOOD), {"margin": True}, TypeError, "margin must be a number"),
        ((GOOD, GOOD), {"deterministic": "no"}, TypeError, "deterministic must be True, False"),
        ((GOOD, GOOD), {"deterministic": 0}, TypeError, "deterministic must be True, False"),
        ((GOOD, GOOD), {"return_stats": "yes"}, TypeError, "return_stats must be True or"),
    ],
)
def test_bad_input_gives_a_clear_error(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        selhn_loss(*args, **kwargs)


def test_module_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match="unknown mode"):
        SelHNLoss(mode="vse")
    with pytest.raises(ValueError, match="margin"):
        SelHNLoss(margin=-1.0)
    with pytest.raises(TypeError, match="deterministic"):
        SelHNLoss(deterministic="no")


def test_numpy_scalars_are_numbers():
    """margin and eps accept NumPy scalars (as read from a config or an array), and give
    the loss of the same Python float."""
    g = torch.Generator().manual_seed(11)
    img, txt = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    for margin, eps in ((np.float32(0.2), np.float64(0.05)), (np.int64(1), np.float16(0.5))):
        got = selhn_loss(img, txt, margin=margin, eps=eps, backend="chunked")
        want = selhn_loss(img, txt, margin=float(margin), eps=float(eps), backend="chunked")
        assert torch.equal(got, want)
        assert SelHNLoss(margin=margin, eps=eps, backend="chunked")(img, txt).item() == want.item()


def test_named_backend_that_cannot_run_raises_every_reason():
    with pytest.raises(selhn_ext.BackendUnavailableError) as info:
        selhn_loss(GOOD.double(), GOOD.double(), backend="cuda")
    text = str(info.value)
    assert "does not run on cpu tensors" in text and "does not take float64" in text


def test_backend_status_reports_reasons():
    status = selhn_ext.backend_status(GOOD, GOOD)
    assert set(status) == {"reference", "chunked", "cpu", "triton", "cuda"}
    assert status["reference"] is None and status["chunked"] is None
    assert "does not run on cpu tensors" in status["cuda"]
    status64 = selhn_ext.backend_status(GOOD.double(), GOOD.double())
    assert "does not take float64" in status64["triton"]
    with pytest.raises(TypeError, match="unknown option"):
        selhn_ext.backend_status(GOOD, GOOD, margn=0.1)


def _run_python(code: str, env_update: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SELHN_BACKEND", "TRITON_INTERPRET")}
    env.update(env_update)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_environment_override_precedence():
    code = (
        "import torch, selhn_ext; from selhn_ext import dispatch;"
        "print(dispatch.choose_backend('auto', 'cpu', torch.float32),"
        " dispatch.choose_backend('chunked', 'cpu', torch.float32))"
    )
    done = _run_python(code, {"SELHN_BACKEND": "reference"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["reference", "chunked"]
    done = _run_python(code, {"SELHN_BACKEND": "triton"})
    assert done.returncode != 0 and "TRITON_INTERPRET=1" in done.stderr
    done = _run_python(code, {"SELHN_BACKEND": "bogus"})
    assert done.returncode != 0 and "SELHN_BACKEND='bogus' is not a backend" in done.stderr


def test_auto_order_on_cpu_never_picks_triton():
    from selhn_ext import dispatch

    chosen = dispatch.choose_backend("auto", "cpu", torch.float32)
    assert chosen in ("cpu", "chunked")
    assert chosen == ("cpu" if not dispatch.unsupported_reasons("cpu", "cpu", torch.float32)
                      else "chunked")  # fmt: skip
    assert "triton" not in dispatch.AUTO_ORDER["cpu"]
    assert dispatch.AUTO_ORDER["cuda"][0] == "triton"


def test_deterministic_none_follows_the_global_flag(monkeypatch):
    from selhn_ext import dispatch
    from selhn_ext.chunked import ChunkedBackend

    seen = []

    class Recording(ChunkedBackend):
        def partials(self, *args, deterministic=False, **kwargs):
            seen.append(deterministic)
            return super().partials(*args, deterministic=deterministic, **kwargs)

    monkeypatch.setitem(dispatch._LOADED, "chunked", Recording())
    selhn_loss(GOOD, GOOD, backend="chunked")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        selhn_loss(GOOD, GOOD, backend="chunked")
        selhn_loss(GOOD, GOOD, backend="chunked", deterministic=False)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert seen == [False, True, False]


def test_autocast_takes_the_autocast_dtype():
    g = torch.Generator().manual_seed(5)
    img, txt = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = selhn_loss(img, txt, backend="chunked")
    outside = selhn_loss(img.bfloat16(), txt.bfloat16(), backend="chunked")
    assert torch.equal(inside, outside)


# ------------------------------------------------------------------ drop-in recipes


def vsepp_contrastive_loss_max_violation(im, s, margin=0.2):
    """VSE++'s ContrastiveLoss(max_violation=True), written from its definition."""
    scores = im @ s.T
    diagonal = scores.diag().view(-1, 1)
    cost_s = (margin + scores - diagonal).clamp(min=0)  # image anchors, caption negatives
    cost_im = (margin + scores - diagonal.T).clamp(min=0)  # caption anchors, image negatives
    eye = torch.eye(scores.shape[0], dtype=torch.bool)
    cost_s = cost_s.masked_fill(eye, 0)
    cost_im = cost_im.masked_fill(eye, 0)
    return cost_s.max(1)[0].sum() + cost_im.max(0)[0].sum()


def vse0_sum_of_hinges(im, s, margin=0.2):
    scores = im @ s.T
    diagonal = scores.diag().view(-1, 1)
    eye = torch.eye(scores.shape[0], dtype=torch.bool)
    cost_s = (margin + scores - diagonal).clamp(min=0).masked_fill(eye, 0)
    cost_im = (margin + scores - diagonal.T).clamp(min=0).masked_fill(eye, 0)
    return cost_s.sum() + cost_im.sum()


def authors_triplet_selhn_loss(im, s, margin=0.2, eps=0.01):
    """The SelHN paper's loss: per anchor, the hardest hinge unless the positive is within
    eps of the hardest negative, then the mean hinge over negatives; averaged over 2B."""
    scores = im @ s.T
    batch = scores.shape[0]
    d = scores.diag()
    eye = torch.eye(batch, dtype=torch.bool)
    total = 0
    for sc in (scores, scores.T):
        hinges = (margin + sc - d.view(-1, 1)).clamp(min=0).masked_fill(eye, 0)
        masked = sc.detach().masked_fill(eye, -1)  # cosine scores: -1 is below every negative
        hardest, index = masked.max(1)
        hard = (margin + sc.gather(1, index.view(-1, 1)).squeeze(1) - d).clamp(min=0)
        gate = (d.detach() - hardest).abs() < eps
        total = total + torch.where(gate, hinges.sum(1) / (batch - 1), hard).sum()
    return total / (2 * batch)


def _unit_pairs(seed, batch=16, dim=8, collapse=0.0):
    """Unit pairs; with ``collapse`` near 1 every vector sits near one direction, so gaps
    fall within eps and the gate fires (as early in training)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(dim, generator=g, dtype=torch.float64)
    spread = 1.0 - collapse
    img = torch.randn(batch, dim, generator=g, dtype=torch.float64) * spread + common
    txt = torch.randn(batch, dim, generator=g, dtype=torch.float64) * spread + common
    return (torch.nn.functional.normalize(img, dim=1), torch.nn.functional.normalize(txt, dim=1))


@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu"])
@pytest.mark.parametrize("seed", [0, 1])
def test_recipes_match_the_published_losses(backend, seed):
    require_backend(backend, "cpu", torch.float64)
    for collapse in (0.0, 0.97):
        img, txt = _unit_pairs(seed, collapse=collapse)
        pairs = [
            (SelHNLoss(mode="hardest", reduction="sum", backend=backend),
             vsepp_contrastive_loss_max_violation),
            (SelHNLoss(backend=backend), authors_triplet_selhn_loss),
            (SelHNLoss(mode="sum_hinges", reduction="sum", backend=backend), vse0_sum_of_hinges),
        ]  # fmt: skip
        for ours, theirs in pairs:
            a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
            ra, rb = img.clone().requires_grad_(), txt.clone().requires_grad_()
            got, expected = ours(a, b), theirs(ra, rb)
            assert_relative_close(got, expected, 1e-10, f"{theirs.__name__} loss")
            got.backward()
            expected.backward()
            assert_relative_close(a.grad, ra.grad, 1e-10, f"{theirs.__name__} img.grad")
            assert_relative_close(b.grad, rb.grad, 1e-10, f"{theirs.__name__} txt.grad")
        if collapse:
            _, stats = SelHNLoss(backend=backend, return_stats=True)(img, txt)
            assert stats.gated.any()  # the gate really was exercised


# ------------------------------------------------------------- compile and opcheck


def test_torch_compile_fullgraph():
    def step(a, b):
        loss, stats = selhn_loss(a, b, backend="chunked", return_stats=True)
        return loss * 2, stats.gated_fraction

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    img, txt = _unit_pairs(3, batch=8, dim=4, collapse=0.8)
    img, txt = img.float().requires_grad_(), txt.float().requires_grad_()
    loss, fraction = compiled(img, txt)
    loss.backward()
    eager_img, eager_txt = (
        img.detach().clone().requires_grad_(),
        txt.detach().clone().requires_grad_(),
    )
    expected, expected_fraction = step(eager_img, eager_txt)
    expected.backward()
    assert_relative_close(loss, expected, 1e-6, "loss")
    assert torch.equal(fraction, expected_fraction)
    assert_relative_close(img.grad, eager_img.grad, 1e-6, "img.grad")
    assert_relative_close(txt.grad, eager_txt.grad, 1e-6, "txt.grad")


@pytest.mark.parametrize("with_ids", [False, True])
def test_opcheck_chunked(with_ids):
    img, txt = _unit_pairs(4, batch=7, dim=5, collapse=0.7)
    ids = torch.tensor([0, 1, 1, 2, 3, 4, 5]) if with_ids else None
    args = (img.requires_grad_(), txt.requires_grad_(), ids, 0.2, 0.05, "selhn", "chunked",
            False, False)  # fmt: skip
    torch.library.opcheck(torch.ops.selhn_ext.loss_forward.default, args)
