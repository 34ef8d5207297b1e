"""The Triton backend's fused glue (selhn_ext/_triton/glue.py): finalize bit for bit
against kernel_interface.finalize, the gradients against the PyTorch glue, the same bits
every run, and the launches and allocations around the B x B kernels, counted with a
dispatch-mode counter for aten ops and a count of Triton launches."""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

from selhn_ext import pipeline  # noqa: E402
from selhn_ext._triton import TritonBackend  # noqa: E402
from selhn_ext.kernel_interface import (  # noqa: E402
    AnchorSide,
    AnchorWeights,
    Block,
    DirectionStats,
    PyTorchGlue,
    count_negatives,
    finalize,
)

MODES = ("selhn", "hardest", "all", "sum_hinges")
EPS = 0.1
MARGIN = 0.2


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def awkward_side(n: int, n_cols: int, gen: torch.Generator, with_ids: bool) -> AnchorSide:
    """Statistics with NaN, +-inf, -0.0, gaps exactly at +-eps (in fp32), no hardest
    negative (arg -1, max -inf) and anchors with no negative at all."""
    d = torch.randn(n, generator=gen)
    best = d - (torch.rand(n, generator=gen) * 0.3 - 0.15)
    eps32 = torch.tensor(EPS, dtype=torch.float32)
    # Gaps of exactly +eps and -eps (eps rounded to fp32, as finalize compares), and NaN.
    d[0:4] = torch.stack([eps32, torch.tensor(0.0), 2 * eps32, torch.tensor(float("nan"))])
    best[0:4] = torch.stack([torch.tensor(0.0), eps32, eps32, torch.tensor(0.5)])
    best[4:8] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0])
    d[8:10] = torch.tensor([float("inf"), float("-inf")])
    best[10] = d[10] + MARGIN - 2**-20  # hard hinge just around zero
    best[11] = d[11] - MARGIN  # margin + max - d == 0 in exact arithmetic
    arg = torch.randint(0, n_cols, (n,), generator=gen)
    arg[12:14] = -1
    best[12:14] = float("-inf")
    hinge_sum = torch.rand(n, generator=gen) * 3
    hinge_sum[14:16] = torch.tensor([float("nan"), float("inf")])
    negatives = torch.full((n,), n_cols - 1, dtype=torch.int64)
    if with_ids:
        negatives = torch.randint(0, n_cols, (n,), generator=gen)
        negatives[16:18] = 0  # every column shares the anchor's id
        arg[16:18] = -1
    active = torch.randint(0, n_cols, (n,), generator=gen, dtype=torch.int32)
    return AnchorSide(DirectionStats(best, arg, hinge_sum, active), d, negatives)


