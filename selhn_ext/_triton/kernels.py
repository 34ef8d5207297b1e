"""Triton kernels of the SelHN loss: fused passes over tiles of S = rows @ cols.T.

No kernel stores S. Every tile is computed by ``_score_tile`` with the same block shape
and K-loop order, in the forward and in the backward's recompute, so the backward sees
the forward's active hinges bit for bit.

Row / column maxima and their arguments are merged across programs with one packed
64-bit key per anchor (``tl.atomic_max`` on int64):

    key = orderable(max) << 32 | (0xFFFFFFFF - global_index)

``orderable`` maps a float's bits to an int32 that sorts like the float, with -0.0 mapped
to +0.0 and every NaN to the largest value, so the largest key holds the largest score
(NaN first) and, among equal scores, the smallest index. ``NO_KEY`` (int64 min) means no
valid negative was seen.
"""

from __future__ import annotations

import triton
import triton.language as tl

INT32_MIN = tl.constexpr(-2147483648)
INT32_MAX = tl.constexpr(2147483647)
NO_KEY = tl.constexpr(-9223372036854775808)
LOW_MASK = tl.constexpr(0xFFFFFFFF)


@triton.jit
def _block_ids(REVERSE: tl.constexpr):
    """(axis-0, axis-1) program ids, visited in reverse when the test switch asks for it."""
    pid0 = tl.program_id(0)
    pid1 = tl.program_id(1)
    if REVERSE:
        pid0 = tl.num_programs(0) - 1 - pid0
        pid1 = tl.num_programs(1) - 1 - pid1
    return pid0, pid1


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST: the interpreter multiplies bfloat16 wrongly (raw bits in numpy),
    so there the exact fp32 upcast is used; compiled kernels always keep UPCAST off."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def _score_tile(
    rows_ptr,
    cols_ptr,
    row_mem,
    col_mem,
    row_ok,
    col_ok,
    D,
    stride_rm,
    stride_rk,
    stride_cn,
    stride_ck,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """S[row_mem, col_mem] in fp32; ``row_mem``/``col_mem`` are int64 memory rows."""
    offs_k = tl.arange(0, BK)
    a_ptrs = rows_ptr + row_mem[:, None] * stride_rm + offs_k[None, :] * stride_rk
    b_ptrs = cols_ptr + col_mem[None, :] * stride_cn + offs_k[:, None] * stride_ck
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        k_ok = (k0 + offs_k) < D
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # see _mma; inlined here, the interpreter pays per helper call
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BK * stride_rk
        b_ptrs += BK * stride_ck
    return acc


@triton.jit
def _valid_pairs(
    row_glob, col_glob, row_ok, col_ok, row_ids_ptr, col_ids_ptr, row_loc, col_mem, HAS_IDS
):
    """Valid negatives of a tile: in bounds, off the positive, and (with ids) other ids."""
    valid = row_ok[:, None] & col_ok[None, :] & (row_glob[:, None] != col_glob[None, :])
    if HAS_IDS:
        rid = tl.load(row_ids_ptr + row_loc, mask=row_ok, other=0)
        cid = tl.load(col_ids_ptr + col_mem, mask=col_ok, other=0)
        valid = valid & (rid[:, None] != cid[None, :])
    return valid


@triton.jit
def _orderable(s):
    """int32 that sorts like the fp32 ``s``; -0.0 -> +0.0, NaN -> INT32_MAX."""
    bits = s.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = tl.where(key == -1, 0, key)
    return tl.where(s != s, INT32_MAX, key)


@triton.jit
def _pack(best, index):
    """Packed key of an int32 orderable max and its int64 global index."""
    key = (best.to(tl.int64) << 32) | (LOW_MASK - index)
    return tl.where(best == INT32_MIN, NO_KEY, key)


@triton.jit
def _hinge(arg, valid):
    """relu(arg) on valid pairs; written so that NaN survives (NaN <= 0 is false)."""
    return tl.where(valid & ~(arg <= 0.0), arg, 0.0)


