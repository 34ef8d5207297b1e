"""Shared Triton building blocks of the SelHN kernels: one S tile, the packed keys' format.

No kernel stores S. Every tile is computed by ``score_tile_at`` with the same block shape
and K-loop order, in the forward (tensor descriptors where the layout allows, else
pointers) and in the backward's recompute (``score_tile``: pointers, gathered rows), so
the backward sees the forward's active hinges bit for bit.

Row / column maxima and their arguments are merged across programs with one packed
64-bit key per anchor (``tl.atomic_max`` on int64; formed by the forward's ``packed_key``):

    key = orderable(max) << 32 | (0xFFFFFFFF - global_index)

``orderable`` maps a float's bits to an int32 that sorts like the float, with -0.0 mapped
to +0.0 and a (positive) NaN above +inf, so the largest key holds the largest score
(NaN first) and, among equal scores, the smallest index. ``NO_KEY`` (int64 min) means no
valid negative was seen.
"""

from __future__ import annotations

import triton
import triton.language as tl

NO_KEY = tl.constexpr(-9223372036854775808)


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST: the interpreter multiplies bfloat16 wrongly (raw bits in numpy),
    so there the exact fp32 upcast is used; compiled kernels always keep UPCAST off."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def load_k_step(
    rows, cols, row0, col0, row_mem, col_mem, row_ok, col_ok, k0, D,
    stride_rm, stride_rk, stride_cn, stride_ck,
    BK: tl.constexpr, USE_TMA: tl.constexpr,
):  # fmt: skip
    """The (BM, BK) row tile and the (BN, BK) column tile of K step ``k0``: the one place
    where the two ways of loading differ. USE_TMA: ``rows``/``cols`` are tensor
    descriptors read at rows ``row0``/``col0`` (TMA on sm_90, zero past the edges);
    otherwise pointers read at the int64 memory rows ``row_mem``/``col_mem``, masked."""
    if USE_TMA:
        a = rows.load([row0, k0])
        b = cols.load([col0, k0])
    else:
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < D
        a_ptrs = rows + row_mem[:, None] * stride_rm + offs_k[None, :] * stride_rk
        b_ptrs = cols + col_mem[:, None] * stride_cn + offs_k[None, :] * stride_ck
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
    return a, b


@triton.jit
def score_tile_at(
    rows, cols, row0, col0, row_mem, col_mem, row_ok, col_ok, D,
    stride_rm, stride_rk, stride_cn, stride_ck,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
):  # fmt: skip
    """S of one tile in fp32: K steps of BK in increasing order, one tl.dot each, of the
    row tile and the transposed column tile, however they were loaded (load_k_step)."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        a, b = load_k_step(
            rows, cols, row0, col0, row_mem, col_mem, row_ok, col_ok, k0, D,
            stride_rm, stride_rk, stride_cn, stride_ck, BK, USE_TMA,
        )  # fmt: skip
        if UPCAST:  # see mma; inlined here, the interpreter pays per helper call
            acc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def score_tile(
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
    """S[row_mem, col_mem] in fp32 through pointers (``row_mem``/``col_mem`` are int64
    memory rows, gathered or not): the forward's arithmetic (score_tile_at), bit for bit."""
    return score_tile_at(
        rows_ptr, cols_ptr, 0, 0, row_mem, col_mem, row_ok, col_ok, D,
        stride_rm, stride_rk, stride_cn, stride_ck, BM, BN, BK, PRECISION, UPCAST, False,
    )  # fmt: skip