@pytest.mark.parametrize("with_ids", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_finalize_is_bit_identical(mode, with_ids):
    gen = torch.Generator().manual_seed(7)
    b = n_cols = 1500  # two finalize blocks per side
    row, col = awkward_side(b, n_cols, gen, with_ids), awkward_side(n_cols, n_cols, gen, with_ids)
    fused = TritonBackend().finalize_both(row, col, MARGIN, EPS, mode)
    for side, got in zip((row, col), fused, strict=False):
        want = finalize(side.stats, side.positive, side.negatives, MARGIN, EPS, mode)
        for name, w, g in zip(want._fields, want, got, strict=False):
            assert g.dtype == w.dtype, name
            assert torch.equal(bits(g), bits(w)), f"{mode} {name}"
    # The decisions the test is about do occur: both gate outcomes, NaN and inf losses.
    want = finalize(row.stats, row.positive, row.negatives, MARGIN, EPS, mode)
    assert want.near_tie.any() and (~want.near_tie).any()
    assert (want.gap[:3].abs() == torch.tensor(EPS, dtype=torch.float32)).all()
    assert want.loss.isnan().any() and want.loss.isinf().any()


@pytest.mark.parametrize("row_offset", [0, 37])
def test_finalize_forward_pairs(row_offset):
    gen = torch.Generator().manual_seed(3)
    b, n_cols = 100, 200
    row, col = awkward_side(b, n_cols, gen, True), awkward_side(n_cols, n_cols, gen, True)
    want = PyTorchGlue().finalize_forward(row, col, MARGIN, EPS, "selhn", row_offset)
    got = TritonBackend().finalize_forward(row, col, MARGIN, EPS, "selhn", row_offset)
    for w_part, g_part in zip(want, got, strict=False):
        for name, w, g in zip(w_part._fields, w_part, g_part, strict=False):
            assert torch.equal(bits(g), bits(w)), name


@pytest.mark.parametrize("with_ids", [False, True])
def test_packed_statistics_decode_in_finalize(with_ids):
    """partials_for_finalize leaves the maxima packed; finalize_forward decodes them in
    its own launch into the same bits as partials' decode, and decides the same; the
    PyTorch fallback's decode (glue.unpacked) gives the same statistics too."""
    from selhn_ext._triton import glue
    from selhn_ext.kernel_interface import PackedStats

    gen = torch.Generator().manual_seed(11)
    b, n_cols, dim, offset = 45, 90, 24, 30
    cols = torch.randn(n_cols, dim, generator=gen)
    cols[offset + 3] = cols[offset + 5]  # a tie for the hardest negative
    cols[7, 2] = float("nan")  # the exact fix-up's anchors
    cols[8, 1] = float("inf")
    rows = (cols[offset : offset + b] + 0.5 * torch.randn(b, dim, generator=gen)).contiguous()
    d = (rows * cols[offset : offset + b]).sum(1)
    d = torch.cat([torch.randn(offset, generator=gen), d, torch.randn(n_cols - offset - b)])
    ids = torch.randint(0, 30, (n_cols,), generator=gen) if with_ids else None
    block = Block(rows, cols, d, offset, None if ids is None else ids[offset : offset + b], ids)
    backend = TritonBackend()
    decoded = backend.partials(block, MARGIN)
    packed = backend.partials_for_finalize(block, MARGIN)
    assert all(isinstance(p, PackedStats) for p in packed)
    negatives = count_negatives(ids, n_cols, rows.device) if with_ids else None

    def sides(stats):
        mine = slice(offset, offset + b)
        n_rows = None if negatives is None else negatives[mine]
        return AnchorSide(stats[0], d[mine], n_rows), AnchorSide(stats[1], d, negatives)

    for s_got, s_want in zip(glue.unpacked(*sides(packed)), sides(decoded), strict=True):
        for g, w in zip(s_got.stats, s_want.stats, strict=True):
            assert torch.equal(bits(g), bits(w))
    want = backend.finalize_forward(*sides(decoded), MARGIN, EPS, "selhn", offset)
    got = backend.finalize_forward(*sides(packed), MARGIN, EPS, "selhn", offset)
    for w_part, g_part in zip(want, got, strict=True):
        for name, w, g in zip(w_part._fields, w_part, g_part, strict=True):
            assert torch.equal(bits(g), bits(w)), name
    for p, w in zip(packed, decoded, strict=True):  # written by the finalize launch
        assert torch.equal(bits(p.max), bits(w.max)) and torch.equal(p.arg, w.arg)
    # The cases the test is about do occur: NaN maxima and anchors with no hardest.
    assert decoded[0].max.isnan().any() and decoded[1].max.isnan().any()
    assert (decoded[1].arg >= 0).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_positive_scores_read_inputs_as_they_are(dtype):
    gen = torch.Generator().manual_seed(1)
    img = torch.randn(37, 300, generator=gen).to(dtype)
    txt = torch.randn(300, 37, generator=gen).to(dtype).t()  # strided rows
    got = TritonBackend().positive_scores(img, txt)
    want = (img.double() * txt.double()).sum(dim=1)
    scale = (img.double().abs() * txt.double().abs()).sum(dim=1)
    assert got.dtype == torch.float32
    assert ((got.double() - want).abs() <= 1e-6 * scale).all()


def backward_case(dtype, row_offset, b, n_cols, dim, gen):
    rows = torch.randn(b, dim, generator=gen).to(dtype)
    cols = torch.randn(n_cols, dim, generator=gen).to(dtype)
    col_pos = torch.randn(n_cols, generator=gen)
    block = Block(rows, cols, col_pos, row_offset)

    def weights(n, targets):
        hardest = torch.randint(0, targets, (n,), generator=gen)
        hardest[:3] = 1  # a shared hardest negative: a scatter with duplicates
        hardest[5] = -1
        hard = (torch.rand(n, generator=gen) < 0.7).float()
        hard[5] = 0.0
        dense = torch.where(hard > 0, 0.0, 1.0 / max(targets - 1, 1))
        active = torch.randint(0, targets, (n,), generator=gen, dtype=torch.int32)
        up = torch.rand(n, generator=gen) + 0.5
        return AnchorWeights(up, hardest, dense, hard, active)

    row = weights(b, n_cols)
    col = weights(n_cols, n_cols)  # global row indices, some outside this block
    dense = (torch.randn(b, dim, generator=gen), torch.randn(n_cols, dim, generator=gen))
    return block, dense, row, col


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("row_offset", [0, 29])
def test_gradients_match_the_pytorch_glue(dtype, row_offset):
    gen = torch.Generator().manual_seed(11)
    b, n_cols, dim = (60 if row_offset else 90), 90, 40
    block, dense, row, col = backward_case(dtype, row_offset, b, n_cols, dim, gen)
    out_dtypes = (dtype, dtype if row_offset == 0 else torch.float32)
    want = PyTorchGlue().sparse_and_diagonal_backward(
        block, tuple(t.clone() for t in dense), row, col, deterministic=True,
        out_dtypes=out_dtypes,
    )  # fmt: skip
    runs = [
        TritonBackend().sparse_and_diagonal_backward(
            block, dense, row, col, deterministic=False, out_dtypes=out_dtypes
        )
        for _ in range(2)
    ]
    for w, g, g2 in zip(want, *runs, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, g2)  # the same bits every run, in the default mode
        # Exact up to the fp32 summation order and one rounding to the output dtype.
        ulp = 2**-8 if g.dtype == torch.bfloat16 else 2**-20
        size = w.double().abs().amax(dim=1, keepdim=True) + 1
        assert ((g.double() - w.double()).abs() <= ulp * size).all()


@pytest.mark.parametrize("hard_weight", [0.0, 1.0])
def test_hardest_rows_of_zero_weight_are_not_read(hard_weight):
    """A hardest-negative term of weight 0 (a gated anchor, an inactive hinge) adds
    nothing, so its row is not read: a NaN there stays out of the gradients. With weight
    1 the same NaN must show, which proves the row is read then."""
    n, dim = 8, 4
    rows, cols = torch.randn(n, dim), torch.randn(n, dim)
    cols[5], rows[6] = float("nan"), float("nan")
    row_hardest = torch.tensor([5, 2, 3, 4, 7, 0, 1, 1])  # column 5 only for row 0
    col_hardest = torch.tensor([1, 2, 6, 4, 0, 3, 7, 0])  # row 6 only for column 2
    row_hard, col_hard = torch.ones(n), torch.ones(n)
    row_hard[0] = col_hard[2] = hard_weight
    # The NaN rows' own anchors are never a hardest-negative source.
    col_hard[5] = row_hard[6] = 0.0

    def weights(hardest, hard):
        return AnchorWeights(torch.ones(n), hardest, torch.zeros(n), hard,
                             torch.zeros(n, dtype=torch.int32))  # fmt: skip

    block = Block(rows, cols, torch.zeros(n), 0)
    grad_rows, grad_cols = TritonBackend().sparse_and_diagonal_backward(
        block, None, weights(row_hardest, row_hard), weights(col_hardest, col_hard),
        deterministic=False, out_dtypes=(torch.float32, torch.float32),
    )  # fmt: skip
    # The diagonal terms read the NaN rows themselves: grad_rows[5] and grad_cols[6].
    nan_rows = {5} | ({0} if hard_weight else set())
    nan_cols = {6} | ({2} if hard_weight else set())
    for grad, nans in ((grad_rows, nan_rows), (grad_cols, nan_cols)):
        has_nan = grad.isnan().any(dim=1)
        assert set(has_nan.nonzero().flatten().tolist()) == nans


# Gate patterns of test_accumulators_are_written_before_read: (gated rows, gated columns)
# out of 150 rows and 170 columns; with panels of 128, 140 gated rows span two panels.
GATE_PATTERNS = {
    "none": (0, 0),
    "rows only": (60, 0),
    "columns only": (0, 70),
    "every row": (150, 40),
    "both, two panels": (140, 150),
}


@pytest.mark.parametrize("pattern", GATE_PATTERNS)
def test_accumulators_are_written_before_read(pattern, monkeypatch):
    """The dense backward's fp32 accumulators start uninitialised (here: NaN). Exactly
    the rows that backward.written_or_zero calls written are written (the others still
    hold the NaN fill, so the rule skips nothing the backward wrote), they equal the
    float64 result, and the gradients kernel, reading only those rows, gives the bits of
    the same kernel on zero-filled gradients. The coefficients multiplied in the
    compaction give the bits of the products formed by torch."""
    from selhn_ext._triton import backward, config
    from selhn_ext.chunked import ChunkedBackend
    from selhn_ext.kernel_interface import GatedAnchors, GatedFactors

    def nan_filled(b, n_cols, dim, device):
        full = [torch.full((n, dim), float("nan"), device=device) for n in (b, n_cols)]
        return tuple(full)

    monkeypatch.setattr(backward, "accumulators", nan_filled)
    monkeypatch.setattr(config.testing, "panel_size", 128)
    gen = torch.Generator().manual_seed(17)
    b, n_cols, dim, row_offset = 150, 170, 24, 10
    block, _, row, col = backward_case(torch.float32, row_offset, b, n_cols, dim, gen)
    gated_rows, gated_cols = GATE_PATTERNS[pattern]
    row_gated = torch.zeros(b, dtype=torch.bool)
    row_gated[torch.randperm(b, generator=gen)[:gated_rows]] = True
    col_gated = torch.zeros(n_cols, dtype=torch.bool)
    col_gated[torch.randperm(n_cols, generator=gen)[:gated_cols]] = True
    # Coefficients whose fp32 products round (upstream x a dense weight 1 / n).
    factors = GatedFactors(
        row.upstream, torch.where(row_gated, 1 / 169, 0.0),
        col.upstream, torch.where(col_gated, 1 / 149, 0.0), row_gated, col_gated,
    )  # fmt: skip
    backend = TritonBackend()
    acc = backend.dense_backward_for_sparse(block, MARGIN, factors)
    gated_cols_exist, gated_rows_exist = gated_cols > 0, gated_rows > 0
    row_written = row_gated | gated_cols_exist
    col_written = gated_rows_exist | (col_gated & (gated_rows < b))
    for grad, written in ((acc.rows, row_written), (acc.cols, col_written)):
        assert not grad[written].isnan().any(), pattern
        assert grad[~written].isnan().all(), pattern
    full = backward.written_or_zero(acc._replace(rows=acc.rows.clone(), cols=acc.cols.clone()))
    direct = backend.dense_backward(block, MARGIN, factors.anchors())
    want = ChunkedBackend().dense_backward(
        Block(block.rows.double(), block.cols.double(), block.col_pos, row_offset), MARGIN,
        GatedAnchors(*(t.double() for t in factors.anchors()[:2]), row_gated, col_gated),
    )  # fmt: skip
    for got, same, w in zip(full, direct, want, strict=True):
        assert torch.equal(got, same)  # the products in the kernel: the same bits
        size = w.abs().amax(dim=1, keepdim=True) + 1
        assert ((got.double() - w).abs() <= 2**-18 * size).all()
    # The gradients kernel: skipping the rows not written == adding zeros.
    out_dtypes = (torch.float32, torch.float32)
    skipped = backend.sparse_and_diagonal_backward(
        block, acc, row, col, deterministic=True, out_dtypes=out_dtypes
    )
    zeros_added = backend.sparse_and_diagonal_backward(
        block, full, row, col, deterministic=True, out_dtypes=out_dtypes
    )
    for g, z in zip(skipped, zeros_added, strict=True):
        assert torch.equal(g, z)


# ---------------------------------------------------------------------------------------
# Launches and allocations

# Ops that launch nothing: allocations without a fill, and views.
NO_LAUNCH = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}


