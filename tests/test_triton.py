"""Backend ``triton``: fused Triton kernels, checked against the reference spec.

On a machine without a GPU these run through the Triton interpreter (conftest sets
TRITON_INTERPRET=1); with a GPU the same tests run the compiled kernels on CUDA tensors.
Loss and gradients follow the two-step method of the design notes (section 4): decisions
must agree with the fp64 reference wherever its margins are clear, and the loss and
gradients must equal the fp64 reference evaluated under the backend's own decisions.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import require_backend

import selhn_ext
from selhn_ext import dispatch
from selhn_ext.chunked import ChunkedBackend
from selhn_ext.kernel_interface import Block, GatedAnchors, positive_scores
from selhn_ext.reference import Decisions, selhn_loss_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MARGIN, EPS = 0.2, 0.01
# Decisions whose fp64 margin exceeds this must agree (S is computed in fp32 here).
CLEAR = 1e-4
# Gradient tolerance relative to the largest reference entry (outputs are in the input
# dtype, so 16-bit gradients carry their own rounding).
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}

pytestmark = pytest.mark.backend("triton")


def _kernels():
    require_backend("triton", DEVICE, torch.float32)
    from selhn_ext import _triton

    return _triton


def triton_backend():
    """The Triton backend object of the variant in use."""
    _kernels()
    return dispatch.backend("triton")


@contextlib.contextmanager
def reversed_blocks():
    triton_mod = _kernels()
    triton_mod.testing.reverse_block_order = True
    try:
        yield
    finally:
        triton_mod.testing.reverse_block_order = False


@contextlib.contextmanager
def tile_counter():
    triton_mod = _kernels()
    counter = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    triton_mod.testing.tile_counter = counter
    try:
        yield counter
    finally:
        triton_mod.testing.tile_counter = None


@contextlib.contextmanager
def panels(size):
    """The backward's P (gated anchors per panel), so that small batches span several."""
    triton_mod = _kernels()
    triton_mod.testing.panel_size = size
    try:
        yield
    finally:
        triton_mod.testing.panel_size = None


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1)


def make_batch(batch, dim, dtype, kind, seed, layout="contiguous"):
    """(img, txt) leaves on DEVICE.

    kind: ``"spread"`` (clear positives, gaps well above eps: no anchor gated),
    ``"half"`` (the first half near-collapsed onto one direction, so gated; the rest
    spread) or ``"collapsed"`` (every embedding near one direction: all gated).
    layout: ``"contiguous"``, ``"strided"`` (every other column of a wider tensor) or
    ``"colmajor"`` (transposed storage).
    """
    gen = torch.Generator().manual_seed(seed)
    img = _unit(torch.randn(batch, dim, generator=gen, dtype=torch.float64))
    noise = _unit(torch.randn(batch, dim, generator=gen, dtype=torch.float64))
    txt = _unit(0.75 * img + 0.66 * noise)
    if kind in ("half", "collapsed"):
        count = batch if kind == "collapsed" else batch // 2
        center = _unit(torch.randn(1, dim, generator=gen, dtype=torch.float64))
        jitter = torch.randn(2, count, dim, generator=gen, dtype=torch.float64)
        img[:count] = _unit(center + 2e-3 * jitter[0])
        txt[:count] = _unit(center + 2e-3 * jitter[1])
    out = []
    for t in (img, txt):
        t = t.to(dtype)
        if layout == "strided":
            wide = torch.zeros(batch, 2 * dim, dtype=dtype)
            wide[:, ::2] = t
            t = wide[:, ::2]
        elif layout == "colmajor":
            t = t.T.contiguous().T
        t = t.to(DEVICE).detach().requires_grad_()
        out.append(t)
    if layout != "contiguous":
        assert not out[0].is_contiguous()
    return out[0], out[1]


