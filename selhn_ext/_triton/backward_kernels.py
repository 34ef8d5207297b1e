"""The backward Triton kernels: device-side compaction of the gated anchors, and the
off-diagonal gradient of the gated anchors through recomputed S tiles (see tile.py)."""

from __future__ import annotations

import triton
import triton.language as tl

from .tile import block_ids, mma, score_tile, valid_pairs


@triton.jit
def compact_kernel(flag_ptr, index_ptr, count_ptr, n, BLOCK: tl.constexpr):
    """index[0:count] = the positions of the nonzero flags, in order; one program."""
    offs = tl.arange(0, BLOCK)
    total = tl.zeros((1,), dtype=tl.int32)
    for start in range(0, n, BLOCK):
        pos = start + offs
        flag = (tl.load(flag_ptr + pos, mask=pos < n, other=0) != 0).to(tl.int32)
        target = tl.sum(total, axis=0) + tl.cumsum(flag, axis=0) - 1
        tl.store(index_ptr + target, pos, mask=flag != 0)
        total += tl.sum(flag, axis=0)
    tl.store(count_ptr + tl.arange(0, 1), total)


@triton.jit
def _block_of(block, size, index_ptr, count, GATHER: tl.constexpr, BLOCK: tl.constexpr):
    """(memory indices int64, in-bounds mask) of a block, through the compacted list if any."""
    pos = tl.cast(block, tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if GATHER:
        ok = pos < count
        mem = tl.load(index_ptr + pos, mask=ok, other=0).to(tl.int64)
    else:
        ok = pos < size
        mem = pos
    return mem, ok


@triton.jit
def _accumulate(ptr, value, mask, ATOMIC: tl.constexpr):
    if ATOMIC:
        tl.atomic_add(ptr, value, mask=mask, sem="relaxed")
    else:
        # The program owns these rows; the barrier orders this store before the next
        # tile's load of the same rows, which may happen on other threads of the block.
        tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + value, mask=mask)
        tl.debug_barrier()