class OpCounter(TorchDispatchMode):
    """aten ops that run a kernel (views and empty allocations excluded), and the fp32
    tensors of at least ``big`` elements any op creates."""

    def __init__(self, big: int) -> None:
        super().__init__()
        self.big, self.ops, self.big_fp32 = big, Counter(), []
        # Inside the B x B kernels' launchers: their own aten ops and Triton launches.
        self.paused, self.launcher_ops, self.launcher_triton = 0, Counter(), Counter()
        self.triton, self.interpreting = Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.interpreting:
            return out
        name = func.overloadpacket.__name__
        schema = func._schema
        is_view = bool(schema.returns) and schema.returns[0].alias_info is not None
        is_view = is_view and not schema.returns[0].alias_info.is_write
        if name not in NO_LAUNCH and not is_view:
            (self.launcher_ops if self.paused else self.ops)[name] += 1
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= self.big:
                self.big_fp32.append((name, tuple(t.shape), bool(self.paused)))
        return out


@contextlib.contextmanager
def glue_counter(big: int):
    """Counts aten ops and Triton launches outside the B x B kernels' launchers
    (partials, dense_backward), which the counter pauses inside."""
    import triton.runtime.interpreter as interpreter

    counter = OpCounter(big)
    stack = contextlib.ExitStack()
    original_run = interpreter.InterpretedFunction.run

    def counted_run(self, *args, **kwargs):
        (counter.launcher_triton if counter.paused else counter.triton)[self.fn.__name__] += 1
        counter.interpreting += 1  # the interpreter's own copies of the arguments
        try:
            return original_run(self, *args, **kwargs)
        finally:
            counter.interpreting -= 1

    patch = stack.enter_context(pytest.MonkeyPatch.context())
    patch.setattr(interpreter.InterpretedFunction, "run", counted_run)
    for name in (
        "partials",
        "partials_for_finalize",
        "dense_backward",
        "dense_backward_for_sparse",
    ):
        original = getattr(TritonBackend, name)  # a function either way

        def paused(*args, _original=original, **kwargs):
            counter.paused += 1
            try:
                return _original(*args, **kwargs)
            finally:
                counter.paused -= 1

        is_static = isinstance(TritonBackend.__dict__[name], staticmethod)
        patch.setattr(TritonBackend, name, staticmethod(paused) if is_static else paused)
    with stack, counter:
        yield counter