def make_ids(batch, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, max(1, batch // 2), (batch,), generator=gen).to(DEVICE)


def _backward(loss, reduction, seed):
    if reduction == "none":
        gen = torch.Generator().manual_seed(seed + 2)
        weights = torch.randn(loss.shape, generator=gen).to(loss.device, loss.dtype)
        (loss * weights).sum().backward()
    else:
        (loss * 1.5).backward()


def check_decisions(img, txt, ids, mode, stats):
    """Step 1: gates and hardest indices agree wherever fp64 margins are clear."""
    x, y = img.detach().double().cpu(), txt.detach().double().cpu()
    batch = x.shape[0]
    s = x @ y.T
    invalid = torch.eye(batch, dtype=torch.bool)
    if ids is not None:
        ids_cpu = ids.cpu()
        invalid |= ids_cpu[:, None] == ids_cpu[None, :]
    has_negative = (~invalid).any(dim=1)
    gated = stats.gated.cpu()
    hardest = stats.hardest_index.cpu()
    for direction, scores in enumerate((s, s.T)):
        masked = scores.masked_fill(invalid, float("-inf"))
        top = masked.topk(min(2, batch), dim=1)
        best, index = top.values[:, 0], top.indices[:, 0]
        second = top.values[:, 1] if batch > 1 else torch.full_like(best, float("-inf"))
        clear_index = has_negative & (best - second > CLEAR)
        assert torch.equal(hardest[direction][clear_index], index[clear_index])
        assert torch.equal(hardest[direction][~has_negative], torch.full_like(best, -1).long()[
            ~has_negative])  # fmt: skip
        gap = s.diagonal() - best
        if mode == "selhn":
            clear_gate = has_negative & ((gap.abs() - EPS).abs() > CLEAR)
            expected = gap.abs() < EPS
            assert torch.equal(gated[direction][clear_gate], expected[clear_gate])
        elif mode == "hardest":
            assert not gated[direction].any()
        else:
            assert torch.equal(gated[direction], has_negative)


def check_against_reference(img, txt, ids, mode, reduction, deterministic, seed):
    """Run the backend, then both steps of the two-step comparison. Returns the stats."""
    loss, stats = selhn_ext.selhn_loss(
        img, txt, margin=MARGIN, eps=EPS, mode=mode, reduction=reduction, ids=ids,
        backend="triton", deterministic=deterministic, return_stats=True,
    )  # fmt: skip
    assert loss.dtype == torch.float32
    _backward(loss, reduction, seed)
    check_decisions(img, txt, ids, mode, stats)

    # Step 2: the fp64 reference under the backend's decisions.
    x = img.detach().double().requires_grad_()
    y = txt.detach().double().requires_grad_()
    ref, _ = selhn_loss_reference(
        x, y, margin=MARGIN, eps=EPS, mode=mode, reduction=reduction, ids=ids,
        decisions=Decisions(stats.gated, stats.hardest_index),
    )  # fmt: skip
    _backward(ref, reduction, seed)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-4, atol=1e-6)
    for got, want in ((img.grad, x.grad), (txt.grad, y.grad)):
        assert got.dtype == img.dtype and got.shape == img.shape
        scale = want.abs().max().item() + 1e-12
        torch.testing.assert_close(got.double(), want, rtol=0, atol=GRAD_TOL[img.dtype] * scale)
    return stats


# (mode, reduction, B, D, dtype, with ids, kind, layout, deterministic): every mode x
# reduction once, and every B, D, dtype, layout, gated fraction and id setting at least
# twice, without the full product (the interpreter runs one program at a time).
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
CASES = [
    ("selhn", "mean", 300, 96, BF16, False, "half", "contiguous", False),
    ("selhn", "sum", 129, 16, F32, True, "collapsed", "strided", False),
    ("selhn", "none", 127, 200, F16, False, "spread", "colmajor", True),
    ("hardest", "mean", 128, 96, F32, False, "spread", "contiguous", False),
    ("hardest", "sum", 300, 16, F16, True, "half", "strided", False),
    ("hardest", "none", 3, 16, BF16, True, "collapsed", "contiguous", False),
    ("all", "mean", 129, 200, BF16, True, "spread", "colmajor", False),
    ("all", "sum", 2, 16, F32, False, "collapsed", "contiguous", True),
    ("all", "none", 300, 16, F32, False, "half", "contiguous", False),
    ("sum_hinges", "mean", 127, 16, F16, False, "collapsed", "contiguous", False),
    ("sum_hinges", "sum", 128, 96, BF16, False, "half", "strided", True),
    ("sum_hinges", "none", 300, 96, F32, True, "spread", "contiguous", False),
    ("selhn", "mean", 300, 200, F32, True, "half", "colmajor", True),
    ("selhn", "mean", 128, 16, F16, True, "half", "contiguous", False),
    ("selhn", "sum", 3, 96, F32, False, "half", "contiguous", False),
    ("selhn", "mean", 2, 200, BF16, False, "spread", "contiguous", False),
    ("selhn", "mean", 300, 16, BF16, False, "collapsed", "contiguous", False),
]


def _case_id(case):
    mode, reduction, batch, dim, dtype, ids, kind, layout, det = case
    name = str(dtype).removeprefix("torch.")
    return f"{mode}-{reduction}-B{batch}-D{dim}-{name}-{'ids' if ids else 'noids'}-{kind}-" \
        f"{layout}{'-det' if det else ''}"  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_reference(case):
    mode, reduction, batch, dim, dtype, with_ids, kind, layout, deterministic = case
    require_backend("triton", DEVICE, dtype)
    seed = batch * 1000 + dim
    img, txt = make_batch(batch, dim, dtype, kind, seed, layout)
    ids = make_ids(batch, seed) if with_ids else None
    stats = check_against_reference(img, txt, ids, mode, reduction, deterministic, seed)
    if mode == "selhn" and kind == "collapsed" and not with_ids:
        assert stats.gated.all()  # the batch does exercise the dense path
    if mode == "selhn" and kind == "spread" and dim >= 96:
        assert not stats.gated.any()


def test_ids_without_negatives():
    """Anchors whose every other pair shares their id: no negative, loss 0, index -1."""
    require_backend("triton", DEVICE, torch.float32)
    img, txt = make_batch(3, 16, torch.float32, "spread", 7)
    ids = torch.tensor([5, 5, 5], device=DEVICE)
    loss, stats = selhn_ext.selhn_loss(
        img, txt, ids=ids, reduction="none", backend="triton", return_stats=True
    )
    assert torch.equal(loss, torch.zeros_like(loss))
    assert (stats.hardest_index == -1).all() and not stats.gated.any()
    assert torch.isnan(stats.gap).all()


def clear_decisions(rows, cols, d, row_offset, row_ids, col_ids, margin):
    """Per direction: the fp64 hardest index and active count of every anchor, and masks
    of the anchors whose decisions are clear (selhn-loss.md section 4): top two valid
    scores apart by more than CLEAR, every valid hinge argument farther than CLEAR from 0."""
    x, y, dd = rows.double().cpu(), cols.double().cpu(), d.double().cpu()
    s = x @ y.T
    b, n = s.shape
    positive = torch.arange(b)[:, None] + row_offset == torch.arange(n)[None, :]
    invalid = positive
    if row_ids is not None:
        invalid = invalid | (row_ids.cpu()[:, None] == col_ids.cpu()[None, :])
    out = []
    for scores, anchor_d, inv, offset in (
        (s, dd[row_offset : row_offset + b], invalid, 0),
        (s.T, dd, invalid.T, row_offset),
    ):
        top = scores.masked_fill(inv, float("-inf")).topk(2, dim=1)
        clear_arg = (top.values[:, 0] - top.values[:, 1] > CLEAR) & (top.values[:, 0] > -1e30)
        args = MARGIN + scores - anchor_d[:, None]
        active = ((args > 0) & ~inv).sum(dim=1)
        clear_active = ((args.abs() > CLEAR) | inv).all(dim=1)
        out.append((top.indices[:, 0] + offset, clear_arg, active, clear_active))
    return out


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=lambda t: str(t).removeprefix("torch."))
def test_partials_match_chunked_with_row_offset(dtype):
    """The distributed form of the interface: b < N rows starting at row_offset, with ids.
    Hardest indices and active counts are exact wherever the fp64 decision is clear; the
    maxima and sums match the chunked kernels to float rounding."""
    _kernels()
    require_backend("triton", DEVICE, dtype)
    img, txt = make_batch(300, 40, dtype, "half", 11)
    rows, cols = img.detach()[70:230], txt.detach()
    ids = make_ids(300, 11)
    d = positive_scores(img.detach(), txt.detach())
    got = triton_backend().partials(Block(rows, cols, d, 70, ids[70:230], ids), MARGIN)
    want = ChunkedBackend().partials(Block(rows, cols, d, 70, ids[70:230], ids), MARGIN)
    expected = clear_decisions(rows, cols, d, 70, ids[70:230], ids, MARGIN)
    for g, w, (arg, clear_arg, active, clear_active) in zip(got, want, expected, strict=True):
        torch.testing.assert_close(g.max, w.max, rtol=0, atol=1e-5)
        torch.testing.assert_close(g.hinge_sum, w.hinge_sum, rtol=1e-5, atol=1e-4)
        assert g.arg.dtype == torch.int64 and g.active.dtype == torch.int32
        assert torch.equal(g.arg.cpu()[clear_arg], arg[clear_arg])
        assert torch.equal(g.active.cpu().long()[clear_active], active[clear_active])
        # Most anchors are clear: the checks above are not vacuous.
        assert clear_arg.float().mean() > 0.4 and clear_active.float().mean() > 0.4