@triton.jit
def dense_backward_kernel(
    rows_ptr,
    cols_ptr,
    col_pos_ptr,
    row_ids_ptr,
    col_ids_ptr,
    coef_ptr,
    gated_index_ptr,
    gated_count_ptr,
    grad_rows_ptr,
    grad_cols_ptr,
    tile_counter_ptr,
    b,
    N,
    D,
    row_offset,
    stride_rm,
    stride_rk,
    stride_cn,
    stride_ck,
    margin,
    inner_blocks_per_split,
    GATED_IS_ROW: tl.constexpr,
    OUTER_IS_GATED: tl.constexpr,
    WRITE_ROWS: tl.constexpr,
    WRITE_COLS: tl.constexpr,
    ATOMIC: tl.constexpr,
    HAS_IDS: tl.constexpr,
    COUNT_TILES: tl.constexpr,
    REVERSE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Off-diagonal gradient of the gated anchors of one side, through recomputed tiles.

    The gated side (rows if GATED_IS_ROW, else columns) is visited through its compacted
    index list of device-side length ``count``; its coefficient c gives
    W = c * 1[hinge of the gated anchor active] on valid pairs. Axis 0 of the grid is the
    outer block (a gated block if OUTER_IS_GATED, else a plain block of the other side),
    axis 1 the split of the inner blocks. Worst-case grids: programs past ``count`` exit
    before loading anything.

    W is split as c * A with A the 0/1 activity (exact in every input dtype). The gated
    side's gradient is c * (A @ other); the other side's is cmax * (A.T @ (c / cmax) * x)
    with cmax the block's largest |c|, so 16-bit operands neither underflow nor lose the
    coefficient's precision beyond one rounding.
    """
    pid_outer, pid_split = block_ids(REVERSE)
    count = tl.load(gated_count_ptr)
    OUTER_IS_ROW: tl.constexpr = GATED_IS_ROW == OUTER_IS_GATED
    if OUTER_IS_ROW:
        outer_start = pid_outer * BM
        n_other = tl.cdiv(N, BN)
    else:
        outer_start = pid_outer * BN
        n_other = tl.cdiv(b, BM)
    if OUTER_IS_GATED:
        # A program past the gated count has no inner block to visit.
        n_inner = tl.where(outer_start < count, n_other, 0)
    elif GATED_IS_ROW:
        n_inner = tl.cdiv(count, BM)
    else:
        n_inner = tl.cdiv(count, BN)
    inner_start = pid_split * inner_blocks_per_split
    inner_stop = tl.minimum(inner_start + inner_blocks_per_split, n_inner)
    if UPCAST:  # the interpreter's bfloat16 casts are not round-to-nearest; stay in fp32
        dtype = tl.float32
    else:
        dtype = rows_ptr.dtype.element_ty
    offs_d = tl.arange(0, BD)
    zero_rows = tl.zeros((BM, BD), dtype=tl.float32)
    zero_cols = tl.zeros((BN, BD), dtype=tl.float32)

    for inner in range(inner_start, inner_stop):
        if OUTER_IS_ROW:
            rb = pid_outer
            cb = inner
        else:
            rb = inner
            cb = pid_outer
        row_mem, row_ok = _block_of(rb, b, gated_index_ptr, count, GATED_IS_ROW, BM)
        col_mem, col_ok = _block_of(cb, N, gated_index_ptr, count, GATED_IS_ROW == 0, BN)
        row_glob = row_offset + row_mem
        s = score_tile(
            rows_ptr, cols_ptr, row_mem, col_mem, row_ok, col_ok, D,
            stride_rm, stride_rk, stride_cn, stride_ck, BM, BN, BK, PRECISION, UPCAST,
        )  # fmt: skip
        if COUNT_TILES:
            tl.atomic_add(tile_counter_ptr, 1)
        valid = valid_pairs(
            row_glob, col_mem, row_ok, col_ok, row_ids_ptr, col_ids_ptr, row_mem, col_mem,
            HAS_IDS,
        )  # fmt: skip
        if GATED_IS_ROW:
            d_anchor = tl.load(col_pos_ptr + row_glob, mask=row_ok, other=0.0)
            active = valid & ((margin + s) - d_anchor[:, None] > 0.0)
            coef = tl.load(coef_ptr + row_mem, mask=row_ok, other=0.0)
        else:
            d_anchor = tl.load(col_pos_ptr + col_mem, mask=col_ok, other=0.0)
            active = valid & ((margin + s) - d_anchor[None, :] > 0.0)
            coef = tl.load(coef_ptr + col_mem, mask=col_ok, other=0.0)
        act = tl.where(active, 1.0, 0.0).to(dtype)
        cmax = tl.max(tl.abs(coef), axis=0)
        cmax = tl.where(cmax > 0.0, cmax, 1.0)
        scale = coef / cmax

        for d0 in range(0, D, BD):
            d_idx = d0 + offs_d
            d_ok = d_idx < D
            row_tile_ok = row_ok[:, None] & d_ok[None, :]
            col_tile_ok = col_ok[:, None] & d_ok[None, :]
            x_rows = tl.load(
                rows_ptr + row_mem[:, None] * stride_rm + d_idx[None, :] * stride_rk,
                mask=row_tile_ok,
                other=0.0,
            )
            x_cols = tl.load(
                cols_ptr + col_mem[:, None] * stride_cn + d_idx[None, :] * stride_ck,
                mask=col_tile_ok,
                other=0.0,
            )
            if GATED_IS_ROW:
                g_rows = mma(act, x_cols, zero_rows, PRECISION, UPCAST) * coef[:, None]
                scaled = (x_rows.to(tl.float32) * scale[:, None]).to(dtype)
                g_cols = mma(tl.trans(act), scaled, zero_cols, PRECISION, UPCAST) * cmax
            else:
                g_cols = mma(tl.trans(act), x_rows, zero_cols, PRECISION, UPCAST) * coef[:, None]
                scaled = (x_cols.to(tl.float32) * scale[:, None]).to(dtype)
                g_rows = mma(act, scaled, zero_rows, PRECISION, UPCAST) * cmax
            if WRITE_ROWS:
                out = grad_rows_ptr + row_mem[:, None] * D + d_idx[None, :]
                _accumulate(out, g_rows, row_tile_ok, ATOMIC)
            if WRITE_COLS:
                out = grad_cols_ptr + col_mem[:, None] * D + d_idx[None, :]
                _accumulate(out, g_cols, col_tile_ok, ATOMIC)


# Panel backward: the off-diagonal gradient of the gated anchors of one side, in panels of
# P compacted gated anchors, with no float atomics. Per panel: the activity kernel writes
# A (P x n_other, 0/1 in the input dtype), then two tl.dot GEMMs whose output tiles are
# each owned by one program: the gated side's rows of the gradient (A @ other) and the
# other side's whole gradient (A.T @ (coef * gated)), added panel after panel in launch
# order. So the result does not depend on the order in which programs run.


@triton.jit
def panel_activity_kernel(
    rows_ptr,
    cols_ptr,
    col_pos_ptr,
    row_ids_ptr,
    col_ids_ptr,
    gated_index_ptr,
    gated_count_ptr,
    act_ptr,
    tile_counter_ptr,
    b,
    N,
    D,
    row_offset,
    stride_rm,
    stride_rk,
    stride_cn,
    stride_ck,
    margin,
    panel_start,
    GATED_IS_ROW: tl.constexpr,
    HAS_IDS: tl.constexpr,
    COUNT_TILES: tl.constexpr,
    REVERSE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """act[g, o] = 1[hinge of gated anchor panel_start + g against o active], else 0.

    Grid (gated blocks of the panel, blocks of the other side). The gated side is read
    through its compacted index list; S comes from ``score_tile`` with the forward's
    tiling, so the activity is the forward's bit for bit. ``act`` is row-major
    (P, n_other) with n_other = N for gated rows and b for gated columns. Programs whose
    gated block starts past the device-side count store nothing.
    """
    pid_gated, pid_other = block_ids(REVERSE)
    count = tl.load(gated_count_ptr)
    if GATED_IS_ROW:
        rb = panel_start // BM + pid_gated
        cb = pid_other
        first = tl.cast(rb, tl.int64) * BM
    else:
        rb = pid_other
        cb = panel_start // BN + pid_gated
        first = tl.cast(cb, tl.int64) * BN
    if first < count:
        row_mem, row_ok = _block_of(rb, b, gated_index_ptr, count, GATED_IS_ROW, BM)
        col_mem, col_ok = _block_of(cb, N, gated_index_ptr, count, GATED_IS_ROW == 0, BN)
        row_glob = row_offset + row_mem
        s = score_tile(
            rows_ptr, cols_ptr, row_mem, col_mem, row_ok, col_ok, D,
            stride_rm, stride_rk, stride_cn, stride_ck, BM, BN, BK, PRECISION, UPCAST,
        )  # fmt: skip
        if COUNT_TILES:
            tl.atomic_add(tile_counter_ptr, 1)
        valid = valid_pairs(
            row_glob, col_mem, row_ok, col_ok, row_ids_ptr, col_ids_ptr, row_mem, col_mem,
            HAS_IDS,
        )  # fmt: skip
        mask = row_ok[:, None] & col_ok[None, :]
        if GATED_IS_ROW:
            d_anchor = tl.load(col_pos_ptr + row_glob, mask=row_ok, other=0.0)
            active = valid & ((margin + s) - d_anchor[:, None] > 0.0)
            g_loc = first + tl.arange(0, BM) - panel_start
            ptrs = act_ptr + g_loc[:, None] * N + col_mem[None, :]
        else:
            d_anchor = tl.load(col_pos_ptr + col_mem, mask=col_ok, other=0.0)
            active = valid & ((margin + s) - d_anchor[None, :] > 0.0)
            g_loc = first + tl.arange(0, BN) - panel_start
            ptrs = act_ptr + g_loc[None, :] * b + row_mem[:, None]
        tl.store(ptrs, tl.where(active, 1.0, 0.0).to(act_ptr.dtype.element_ty), mask=mask)


@triton.jit
def panel_gated_grad_kernel(
    act_ptr,
    other_ptr,
    coef_ptr,
    gated_index_ptr,
    gated_count_ptr,
    grad_ptr,
    n_other,
    D,
    stride_xn,
    stride_xk,
    panel_start,
    REVERSE: tl.constexpr,
    GM: tl.constexpr,
    GD: tl.constexpr,
    GK: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """grad[index[panel_start + g]] += coef * (act[g, :] @ other) for the panel's anchors.

    Grid (panel blocks of GM anchors, blocks of GD embedding columns); each program owns
    its output tile (compacted indices are unique), and the product of the exact 0/1
    activity is scaled by the fp32 coefficient after the fp32 accumulation.
    """
    pid_g, pid_d = block_ids(REVERSE)
    count = tl.load(gated_count_ptr)
    g_loc = tl.cast(pid_g, tl.int64) * GM + tl.arange(0, GM)
    if panel_start + pid_g * GM < count:
        g_ok = panel_start + g_loc < count
        mem = tl.load(gated_index_ptr + panel_start + g_loc, mask=g_ok, other=0).to(tl.int64)
        d_idx = tl.cast(pid_d, tl.int64) * GD + tl.arange(0, GD)
        d_ok = d_idx < D
        offs_k = tl.arange(0, GK).to(tl.int64)  # o * stride_xn may pass 2**31
        acc = tl.zeros((GM, GD), dtype=tl.float32)
        for o0 in range(0, n_other, GK):
            o = o0 + offs_k
            o_ok = o < n_other
            # Rows past the count hold another panel's (or no) data: masked to 0.
            a = tl.load(
                act_ptr + g_loc[:, None] * n_other + o[None, :],
                mask=g_ok[:, None] & o_ok[None, :],
                other=0.0,
            )
            x = tl.load(
                other_ptr + o[:, None] * stride_xn + d_idx[None, :] * stride_xk,
                mask=o_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            acc = mma(a, x, acc, PRECISION, UPCAST)
        coef = tl.load(coef_ptr + mem, mask=g_ok, other=0.0)
        out = grad_ptr + mem[:, None] * D + d_idx[None, :]
        out_ok = g_ok[:, None] & d_ok[None, :]
        tl.store(out, tl.load(out, mask=out_ok, other=0.0) + acc * coef[:, None], mask=out_ok)


@triton.jit
def panel_other_grad_kernel(
    act_ptr,
    gated_ptr,
    coef_ptr,
    gated_index_ptr,
    gated_count_ptr,
    grad_ptr,
    n_other,
    D,
    stride_xn,
    stride_xk,
    panel_start,
    panel_size,
    REVERSE: tl.constexpr,
    GM: tl.constexpr,
    GD: tl.constexpr,
    GK: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """grad[o] += sum over the panel's anchors g of act[g, o] * coef_g * gated[index[g]].

    Grid (blocks of GM other-side anchors, blocks of GD embedding columns); each program
    owns its output tile for the whole panel (read-add-write, no atomics). Each K step of
    GK anchors scales its operand by coef / max|coef| of those anchors and the product
    back by that max, so 16-bit operands neither underflow nor lose the coefficient.
    """
    pid_o, pid_d = block_ids(REVERSE)
    count = tl.load(gated_count_ptr)
    n_gated = tl.minimum(count - panel_start, panel_size)
    if n_gated > 0:
        if UPCAST:  # the interpreter's bfloat16 casts are not round-to-nearest
            dtype = tl.float32
        else:
            dtype = gated_ptr.dtype.element_ty
        o = tl.cast(pid_o, tl.int64) * GM + tl.arange(0, GM)
        o_ok = o < n_other
        d_idx = tl.cast(pid_d, tl.int64) * GD + tl.arange(0, GD)
        d_ok = d_idx < D
        offs_k = tl.arange(0, GK).to(tl.int64)
        zero = tl.zeros((GM, GD), dtype=tl.float32)
        acc = tl.zeros((GM, GD), dtype=tl.float32)
        for g0 in range(0, n_gated, GK):
            g_loc = g0 + offs_k
            g_ok = g_loc < n_gated
            mem = tl.load(gated_index_ptr + panel_start + g_loc, mask=g_ok, other=0)
            mem = mem.to(tl.int64)
            a_t = tl.load(
                act_ptr + g_loc[None, :] * n_other + o[:, None],
                mask=o_ok[:, None] & g_ok[None, :],
                other=0.0,
            )
            coef = tl.load(coef_ptr + mem, mask=g_ok, other=0.0)
            cmax = tl.max(tl.abs(coef), axis=0)
            cmax = tl.where(cmax > 0.0, cmax, 1.0)
            x = tl.load(
                gated_ptr + mem[:, None] * stride_xn + d_idx[None, :] * stride_xk,
                mask=g_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            scaled = (x.to(tl.float32) * (coef / cmax)[:, None]).to(dtype)
            acc += mma(a_t, scaled, zero, PRECISION, UPCAST) * cmax
        out = grad_ptr + o[:, None] * D + d_idx[None, :]
        out_ok = o_ok[:, None] & d_ok[None, :]
        tl.store(out, tl.load(out, mask=out_ok, other=0.0) + acc, mask=out_ok)