def run_pipeline(img, txt, ids, mode, upstream):
    """pipeline.forward and .backward of the Triton backend, each under its own counter."""
    backend = TritonBackend()
    settings = pipeline.Settings(MARGIN, EPS, mode, False, False)
    one = pipeline.OneProcess(img.shape[0])
    big = img.numel()
    with glue_counter(big) as fwd:
        out = pipeline.forward(backend, img, txt, ids, settings, one)
    with glue_counter(big) as bwd:
        grads = pipeline.backward(
            backend, upstream, img, txt, ids, out.gated, out.hardest_index, out.saved, settings,
            one,
        )  # fmt: skip
    return fwd, bwd, out, grads


@pytest.mark.parametrize("mode", ["selhn", "hardest"])
@pytest.mark.parametrize("with_ids", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_glue_launches_and_allocations(dtype, with_ids, mode):
    from selhn_ext import dispatch

    if not dispatch.TRITON_INTERPRET:
        pytest.skip("counts Triton launches under the interpreter")
    gen = torch.Generator().manual_seed(5)
    b, dim = 70, 48
    img = torch.randn(b, dim, generator=gen).to(dtype)
    txt = torch.randn(b, dim, generator=gen).to(dtype)
    ids = torch.randint(0, 50, (b,), generator=gen) if with_ids else None
    upstream = torch.rand(2, b, generator=gen)
    fwd, bwd, out, grads = run_pipeline(img, txt, ids, mode, upstream)
    what = {name: (c.ops, c.triton, c.launcher_ops, c.launcher_triton) for name, c in
            (("forward", fwd), ("backward", bwd))}  # fmt: skip
    # Forward: positive scores, the forward kernels' buffers, and finalize of both
    # directions (decoding the packed maxima), one launch each, and no fp32 copy of an
    # input; with ids the negative counts add a sort, two binary searches and two
    # differences.
    assert fwd.triton == Counter(positive_kernel=1, finalize_kernel=1), what
    assert fwd.launcher_triton == Counter(dict.fromkeys(BXB_FORWARD, 1), partials_init_kernel=1)
    assert not fwd.launcher_ops, what
    assert glue_launches(fwd) == (3 + 5 * with_ids), what
    assert not fwd.big_fp32, fwd.big_fp32
    if mode == "hardest":
        # No anchor can be gated: no dense backward, three launches in all, and no fp32
        # B x D tensor unless the gradients themselves are fp32.
        assert bwd.triton == Counter(hard_keys_kernel=1, gradients_kernel=1), what
        assert bwd.ops == Counter(sort=1) and not bwd.launcher_triton, what
        assert not bwd.launcher_ops and glue_launches(bwd) == 3, what
        fp32_outputs = 2 if dtype == torch.float32 else 0
        assert len(bwd.big_fp32) == fp32_outputs, bwd.big_fp32
    else:
        # The glue: keys, sort, gradients, as in mode hardest (the gated coefficients are
        # multiplied in the compaction). Inside the dense backward's launcher nothing but
        # its own kernels: count_kernel zeroes the compaction's state, and the fp32
        # accumulators are allocated without a fill (each element is stored before it is
        # read, and the gradients kernel reads only the rows written: see
        # test_accumulators_are_written_before_read).
        assert bwd.triton == Counter(hard_keys_kernel=1, gradients_kernel=1), what
        assert bwd.ops == Counter(sort=1), what
        assert not bwd.launcher_ops and glue_launches(bwd) == 3, what
        assert Counter(bwd.launcher_triton) == Counter(
            count_kernel=1, compact_kernel=1, weights_kernel=2, products_kernel=1
        ), what
        # The fp32 B x D tensors: the two accumulators (allocated, never filled; fp32
        # gradients are written over them); the rest are the panel-sized workspaces of
        # the gated side's partial products (allocated, never filled).
        b_by_d = [(name, inside) for name, shape, inside in bwd.big_fp32 if shape == (b, dim)]
        assert b_by_d == [("empty", True)] * 2, what
        assert all(name == "empty" for name, _, _ in bwd.big_fp32), bwd.big_fp32
    assert grads[0].dtype == dtype and grads[1].dtype == dtype
    # The glue's result: the PyTorch glue on the same forward gives the same gradients
    # up to fp32 summation order and one rounding.
    reference = PyTorchGlue()
    with pytest.MonkeyPatch.context() as patch:
        for name in ("positive_scores", "partials_for_finalize", "finalize_both",
                     "finalize_forward", "dense_backward_for_sparse",
                     "sparse_and_diagonal_backward"):  # fmt: skip
            patch.setattr(TritonBackend, name, getattr(reference, name).__func__)
        _, _, out_ref, grads_ref = run_pipeline(img, txt, ids, mode, upstream)
    for got, want in zip(grads, grads_ref, strict=True):
        size = want.double().abs().amax(dim=1, keepdim=True) + 1
        ulp = 2**-7 if dtype == torch.bfloat16 else 2**-18
        assert ((got.double() - want.double()).abs() <= ulp * size).all()


BXB_FORWARD = {"partials_kernel", "exact_fixup_kernel"}
BXB_BACKWARD = {"count_kernel", "compact_kernel", "weights_kernel", "products_kernel"}


def glue_launches(counter) -> int:
    """Launches outside the B x B kernels (the launchers' own aten ops included)."""
    bxb = BXB_FORWARD | BXB_BACKWARD
    triton_glue = sum(n for k, n in counter.launcher_triton.items() if k not in bxb)
    return (
        sum(counter.ops.values()) + sum(counter.triton.values())
        + sum(counter.launcher_ops.values()) + triton_glue
    )  # fmt: skip


def _global_batch(dtype):
    gen = torch.Generator().manual_seed(21)
    n, dim = 75, 24
    img = torch.randn(n, dim, generator=gen).to(dtype)
    txt = (img.float() + 0.8 * torch.randn(n, dim, generator=gen)).to(dtype)
    ids = torch.randint(0, 60, (n,), generator=gen)
    return img, txt, ids


def _loss_and_grads(loss_fn, img, txt, ids, mode):
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    loss = loss_fn(img, txt, margin=MARGIN, eps=EPS, mode=mode, ids=ids, backend="triton")
    loss.backward()
    return loss.detach(), img.grad, txt.grad


SIZES = (40, 35)  # two ranks: the second block starts at row_offset 40
DIST_CASES = [(torch.float32, "selhn", True), (torch.bfloat16, "hardest", False)]


def _rank_main(rank: int) -> None:
    """One rank of test_distributed_blocks: its rows of the global batch."""
    import json

    import torch.distributed as dist

    from selhn_ext import distributed

    dist.init_process_group("gloo")
    rows = slice(sum(SIZES[:rank]), sum(SIZES[: rank + 1]))
    out = []
    for dtype, mode, with_ids in DIST_CASES:
        img, txt, ids = _global_batch(dtype)
        loss, g_img, g_txt = _loss_and_grads(
            distributed.selhn_loss, img[rows], txt[rows], ids[rows] if with_ids else None, mode
        )
        out.append([loss.item(), g_img.float().tolist(), g_txt.float().tolist()])
    dist.destroy_process_group()
    print("RESULT " + json.dumps(out))


@pytest.mark.backend("distributed")
def test_distributed_blocks(tmp_path):
    """Two gloo ranks (the second with row_offset 40) give the single-process gradients."""
    import json
    import os
    import socket
    import subprocess
    import sys

    from selhn_ext import functional

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank)],
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in range(2)
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr[-4000:]
        line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
        results.append(json.loads(line.removeprefix("RESULT ")))
    for case, (dtype, mode, with_ids) in enumerate(DIST_CASES):
        img, txt, ids = _global_batch(dtype)
        loss, g_img, g_txt = _loss_and_grads(
            functional.selhn_loss, img, txt, ids if with_ids else None, mode
        )
        got_img = torch.cat([torch.tensor(r[case][1]) for r in results])
        got_txt = torch.cat([torch.tensor(r[case][2]) for r in results])
        ulp = 2**-7 if dtype == torch.bfloat16 else 2**-18
        for got, want in ((got_img, g_img.float()), (got_txt, g_txt.float())):
            size = want.abs().amax() + 1e-30
            assert want.abs().amax() > 0
            assert ((got - want).abs() <= ulp * size).all(), (dtype, mode)
        for r in results:
            assert abs(r[case][0] - loss.item()) <= 1e-5 * abs(loss.item())


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["selhn", "hardest"])
@pytest.mark.parametrize("with_ids", [False, True])
def test_cuda_graph_captures_forward_and_backward(mode, with_ids):
    """No host sync anywhere: forward and backward are captured in one CUDA graph, and a
    replay on new inputs gives the eager result bit for bit."""
    from selhn_ext import functional

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    b, dim = 600, 256

    def batch():
        img = torch.randn(b, dim, generator=gen, device=device).to(torch.bfloat16)
        ids = torch.randint(0, 400, (b,), generator=gen, device=device)
        return img, torch.randn(b, dim, generator=gen, device=device).to(torch.bfloat16), ids

    static_img, static_txt, static_ids = (t.clone() for t in batch())
    static_img.requires_grad_()
    static_txt.requires_grad_()

    def step():
        loss = functional.selhn_loss(
            static_img, static_txt, margin=MARGIN, eps=EPS, mode=mode, backend="triton",
            ids=static_ids if with_ids else None, deterministic=True,
        )  # fmt: skip
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles every kernel before the capture
        for _ in range(2):
            static_img.grad = static_txt.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    static_img.grad = static_txt.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()

    img, txt, ids = batch()
    with torch.no_grad():
        static_img.copy_(img)
        static_txt.copy_(txt)
        static_ids.copy_(ids)
    graph.replay()
    torch.cuda.synchronize()
    eager_img, eager_txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    eager = functional.selhn_loss(
        eager_img, eager_txt, margin=MARGIN, eps=EPS, mode=mode, backend="triton",
        ids=ids if with_ids else None, deterministic=True,
    )  # fmt: skip
    eager.backward()
    assert torch.equal(static_loss, eager)
    assert torch.equal(static_img.grad, eager_img.grad)
    assert torch.equal(static_txt.grad, eager_txt.grad)
    assert eager_img.grad.abs().sum() > 0  # a gradient that an all-zero bug would fail


if __name__ == "__main__":
    import os

    _rank_main(int(os.environ["RANK"]))