def test_masked_tile_count_matches_a_brute_force_count():
    """The forward's split of tiles into interior and masked ones (diagonal, edge) for
    aligned and unaligned row offsets, edges and tile shapes."""
    _kernels()
    from selhn_ext._triton.forward import masked_tile_count

    for b, n, offset, bm, bn in [(300, 300, 0, 128, 128), (160, 300, 70, 128, 128),
                                 (256, 512, 256, 128, 128), (130, 130, 0, 64, 64),
                                 (200, 450, 33, 64, 128), (64, 64, 0, 64, 64)]:  # fmt: skip
        brute = 0
        for rb in range(math.ceil(b / bm)):
            for cb in range(math.ceil(n / bn)):
                full = (rb + 1) * bm <= b and (cb + 1) * bn <= n
                rows = range(rb * bm + offset, min((rb + 1) * bm, b) + offset)
                diagonal = any(cb * bn <= c < (cb + 1) * bn for c in rows)
                brute += not full or diagonal
        assert masked_tile_count(b, n, offset, bm, bn) == brute, (b, n, offset, bm, bn)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=lambda t: str(t).removeprefix("torch."))
def test_descriptor_and_pointer_loads_give_the_same_bits(dtype):
    """Contiguous inputs are read through tensor descriptors, strided ones through
    pointers: the same S tiles, so the same statistics bit for bit (deterministic sums)."""
    _kernels()
    from selhn_ext._triton.config import tma_allowed

    img, txt = make_batch(300, 40, dtype, "half", 13)
    wide_img, wide_txt = make_batch(300, 40, dtype, "half", 13, layout="strided")
    assert tma_allowed(img, False) and not tma_allowed(wide_img, False)
    d = positive_scores(img.detach(), txt.detach())
    ids = make_ids(300, 13)
    for with_ids in (None, ids):
        got = [
            triton_backend().partials(Block(a.detach(), b.detach(), d, 0, with_ids, with_ids),
                                      MARGIN, deterministic=True)
            for a, b in ((img, txt), (wide_img, wide_txt))
        ]  # fmt: skip
        for one, other in zip(*got, strict=True):
            for x, y in zip(one, other, strict=True):
                assert torch.equal(x, y)


def extreme_scores(case, batch=200):
    """(img, txt) with S = img @ txt.T: img = [I | extra] gives S_ij = txt_ji where extra
    is 0, and chosen overflows elsewhere, so that single scores are -inf or +inf without
    0 x inf = NaN spreading over S."""
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(batch, batch, generator=gen)
    if case == "sentinel":  # a row of -FLT_MAX (the masking sentinel) after its positive
        s[0, 1:] = -torch.finfo(torch.float32).max
    img = torch.cat([torch.eye(batch), torch.zeros(batch, 2)], dim=1)
    txt = torch.cat([s.T, torch.zeros(batch, 2)], dim=1)
    if case == "infinite":  # row 3: -inf scores, but its positive; column 90: +inf
        img[3, batch], txt[:, batch] = 3e38, -2.0
        txt[3, batch] = 0.0
        img[:, batch + 1], txt[90, batch + 1] = 3e38, 2.0
        img[3, batch + 1] = 0.0
    if case == "d_minus_inf":  # S_30,30 = d_30 = -inf, every other score finite
        img[30, batch], txt[30, batch] = 3e38, -2.0
    return img.to(DEVICE), txt.to(DEVICE)


