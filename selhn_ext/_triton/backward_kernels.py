"""The backward Triton kernels: the off-diagonal gradient of the gated anchors.

``count_kernel`` and ``compact_kernel`` order each side with its gated anchors first, on
the device, in blocks that run at once:

    row_order = [gated rows ascending | other rows descending]    (kr gated rows)
    col_order = [gated columns ascending | other columns descending]    (kc gated)

The pairs of S that touch a gated anchor form two disjoint parts, each recomputed once:

    part A: gated rows x every column       W = W_row + W_col
    part B: other rows x gated columns      W = W_col

Both are cut into panels of P gated anchors (rows for A, columns for B). Step t of the
backward handles panel t of both parts: ``weights_kernel`` recomputes the panel's S tiles
with ``score_tile`` (the forward's tiling and K order, so every active hinge is the
forward's) and writes W / scale in the input dtype; ``products_kernel`` multiplies on
tensor cores, each output tile owned by one program:

    gated side  (A: grad_rows[gated], B: grad_cols[gated])   = W @ other      K = n_other
    other side  (A: grad_cols,        B: grad_rows[other])  += W.T @ gated    K = panel

The gated side's products go to a workspace as partial sums (split over K when there are
too few output tiles to fill the GPU); the next ``weights_kernel`` launch adds them into
the gradient in a fixed order. No float atomics: the result does not depend on the order
in which programs run.

First writes: the fp32 gradients start uninitialised (no zero fill), and each element's
first term is stored, not added. grad_rows[gated row] has one term, the sum of part A's
partial products (``weights_kernel``, the step after its panel); the other rows' first
term is part B's product at step 0 (if any column is gated); grad_cols' first term is
part A's product at step 0 if any row is gated, else a gated column's part B sum. So a
gradient row is written iff (rows) it is gated or some column is, (columns) some row is
gated, or it is gated and some row is not; the rest is never written and must not be
read (``written_or_zero`` in backward.py, ``_dense_term`` in glue_kernels.py).

``scale`` is the largest finite |coefficient| of a gated anchor (raised to the smallest
normal fp32 when that is subnormal, so that 1 / scale is finite): with uniform coefficients
(mean reduction, no ids) W / scale is 0, 1 or 2, exact in every dtype; otherwise each
entry is rounded once to the input dtype (relative 2**-9 for bfloat16, 2**-12 for
float16), and the products accumulate in fp32.

Every kernel is persistent: its programs claim work items with an integer ticket, and
the number of items is computed on the device from the gated counts, so the work follows
what is gated without a host synchronisation.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tile import mma, score_tile

# The int32 state written by compact_kernel and read by every later launch.
GATED_ROWS = tl.constexpr(0)
GATED_COLS = tl.constexpr(1)
SCALE_BITS = tl.constexpr(2)  # fp32 bits of the scale (0 until the compaction sets it)
TICKETS = tl.constexpr(4)  # state[TICKETS + launch]: the next work item of each launch
SPLIT_MAX = tl.constexpr(8)  # at most this many K splits of a gated-side product tile
SMALLEST_NORMAL = tl.constexpr(2.0**-126)  # fp32
# Columns per tile of the sums of K splits: GM x SUM_COLS fp32, the running sum and one
# loaded split in registers (128 x 128 at 4 warps would spill).
SUM_COLS = tl.constexpr(64)


@triton.jit
def _coefficients(coef_ptr, factor_ptr, pos, mask, FACTORED: tl.constexpr):
    """coef[pos], or coef[pos] * factor[pos] (one fp32 product, as torch rounds it)."""
    coef = tl.load(coef_ptr + pos, mask=mask, other=0.0)
    if FACTORED:
        coef = coef * tl.load(factor_ptr + pos, mask=mask, other=0.0)
    return coef


@triton.jit
def count_kernel(
    row_flag_ptr, col_flag_ptr, row_coef_ptr, row_factor_ptr, col_coef_ptr, col_factor_ptr,
    blocks_ptr, state_ptr, state_len, b, N, FACTORED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Per block of BLOCK anchors (rows, then columns, one program each): the number of
    gated anchors, and the largest finite |coefficient| among them (fp32 bits; NaN and
    inf stay out), into ``blocks_ptr[pid]`` and ``blocks_ptr[blocks + pid]``. Program 0
    also zeroes ``state_ptr[:state_len]`` (counts, scale, tickets) for the launches after
    this one."""
    pid = tl.program_id(0)
    if pid == 0:
        for start in range(0, state_len, BLOCK):
            at = start + tl.arange(0, BLOCK)
            tl.store(state_ptr + at, tl.zeros((BLOCK,), tl.int32), mask=at < state_len)
    row_blocks = tl.cdiv(b, BLOCK)
    if pid < row_blocks:
        flag_ptr, coef_ptr, factor_ptr, n, block = (
            row_flag_ptr, row_coef_ptr, row_factor_ptr, b, pid
        )  # fmt: skip
    else:
        flag_ptr, coef_ptr, factor_ptr, n, block = (
            col_flag_ptr, col_coef_ptr, col_factor_ptr, N, pid - row_blocks
        )  # fmt: skip
    pos = block * BLOCK + tl.arange(0, BLOCK)
    ok = pos < n
    flag = tl.load(flag_ptr + pos, mask=ok, other=0) != 0
    tl.store(blocks_ptr + pid, tl.sum(flag.to(tl.int32), axis=0))
    coef = tl.abs(_coefficients(coef_ptr, factor_ptr, pos, ok & flag, FACTORED))
    coef = tl.where(coef < float("inf"), coef, 0.0)
    blocks = row_blocks + tl.cdiv(N, BLOCK)
    tl.store(blocks_ptr + blocks + pid, tl.max(coef, axis=0).to(tl.int32, bitcast=True))


