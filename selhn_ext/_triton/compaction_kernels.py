"""The backward's compaction: each side's gated anchors first, on the device.

``count_kernel`` and ``compact_kernel`` order each side with its gated anchors first, in
blocks that run at once:

    row_order = [gated rows ascending | other rows descending]    (kr gated rows)
    col_order = [gated columns ascending | other columns descending]    (kc gated)

and write each side's weights coefficient / scale, and the int32 state that every later
launch of the backward reads (backward_kernels.py): the gated counts, the scale's bits
and the zeroed work tickets.
"""

from __future__ import annotations

import triton
import triton.language as tl

# The int32 state written by compact_kernel and read by every later launch.
GATED_ROWS = tl.constexpr(0)
GATED_COLS = tl.constexpr(1)
SCALE_BITS = tl.constexpr(2)  # fp32 bits of the scale (0 until the compaction sets it)
TICKETS = tl.constexpr(4)  # state[TICKETS + launch]: the next work item of each launch
SMALLEST_NORMAL = tl.constexpr(2.0**-126)  # fp32


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