@pytest.mark.parametrize("case", ["sentinel", "infinite", "d_minus_inf", "margin_inf"])
def test_exact_fixup_for_infinite_and_extreme_values(case):
    """Extreme scores, positive scores and margins come out as the chunked kernels' on
    every tile path (fp32: 64 x 64 tiles, interior and masked ones): the fast epilogue
    where it is exact, the exact fix-up where it is not."""
    _kernels()
    img, txt = extreme_scores(case)
    scores = img @ txt.T
    assert not scores.isnan().any()
    if case == "infinite":
        assert scores.isneginf().sum() == 199 and scores.isposinf().sum() == 199
    if case == "d_minus_inf":
        assert scores.isneginf().sum() == 1 and torch.isneginf(scores[30, 30])
    d = positive_scores(img, txt)
    margin = float("inf") if case == "margin_inf" else MARGIN
    got = triton_backend().partials(Block(img, txt, d, 0, None, None), margin)
    want = ChunkedBackend().partials(Block(img, txt, d, 0, None, None), margin)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.max, w.max, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(g.arg, w.arg)
        assert torch.equal(g.active, w.active)
        torch.testing.assert_close(g.hinge_sum, w.hinge_sum, rtol=1e-5, atol=1e-4,
                                   equal_nan=True)  # fmt: skip


def test_exact_ties_zero_signs_and_eps():
    """img = I makes S = txt.T exact: ties go to the smallest index, -0.0 ties +0.0,
    and a gap exactly at eps is not gated."""
    _kernels()
    batch = 6
    img = torch.eye(batch, device=DEVICE)
    s = torch.full((batch, batch), -0.5)
    s.fill_diagonal_(0.3)
    s[0, 2] = s[0, 4] = 0.25  # row tie
    s[3, 1] = s[5, 1] = 0.25  # column tie (column 1: rows 3 and 5)
    s[2, 3] = -0.0  # row 2: -0.0 at column 3 ties +0.0 at column 5
    s[2, 5] = 0.0
    txt = s.T.contiguous().to(DEVICE)
    d = positive_scores(img, txt)
    row, col = triton_backend().partials(Block(img, txt, d), MARGIN)
    assert row.arg[0].item() == 2 and col.arg[1].item() == 3
    assert row.arg[2].item() == 3 and row.max[2].item() == 0.0
    assert not torch.signbit(row.max[2]).item()

    # Exactly at eps: S_ii = eps, every other S_ij = 0.
    txt_eps = (EPS * torch.eye(batch)).to(DEVICE)
    for dtype in (F32, BF16, F16):
        _, stats = selhn_ext.selhn_loss(
            img.to(dtype), txt_eps.to(dtype), backend="triton", return_stats=True
        )
        assert not stats.gated.any(), dtype
        assert (stats.hardest_index[0] == torch.tensor([1, 0, 0, 0, 0, 0], device=DEVICE)).all()


def test_nan_propagates_to_max_index_and_sums():
    _kernels()
    img, txt = make_batch(130, 24, torch.float32, "spread", 3)
    rows, cols = img.detach().clone(), txt.detach().clone()
    rows[5, 3] = float("nan")
    d = positive_scores(rows, cols)
    row, col = triton_backend().partials(Block(rows, cols, d), MARGIN)
    want_row, want_col = ChunkedBackend().partials(Block(rows, cols, d), MARGIN)
    assert torch.isnan(row.max[5]) and row.arg[5].item() == want_row.arg[5].item()
    assert torch.isnan(row.hinge_sum[5])
    # Every column sees the NaN of row 5 (all but column 5 as a valid negative).
    others = torch.arange(130, device=DEVICE) != 5
    assert torch.isnan(col.max[others]).all() and (col.arg[others] == 5).all()
    assert torch.isnan(col.hinge_sum).all()  # column 5 gets NaN through its own d_5
    assert torch.equal(col.arg, want_col.arg) and torch.equal(row.arg, want_row.arg)
    loss = selhn_ext.selhn_loss(rows, cols, backend="triton")
    assert torch.isnan(loss)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=lambda t: str(t).removeprefix("torch."))
def test_backward_recomputes_the_forward_active_set(dtype):
    """With coefficient 1 and a constant-1 embedding column, the recomputed activity of
    each gated anchor sums to exactly the forward's active count."""
    _kernels()
    require_backend("triton", DEVICE, dtype)
    img, txt = make_batch(200, 48, dtype, "half", 5)
    rows, cols = img.detach().clone(), txt.detach().clone()
    cols[:, 0] = 1.0
    rows[:, 1] = 1.0
    d = positive_scores(rows, cols)
    row, col = triton_backend().partials(Block(rows, cols, d), MARGIN)
    ones = torch.ones(200, device=DEVICE)
    yes = torch.ones(200, dtype=torch.bool, device=DEVICE)
    no = torch.zeros_like(yes)
    with panels(128):  # two panels on each side
        grad_rows, _ = triton_backend().dense_backward(
            Block(rows, cols, d), MARGIN, GatedAnchors(ones, ones, yes, no)
        )
        _, grad_cols = triton_backend().dense_backward(
            Block(rows, cols, d), MARGIN, GatedAnchors(ones, ones, no, yes)
        )
    assert torch.equal(grad_rows[:, 0], row.active.float())
    assert torch.equal(grad_cols[:, 1], col.active.float())
    assert row.active.min() < row.active.max()  # not a trivial all-or-nothing set


