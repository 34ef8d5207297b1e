"""The forward Triton kernel: row and column statistics of S in one pass (see tile.py)."""

from __future__ import annotations

import triton
import triton.language as tl

from .tile import INT32_MIN, NO_KEY, block_ids, hinge, orderable, pack, score_tile, valid_pairs


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
    pid_p, pid_q = block_ids(REVERSE)
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
            s = score_tile(
                rows_ptr, cols_ptr, row_loc, col_glob, row_ok, col_ok, D,
                stride_rm, stride_rk, stride_cn, stride_ck, BM, BN, BK, PRECISION, UPCAST,
            )  # fmt: skip
            valid = valid_pairs(
                row_glob, col_glob, row_ok, col_ok, row_ids_ptr, col_ids_ptr, row_loc,
                col_glob, HAS_IDS,
            )  # fmt: skip
            order = tl.where(valid, orderable(s), INT32_MIN)
            shifted = margin + s

            # Row direction: merge this tile into the running per-row statistics.
            best = tl.max(order, axis=1)
            first = tl.min(tl.where(order == best[:, None], arange_n[None, :], BN), axis=1)
            run_key = tl.maximum(run_key, pack(best, col_glob0 + first))
            row_arg = shifted - d_row[:, None]
            row_hinge = hinge(row_arg, valid)
            run_sum += tl.sum(row_hinge, axis=1)
            run_cnt += tl.sum((row_hinge > 0.0).to(tl.int32), axis=1)  # NaN > 0 is false

            # Column direction: this tile's partials, merged into the global ones now.
            d_col = tl.load(col_pos_ptr + col_glob, mask=col_ok, other=0.0)
            best_c = tl.max(order, axis=0)
            first_c = tl.min(tl.where(order == best_c[None, :], arange_m[:, None], BM), axis=0)
            key_c = pack(best_c, row_glob0 + first_c)
            tl.atomic_max(col_key_ptr + col_glob, key_c, mask=col_ok, sem="relaxed")
            col_arg = shifted - d_col[None, :]
            hinge_c = hinge(col_arg, valid)
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
