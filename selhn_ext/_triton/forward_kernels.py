"""The forward Triton kernels: row and column statistics of S in one pass (see tile.py).

``partials_kernel``: a persistent grid. Each tile's S comes from ``score_tile_at``
(tensor descriptors where the launcher allows); its statistics from a fast epilogue that
reduces in float and forms the packed keys (tile.py) and indices only on the reduced
vectors. Interior tiles (no diagonal, no edge, no ids) do no validity work at all; the
others ("masked": the diagonal and edge tiles, or every tile with ids) first set their
invalid pairs to SENTINEL, then run the same epilogue. The first ``interior_programs``
programs take the interior tiles (program g visits tiles g, g + G, ... in the order of
``tile_coords``: groups of row blocks, row block fastest, so that programs running at
the same time share column tiles and a group's row tiles stay in L2), the others the
masked tiles (``masked_coords``). The two kinds are separate loops, so that the
compiler allocates registers for each on its own.

The fast epilogue is exact for finite inputs. Where it may not be (NaN or infinite
scores, extreme values; see ``merge_hinges``) it leaves the anchor's hinge sum NaN,
and ``exact_fixup_kernel`` then recomputes the statistics of every anchor with a NaN
hinge sum exactly, through the same S tiles. With none, its programs exit after reading
the sums.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tile import NO_KEY, score_tile_at

NEG_INF = tl.constexpr(float("-inf"))
INT32_MAX = tl.constexpr(2147483647)
# Invalid pairs of a masked tile take this score (-FLT_MAX): below every valid max the
# fast epilogue accepts, and finite, so that no hinge argument is NaN.
SENTINEL = tl.constexpr(-3.4028234663852886e38)
# Masked tiles leave to the exact fixup the anchors with d at or below -BIG, or all of
# them when margin is at or above BIG: their SENTINEL pairs could look active.
BIG = tl.constexpr(1e37)


@triton.jit
def tile_coords(t, n_row_blocks, n_col_blocks, group_rows):
    """(row block, column block) of tile t: groups of ``group_rows`` row blocks, each
    visited column block by column block with its row blocks fastest."""
    per_group = group_rows * n_col_blocks
    group = t // per_group
    first_rb = group * group_rows
    rows_in_group = tl.minimum(n_row_blocks - first_rb, group_rows)
    local = t - group * per_group
    return first_rb + local % rows_in_group, local // rows_in_group


@triton.jit
def masked_coords(u, n_full_row_blocks, n_col_blocks, N, row_offset, SLOTS: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    """(row block, column block, valid) of masked slot u. Each full row block has SLOTS
    slots: its diagonal column blocks (at most SLOTS - 1), then the edge column block if
    N % BN and the diagonal does not already hold it; unused slots are not valid. After
    them, the tiles of the partial last row block, if any."""
    rb = u // SLOTS
    k = u % SLOTS
    first_col = row_offset + rb * BM  # column of the block's first positive
    lo = first_col // BN
    hi = (first_col + BM - 1) // BN
    edge = n_col_blocks - 1
    is_edge_slot = k == SLOTS - 1
    cb = tl.where(is_edge_slot, edge, lo + k)
    valid = tl.where(is_edge_slot, (N % BN != 0) & (edge > hi), lo + k <= hi)
    in_last_row = u >= n_full_row_blocks * SLOTS
    rb = tl.where(in_last_row, n_full_row_blocks, rb)
    cb = tl.where(in_last_row, u - n_full_row_blocks * SLOTS, cb)
    return rb, cb, valid | in_last_row


@triton.jit
def first_at(hit, AXIS: tl.constexpr, SIZE: tl.constexpr):
    """int32 position of the first True along AXIS (SIZE if none)."""
    if AXIS == 1:
        index = tl.arange(0, SIZE)[None, :]
    else:
        index = tl.arange(0, SIZE)[:, None]
    return tl.min(tl.where(hit, index, SIZE), axis=AXIS)


@triton.jit
def valid_pairs_mask(row_offs, col_offs, b, N, row_offset, row_ids_ptr, col_ids_ptr,
                     HAS_IDS: tl.constexpr):  # fmt: skip
    """Valid negatives of a tile: in bounds, off the positives (column row_offset + i of
    row i) and, with ids, of other ids."""
    row_ok = row_offs < b
    col_ok = col_offs < N
    ok = row_ok[:, None] & col_ok[None, :] & ((row_offs + row_offset)[:, None] != col_offs[None, :])
    if HAS_IDS:
        ok = ok & other_ids(row_offs, col_offs, b, N, row_ids_ptr, col_ids_ptr)
    return ok


@triton.jit
def other_ids(row_offs, col_offs, b, N, row_ids_ptr, col_ids_ptr):
    """Pairs of a tile whose ids differ (ids past the edges read as 0)."""
    rid = tl.load(row_ids_ptr + row_offs, mask=row_offs < b, other=0)
    cid = tl.load(col_ids_ptr + col_offs, mask=col_offs < N, other=0)
    return rid[:, None] != cid[None, :]


@triton.jit
def packed_key(best, first, base):
    """Packed key (tile.py) of reduced maxima at global indices ``base + first`` (int32,
    below 2**32 together). ``best + 0.0`` maps -0.0 to +0.0; a NaN max must be a positive
    NaN, which sorts above +inf once made orderable."""
    bits = (best + 0.0).to(tl.int32, bitcast=True)
    high = bits ^ ((bits >> 31).to(tl.uint32, bitcast=True) >> 1).to(tl.int32, bitcast=True)
    low = (0xFFFFFFFF - tl.cast(base, tl.uint32)) - first.to(tl.uint32)
    return (high.to(tl.int64) << 32) | low.to(tl.int64)


@triton.jit
def merge_max(s, offs, other_offs, base, key_ptr, AXIS: tl.constexpr):
    """Reduce one tile's scores along AXIS to the packed keys (tile.py) of its anchors at
    int32 positions ``offs`` and merge them (integer atomics, order-free); ``other_offs``
    index the other side (global index: + ``base``). Float max (NaN dropped), then the
    first index at it. Returns the max (the masked path's hinge sums need it)."""
    best = tl.max(s, axis=AXIS)
    if AXIS == 1:
        first = tl.min(tl.where(s == best[:, None], other_offs[None, :], INT32_MAX), axis=1)
    else:
        first = tl.min(tl.where(s == best[None, :], other_offs[:, None], INT32_MAX), axis=0)
    tl.atomic_max(key_ptr + offs, packed_key(best, first, base), sem="relaxed")
    return best


@triton.jit
def merge_hinges(
    shifted, best, margin, d_ptr, offs, cnt_ptr, sum_ptr, slot_ptr, AXIS: tl.constexpr,
    MASKED: tl.constexpr, DETERMINISTIC: tl.constexpr,
):  # fmt: skip
    """Reduce one tile's ``shifted`` = margin + S along AXIS to the active counts and
    hinge sums of its anchors at int32 positions ``offs`` and merge them. Past the edges,
    ``offs`` fall in the launcher's padding: no masks anywhere.

    The hinge argument is (margin + S) - d_anchor, rounded as in the backward; activity
    is 1.0 / 0.0, the count its sum (exact: at most the tile size), the hinge sum that of
    max(argument, 0) with NaN kept (one float max per pair; the product argument x
    activity needs more registers). Counts merge with integer atomics.

    Exact unless a hinge argument is NaN (a NaN score, d or margin, or inf - inf): it
    makes the anchor's hinge sum NaN. MASKED, a max ``best`` at or below SENTINEL (no
    valid pair, or -inf and -FLT_MAX scores), or an extreme d or margin, sets it to NaN
    too. exact_fixup_kernel recomputes every anchor whose merged hinge sum is NaN."""
    d_anchor = tl.load(d_ptr + offs)
    if AXIS == 1:
        arg = shifted - d_anchor[:, None]
    else:
        arg = shifted - d_anchor[None, :]
    active = tl.where(arg > 0.0, 1.0, 0.0)
    tl.atomic_add(cnt_ptr + offs, tl.sum(active, axis=AXIS).to(tl.int32), sem="relaxed")
    hinge_sum = tl.sum(tl.maximum(arg, 0.0, propagate_nan=tl.PropagateNan.ALL), axis=AXIS)
    if MASKED:
        unsure = (best <= SENTINEL) | (margin >= BIG) | (d_anchor <= -BIG)
        hinge_sum = tl.where(unsure, float("nan"), hinge_sum)
    if DETERMINISTIC:
        tl.store(slot_ptr + offs, tl.load(slot_ptr + offs) + hinge_sum)
    else:
        tl.atomic_add(sum_ptr + offs, hinge_sum, sem="relaxed")


@triton.jit
def tile(
    rows, cols, rb, cb, col_pos_ptr, row_ids_ptr, col_ids_ptr, row_key_ptr, row_sum_ptr,
    row_cnt_ptr, col_key_ptr, col_sum_ptr, col_cnt_ptr, row_slot, col_slot, b, N, D,
    row_offset, stride_rm, stride_rk, stride_cn, stride_ck, margin, HAS_IDS: tl.constexpr,
    MASKED: tl.constexpr, DETERMINISTIC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
):  # fmt: skip
    """S of tile (rb, cb), and its statistics merged in both directions."""
    row0 = rb * BM
    col0 = cb * BN
    row_offs = row0 + tl.arange(0, BM)
    col_offs = col0 + tl.arange(0, BN)
    s = score_tile_at(
        rows, cols, row0, col0, row_offs.to(tl.int64), col_offs.to(tl.int64), row_offs < b,
        col_offs < N, D, stride_rm, stride_rk, stride_cn, stride_ck, BM, BN, BK, PRECISION,
        UPCAST, USE_TMA,
    )  # fmt: skip
    if MASKED:
        s = masked_scores(s, row_offs, col_offs, b, N, row_offset, row_ids_ptr, col_ids_ptr,
                          HAS_IDS)  # fmt: skip
    # Both directions' maxima first, then S is replaced by margin + S for the hinges: the
    # two full tiles are never alive together (registers). Rows: first index among column
    # offsets (global); columns: among row offsets, whose global index adds row_offset.
    row_best = merge_max(s, row_offs, col_offs, row_offset * 0, row_key_ptr, 1)
    col_best = merge_max(s, col_offs, row_offs, row_offset, col_key_ptr, 0)
    shifted = margin + s
    merge_hinges(shifted, row_best, margin, col_pos_ptr + row_offset, row_offs, row_cnt_ptr,
                 row_sum_ptr, row_slot, 1, MASKED, DETERMINISTIC)  # fmt: skip
    merge_hinges(shifted, col_best, margin, col_pos_ptr, col_offs, col_cnt_ptr, col_sum_ptr,
                 col_slot, 0, MASKED, DETERMINISTIC)  # fmt: skip
    if DETERMINISTIC:
        # The next tile may read these slots from other threads of the program.
        tl.debug_barrier()


@triton.jit
def masked_scores(s, row_offs, col_offs, b, N, row_offset, row_ids_ptr, col_ids_ptr,
                  HAS_IDS: tl.constexpr):  # fmt: skip
    """S with its invalid pairs (valid_pairs_mask) set to SENTINEL, the ids apart: with
    one mask, its 64-bit column ids stay alive beside S and spill at 4 warps."""
    ok = valid_pairs_mask(row_offs, col_offs, b, N, row_offset, row_ids_ptr, col_ids_ptr,
                          False)  # fmt: skip
    s = tl.where(ok, s, SENTINEL)
    if HAS_IDS:
        s = tl.where(other_ids(row_offs, col_offs, b, N, row_ids_ptr, col_ids_ptr), s, SENTINEL)
    return s


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
    group_rows,
    interior_programs,
    slot_stride_rows,
    slot_stride_cols,
    HAS_IDS: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    REVERSE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """Row and column statistics in one pass over S; a 1-D persistent grid.

    The statistics buffers and d (``col_pos``) are padded past b and N by the launcher.
    Keys and counts merge with integer atomics. Hinge sums: float atomics into (b,) and
    (N,), or, DETERMINISTIC, into row g of (G, slot_stride) buffers (program g owns its
    row and visits its tiles in a fixed order), which the caller sums in a fixed order.
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    if REVERSE:
        pid = programs - 1 - pid
    if USE_TMA:
        rows = tl.make_tensor_descriptor(rows_ptr, [b, D], [stride_rm, 1], [BM, BK])
        cols = tl.make_tensor_descriptor(cols_ptr, [N, D], [stride_cn, 1], [BN, BK])
    else:
        rows = rows_ptr
        cols = cols_ptr
    row_slot = row_sum_ptr + tl.cast(pid, tl.int64) * slot_stride_rows
    col_slot = col_sum_ptr + tl.cast(pid, tl.int64) * slot_stride_cols
    n_tiles = n_row_blocks * n_col_blocks
    if pid < interior_programs:
        for t in tl.range(pid, n_tiles, interior_programs):
            rb, cb = tile_coords(t, n_row_blocks, n_col_blocks, group_rows)
            diagonal = row_offset + (rb * BM - cb * BN)  # column - row of the positives
            full = (rb * BM + BM <= b) & (cb * BN + BN <= N)
            if full & ((diagonal >= BN) | (diagonal <= -BM)):
                tile(
                    rows, cols, rb, cb, col_pos_ptr, row_ids_ptr, col_ids_ptr, row_key_ptr,
                    row_sum_ptr, row_cnt_ptr, col_key_ptr, col_sum_ptr, col_cnt_ptr, row_slot,
                    col_slot, b, N, D, row_offset, stride_rm, stride_rk, stride_cn, stride_ck,
                    margin, HAS_IDS, False, DETERMINISTIC, BM, BN, BK, PRECISION, UPCAST,
                    USE_TMA,
                )  # fmt: skip
    else:
        q = pid - interior_programs
        masked_programs = programs - interior_programs
        if HAS_IDS:  # every tile has invalid pairs
            for t in tl.range(q, n_tiles, masked_programs):
                rb, cb = tile_coords(t, n_row_blocks, n_col_blocks, group_rows)
                tile(
                    rows, cols, rb, cb, col_pos_ptr, row_ids_ptr, col_ids_ptr, row_key_ptr,
                    row_sum_ptr, row_cnt_ptr, col_key_ptr, col_sum_ptr, col_cnt_ptr, row_slot,
                    col_slot, b, N, D, row_offset, stride_rm, stride_rk, stride_cn, stride_ck,
                    margin, HAS_IDS, True, DETERMINISTIC, BM, BN, BK, PRECISION, UPCAST,
                    USE_TMA,
                )  # fmt: skip
        else:
            SLOTS: tl.constexpr = (BM + BN - 1) // BN + 2
            full_row_blocks = b // BM
            n_slots = full_row_blocks * SLOTS + (b % BM != 0) * n_col_blocks
            for u in tl.range(q, n_slots, masked_programs):
                rb, cb, valid = masked_coords(u, full_row_blocks, n_col_blocks, N, row_offset,
                                              SLOTS, BM, BN)  # fmt: skip
                if valid:
                    tile(
                        rows, cols, rb, cb, col_pos_ptr, row_ids_ptr, col_ids_ptr,
                        row_key_ptr, row_sum_ptr, row_cnt_ptr, col_key_ptr, col_sum_ptr,
                        col_cnt_ptr, row_slot, col_slot, b, N, D, row_offset, stride_rm,
                        stride_rk, stride_cn, stride_ck, margin, HAS_IDS, True, DETERMINISTIC,
                        BM, BN, BK, PRECISION, UPCAST, USE_TMA,
                    )  # fmt: skip


@triton.jit
def exact_tile_stats(s, margin, d_anchor, ok, base, AXIS: tl.constexpr, SIZE: tl.constexpr):
    """(packed key, hinge sum, active count) along AXIS over the valid pairs ``ok`` of a
    tile, for any input: NaN propagates to the max (at the first NaN) and to the hinge
    sum, -inf arguments add 0."""
    if AXIS == 1:
        arg = (margin + s) - d_anchor[:, None]
    else:
        arg = (margin + s) - d_anchor[None, :]
    hinge = tl.where(ok, tl.maximum(arg, 0.0, propagate_nan=tl.PropagateNan.ALL), 0.0)
    count = tl.sum((ok & (arg > 0.0)).to(tl.int32), axis=AXIS)
    scores = tl.where(ok, s, NEG_INF)
    best = tl.max(scores, axis=AXIS)
    if AXIS == 1:
        first = first_at(ok & (scores == best[:, None]), AXIS, SIZE)
    else:
        first = first_at(ok & (scores == best[None, :]), AXIS, SIZE)
    first_nan = first_at(ok & (s != s), AXIS, SIZE)
    has_nan = first_nan < SIZE
    best = tl.where(has_nan, float("nan"), best)
    first = tl.where(has_nan, first_nan, first)
    key = tl.where(first < SIZE, packed_key(best, first, base), NO_KEY)
    return key, tl.sum(hinge, axis=AXIS), count


@triton.jit
def exact_fixup_kernel(
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
    HAS_IDS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Exact statistics of the anchors whose hinge sum partials_kernel left NaN (see
    merge_hinges), replacing its values.

    Programs [0, n_row_blocks) take a block of rows, the others a block of columns; a
    block with such an anchor recomputes its whole row (column) of S tile by tile
    (score_tile_at: the forward's bits) and stores those anchors' statistics, summed in
    tile order. Blocks without one exit after reading their sums."""
    pid = tl.program_id(0)
    if pid < n_row_blocks:
        row_offs = pid * BM + tl.arange(0, BM)
        row_ok = row_offs < b
        old_sum = tl.load(row_sum_ptr + row_offs, mask=row_ok, other=0.0)
        flags = old_sum != old_sum
        if tl.max(flags.to(tl.int32), axis=0) > 0:
            d_row = tl.load(col_pos_ptr + row_offset + row_offs, mask=row_ok, other=0.0)
            key = tl.full((BM,), NO_KEY, dtype=tl.int64)
            hinge_sum = tl.zeros((BM,), dtype=tl.float32)
            count = tl.zeros((BM,), dtype=tl.int32)
            for cb in range(n_col_blocks):
                col_offs = cb * BN + tl.arange(0, BN)
                s = score_tile_at(
                    rows_ptr, cols_ptr, 0, 0, row_offs.to(tl.int64), col_offs.to(tl.int64),
                    row_ok, col_offs < N, D, stride_rm, stride_rk, stride_cn, stride_ck,
                    BM, BN, BK, PRECISION, UPCAST, False,
                )  # fmt: skip
                ok = valid_pairs_mask(row_offs, col_offs, b, N, row_offset, row_ids_ptr,
                                      col_ids_ptr, HAS_IDS)  # fmt: skip
                k, h, c = exact_tile_stats(s, margin, d_row, ok, cb * BN, 1, BN)
                key = tl.maximum(key, k)
                hinge_sum += h
                count += c
            tl.store(row_key_ptr + row_offs, key, mask=flags)
            tl.store(row_sum_ptr + row_offs, hinge_sum, mask=flags)
            tl.store(row_cnt_ptr + row_offs, count, mask=flags)
    else:
        col_offs = (pid - n_row_blocks) * BN + tl.arange(0, BN)
        col_ok = col_offs < N
        old_sum = tl.load(col_sum_ptr + col_offs, mask=col_ok, other=0.0)
        flags = old_sum != old_sum
        if tl.max(flags.to(tl.int32), axis=0) > 0:
            d_col = tl.load(col_pos_ptr + col_offs, mask=col_ok, other=0.0)
            key = tl.full((BN,), NO_KEY, dtype=tl.int64)
            hinge_sum = tl.zeros((BN,), dtype=tl.float32)
            count = tl.zeros((BN,), dtype=tl.int32)
            for rb in range(n_row_blocks):
                row_offs = rb * BM + tl.arange(0, BM)
                s = score_tile_at(
                    rows_ptr, cols_ptr, 0, 0, row_offs.to(tl.int64), col_offs.to(tl.int64),
                    row_offs < b, col_ok, D, stride_rm, stride_rk, stride_cn, stride_ck,
                    BM, BN, BK, PRECISION, UPCAST, False,
                )  # fmt: skip
                ok = valid_pairs_mask(row_offs, col_offs, b, N, row_offset, row_ids_ptr,
                                      col_ids_ptr, HAS_IDS)  # fmt: skip
                k, h, c = exact_tile_stats(s, margin, d_col, ok, row_offset + rb * BM, 0, BM)
                key = tl.maximum(key, k)
                hinge_sum += h
                count += c
            tl.store(col_key_ptr + col_offs, key, mask=flags)
            tl.store(col_sum_ptr + col_offs, hinge_sum, mask=flags)
            tl.store(col_cnt_ptr + col_offs, count, mask=flags)