def grid_block(batch, dim, dtype, seed, b=None, offset=0):
    """(rows, cols, col_pos in fp64) with entries on a grid of 1/8 and rows close to their
    positives: every score and hinge argument is exact in every dtype and summation
    order, so the active set is the fp64 one."""
    gen = torch.Generator().manual_seed(seed)
    b = batch if b is None else b
    cols = (torch.randint(-2, 3, (batch, dim), generator=gen) / 8).to(dtype)
    noise = (torch.randint(-1, 2, (b, dim), generator=gen) / 8).to(dtype)
    rows = cols[offset : offset + b] + noise
    col_pos = positive_scores(cols.double(), cols.double())
    col_pos[offset : offset + b] = positive_scores(
        rows.double(), cols[offset : offset + b].double()
    )
    return rows, cols, col_pos


def scattered(count, total, gen):
    """A bool mask with ``count`` True entries at random positions."""
    mask = torch.zeros(total, dtype=torch.bool)
    mask[torch.randperm(total, generator=gen)[:count]] = True
    return mask


def expected_tiles(b, n_cols, dim, gated_rows, gated_cols, cfg):
    """S tiles the backward recomputes: per panel of P gated anchors, the gated rows'
    blocks against every column block (part A) and the other rows' blocks against the
    gated columns' blocks (part B)."""
    from selhn_ext._triton import backward

    size = backward.panel_size(dim, max(b, n_cols))
    tiles = 0
    for start in range(0, max(b, n_cols), size):
        in_a = min(max(gated_rows - start, 0), size)
        in_b = min(max(gated_cols - start, 0), size) if gated_rows < b else 0
        tiles += math.ceil(in_a / cfg.BM) * math.ceil(n_cols / cfg.BN)
        tiles += math.ceil(in_b / cfg.BN) * math.ceil((b - gated_rows) / cfg.BM)
    return tiles


@pytest.mark.parametrize(
    ("row_fraction", "col_fraction", "panel"),
    [(0.01, 0.01, None), (0.3, 0.3, None), (0.3, 0.3, 128), (1.0, 0.3, None), (1.0, 1.0, 128)],
)
def test_each_touched_tile_is_recomputed_once(row_fraction, col_fraction, panel):
    """Scattered gated anchors: the backward recomputes exactly the tiles of the gated
    rows (against every column) and of the other rows against the gated columns, each
    once, fewer than S has whenever not every row is gated; and the gradient is right."""
    triton_mod = _kernels()
    cfg = triton_mod.CONFIGS[F32]
    batch, dim = 300, 24
    gen = torch.Generator().manual_seed(31)
    rows, cols, col_pos = grid_block(batch, dim, F32, 31)
    row_gated = scattered(max(1, round(row_fraction * batch)), batch, gen)
    col_gated = scattered(max(1, round(col_fraction * batch)), batch, gen)
    row_coef, col_coef = torch.randn(batch, generator=gen), torch.randn(batch, generator=gen)
    on_device = [t.to(DEVICE) for t in (rows, cols, col_pos.float())]
    gated = GatedAnchors(*(t.to(DEVICE) for t in (row_coef, col_coef, row_gated, col_gated)))
    with tile_counter() as counter, panels(panel):
        got = triton_backend().dense_backward(Block(*on_device), 0.25, gated)
        want = expected_tiles(batch, batch, dim, int(row_gated.sum()), int(col_gated.sum()), cfg)
    count = int(counter.item())
    every_tile = math.ceil(batch / cfg.BM) * math.ceil(batch / cfg.BN)
    assert count == want
    if row_fraction < 1:
        assert count < every_tile
    else:  # every row gated: every tile once, none twice
        assert count == every_tile
    reference = ChunkedBackend().dense_backward(
        Block(rows.double(), cols.double(), col_pos), 0.25,
        GatedAnchors(row_coef.double(), col_coef.double(), row_gated, col_gated),
    )  # fmt: skip
    for g, w in zip(got, reference, strict=True):
        torch.testing.assert_close(g.double().cpu(), w, rtol=0, atol=1e-5 * w.abs().max())


def test_no_gated_anchor_recomputes_no_tile():
    triton_mod = _kernels()
    img, txt = make_batch(300, 96, F32, "spread", 21)
    with tile_counter() as counter:
        loss, stats = selhn_ext.selhn_loss(img, txt, backend="triton", return_stats=True)
        loss.backward()
    assert not stats.gated.any() and int(counter.item()) == 0
    img, txt = make_batch(300, 96, F32, "half", 21)
    with tile_counter() as counter:
        selhn_ext.selhn_loss(img, txt, mode="hardest", backend="triton").backward()
    assert int(counter.item()) == 0
    assert triton_mod.testing.tile_counter is None