@triton.jit
def compact_kernel(
    row_flag_ptr, col_flag_ptr, row_coef_ptr, row_factor_ptr, col_coef_ptr, col_factor_ptr,
    row_order_ptr, col_order_ptr, row_weight_ptr, col_weight_ptr, state_ptr, blocks_ptr, b,
    N, FACTORED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Per block (as count_kernel): its entries of the side's order and of its weights
    coefficient / scale (0 where not gated), the side's gated count (last block) and the
    scale (first program). Each program reads the per-block counts and maxima, so the
    blocks run at once and the work is O(n + blocks**2)."""
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(b, BLOCK)
    blocks = row_blocks + tl.cdiv(N, BLOCK)
    if pid < row_blocks:
        flag_ptr, coef_ptr, factor_ptr, order_ptr, weight_ptr = (
            row_flag_ptr, row_coef_ptr, row_factor_ptr, row_order_ptr, row_weight_ptr
        )  # fmt: skip
        n, block, first, count_at = b, pid, 0, GATED_ROWS
    else:
        flag_ptr, coef_ptr, factor_ptr, order_ptr, weight_ptr = (
            col_flag_ptr, col_coef_ptr, col_factor_ptr, col_order_ptr, col_weight_ptr
        )  # fmt: skip
        n, block, first, count_at = N, pid - row_blocks, row_blocks, GATED_COLS
    offs = tl.arange(0, BLOCK)
    before = 0  # gated anchors of the side's earlier blocks
    largest = 0  # the scale's bits: the max over every block of both sides
    for start in range(0, blocks, BLOCK):
        at = start + offs
        count = tl.load(blocks_ptr + at, mask=(at >= first) & (at < pid), other=0)
        before += tl.sum(count, axis=0)
        bits = tl.load(blocks_ptr + blocks + at, mask=at < blocks, other=0)
        largest = tl.maximum(largest, tl.max(bits, axis=0))
    scale = largest.to(tl.float32, bitcast=True)
    # At least the smallest normal float, so 1 / scale (the products' rescaling) is finite
    # when every gated coefficient is subnormal.
    scale = tl.where(scale > 0.0, tl.maximum(scale, SMALLEST_NORMAL), 1.0)
    pos = block * BLOCK + offs
    ok = pos < n
    flag = tl.load(flag_ptr + pos, mask=ok, other=0) != 0
    upto = before + tl.cumsum(flag.to(tl.int32), axis=0)  # gated in [0, pos]
    # A gated anchor goes to its rank from the front, the others fill from the back.
    tl.store(order_ptr + tl.where(flag, upto - 1, n - 1 - (pos - upto)), pos, mask=ok)
    coef = _coefficients(coef_ptr, factor_ptr, pos, ok & flag, FACTORED)
    # Rounded division (a plain / is approximate on GPUs): c / c is exactly 1.
    tl.store(weight_ptr + pos, tl.where(flag, tl.div_rn(coef, scale), 0.0), mask=ok)
    if (block + 1) * BLOCK >= n:
        tl.store(state_ptr + count_at, tl.max(upto, axis=0))
    if pid == 0:
        tl.store(state_ptr + SCALE_BITS, scale.to(tl.int32, bitcast=True))


@triton.jit
def _panel(state_ptr, step, b, panel):
    """(gated rows, other rows, and the gated anchors of panel ``step`` in parts A and B)."""
    kr = tl.load(state_ptr + GATED_ROWS)
    kc = tl.load(state_ptr + GATED_COLS)
    others = b - kr
    in_a = tl.minimum(tl.maximum(kr - step * panel, 0), panel)
    in_b = tl.minimum(tl.maximum(kc - step * panel, 0), panel)
    in_b = tl.where((others > 0) & (step >= 0), in_b, 0)  # part B needs other rows
    in_a = tl.where(step >= 0, in_a, 0)
    return kr, others, in_a, in_b


@triton.jit
def _split(in_a, in_b, target, d_blocks, panel, GM: tl.constexpr):
    """(K splits, rows per split in the workspace) of a step's gated-side products: enough
    tiles for ``target`` programs, at most SPLIT_MAX, and within the panel-sized workspace."""
    blocks = tl.maximum(tl.cdiv(in_a, GM), tl.cdiv(in_b, GM))
    tiles = (tl.cdiv(in_a, GM) + tl.cdiv(in_b, GM)) * d_blocks
    split = tl.maximum(target // tl.maximum(tiles, 1), 1)
    split = tl.minimum(tl.minimum(split, SPLIT_MAX), panel // tl.maximum(blocks * GM, GM))
    return split, blocks * GM


@triton.jit
def _claim(state_ptr, launch):
    """The next ticket of this launch (work items are tickets in some order, _item)."""
    return tl.atomic_add(state_ptr + TICKETS + launch, 1, sem="relaxed")


@triton.jit
def _item(ticket, first, end, REVERSE: tl.constexpr):
    """The work item of a ticket in [first, end): the same, or (REVERSE, a test switch)
    the items of that range in the opposite order."""
    if REVERSE:
        ticket = first + end - 1 - ticket
    return ticket


@triton.jit
def _rounded(w, dtype: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    """``w`` in the storage dtype, rounded to nearest even. The interpreter's own
    fp32 -> bfloat16 cast truncates, so there the rounding is done on the bits."""
    if BF16_BY_HAND:
        bits = w.to(tl.int32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        out = w.to(dtype)
    return out


@triton.jit
def _a_tiles(state_ptr, step, b, N, panel, BM: tl.constexpr, BN: tl.constexpr):
    """S tiles of part A of panel ``step``."""
    _, _, in_a, _ = _panel(state_ptr, step, b, panel)
    return tl.cdiv(in_a, BM) * tl.cdiv(N, BN)


@triton.jit
def _tiles(state_ptr, step, b, N, panel, BM: tl.constexpr, BN: tl.constexpr):
    """S tiles of panel ``step``: parts A and B."""
    _, others, in_a, in_b = _panel(state_ptr, step, b, panel)
    return tl.cdiv(in_a, BM) * tl.cdiv(N, BN) + tl.cdiv(in_b, BN) * tl.cdiv(others, BM)


@triton.jit
def _tile_weights(
    item, rows_ptr, cols_ptr, col_pos_ptr, row_ids_ptr, col_ids_ptr, row_weight_ptr,
    col_weight_ptr, row_order_ptr, col_order_ptr, state_ptr, w_a_ptr, w_b_ptr,
    tile_counter_ptr, b, N, D, row_offset, stride_rm, stride_rk, stride_cn, stride_ck, margin,
    step, panel, ld_a, PART_A: tl.constexpr, HAS_IDS: tl.constexpr, COUNT_TILES: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """W / scale of S tile ``item`` of the panel into its W buffer: part A's tiles
    (PART_A) are items [0, A tiles), part B's follow.

    Registers (4 warps): beside S, a per-column value costs 32 per thread, a per-row one
    4. So each part has its own code (PART_A is a constant): part A's columns stay plain
    offsets, part B carries no row term; part A masks no entry (_zero_positives). The
    panel's counts are read again here rather than carried through the work loops."""
    kr, others, in_a, in_b = _panel(state_ptr, step, b, panel)
    a_blocks = tl.cdiv(in_a, BM)
    # (row0, col0): the tile's place in the W buffer of its part; entries from column
    # col_end up to a multiple of 16 are padding (zero).
    if PART_A:  # gated rows (through row_order) x a block of plain columns
        row0 = (item % a_blocks) * BM
        row_ok = row0 + tl.arange(0, BM) < in_a
        row_mem = tl.load(row_order_ptr + step * panel + row0 + tl.arange(0, BM), mask=row_ok,
                          other=0)  # fmt: skip
        col0 = (item // a_blocks) * BN
        col_ok = col0 + tl.arange(0, BN) < N
        col_mem = tl.minimum(col0 + tl.arange(0, BN), N - 1)  # in bounds
        w_ptr, ld, col_end = w_a_ptr, ld_a, N
    else:  # other rows x gated columns, both through their orders
        tile = item - a_blocks * tl.cdiv(N, BN)
        b_blocks = tl.cdiv(in_b, BN)
        row0 = (tile // b_blocks) * BM
        row_ok = row0 + tl.arange(0, BM) < others
        row_mem = tl.load(row_order_ptr + kr + row0 + tl.arange(0, BM), mask=row_ok, other=0)
        col0 = (tile % b_blocks) * BN
        col_ok = col0 + tl.arange(0, BN) < in_b
        col_mem = tl.load(col_order_ptr + step * panel + col0 + tl.arange(0, BN), mask=col_ok,
                          other=0)  # fmt: skip
        w_ptr, ld, col_end = w_b_ptr, panel, in_b
    s = score_tile(
        rows_ptr, cols_ptr, row_mem.to(tl.int64), col_mem.to(tl.int64), row_ok, col_ok,
        D, stride_rm, stride_rk, stride_cn, stride_ck, BM, BN, BK, PRECISION, UPCAST,
    )  # fmt: skip
    if COUNT_TILES:
        tl.atomic_add(tile_counter_ptr, 1)
    row_glob = row_offset + row_mem
    # Past the ends, row_mem and col_mem hold anchors in bounds: no masks on these loads
    # (those entries are not stored).
    d_col = tl.load(col_pos_ptr + col_mem)
    col_w = tl.load(col_weight_ptr + col_mem)
    # The forward's hinge arguments, (margin + S) - d, in the same order.
    shifted = margin + s
    if PART_A:
        d_row = tl.load(col_pos_ptr + row_glob)
        row_w = tl.load(row_weight_ptr + row_mem)
        w = tl.where(shifted - d_row[:, None] > 0.0, row_w[:, None], 0.0)
    else:  # part B's rows are not gated: their term is 0.0 (kept: 0.0 + -0.0 is +0.0)
        w = 0.0
    w += tl.where(shifted - d_col[None, :] > 0.0, col_w[None, :], 0.0)
    if not PART_A:
        w = _without_positives(w, row_glob, col_mem)
    # Row starts from the tile's own rows: tl.arange(0, BM) * ld alone would be hoisted
    # out of the work loop (16 values per part, alive throughout).
    w_rows = w_ptr + (row0 + tl.arange(0, BM)).to(tl.int64) * ld
    col_loc = col0 + tl.arange(0, BN)
    w_at = w_rows[:, None] + col_loc[None, :]
    dtype = w_a_ptr.dtype.element_ty
    w = _rounded(w, dtype, UPCAST)
    if HAS_IDS:  # same-id pairs, once W is in the input dtype (64-bit ids per column)
        rid = tl.load(row_ids_ptr + row_mem, mask=row_ok, other=0)
        cid = tl.load(col_ids_ptr + col_mem, mask=col_ok, other=0)
        w = tl.where(rid[:, None] != cid[None, :], w, tl.zeros_like(w))
    tl.store(w_at, w, mask=row_ok[:, None] & (col_loc < col_end)[None, :])
    pad = col_end + tl.arange(0, 16)
    pad_ok = (pad < tl.cdiv(col_end, 16) * 16) & (col0 <= col_end) & (col_end < col0 + BN)
    tl.store(w_rows[:, None] + pad[None, :], tl.zeros((BM, 16), dtype),
             mask=row_ok[:, None] & pad_ok[None, :])  # fmt: skip
    if PART_A:
        _zero_positives(w_rows, row_glob, row_ok, col0, BM, BN)


@triton.jit
def _without_positives(w, row_glob, col_mem):
    """Part B: W with its positives zeroed, entry by entry (the columns are gathered)."""
    return tl.where(row_glob[:, None] != col_mem[None, :], w, 0.0)


@triton.jit
def _zero_positives(w_rows, row_glob, row_ok, col0, BM: tl.constexpr, BN: tl.constexpr):
    """Part A: zero the tile's positives in W (row i's is column row_glob[i]), after
    the tile's store: one entry per row at most, no mask on the tile."""
    tl.debug_barrier()
    on_tile = row_ok & (row_glob >= col0) & (row_glob < col0 + BN)
    tl.store(w_rows + row_glob, tl.zeros((BM,), w_rows.dtype.element_ty), mask=on_tile)


@triton.jit
def _part_a_tile(
    item, rows_ptr, cols_ptr, col_pos_ptr, row_ids_ptr, col_ids_ptr, row_weight_ptr,
    col_weight_ptr, row_order_ptr, col_order_ptr, state_ptr, w_a_ptr, w_b_ptr,
    tile_counter_ptr, b, N, D, row_offset, stride_rm, stride_rk, stride_cn, stride_ck, margin,
    step, panel, ld_a, HAS_IDS: tl.constexpr, COUNT_TILES: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """A tile of part A (bench/static_profile.py tells the parts apart by this name)."""
    _tile_weights(
        item, rows_ptr, cols_ptr, col_pos_ptr, row_ids_ptr, col_ids_ptr, row_weight_ptr,
        col_weight_ptr, row_order_ptr, col_order_ptr, state_ptr, w_a_ptr, w_b_ptr,
        tile_counter_ptr, b, N, D, row_offset, stride_rm, stride_rk, stride_cn, stride_ck,
        margin, step, panel, ld_a, True, HAS_IDS, COUNT_TILES, BM, BN, BK, PRECISION, UPCAST,
    )  # fmt: skip


@triton.jit
def _part_b_tile(
    item, rows_ptr, cols_ptr, col_pos_ptr, row_ids_ptr, col_ids_ptr, row_weight_ptr,
    col_weight_ptr, row_order_ptr, col_order_ptr, state_ptr, w_a_ptr, w_b_ptr,
    tile_counter_ptr, b, N, D, row_offset, stride_rm, stride_rk, stride_cn, stride_ck, margin,
    step, panel, ld_a, HAS_IDS: tl.constexpr, COUNT_TILES: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """A tile of part B (see _part_a_tile)."""
    _tile_weights(
        item, rows_ptr, cols_ptr, col_pos_ptr, row_ids_ptr, col_ids_ptr, row_weight_ptr,
        col_weight_ptr, row_order_ptr, col_order_ptr, state_ptr, w_a_ptr, w_b_ptr,
        tile_counter_ptr, b, N, D, row_offset, stride_rm, stride_rk, stride_cn, stride_ck,
        margin, step, panel, ld_a, False, HAS_IDS, COUNT_TILES, BM, BN, BK, PRECISION, UPCAST,
    )  # fmt: skip


@triton.jit
def _add_splits(
    part, state_ptr, row_order_ptr, col_order_ptr, ws_a_ptr, ws_b_ptr, grad_rows_ptr,
    grad_cols_ptr, b, D, step, panel, split_target, GM: tl.constexpr, GD: tl.constexpr,
):  # fmt: skip
    """Sum the K splits of gated-side tile ``part`` of the previous step's products into
    the gradient, split 0 first (parts of A, then of B)."""
    kr, _, prev_a, prev_b = _panel(state_ptr, step - 1, b, panel)
    split, split_rows = _split(prev_a, prev_b, split_target, tl.cdiv(D, GD), panel, GM)
    d_blocks = tl.cdiv(D, SUM_COLS)
    sums_a = tl.cdiv(prev_a, GM) * d_blocks
    # First writes (module docstring): a gated row's only term; a gated column's first
    # too when no row is gated, else added to part A's products.
    first = (part < sums_a) | (kr == 0)
    if part < sums_a:
        ws_ptr, order_ptr, grad_ptr, count = ws_a_ptr, row_order_ptr, grad_rows_ptr, prev_a
    else:
        part -= sums_a
        ws_ptr, order_ptr, grad_ptr, count = ws_b_ptr, col_order_ptr, grad_cols_ptr, prev_b
    g = (part // d_blocks) * GM + tl.arange(0, GM)
    g_ok = g < count
    d_idx = (part % d_blocks) * SUM_COLS + tl.arange(0, SUM_COLS)
    ok = g_ok[:, None] & (d_idx < D)[None, :]
    acc = tl.zeros((GM, SUM_COLS), dtype=tl.float32)
    for k_split in range(0, split):
        ws_rows = (k_split * split_rows + g).to(tl.int64)
        acc += tl.load(ws_ptr + ws_rows[:, None] * D + d_idx[None, :], mask=ok, other=0.0)
    mem = tl.load(order_ptr + (step - 1) * panel + g, mask=g_ok, other=0).to(tl.int64)
    out = grad_ptr + mem[:, None] * D + d_idx[None, :]
    if first:  # acc is never -0.0 (it starts at +0.0), so 0.0 + acc is acc
        tl.store(out, acc, mask=ok)
    else:
        tl.store(out, tl.load(out, mask=ok, other=0.0) + acc, mask=ok)


@triton.jit(do_not_specialize=["step"])
def weights_kernel(
    rows_ptr, cols_ptr, col_pos_ptr, row_ids_ptr, col_ids_ptr, row_weight_ptr, col_weight_ptr,
    row_order_ptr, col_order_ptr, state_ptr, w_a_ptr, w_b_ptr, ws_a_ptr, ws_b_ptr,
    grad_rows_ptr, grad_cols_ptr, tile_counter_ptr, b, N, D, row_offset, stride_rm, stride_rk,
    stride_cn, stride_ck, margin, step, panel, ld_a, split_target, HAS_IDS: tl.constexpr,
    COUNT_TILES: tl.constexpr, REVERSE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, GM: tl.constexpr, GD: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """W of panel ``step`` (S tiles of parts A and B), then the fixed-order sum of the
    previous step's gated-side partial products into the gradients.

    Both W buffers are row-major with S's orientation (rows of S along rows of W):
    ``w_a`` (P, ld_a): row g = gated row ``row_order[step * P + g]``, column j = column j;
    ``w_b`` (b, P): row o = other row ``row_order[kr + o]``, column g = gated column
    ``col_order[step * P + g]``. Entries hold W / scale in the input dtype, with zeros
    from the last column up to a multiple of 16, so that the products read aligned
    vectors (async copies) with 16-entry masks.

    Tickets [0, S tiles) are the S tiles (part A's, then part B's), the rest the sums;
    the two kinds have their own loops (a program leaves the first with its first sum
    ticket), so that the compiler allocates registers for each on its own. (Parts A and
    B in two loops do worse: the compiler shares their loop-invariant values, alive
    through both.)
    """
    launch = 2 * step
    ticket = _claim(state_ptr, launch)
    while ticket < _tiles(state_ptr, step, b, N, panel, BM, BN):
        item = _item(ticket, 0, _tiles(state_ptr, step, b, N, panel, BM, BN), REVERSE)
        if item < _a_tiles(state_ptr, step, b, N, panel, BM, BN):
            _part_a_tile(
                item, rows_ptr, cols_ptr, col_pos_ptr, row_ids_ptr, col_ids_ptr, row_weight_ptr,
                col_weight_ptr, row_order_ptr, col_order_ptr, state_ptr, w_a_ptr, w_b_ptr,
                tile_counter_ptr, b, N, D, row_offset, stride_rm, stride_rk, stride_cn,
                stride_ck, margin, step, panel, ld_a, HAS_IDS, COUNT_TILES, BM, BN, BK,
                PRECISION, UPCAST,
            )  # fmt: skip
        else:
            _part_b_tile(
                item, rows_ptr, cols_ptr, col_pos_ptr, row_ids_ptr, col_ids_ptr, row_weight_ptr,
                col_weight_ptr, row_order_ptr, col_order_ptr, state_ptr, w_a_ptr, w_b_ptr,
                tile_counter_ptr, b, N, D, row_offset, stride_rm, stride_rk, stride_cn,
                stride_ck, margin, step, panel, ld_a, HAS_IDS, COUNT_TILES, BM, BN, BK,
                PRECISION, UPCAST,
            )  # fmt: skip
        ticket = _claim(state_ptr, launch)
    # The previous step's partial products (none before step 0).
    tiles = _tiles(state_ptr, step, b, N, panel, BM, BN)
    _, _, prev_a, prev_b = _panel(state_ptr, step - 1, b, panel)
    total = tiles + (tl.cdiv(prev_a, GM) + tl.cdiv(prev_b, GM)) * tl.cdiv(D, SUM_COLS)
    while ticket < total:
        _add_splits(
            _item(ticket, tiles, total, REVERSE) - tiles, state_ptr, row_order_ptr,
            col_order_ptr, ws_a_ptr, ws_b_ptr, grad_rows_ptr, grad_cols_ptr, b, D, step, panel,
            split_target, GM, GD,
        )  # fmt: skip
        ticket = _claim(state_ptr, launch)


@triton.jit
def _w_tile(w_ptr, ld, m, k, m_end, k_end, W_IS_KM: tl.constexpr):
    """The (M, K) operand tile of W: W[m, k] from a row-major (m, k) buffer, or W[k, m]
    (W_IS_KM). The contiguous index is read up to its end rounded up to 16 (zeros there,
    see weights_kernel), so that its mask covers whole aligned vectors (async copies)."""
    if W_IS_KM:
        ptrs = w_ptr + k[None, :].to(tl.int64) * ld + m[:, None]
        mask = (m < tl.cdiv(m_end, 16) * 16)[:, None] & (k < k_end)[None, :]
    else:
        ptrs = w_ptr + m[:, None].to(tl.int64) * ld + k[None, :]
        mask = (m < m_end)[:, None] & (k < tl.cdiv(k_end, 16) * 16)[None, :]
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _gated_product(
    w_ptr, ld, count, n_other, x_ptr, stride_xn, stride_xk, gather_ptr, ws_ptr, scale, D,
    block, d_block, k_split, split, split_rows,
    W_IS_KM: tl.constexpr, GATHER: tl.constexpr, GM: tl.constexpr, GD: tl.constexpr,
    GK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Workspace rows ``k_split * split_rows + g`` = scale * (W[g, K part] @ x[K part]) for
    one GM x GD tile of the gated anchors g; x rows are plain (A: columns) or through
    ``gather_ptr`` (B: other rows)."""
    g = block * GM + tl.arange(0, GM)
    g_ok = g < count
    d_idx = d_block * GD + tl.arange(0, GD)
    d_ok = d_idx < D
    chunk = tl.cdiv(tl.cdiv(n_other, split), GK) * GK
    k_lo = k_split * chunk
    k_hi = tl.minimum(k_lo + chunk, n_other)
    acc = tl.zeros((GM, GD), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, GK):
        k = k0 + tl.arange(0, GK)
        a = _w_tile(w_ptr, ld, g, k, count, k_hi, W_IS_KM)
        k_ok = k < k_hi
        if GATHER:
            mem = tl.load(gather_ptr + k, mask=k_ok, other=0).to(tl.int64)
        else:
            mem = k.to(tl.int64)
        x = tl.load(
            x_ptr + mem[:, None] * stride_xn + d_idx[None, :] * stride_xk,
            mask=k_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc = mma(a, x, acc, PRECISION, UPCAST)
    ws_rows = (k_split * split_rows + g).to(tl.int64)
    tl.store(
        ws_ptr + ws_rows[:, None] * D + d_idx[None, :],
        acc * scale,
        mask=g_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _other_product(
    w_ptr, ld, count, n_out, x_ptr, stride_xn, stride_xk, order_ptr, out_order_ptr, grad_ptr,
    scale, inv_scale, D, block, d_block, step,
    W_IS_KM: tl.constexpr, OUT_GATHER: tl.constexpr, GM: tl.constexpr, GD: tl.constexpr,
    GK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """grad[o] += W[o, :count] @ x[order[:count]] * scale for one GM x GD tile of the
    other side; output rows plain (A: columns) or through ``out_order_ptr`` (B: other
    rows). The accumulator starts from grad[o] / scale, so the epilogue holds one tile
    (two more fp32 roundings of the running sum per panel; none for a power-of-two scale)."""
    o = block * GM + tl.arange(0, GM)
    o_ok = o < n_out
    d_idx = d_block * GD + tl.arange(0, GD)
    d_ok = d_idx < D
    if OUT_GATHER:
        out_mem = tl.load(out_order_ptr + o, mask=o_ok, other=0).to(tl.int64)
    else:
        out_mem = o.to(tl.int64)
    out = grad_ptr + out_mem[:, None] * D + d_idx[None, :]
    ok = o_ok[:, None] & d_ok[None, :]
    # Step 0 writes first (nothing was stored before): the running sum starts at 0.
    acc = tl.load(out, mask=ok & (step > 0), other=0.0) * inv_scale
    for g0 in range(0, count, GK):
        g = g0 + tl.arange(0, GK)
        a = _w_tile(w_ptr, ld, o, g, n_out, count, W_IS_KM)
        g_ok = g < count
        mem = tl.load(order_ptr + g, mask=g_ok, other=0).to(tl.int64)
        x = tl.load(
            x_ptr + mem[:, None] * stride_xn + d_idx[None, :] * stride_xk,
            mask=g_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc = mma(a, x, acc, PRECISION, UPCAST)
    # Two different stores: merged into one tail, the two callers' accumulators would
    # share registers and the compiler would serialise their tensor-core loops. The
    # other rows' gradient (B) is rarely read again within the backward: streamed.
    if OUT_GATHER:
        tl.store(out, acc * scale, mask=ok, cache_modifier=".cs")
    else:
        tl.store(out, acc * scale, mask=ok)


@triton.jit(do_not_specialize=["step"])
def products_kernel(
    rows_ptr, cols_ptr, row_order_ptr, col_order_ptr, state_ptr, w_a_ptr, w_b_ptr, ws_a_ptr,
    ws_b_ptr, grad_rows_ptr, grad_cols_ptr, b, N, D, stride_rm, stride_rk, stride_cn,
    stride_ck, step, panel, ld_a, split_target, REVERSE: tl.constexpr, GM: tl.constexpr,
    GD: tl.constexpr, GK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """The gradient products of panel ``step`` (W layouts in weights_kernel). Items,
    longest first: the gated-side tiles of A and B (times their K splits, into the
    workspaces), then the other-side tiles of A (grad_cols) and B (grad_rows of the
    other rows)."""
    scale = tl.load(state_ptr + SCALE_BITS).to(tl.float32, bitcast=True)
    inv_scale = tl.div_rn(1.0, scale)  # a plain / is approximate on GPUs
    kr, others, in_a, in_b = _panel(state_ptr, step, b, panel)
    d_blocks = tl.cdiv(D, GD)
    split, split_rows = _split(in_a, in_b, split_target, d_blocks, panel, GM)
    a_blocks = tl.cdiv(in_a, GM)
    b_blocks = tl.cdiv(in_b, GM)
    gated_a = a_blocks * d_blocks * split
    gated = gated_a + b_blocks * d_blocks * split
    other_a = tl.where(in_a > 0, tl.cdiv(N, GM) * d_blocks, 0)
    total = gated + other_a + tl.where(in_b > 0, tl.cdiv(others, GM) * d_blocks, 0)
    start = step * panel
    launch = 2 * step + 1

    ticket = _claim(state_ptr, launch)
    while ticket < total:
        item = _item(ticket, 0, total, REVERSE)
        if item < gated:  # W @ other side: partial sums into the workspaces
            is_a = item < gated_a
            part = tl.where(is_a, item, item - gated_a)
            blocks = tl.where(is_a, a_blocks, b_blocks)
            block = (part // d_blocks) % blocks
            k_split = part // (d_blocks * blocks)
            if is_a:  # grad_rows[gated rows]: W_A @ cols
                _gated_product(
                    w_a_ptr, ld_a, in_a, N, cols_ptr, stride_cn, stride_ck, row_order_ptr,
                    ws_a_ptr, scale, D, block, part % d_blocks, k_split, split, split_rows,
                    False, False, GM, GD, GK, PRECISION, UPCAST,
                )  # fmt: skip
            else:  # grad_cols[gated columns]: W_B.T @ rows[other rows]
                _gated_product(
                    w_b_ptr, panel, in_b, others, rows_ptr, stride_rm, stride_rk,
                    row_order_ptr + kr, ws_b_ptr, scale, D, block, part % d_blocks, k_split,
                    split, split_rows, True, True, GM, GD, GK, PRECISION, UPCAST,
                )  # fmt: skip
        elif item < gated + other_a:  # grad_cols += W_A.T @ rows[gated rows of the panel]
            part = item - gated
            _other_product(
                w_a_ptr, ld_a, in_a, N, rows_ptr, stride_rm, stride_rk, row_order_ptr + start,
                row_order_ptr, grad_cols_ptr, scale, inv_scale, D, part // d_blocks,
                part % d_blocks, step,
                True, False, GM, GD, GK, PRECISION, UPCAST,
            )  # fmt: skip
        else:  # grad_rows[other rows] += W_B @ cols[gated columns of the panel]
            part = item - gated - other_a
            _other_product(
                w_b_ptr, panel, in_b, others, cols_ptr, stride_cn, stride_ck,
                col_order_ptr + start, row_order_ptr + kr, grad_rows_ptr, scale, inv_scale, D,
                part // d_blocks, part % d_blocks, step, False, True, GM, GD, GK, PRECISION, UPCAST,
            )  # fmt: skip
        ticket = _claim(state_ptr, launch)
