"""The Triton kernels of the O(B) and O(B*D) steps around the B x B kernels (glue.py
launches them).

    positive_kernel     d_i = <img_i, txt_i>: 16-bit rows read as they are, fp32 sums
    finalize_kernel     kernel_interface.finalize of both directions, op for op, decoding
                        the forward kernels' packed keys first when given them
    hard_keys_kernel    the sort keys that group the hardest-negative pairs by target
    gradients_kernel    one output row per program: the dense gradient (if any), the
                        hardest-negative pairs and the diagonal, stored in the output dtype

The scatter of the hardest-negative pairs (many anchors may share a hardest negative) is
written as a gather: the pairs are sorted by target with a stable sort, so each output
row sums its pairs in ascending source order. No float atomics: the same bits every run.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _to_output(x, dtype: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    """fp32 ``x`` in the output dtype, rounded to nearest even. The interpreter's own
    fp32 -> bfloat16 cast truncates, so there the rounding is done on the bits."""
    if BF16_BY_HAND:
        bits = x.to(tl.int32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(dtype)
    return out


@triton.jit
def positive_kernel(
    img_ptr, txt_ptr, out_ptr, b, D, stride_im, stride_ik, stride_tm, stride_tk,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out[i] = sum_k img[i, k] * txt[i, k] in fp32, over BLOCK_R rows per program."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < b
    r64 = r.to(tl.int64)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        k = k0 + tl.arange(0, BLOCK_D)
        ok = r_ok[:, None] & (k < D)[None, :]
        x = tl.load(img_ptr + r64[:, None] * stride_im + k[None, :] * stride_ik, mask=ok, other=0.0)
        y = tl.load(txt_ptr + r64[:, None] * stride_tm + k[None, :] * stride_tk, mask=ok, other=0.0)
        acc += tl.sum(x.to(tl.float32) * y.to(tl.float32), axis=1)
    tl.store(out_ptr + r, acc, mask=r_ok)


@triton.jit
def _finalize_side(
    pos, ok, key_ptr, max_ptr, arg_ptr, sum_ptr, d_ptr, n_ptr, N, margin, eps, out_ptrs,
    HAS_N: tl.constexpr, MODE: tl.constexpr, PACKED: tl.constexpr,
):  # fmt: skip
    """kernel_interface.finalize for the anchors ``pos``, the same operations in the same
    order (so the same bits); outputs at ``pos`` of ``out_ptrs`` = (loss, gap,
    dense_weight, hard_weight, gated, near_tie). PACKED: max and arg are first decoded
    from the packed keys and stored (decode_keys_kernel's work, in this launch)."""
    if PACKED:
        best, arg = _decode(key_ptr, max_ptr, arg_ptr, pos, ok)
    else:
        best = tl.load(max_ptr + pos, mask=ok, other=0.0)
        arg = tl.load(arg_ptr + pos, mask=ok, other=-1)
    hinge_sum = tl.load(sum_ptr + pos, mask=ok, other=0.0)
    d = tl.load(d_ptr + pos, mask=ok, other=0.0)
    if HAS_N:
        n = tl.load(n_ptr + pos, mask=ok, other=0)
    else:  # no ids: every anchor has N - 1 negatives
        n = tl.zeros_like(arg) + (N - 1)
    has_negative = n > 0
    has_hardest = arg >= 0
    gap = tl.where(has_hardest, d - best, float("nan"))
    near_tie = tl.abs(gap) < eps
    if MODE == "selhn":
        gated = near_tie & has_negative
    elif MODE == "hardest":
        gated = tl.zeros(near_tie.shape, tl.int1)
    else:  # "all", "sum_hinges"
        gated = has_negative
    hard_arg = (margin + best) - d
    # torch.relu: NaN stays NaN, everything not above zero becomes +0.0.
    hard_hinge = tl.where(hard_arg > 0.0, hard_arg, tl.where(hard_arg != hard_arg, hard_arg, 0.0))
    if MODE == "sum_hinges":
        per_hinge = tl.full(d.shape, 1.0, tl.float32)
    else:
        # 1.0 / n rounded as torch divides (a plain / is approximate on GPUs).
        per_hinge = tl.div_rn(tl.full(d.shape, 1.0, tl.float32), tl.maximum(n, 1).to(tl.float32))
    dense = hinge_sum * per_hinge
    loss = tl.where(gated, dense, tl.where(has_negative, hard_hinge, 0.0)) + 0.0 * d
    hard_active = (~gated) & has_hardest & (hard_arg > 0.0)
    loss_ptr, gap_ptr, dense_ptr, hard_ptr, gated_ptr, near_ptr = out_ptrs
    tl.store(loss_ptr + pos, loss, mask=ok)
    tl.store(gap_ptr + pos, gap, mask=ok)
    tl.store(dense_ptr + pos, tl.where(gated, per_hinge, 0.0), mask=ok)
    tl.store(hard_ptr + pos, hard_active.to(tl.float32), mask=ok)
    tl.store(gated_ptr + pos, gated, mask=ok)
    tl.store(near_ptr + pos, near_tie, mask=ok)
    return loss, gated, near_tie, gap, arg


@triton.jit
def finalize_kernel(
    row_key_ptr, row_max_ptr, row_arg_ptr, row_sum_ptr, row_d_ptr, row_n_ptr,
    col_key_ptr, col_max_ptr, col_arg_ptr, col_sum_ptr, col_d_ptr, col_n_ptr,
    row_loss_ptr, row_gap_ptr, row_dense_ptr, row_hard_ptr, row_gated_ptr, row_near_ptr,
    col_loss_ptr, col_gap_ptr, col_dense_ptr, col_hard_ptr, col_gated_ptr, col_near_ptr,
    pair_loss_ptr, pair_gap_ptr, pair_gated_ptr, pair_near_ptr, pair_arg_ptr,
    b, N, row_offset, margin, eps, HAS_N: tl.constexpr, MODE: tl.constexpr,
    PACKED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Programs [0, cdiv(b, BLOCK)) finalize rows, the others columns (outputs per side
    in _finalize_side; with PACKED the max and arg vectors are outputs too). The (2, b)
    pair results (row 0 the rows, row 1 the columns ``row_offset + i``) are written as
    well. Every output is its own tensor (the loss op's outputs may not alias one
    another)."""
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(b, BLOCK)
    if pid < row_blocks:
        pos = pid * BLOCK + tl.arange(0, BLOCK)
        ok = pos < b
        loss, gated, near_tie, gap, arg = _finalize_side(
            pos, ok, row_key_ptr, row_max_ptr, row_arg_ptr, row_sum_ptr, row_d_ptr, row_n_ptr,
            N, margin, eps, (row_loss_ptr, row_gap_ptr, row_dense_ptr, row_hard_ptr,
                             row_gated_ptr, row_near_ptr), HAS_N, MODE, PACKED,
        )  # fmt: skip
        pair = pos
        pair_ok = ok
        side = 0
    else:
        pos = (pid - row_blocks) * BLOCK + tl.arange(0, BLOCK)
        ok = pos < N
        loss, gated, near_tie, gap, arg = _finalize_side(
            pos, ok, col_key_ptr, col_max_ptr, col_arg_ptr, col_sum_ptr, col_d_ptr, col_n_ptr,
            N, margin, eps, (col_loss_ptr, col_gap_ptr, col_dense_ptr, col_hard_ptr,
                             col_gated_ptr, col_near_ptr), HAS_N, MODE, PACKED,
        )  # fmt: skip
        pair = pos - row_offset
        pair_ok = ok & (pair >= 0) & (pair < b)
        side = 1
    at = side * b + pair
    tl.store(pair_loss_ptr + at, loss, mask=pair_ok)
    tl.store(pair_gap_ptr + at, gap, mask=pair_ok)
    tl.store(pair_gated_ptr + at, gated, mask=pair_ok)
    tl.store(pair_near_ptr + at, near_tie, mask=pair_ok)
    tl.store(pair_arg_ptr + at, arg, mask=pair_ok)


@triton.jit
def hard_keys_kernel(
    row_hard_ptr, row_arg_ptr, col_hard_ptr, col_arg_ptr, keys_ptr, b, N, row_offset,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """keys[s] for the b + N sources: row s (its hardest column k is a target of
    grad_cols) has key k; column j = s - b (its hardest row q, when it is one of these
    rows, is a target of grad_rows) has key N + q - row_offset; a source with no such
    pair (hard weight 0, no hardest) has key N + b, after every target."""
    s = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    is_row = s < b
    is_col = (s >= b) & (s < b + N)
    none = N + b
    r_hard = tl.load(row_hard_ptr + s, mask=is_row, other=0.0)
    r_arg = tl.load(row_arg_ptr + s, mask=is_row, other=-1)
    c_hard = tl.load(col_hard_ptr + (s - b), mask=is_col, other=0.0)
    c_arg = tl.load(col_arg_ptr + (s - b), mask=is_col, other=-1)
    q = c_arg - row_offset
    row_key = tl.where((r_hard != 0.0) & (r_arg >= 0), r_arg, none)
    col_key = tl.where((c_hard != 0.0) & (c_arg >= 0) & (q >= 0) & (q < b), N + q, none)
    tl.store(keys_ptr + s, tl.where(is_row, row_key, col_key), mask=is_row | is_col)


@triton.jit
def _segment(keys_ptr, length, target, steps):
    """[first, end) of the entries equal to ``target`` in the ascending keys."""
    lo_a = target * 0
    hi_a = lo_a + length
    lo_b = lo_a
    hi_b = hi_a
    for _ in range(steps):
        mid_a = (lo_a + hi_a) // 2
        v_a = tl.load(keys_ptr + mid_a, mask=lo_a < hi_a, other=0)
        left = (lo_a < hi_a) & (v_a < target)
        hi_a = tl.where((lo_a < hi_a) & ~left, mid_a, hi_a)
        lo_a = tl.where(left, mid_a + 1, lo_a)
        mid_b = (lo_b + hi_b) // 2
        v_b = tl.load(keys_ptr + mid_b, mask=lo_b < hi_b, other=0)
        right = (lo_b < hi_b) & (v_b <= target)
        hi_b = tl.where((lo_b < hi_b) & ~right, mid_b, hi_b)
        lo_b = tl.where(right, mid_b + 1, lo_b)
    return lo_a, lo_b


@triton.jit
def _diagonal_weight(r, row_offset, row_up_ptr, row_dw_ptr, row_hw_ptr, row_act_ptr,
                     col_up_ptr, col_dw_ptr, col_hw_ptr, col_act_ptr):  # fmt: skip
    """g_r = -(dense_r + w_row_r + (dense_c + w_col)[row_offset + r]), as the PyTorch glue."""
    up = tl.load(row_up_ptr + r)
    dense_r = up * tl.load(row_dw_ptr + r) * tl.load(row_act_ptr + r).to(tl.float32)
    w_row = up * tl.load(row_hw_ptr + r)
    c = row_offset + r
    c_up = tl.load(col_up_ptr + c)
    dense_c = c_up * tl.load(col_dw_ptr + c) * tl.load(col_act_ptr + c).to(tl.float32)
    w_col = c_up * tl.load(col_hw_ptr + c)
    return -(dense_r + w_row + (dense_c + w_col))


@triton.jit
def gradients_kernel(
    rows_ptr, cols_ptr, stride_rm, stride_rk, stride_cn, stride_ck,
    dense_rows_ptr, dense_cols_ptr, state_ptr, row_gated_ptr, col_gated_ptr,
    row_up_ptr, row_arg_ptr, row_dw_ptr, row_hw_ptr, row_act_ptr,
    col_up_ptr, col_arg_ptr, col_dw_ptr, col_hw_ptr, col_act_ptr,
    keys_ptr, sources_ptr, out_rows_ptr, out_cols_ptr,
    b, N, D, row_offset, search_steps,
    HAS_DENSE: tl.constexpr, WHERE_WRITTEN: tl.constexpr, ROWS_BY_HAND: tl.constexpr,
    COLS_BY_HAND: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (t, kd): output row t (t < b: grad_rows[t], else grad_cols[t - b]) on
    columns [kd * BLOCK_D, ...) of D, summed in fp32 and stored once in the output dtype:

        grad_rows[r] = dense_rows[r] + w_row_r cols[k_r] + sum_{j: q_j = off + r} w_col_j cols[j]
                       + g_r cols[off + r]
        grad_cols[c] = dense_cols[c] + sum_{i: k_i = c} w_row_i rows[i] + w_col_c rows[q_c - off]
                       + g_{c - off} rows[c - off]   (last term for off <= c < off + b)

    with w = upstream x hard weight and g the diagonal weight (_diagonal_weight); the
    sums run over the sorted (keys, sources) in ascending source order. WHERE_WRITTEN:
    the dense gradients are the dense backward's accumulators, read only where written
    (``_dense_term``)."""
    t = tl.program_id(0)
    k = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    weights = (row_up_ptr, row_dw_ptr, row_hw_ptr, row_act_ptr,
               col_up_ptr, col_dw_ptr, col_hw_ptr, col_act_ptr)  # fmt: skip
    if t < b:
        acc = _dense_term(dense_rows_ptr, t, k, D, state_ptr, row_gated_ptr, b, True,
                          HAS_DENSE, WHERE_WRITTEN)  # fmt: skip
        _row_gradient(
            t, k, acc, cols_ptr, stride_cn, stride_ck, row_arg_ptr, weights,
            keys_ptr, sources_ptr, out_rows_ptr, b, N, D, row_offset, search_steps,
            ROWS_BY_HAND, BLOCK_D,
        )  # fmt: skip
    else:
        acc = _dense_term(dense_cols_ptr, t - b, k, D, state_ptr, col_gated_ptr, b, False,
                          HAS_DENSE, WHERE_WRITTEN)  # fmt: skip
        _col_gradient(
            t - b, k, acc, rows_ptr, stride_rm, stride_rk, col_arg_ptr, weights,
            keys_ptr, sources_ptr, out_cols_ptr, b, N, D, row_offset, search_steps,
            COLS_BY_HAND, BLOCK_D,
        )  # fmt: skip


@triton.jit
def _dense_term(
    dense_ptr, i, k, D, state_ptr, gated_ptr, b, IS_ROW: tl.constexpr,
    HAS_DENSE: tl.constexpr, WHERE_WRITTEN: tl.constexpr,
):  # fmt: skip
    """0 + the dense gradient's row i (fp32, on the columns ``k`` of D). WHERE_WRITTEN: the
    row is read only if the dense backward wrote it (the rule of "First writes" in
    backward_kernels.py; the gated counts are the first two entries of the state of
    compaction_kernels.py)."""
    k_ok = k < D
    acc = tl.zeros(k.shape, dtype=tl.float32)
    if HAS_DENSE:
        if WHERE_WRITTEN:
            gated_rows = tl.load(state_ptr)
            gated_cols = tl.load(state_ptr + 1)
            gated = tl.load(gated_ptr + i) != 0
            if IS_ROW:
                written = gated | (gated_cols > 0)
            else:
                written = (gated_rows > 0) | (gated & (gated_rows < b))
            k_ok = k_ok & written
        acc += tl.load(dense_ptr + i.to(tl.int64) * D + k, mask=k_ok, other=0.0)
    return acc


@triton.jit
def _row_gradient(
    r, k, acc, cols_ptr, stride_cn, stride_ck, row_arg_ptr, weights, keys_ptr,
    sources_ptr, out_ptr, b, N, D, row_offset, search_steps,
    BY_HAND: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """grad_rows[r] on the columns ``k`` of D (see gradients_kernel), added to ``acc``."""
    row_up_ptr, row_dw_ptr, row_hw_ptr, row_act_ptr, col_up_ptr, _, col_hw_ptr, _ = weights
    k_ok = k < D
    arg = tl.load(row_arg_ptr + r)
    w = tl.load(row_up_ptr + r) * tl.load(row_hw_ptr + r)
    # A zero weight (a gated anchor, or an inactive hinge) adds nothing: its row is not
    # read, as hard_keys_kernel leaves such sources out of the sums below.
    if (arg >= 0) & (w != 0.0):
        x = tl.load(cols_ptr + arg * stride_cn + k * stride_ck, mask=k_ok, other=0.0)
        acc += w * x.to(tl.float32)
    first, end = _segment(keys_ptr, b + N, N + r, search_steps)
    for s in range(first, end):
        j = tl.load(sources_ptr + s) - b
        w_j = tl.load(col_up_ptr + j) * tl.load(col_hw_ptr + j)
        x = tl.load(cols_ptr + j * stride_cn + k * stride_ck, mask=k_ok, other=0.0)
        acc += w_j * x.to(tl.float32)
    g = _diagonal_weight(r, row_offset, *weights)
    c = (row_offset + r).to(tl.int64)
    x = tl.load(cols_ptr + c * stride_cn + k * stride_ck, mask=k_ok, other=0.0)
    acc += g * x.to(tl.float32)
    out = out_ptr + r.to(tl.int64) * D + k
    tl.store(out, _to_output(acc, out_ptr.dtype.element_ty, BY_HAND), mask=k_ok)


@triton.jit
def _col_gradient(
    c, k, acc, rows_ptr, stride_rm, stride_rk, col_arg_ptr, weights, keys_ptr,
    sources_ptr, out_ptr, b, N, D, row_offset, search_steps,
    BY_HAND: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """grad_cols[c] on the columns ``k`` of D (see gradients_kernel), added to ``acc``."""
    row_up_ptr, _, row_hw_ptr, _, col_up_ptr, _, col_hw_ptr, _ = weights
    k_ok = k < D
    first, end = _segment(keys_ptr, b + N, c, search_steps)
    for s in range(first, end):
        i = tl.load(sources_ptr + s)
        w_i = tl.load(row_up_ptr + i) * tl.load(row_hw_ptr + i)
        x = tl.load(rows_ptr + i * stride_rm + k * stride_rk, mask=k_ok, other=0.0)
        acc += w_i * x.to(tl.float32)
    q = tl.load(col_arg_ptr + c) - row_offset
    w = tl.load(col_up_ptr + c) * tl.load(col_hw_ptr + c)
    if (q >= 0) & (q < b) & (w != 0.0):  # (a zero weight: see _row_gradient)
        x = tl.load(rows_ptr + q * stride_rm + k * stride_rk, mask=k_ok, other=0.0)
        acc += w * x.to(tl.float32)
    r = c - row_offset
    if (r >= 0) & (r < b):
        g = _diagonal_weight(r, row_offset, *weights)
        x = tl.load(rows_ptr + r.to(tl.int64) * stride_rm + k * stride_rk, mask=k_ok, other=0.0)
        acc += g * x.to(tl.float32)
    out = out_ptr + c.to(tl.int64) * D + k
    tl.store(out, _to_output(acc, out_ptr.dtype.element_ty, BY_HAND), mask=k_ok)


@triton.jit
def partials_init_kernel(
    col_pos_ptr, pos_ptr, row_key_ptr, col_key_ptr, row_cnt_ptr, col_cnt_ptr, row_sum_ptr,
    col_sum_ptr, N, pos_len, rows_pad, cols_pad, row_sums, col_sums, BLOCK: tl.constexpr,
):  # fmt: skip
    """The forward kernel's buffers in one launch: pos = col_pos then zeros, keys NO_KEY,
    counts and sum slots 0. Program p covers elements [p BLOCK, (p + 1) BLOCK) of each."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.load(col_pos_ptr + i, mask=i < N, other=0.0)
    tl.store(pos_ptr + i, d, mask=i < pos_len)
    no_key = tl.full((BLOCK,), -9223372036854775808, tl.int64)
    tl.store(row_key_ptr + i, no_key, mask=i < rows_pad)
    tl.store(col_key_ptr + i, no_key, mask=i < cols_pad)
    tl.store(row_cnt_ptr + i, tl.zeros((BLOCK,), tl.int32), mask=i < rows_pad)
    tl.store(col_cnt_ptr + i, tl.zeros((BLOCK,), tl.int32), mask=i < cols_pad)
    tl.store(row_sum_ptr + i, tl.zeros((BLOCK,), tl.float32), mask=i < row_sums)
    tl.store(col_sum_ptr + i, tl.zeros((BLOCK,), tl.float32), mask=i < col_sums)


@triton.jit
def _decode(key_ptr, max_ptr, arg_ptr, pos, ok):
    """(max, arg) from the packed keys (tile.py's layout), stored and returned; NO_KEY:
    -inf and -1."""
    key = tl.load(key_ptr + pos, mask=ok, other=-9223372036854775808)
    none = key == -9223372036854775808
    high = (key >> 32).to(tl.int32)
    bits = tl.where(high >= 0, high, high ^ 0x7FFFFFFF)
    best = tl.where(none, float("-inf"), bits.to(tl.float32, bitcast=True))
    low = tl.full(key.shape, 0xFFFFFFFF, tl.int64)
    arg = tl.where(none, -1, low - (key & low))
    tl.store(max_ptr + pos, best, mask=ok)
    tl.store(arg_ptr + pos, arg, mask=ok)
    return best, arg


@triton.jit
def decode_keys_kernel(
    row_key_ptr, col_key_ptr, row_max_ptr, row_arg_ptr, col_max_ptr, col_arg_ptr, b, N,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Both directions' packed keys decoded, programs [0, cdiv(b, BLOCK)) rows, the
    others columns."""
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(b, BLOCK)
    if pid < row_blocks:
        pos = pid * BLOCK + tl.arange(0, BLOCK)
        _decode(row_key_ptr, row_max_ptr, row_arg_ptr, pos, pos < b)
    else:
        pos = (pid - row_blocks) * BLOCK + tl.arange(0, BLOCK)
        _decode(col_key_ptr, col_max_ptr, col_arg_ptr, pos, pos < N)