@pytest.mark.parametrize("dtype", [BF16, F16], ids=lambda t: str(t).removeprefix("torch."))
def test_uniform_coefficients_are_exact_in_16_bit(dtype):
    """Equal coefficients (the mean reduction without ids) make W / scale 0, 1 or 2, exact
    in 16 bits: with grid inputs and a power-of-two coefficient every sum is exact, so the
    gradients equal the fp64 ones bit for bit; with any other coefficient only the final
    fp32 roundings remain (a 16-bit W would be off by about 2**-9)."""
    _kernels()
    require_backend("triton", DEVICE, dtype)
    gen = torch.Generator().manual_seed(8)
    batch, dim = 260, 40
    rows, cols, col_pos = grid_block(batch, dim, dtype, 8)
    row_gated, col_gated = scattered(90, batch, gen), scattered(120, batch, gen)
    for coef, tol in ((2.0**-10, 0.0), (1 / (2 * batch * (batch - 1)), 1e-6)):
        coefs = torch.full((batch,), coef)
        want = ChunkedBackend().dense_backward(
            Block(rows.double(), cols.double(), col_pos.double()), 0.25,
            GatedAnchors(coefs.double(), coefs.double(), row_gated, col_gated),
        )  # fmt: skip
        with panels(128):
            got = triton_backend().dense_backward(
                Block(*(t.to(DEVICE) for t in (rows, cols, col_pos))), 0.25,
                GatedAnchors(*(t.to(DEVICE) for t in (coefs, coefs, row_gated, col_gated))),
            )  # fmt: skip
        for g, w in zip(got, want, strict=True):
            assert w.abs().max() > 0
            if tol == 0:
                assert torch.equal(g.cpu(), w.float())
            else:
                torch.testing.assert_close(g.double().cpu(), w, rtol=0, atol=tol * w.abs().max())


def test_compaction_orders_counts_and_scale():
    """Several blocks per side: gated anchors first in order, then the others from the
    back; the counts; the scale is the largest finite |coefficient| of a gated anchor,
    and the weights are the gated coefficients over it (exactly 1 for the largest)."""
    _kernels()
    from selhn_ext._triton import backward

    gen = torch.Generator().manual_seed(4)
    b, n_cols = 2500, 1100
    row_gated = torch.rand(b, generator=gen) < 0.3
    col_gated = torch.rand(n_cols, generator=gen) < 0.6
    row_coef = torch.randn(b, generator=gen)
    col_coef = torch.randn(n_cols, generator=gen)
    row_coef[~row_gated] = 100.0  # not gated: left out of the scale
    gated_cols = col_gated.nonzero().flatten()
    col_coef[gated_cols[:2]] = torch.tensor([float("nan"), float("-inf")])
    *orders, row_weight, col_weight, state = backward.compact(
        *(t.to(DEVICE) for t in (row_gated, col_gated, row_coef, col_coef)), launches=3
    )
    state = state.cpu()
    for gated, order, count in zip((row_gated, col_gated), orders, state[:2], strict=True):
        order = order.cpu().long()
        assert count.item() == gated.sum().item()
        assert torch.equal(order[: gated.sum()], gated.nonzero().flatten())
        assert torch.equal(order[gated.sum() :], (~gated).nonzero().flatten().flip(0))
    scale = col_coef[gated_cols[2:]].abs().max().maximum(row_coef[row_gated].abs().max())
    assert state[2:3].view(torch.float32).item() == scale.item()
    assert torch.equal(state[4:], torch.zeros(3, dtype=torch.int32))
    for weight, coef, gated in (
        (row_weight, row_coef, row_gated),
        (col_weight, col_coef, col_gated),
    ):  # NaN stays NaN, -inf stays -inf
        want = torch.where(gated, coef / scale, 0.0)
        torch.testing.assert_close(weight.cpu(), want, rtol=0, atol=0, equal_nan=True)
    largest = torch.cat([row_weight.cpu(), col_weight.cpu()[gated_cols[2:]]]).abs().max()
    assert largest.item() == 1.0


def _outputs(img, txt, deterministic):
    img.grad = txt.grad = None
    loss = selhn_ext.selhn_loss(
        img, txt, mode="all", reduction="none", backend="triton", deterministic=deterministic
    )
    loss.backward(torch.ones_like(loss))
    return loss.detach().clone(), img.grad.clone(), txt.grad.clone()


def test_backward_is_order_free_and_forward_atomics_are_not():
    """Reversing the order in which programs run and claim work changes no bit of the
    gradients in either mode: the backward has no float atomics (P = 128, so 300 gated
    anchors per side span three panels). It changes no bit of the loss in deterministic
    mode; under the interpreter (programs run one by one) the forward's float atomics of
    the default mode do change bits of the loss (many blocks summed per anchor)."""
    _kernels()
    img, txt = make_batch(300, 16, torch.float32, "half", 9)
    results = {}
    for deterministic in (True, False):
        with panels(128):
            forward_order = _outputs(img, txt, deterministic)
            with reversed_blocks():
                reverse_order = _outputs(img, txt, deterministic)
        assert torch.equal(forward_order[1], reverse_order[1])
        assert torch.equal(forward_order[2], reverse_order[2])
        assert forward_order[1].abs().max() > 0  # a real gradient was compared
        if deterministic:
            assert torch.equal(forward_order[0], reverse_order[0])
        elif DEVICE == "cpu":
            assert not torch.equal(forward_order[0], reverse_order[0])
        torch.testing.assert_close(forward_order[0], reverse_order[0], rtol=1e-5, atol=1e-6)
        results[deterministic] = forward_order
    # The deterministic flag costs the backward nothing: the same gradients, bit for bit.
    assert torch.equal(results[True][1], results[False][1])
    assert torch.equal(results[True][2], results[False][2])


# Several panels per side (P = 128 < gated anchors): the sums over panels of the other
# side's gradient, and gated indices split across panel boundaries.
PANEL_CASES = [
    ("selhn", "none", 300, 96, BF16, True, "half", "contiguous", False),
    ("all", "mean", 300, 16, F32, False, "collapsed", "strided", False),
    ("sum_hinges", "sum", 129, 200, F16, True, "half", "colmajor", False),
]