@triton.jit
def partials_kernel(
    rows_ptr,
    cols_ptr,
    col_pos_ptr,
    row_ids_ptr,
    col_ids_ptr,
    row_key_ptr,
    row_sum_ptr,
    row_cnt_ptr,
    col_key_ptr,
    col_sum_ptr,
    col_cnt_ptr,
    b,
    N,
    D,
    row_offset,
    stride_rm,
    stride_rk,
    stride_cn,
    stride_ck,
    margin,
    n_row_blocks,
    n_col_blocks,
    col_blocks_per_split,
    HAS_IDS: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    REVERSE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Row and column statistics in one pass; grid (row programs P, column splits Q).

    Program (p, q) visits row blocks p, p + P, ... and, for each, the column blocks of
    split q. Keys and counts merge with integer atomics (order-free). Hinge sums: with
    DETERMINISTIC off, float atomics into (b,) and (N,); with it on, row sums go to slot
    q of a (Q, b) buffer and column sums to slot p of a (P, N) buffer, each slot owned by
    one program and summed in a fixed order, so the caller reduces them in a fixed order.
    """
    pid_p, pid_q = _block_ids(REVERSE)
    n_row_programs = tl.num_programs(0)
    cb_start = pid_q * col_blocks_per_split
    cb_stop = tl.minimum(cb_start + col_blocks_per_split, n_col_blocks)
    arange_m = tl.arange(0, BM)
    arange_n = tl.arange(0, BN)
    row_slot = row_sum_ptr
    col_slot = col_sum_ptr
    if DETERMINISTIC:
        row_slot = row_sum_ptr + tl.cast(pid_q, tl.int64) * b
        col_slot = col_sum_ptr + tl.cast(pid_p, tl.int64) * N
    for rb in range(pid_p, n_row_blocks, n_row_programs):
        row_loc = tl.cast(rb, tl.int64) * BM + arange_m
        row_ok = row_loc < b
        row_glob0 = row_offset + tl.cast(rb, tl.int64) * BM
        row_glob = row_offset + row_loc
        d_row = tl.load(col_pos_ptr + row_glob, mask=row_ok, other=0.0)
        run_key = tl.full((BM,), NO_KEY, dtype=tl.int64)
        run_sum = tl.zeros((BM,), dtype=tl.float32)
        run_cnt = tl.zeros((BM,), dtype=tl.int32)
        for cb in range(cb_start, cb_stop):
            col_glob0 = tl.cast(cb, tl.int64) * BN
            col_glob = col_glob0 + arange_n
            col_ok = col_glob < N
            s = _score_tile(
                rows_ptr, cols_ptr, row_loc, col_glob, row_ok, col_ok, D,
                stride_rm, stride_rk, stride_cn, stride_ck, BM, BN, BK, PRECISION, UPCAST,
            )  # fmt: skip
            valid = _valid_pairs(
                row_glob, col_glob, row_ok, col_ok, row_ids_ptr, col_ids_ptr, row_loc,
                col_glob, HAS_IDS,
            )  # fmt: skip
            order = tl.where(valid, _orderable(s), INT32_MIN)
            shifted = margin + s

            # Row direction: merge this tile into the running per-row statistics.
            best = tl.max(order, axis=1)
            first = tl.min(tl.where(order == best[:, None], arange_n[None, :], BN), axis=1)
            run_key = tl.maximum(run_key, _pack(best, col_glob0 + first))
            row_arg = shifted - d_row[:, None]
            hinge = _hinge(row_arg, valid)
            run_sum += tl.sum(hinge, axis=1)
            run_cnt += tl.sum((hinge > 0.0).to(tl.int32), axis=1)  # NaN > 0 is false

            # Column direction: this tile's partials, merged into the global ones now.
            d_col = tl.load(col_pos_ptr + col_glob, mask=col_ok, other=0.0)
            best_c = tl.max(order, axis=0)
            first_c = tl.min(tl.where(order == best_c[None, :], arange_m[:, None], BM), axis=0)
            key_c = _pack(best_c, row_glob0 + first_c)
            tl.atomic_max(col_key_ptr + col_glob, key_c, mask=col_ok, sem="relaxed")
            col_arg = shifted - d_col[None, :]
            hinge_c = _hinge(col_arg, valid)
            sum_c = tl.sum(hinge_c, axis=0)
            cnt_c = tl.sum((hinge_c > 0.0).to(tl.int32), axis=0)
            tl.atomic_add(col_cnt_ptr + col_glob, cnt_c, mask=col_ok, sem="relaxed")
            if DETERMINISTIC:
                old = tl.load(col_slot + col_glob, mask=col_ok, other=0.0)
                tl.store(col_slot + col_glob, old + sum_c, mask=col_ok)
                # The next row block may read these sums from other threads of the block.
                tl.debug_barrier()
            else:
                tl.atomic_add(col_sum_ptr + col_glob, sum_c, mask=col_ok, sem="relaxed")

        tl.atomic_max(row_key_ptr + row_loc, run_key, mask=row_ok, sem="relaxed")
        tl.atomic_add(row_cnt_ptr + row_loc, run_cnt, mask=row_ok, sem="relaxed")
        if DETERMINISTIC:
            tl.store(row_slot + row_loc, run_sum, mask=row_ok)
        else:
            tl.atomic_add(row_sum_ptr + row_loc, run_sum, mask=row_ok, sem="relaxed")


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
    pid_outer, pid_split = _block_ids(REVERSE)
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
        s = _score_tile(
            rows_ptr, cols_ptr, row_mem, col_mem, row_ok, col_ok, D,
            stride_rm, stride_rk, stride_cn, stride_ck, BM, BN, BK, PRECISION, UPCAST,
        )  # fmt: skip
        if COUNT_TILES:
            tl.atomic_add(tile_counter_ptr, 1)
        valid = _valid_pairs(
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
                g_rows = _mma(act, x_cols, zero_rows, PRECISION, UPCAST) * coef[:, None]
                scaled = (x_rows.to(tl.float32) * scale[:, None]).to(dtype)
                g_cols = _mma(tl.trans(act), scaled, zero_cols, PRECISION, UPCAST) * cmax
            else:
                g_cols = _mma(tl.trans(act), x_rows, zero_cols, PRECISION, UPCAST) * coef[:, None]
                scaled = (x_cols.to(tl.float32) * scale[:, None]).to(dtype)
                g_rows = _mma(act, scaled, zero_rows, PRECISION, UPCAST) * cmax
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
    through its compacted index list; S comes from ``_score_tile`` with the forward's
    tiling, so the activity is the forward's bit for bit. ``act`` is row-major
    (P, n_other) with n_other = N for gated rows and b for gated columns. Programs whose
    gated block starts past the device-side count store nothing.
    """
    pid_gated, pid_other = _block_ids(REVERSE)
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
        s = _score_tile(
            rows_ptr, cols_ptr, row_mem, col_mem, row_ok, col_ok, D,
            stride_rm, stride_rk, stride_cn, stride_ck, BM, BN, BK, PRECISION, UPCAST,
        )  # fmt: skip
        if COUNT_TILES:
            tl.atomic_add(tile_counter_ptr, 1)
        valid = _valid_pairs(
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
    pid_g, pid_d = _block_ids(REVERSE)
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
            acc = _mma(a, x, acc, PRECISION, UPCAST)
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
    pid_o, pid_d = _block_ids(REVERSE)
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
            acc += _mma(a_t, scaled, zero, PRECISION, UPCAST) * cmax
        out = grad_ptr + o[:, None] * D + d_idx[None, :]
        out_ok = o_ok[:, None] & d_ok[None, :]
        tl.store(out, tl.load(out, mask=out_ok, other=0.0) + acc, mask=out_ok)
