"""The CUDA backend (``cuda``) against the reference, on a GPU (skipped without one).

Two-step comparison (selhn-loss.md, section 4): decisions agree with the fp64 reference
wherever its margins are clear; loss and gradients match the fp64 reference evaluated
under the kernel's own decisions. fp32 runs in IEEE fp32 (TF32 stays off unless enabled).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import require_backend

from selhn_ext import selhn_loss
from selhn_ext.chunked import ChunkedBackend
from selhn_ext.kernel_interface import Block, GatedAnchors, positive_scores
from selhn_ext.reference import Decisions, selhn_loss_reference

pytestmark = [pytest.mark.gpu, pytest.mark.backend("cuda")]

MARGIN = 0.2
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (mode, gate mix): the gate mix only matters to "selhn"; eps 0 gates nothing, a huge eps
# gates every anchor, and "half" picks eps at the median |gap| of the batch.
VARIANTS = [
    ("selhn", "none"),
    ("selhn", "half"),
    ("selhn", "all"),
    ("hardest", "half"),
    ("all", "half"),
    ("sum_hinges", "half"),
]


def make_batch(batch, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    target = min(0.9, math.sqrt(2 * math.log(batch) / dim))
    noise = math.sqrt(1 / target**2 - 1)
    img = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=1)
    txt = img + noise * torch.randn(batch, dim, generator=gen) / math.sqrt(dim)
    txt = torch.nn.functional.normalize(txt, dim=1)
    return img.to("cuda", dtype), txt.to("cuda", dtype)


def eps_for(mix, img, txt):
    if mix == "none":
        return 0.0
    if mix == "all":
        return 1e9
    _, stats = selhn_loss_reference(img.double(), txt.double())
    return stats["gap"].abs().median().item()


def run(img, txt, mode, eps, deterministic=False, backend="cuda"):
    x = img.detach().clone().requires_grad_(True)
    y = txt.detach().clone().requires_grad_(True)
    loss, stats = selhn_loss(
        x, y, margin=MARGIN, eps=eps, mode=mode, reduction="none", backend=backend,
        deterministic=deterministic, return_stats=True,
    )  # fmt: skip
    weights = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).reshape(loss.shape)
    (loss * weights.to(loss.dtype)).sum().backward()
    return loss.detach(), x.grad, y.grad, stats


def reference(img, txt, mode, eps, decisions=None):
    x = img.double().requires_grad_(True)
    y = txt.double().requires_grad_(True)
    loss, stats = selhn_loss_reference(
        x, y, margin=MARGIN, eps=eps, mode=mode, reduction="none", decisions=decisions
    )
    weights = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device, dtype=loss.dtype)
    (loss * weights.reshape(loss.shape)).sum().backward()
    return loss.detach(), x.grad, y.grad, stats


def check_relative(actual, expected, rel, what):
    scale = expected.abs().max().item() + 1e-12
    err = (actual.double() - expected).abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel:g} * {scale:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,dim", [(129, 96), (129, 1024), (1000, 96), (1000, 1024),
                                       (4096, 96), (4096, 1024)])  # fmt: skip
@pytest.mark.parametrize("mode,mix", VARIANTS)
def test_cuda_matches_reference_two_step(dtype, batch, dim, mode, mix):
    require_backend("cuda", "cuda", dtype)
    img, txt = make_batch(batch, dim, dtype, seed=batch + dim)
    eps = eps_for(mix, img, txt)
    loss, grad_img, grad_txt, stats = run(img, txt, mode, eps)
    assert loss.dtype == torch.float32 and grad_img.dtype == dtype

    # Step 1: decisions agree wherever the fp64 reference's margins are clear.
    _, _, _, ref_stats = reference(img, txt, mode, eps)
    x, y = img.double(), txt.double()
    s = x @ y.T
    off = ~torch.eye(batch, dtype=torch.bool, device=s.device)
    tol = 1e-4
    for k, scores in enumerate((s, s.T)):
        top2 = scores.masked_fill(~off, float("-inf")).topk(2, dim=1).values
        clear_index = (top2[:, 0] - top2[:, 1]) > tol
        gap = ref_stats["gap"][k]
        clear_gate = (gap.abs() - eps).abs() > tol
        assert torch.equal(
            stats.hardest_index[k][clear_index], ref_stats["hardest_index"][k][clear_index]
        )
        assert torch.equal(stats.gated[k][clear_gate], ref_stats["gated"][k][clear_gate])
    if mode == "selhn":
        fraction = stats.gated.float().mean().item()
        expected = {"none": (0.0, 0.0), "half": (0.2, 0.8), "all": (1.0, 1.0)}[mix]
        assert expected[0] <= fraction <= expected[1]

    # Step 2: values under the kernel's own decisions.
    decisions = Decisions(stats.gated, stats.hardest_index)
    ref_loss, ref_gi, ref_gt, _ = reference(img, txt, mode, eps, decisions)
    check_relative(loss, ref_loss, 1e-5, "loss")
    grad_rel = 2e-4 if dtype == torch.float32 else 2e-2
    check_relative(grad_img, ref_gi, grad_rel, "grad img")
    check_relative(grad_txt, ref_gt, grad_rel, "grad txt")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_deterministic_repeat_is_bitwise_identical(dtype):
    require_backend("cuda", "cuda", dtype)
    img, txt = make_batch(1000, 96, dtype, seed=7)
    eps = eps_for("half", img, txt)
    first = run(img, txt, "selhn", eps, deterministic=True)
    second = run(img, txt, "selhn", eps, deterministic=True)
    for a, b in zip(first[:3], second[:3], strict=True):
        assert torch.equal(a, b)
    default = run(img, txt, "selhn", eps, deterministic=False)
    assert torch.equal(first[3].gated, default[3].gated)
    assert torch.equal(first[3].hardest_index, default[3].hardest_index)
    check_relative(default[0], first[0].double(), 1e-5, "default vs deterministic loss")


@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_row_block_matches_chunked(deterministic):
    require_backend("cuda", "cuda", torch.float32)
    from selhn_ext import _cpp

    img, txt = make_batch(700, 64, torch.float32, seed=3)
    ids = torch.randint(0, 350, (700,), device="cuda")
    off, b = 130, 197
    rows, row_ids = img[off : off + b], ids[off : off + b]
    d = positive_scores(img, txt)
    args = (Block(rows, txt, d, off, row_ids, ids), MARGIN)
    got = _cpp.COMPILED_BACKEND.partials(*args, deterministic=deterministic)
    ref = ChunkedBackend().partials(*args)
    for a, c in zip(got, ref, strict=True):
        assert torch.equal(a.arg, c.arg) and torch.equal(a.active, c.active)
        check_relative(a.max, c.max.double(), 1e-6, "max")
        check_relative(a.hinge_sum, c.hinge_sum.double(), 1e-5, "hinge sum")
    gen = torch.Generator(device="cuda").manual_seed(1)
    coef_r = torch.rand(b, device="cuda", generator=gen)
    coef_c = torch.rand(700, device="cuda", generator=gen)
    gated_r = torch.rand(b, device="cuda", generator=gen) < 0.3
    gated_c = torch.rand(700, device="cuda", generator=gen) < 0.3
    full = (*args, GatedAnchors(coef_r, coef_c, gated_r, gated_c))
    g_rows, g_cols = _cpp.COMPILED_BACKEND.dense_backward(*full, deterministic=deterministic)
    r_rows, r_cols = ChunkedBackend().dense_backward(*full)
    check_relative(g_rows, r_rows.double(), 1e-4, "grad rows")
    check_relative(g_cols, r_cols.double(), 1e-4, "grad cols")


def test_cuda_nan_propagates():
    require_backend("cuda", "cuda", torch.float32)
    from selhn_ext import _cpp

    img, txt = make_batch(130, 32, torch.float32, seed=2)
    img[3, 0] = float("nan")
    d = positive_scores(img, txt)
    rows, cols = _cpp.COMPILED_BACKEND.partials(Block(img, txt, d), MARGIN)
    assert torch.isnan(rows.max[3]) and rows.arg[3] == 0
    others = torch.arange(130, device="cuda") != 3
    assert torch.isnan(cols.max[others]).all() and (cols.arg[others] == 3).all()
    assert torch.isnan(selhn_loss(img, txt, backend="cuda"))