@pytest.mark.parametrize("case", PANEL_CASES, ids=[_case_id(c) for c in PANEL_CASES])
def test_backward_across_panels_matches_reference(case):
    mode, reduction, batch, dim, dtype, with_ids, kind, layout, deterministic = case
    require_backend("triton", DEVICE, dtype)
    seed = batch * 1000 + dim + 1
    img, txt = make_batch(batch, dim, dtype, kind, seed, layout)
    ids = make_ids(batch, seed) if with_ids else None
    with panels(128):
        stats = check_against_reference(img, txt, ids, mode, reduction, deterministic, seed)
    assert (stats.gated.sum(dim=1) > 128).all()  # more gated anchors than one panel


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=lambda t: str(t).removeprefix("torch."))
def test_dense_backward_with_row_offset(dtype):
    """The distributed form of dense_backward: b < N rows at row_offset, with ids, random
    signed coefficients (W rounds to the input dtype), half the anchors of each side gated,
    two panels. Grid inputs make the active set the fp64 one; only the products round."""
    _kernels()
    require_backend("triton", DEVICE, dtype)
    gen = torch.Generator().manual_seed(17)
    batch, dim, offset, b = 300, 40, 70, 160
    rows, cols, col_pos = grid_block(batch, dim, dtype, 17, b=b, offset=offset)
    ids = make_ids(batch, 17)
    row_coef = torch.randn(b, generator=gen)
    col_coef = torch.randn(batch, generator=gen)
    row_gated = torch.rand(b, generator=gen) < 0.5
    col_gated = torch.rand(batch, generator=gen) < 0.5
    margin = 0.25
    want = ChunkedBackend().dense_backward(
        Block(rows.double(), cols.double(), col_pos, offset, ids[offset : offset + b].cpu(),
              ids.cpu()),
        margin, GatedAnchors(row_coef.double(), col_coef.double(), row_gated, col_gated),
    )  # fmt: skip
    rows, cols, col_pos = (t.to(DEVICE) for t in (rows, cols, col_pos.float()))
    with panels(128):
        got = triton_backend().dense_backward(
            Block(rows, cols, col_pos, offset, ids[offset : offset + b], ids), margin,
            GatedAnchors(*(t.to(DEVICE) for t in (row_coef, col_coef, row_gated, col_gated))),
        )  # fmt: skip
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        scale = w.abs().max().item()
        assert scale > 0
        torch.testing.assert_close(g.double().cpu(), w, rtol=0, atol=GRAD_TOL[dtype] * scale)


def test_dense_backward_propagates_nan():
    """A NaN entry in one column reaches the gradient entries that the reference's
    W @ cols and W.T @ rows reach (0 * NaN included), gated or not, with no host check."""
    _kernels()
    gen = torch.Generator().manual_seed(3)
    rows = _unit(torch.randn(200, 24, generator=gen))
    cols = rows + 0.1 * torch.randn(200, 24, generator=gen)
    cols[5, 3] = float("nan")
    d = positive_scores(rows, cols)
    coef = torch.randn(200, generator=gen)
    row_gated = torch.rand(200, generator=gen) < 0.5
    for nan_column_gated in (True, False):
        col_gated = torch.rand(200, generator=gen) < 0.5
        col_gated[5] = nan_column_gated
        tensors = (rows, cols, d, coef, coef, row_gated, col_gated)
        want = ChunkedBackend().dense_backward(
            Block(rows, cols, d), MARGIN, GatedAnchors(*tensors[3:])
        )
        on_device = [t.to(DEVICE) for t in tensors]
        with panels(128):
            got = triton_backend().dense_backward(
                Block(*on_device[:3]), MARGIN, GatedAnchors(*on_device[3:])
            )
        assert torch.isnan(got[0]).any()
        for g, w in zip(got, want, strict=True):
            assert torch.equal(torch.isnan(g).cpu(), torch.isnan(w))


def test_backward_variant_and_panel_switches():
    _kernels()
    from selhn_ext._triton import VARIANTS, TritonBackend, backward

    # dispatch lists the variants the backend implements, the default first.
    assert dispatch.REGISTRY["triton"].variants == VARIANTS == ("panels",)
    assert dispatch.variant("triton") == os.environ.get("SELHN_TRITON_BACKWARD", "panels")
    assert triton_backend().variant == dispatch.variant("triton")
    img, txt = make_batch(20, 16, torch.float32, "collapsed", 2)
    d = positive_scores(img.detach(), txt.detach())
    coef = torch.ones(20, device=DEVICE)
    gated = torch.ones(20, dtype=torch.bool, device=DEVICE)
    args = (Block(img.detach(), txt.detach(), d), MARGIN, GatedAnchors(coef, coef, gated, gated))
    # A variant that no longer exists is refused, by the dispatch and by the backend.
    with pytest.raises(ValueError, match="not a variant"), dispatch.use_variant("triton", "tiles"):
        pass
    with pytest.raises(ValueError, match="backward variant"):
        TritonBackend("tiles")
    with panels(100), pytest.raises(ValueError, match="multiple"):
        triton_backend().dense_backward(*args)
    # P follows 2 D within its bounds, and never exceeds the anchors there are.
    assert backward.panel_size(512, 16384) == 1024
    assert backward.panel_size(200, 16384) == 512
    assert backward.panel_size(16, 16384) == backward.PANEL_MIN
    assert backward.panel_size(8192, 16384) == backward.PANEL_MAX
    assert backward.panel_size(1024, 300) == 384


