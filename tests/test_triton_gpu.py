"""The compiled Triton kernels on a GPU against the reference, for a handful of
specializations (each compile costs seconds): the tensor-descriptor and pointer loads,
16-bit and TF32 products, ids, determinism, a row offset, interior and masked tiles
(B = 1000 spans 8 x 8 tiles of 128), the exact fix-up, and the backward's recompute of
the forward's active set. Skipped without a CUDA device (bench/gpu_check.sh runs them).
"""

from __future__ import annotations

import pytest
import torch
from test_triton import (
    MARGIN,
    check_against_reference,
    clear_decisions,
    make_batch,
    make_ids,
    triton_backend,
)

from selhn_ext.chunked import ChunkedBackend
from selhn_ext.kernel_interface import Block, GatedAnchors, positive_scores

pytestmark = [pytest.mark.gpu, pytest.mark.backend("triton")]

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize(
    ("dtype", "layout", "with_ids", "deterministic"),
    [
        (BF16, "contiguous", False, False),  # the headline: descriptors, interior tiles
        (F16, "contiguous", True, False),
        (BF16, "strided", False, True),  # pointer loads
        (F32, "contiguous", False, False),  # fp32 FMA product, pointer loads
    ],
)
def test_partials_match_chunked_on_gpu(dtype, layout, with_ids, deterministic):
    img, txt = make_batch(1000, 256, dtype, "half", 31, layout)
    rows, cols = img.detach()[70:900], txt.detach()
    ids = make_ids(1000, 31) if with_ids else None
    row_ids = ids[70:900] if with_ids else None
    d = positive_scores(img.detach(), txt.detach())
    block = Block(rows, cols, d, 70, row_ids, ids)
    got = triton_backend().partials(block, MARGIN, deterministic=deterministic)
    want = ChunkedBackend().partials(block, MARGIN)
    expected = clear_decisions(rows, cols, d, 70, row_ids, ids, MARGIN)
    for g, w, (arg, clear_arg, active, clear_active) in zip(got, want, expected, strict=True):
        torch.testing.assert_close(g.max, w.max, rtol=0, atol=1e-5)
        torch.testing.assert_close(g.hinge_sum, w.hinge_sum, rtol=1e-5, atol=1e-3)
        assert torch.equal(g.arg.cpu()[clear_arg], arg[clear_arg])
        assert torch.equal(g.active.cpu().long()[clear_active], active[clear_active])
        assert clear_arg.float().mean() > 0.4


def test_tf32_partials_on_gpu():
    """TF32 products (descriptor loads): decisions clear at TF32 rounding agree."""
    img, txt = make_batch(1000, 256, F32, "spread", 37)
    rows, cols = img.detach(), txt.detach()
    d = positive_scores(rows, cols)
    got = triton_backend().partials(Block(rows, cols, d), MARGIN, allow_tf32=True)
    s = rows.double() @ cols.double().T
    s.fill_diagonal_(float("-inf"))
    top = s.topk(2, dim=1)
    clear = top.values[:, 0] - top.values[:, 1] > 1e-2
    assert torch.equal(got[0].arg[clear], top.indices[clear, 0])
    torch.testing.assert_close(got[0].max.double(), top.values[:, 0], rtol=0, atol=5e-3)


@pytest.mark.parametrize(
    ("dtype", "with_ids", "kind"), [(BF16, False, "half"), (F16, True, "collapsed")]
)
def test_loss_and_gradients_match_reference_on_gpu(dtype, with_ids, kind):
    img, txt = make_batch(1000, 256, dtype, kind, 41)
    ids = make_ids(1000, 41) if with_ids else None
    stats = check_against_reference(img, txt, ids, "selhn", "mean", False, 41)
    assert stats.gated.any()


def test_backward_recomputes_the_forward_active_set_on_gpu():
    """The forward (descriptor loads, persistent grid) and the backward's recompute
    (pointer loads, gathered rows) produce the same S bits: with coefficient 1 and a
    constant-1 column, each gated anchor's recomputed activity is its forward count."""
    # fp16 gradients hold the counts (below 1000) exactly; bf16 would round them.
    img, txt = make_batch(1000, 256, F16, "half", 43)
    rows, cols = img.detach().clone(), txt.detach().clone()
    cols[:, 0] = 1.0
    rows[:, 1] = 1.0
    d = positive_scores(rows, cols)
    row, col = triton_backend().partials(Block(rows, cols, d), MARGIN)
    ones = torch.ones(1000, device="cuda")
    yes = torch.ones(1000, dtype=torch.bool, device="cuda")
    no = torch.zeros_like(yes)
    backend = triton_backend()
    grad_rows, _ = backend.dense_backward(
        Block(rows, cols, d), MARGIN, GatedAnchors(ones, ones, yes, no)
    )
    _, grad_cols = backend.dense_backward(
        Block(rows, cols, d), MARGIN, GatedAnchors(ones, ones, no, yes)
    )
    assert torch.equal(grad_rows[:, 0].float(), row.active.float())
    assert torch.equal(grad_cols[:, 1].float(), col.active.float())


@pytest.mark.parametrize("case", ["sentinel", "infinite", "d_minus_inf", "margin_inf"])
def test_exact_fixup_on_gpu(case):
    from test_triton import test_exact_fixup_for_infinite_and_extreme_values

    test_exact_fixup_for_infinite_and_extreme_values(case)