def test_backward_variant_comes_from_the_environment():
    """SELHN_TRITON_BACKWARD is read once, by dispatch, and shown by backend_status; an
    unknown value is a reason the backend cannot run, raised when it is asked for."""
    _kernels()
    code = (
        "import sys, torch, selhn_ext; from selhn_ext import dispatch\n"
        "x = torch.randn(4, 3)\n"
        "print(selhn_ext.backend_status(x, x).variants['triton'])\n"
        "print(selhn_ext.backend_status(x, x)['triton'])\n"
        "print(dispatch.backend('triton').variant if sys.argv[1] == 'panels' else '-')\n"
        "selhn_ext.selhn_loss(x, x, backend='triton')\n"
    )
    outputs = {}
    for value in ("panels", "panel"):
        env = dict(os.environ, SELHN_TRITON_BACKWARD=value)
        outputs[value] = subprocess.run(
            [sys.executable, "-c", code, value], capture_output=True, text=True, env=env,
            timeout=300,
        )  # fmt: skip
    assert outputs["panels"].returncode == 0, outputs["panels"].stderr[-2000:]
    assert outputs["panels"].stdout.split("\n")[:3] == ["panels", "None", "panels"]
    old = outputs["panel"]  # the old paths are gone
    assert old.returncode != 0
    reason = "SELHN_TRITON_BACKWARD='panel' is not a variant of 'triton'"
    assert reason in old.stdout.split("\n")[1]  # backend_status shows it
    assert "BackendUnavailableError" in old.stderr and reason in old.stderr


def test_opcheck():
    require_backend("triton", DEVICE, torch.float32)
    img, txt = make_batch(70, 32, torch.float32, "half", 4)
    ids = make_ids(70, 4)
    for args in (
        (img, txt, None, 0.2, 0.01, "selhn", "triton", False, False),
        (img, txt, ids, 0.2, 0.01, "all", "triton", True, False),
    ):
        torch.library.opcheck(torch.ops.selhn_ext.loss_forward.default, args)


@pytest.mark.parametrize(
    "compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]
)
def test_torch_compile_fullgraph(compiler):
    require_backend("triton", DEVICE, torch.float32)
    img, txt = make_batch(70, 32, torch.float32, "half", 6)

    def step(a, b):
        return selhn_ext.selhn_loss(a, b, backend="triton") * 2.0

    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    got = compiled(img, txt)
    got.backward()
    grads = img.grad.clone(), txt.grad.clone()
    img.grad = txt.grad = None
    want = step(img, txt)
    want.backward()
    # Inductor may fuse the O(B) reduction around the op in another order.
    tol = 0 if compiler == "aot_eager" else 1e-6
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(grads, (img.grad, txt.grad), rtol=tol, atol=tol)


MEMORY_CHILD = textwrap.dedent(
    """
    import sys
    import torch
    from selhn_ext import dispatch
    from selhn_ext.kernel_interface import Block, GatedAnchors, positive_scores

    def status_kib(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise RuntimeError(field + " missing from /proc/self/status")

    def run(batch):
        gen = torch.Generator().manual_seed(0)
        img = torch.randn(batch, 64, generator=gen).to(torch.bfloat16)
        txt = (img.float() + 0.1 * torch.randn(batch, 64, generator=gen)).to(torch.bfloat16)
        d = positive_scores(img, txt)
        coef = torch.full((batch,), 1e-3)
        # A few gated anchors: every buffer of the backward is allocated, and the
        # interpreter recomputes few tiles.
        gated = torch.arange(batch) < 100
        return img, txt, d, coef, gated

    def loss_pass(img, txt, d, coef, gated):
        backend = dispatch.backend("triton")
        outputs = [*backend.partials(Block(img, txt, d), 0.2)[0]]
        outputs += backend.dense_backward(
            Block(img, txt, d), 0.2, GatedAnchors(coef, coef, gated, gated)
        )
        for out in outputs:  # zero-filled pages count once written
            out.fill_(1)

    loss_pass(*run(130))  # warm up the interpreter's caches
    inputs = run(int(sys.argv[1]))
    base = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    loss_pass(*inputs)
    print(max(0, status_kib("VmHWM") - base))
    """
)


@pytest.mark.slow
def test_extra_memory_grows_linearly():
    """Host RSS of forward + backward in the interpreter (a child process per size; it
    runs on CPU tensors whether or not this machine has a GPU): linear in B, and at
    B = 4096 below one B x B bfloat16 matrix (32 MiB). The backward's W panels hold a
    fixed number of rows (P = 512 here, D = 64) against every anchor. D is small so that
    the interpreter's forward stays within the timeout on a loaded machine."""
    require_backend("triton", DEVICE, torch.bfloat16)
    # One BLAS thread: the interpreter's many small products crawl when threads contend.
    # Large blocks straight from mmap: freed temporaries then cannot hide new allocations.
    env = dict(
        os.environ, TRITON_INTERPRET="1", OPENBLAS_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    extra = {}
    for batch in (2048, 4096):
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_CHILD, str(batch)],
            capture_output=True, text=True, env=env, cwd=root, timeout=1200,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        extra[batch] = int(out.stdout.split()[-1]) / 1024  # MiB
    assert extra[4096] < 2.5 * max(extra[2048], 1.0), extra
    assert extra[4096] < 4096 * 4096 * 2 / 2**20, extra
