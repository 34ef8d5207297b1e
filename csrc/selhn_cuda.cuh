// Declarations shared by the CUDA backend's translation units (the CUDA backend of the
// kernel interface, selhn_ext/kernel_interface.py):
//   selhn_cuda_forward.cu   the forward statistics (partials): kernels and launcher;
//   selhn_cuda_backward.cu  the dense (gated) backward: kernels and launcher;
//   selhn_cuda.cu           the op registration and the input checks both launchers share.
// This header holds the tile geometry and the S tile both passes compute.
//
// S tiles of kBM x kBN are computed by one block of 128 threads: on tensor cores through
// WMMA for fp16/bf16 (fp32 accumulation) and for fp32 when TF32 is allowed, otherwise with
// IEEE fp32 FMAs. Every element of S runs the same sequence of operations over k whatever
// its position in a tile or which rows share the tile, so the backward, which recomputes
// tiles of compacted gated rows (or columns), reproduces the forward's S bit for bit.
#pragma once

#include <ATen/ATen.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "selhn_tile_math.h"

namespace selhn::cuda {

constexpr int kBM = 64;            // rows per tile (and gated rows per group)
constexpr int kBN = 64;            // columns per tile (and gated columns per group)
constexpr int kBK = 16;            // k chunk staged in shared memory
constexpr int kLdk = kBK + 8;      // padded leading dimension of the staged chunks
constexpr int kLds = kBN + 4;      // padded leading dimension of the S tile
constexpr int kThreads = 128;      // 4 warps; warp w owns S rows [16w, 16w + 16)
constexpr int kCompactThreads = 1024;

static_assert(kBM == 64 && kBN == 64 && kThreads == 128, "the epilogues assume 64 x 64 tiles");

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename In>
struct Convert;
template <>
struct Convert<float> {
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float zero() { return 0.0f; }
};
template <>
struct Convert<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half zero() { return __float2half(0.0f); }
};
template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) {
    return __bfloat162float(x);
  }
  static __device__ __forceinline__ __nv_bfloat16 zero() { return __float2bfloat16(0.0f); }
};

// WMMA fragment element type and k extent per input type (fp32 runs as TF32).
template <typename In>
struct MmaTraits;
template <>
struct MmaTraits<__half> {
  using Element = __half;
  static constexpr int kK = 16;
};
template <>
struct MmaTraits<__nv_bfloat16> {
  using Element = __nv_bfloat16;
  static constexpr int kK = 16;
};
template <>
struct MmaTraits<float> {
  using Element = nvcuda::wmma::precision::tf32;
  static constexpr int kK = 8;
};

template <typename In>
struct alignas(32) SharedTile {
  In a[kBM * kLdk];  // rows of the tile, k chunk
  In b[kBN * kLdk];  // columns of the tile, k chunk
  float s[kBM * kLds];  // S, then the backward's weights W
  int64_t row_index[kBM];  // global row (local to ``rows``) of each tile row, -1 past the end
  int64_t col_index[kBN];
};

// Which embeddings form one side of a tile: ``list`` (compacted indices) or a range.
struct TileSide {
  const int32_t* list;  // nullptr: contiguous from ``start``
  int64_t start;
  int count;
  __device__ __forceinline__ int64_t at(int k) const {
    return list ? static_cast<int64_t>(list[start + k]) : start + k;
  }
};

struct Problem {
  const float* col_pos;
  const int64_t* row_ids;  // nullptr without ids
  const int64_t* col_ids;
  int64_t b, n, dim, row_offset;
  float margin;
  __device__ __forceinline__ bool valid(int64_t row, int64_t col) const {
    const bool has_ids = row_ids != nullptr;
    return valid_pair(col, row_offset + row, has_ids, has_ids ? row_ids[row] : 0,
                      has_ids ? col_ids[col] : 0);
  }
};

template <typename In>
__device__ void stage_indices(SharedTile<In>& sm, TileSide rows, TileSide cols) {
  __syncthreads();  // the previous tile's epilogue may still read the indices and S
  for (int k = threadIdx.x; k < kBM; k += kThreads) sm.row_index[k] = k < rows.count ? rows.at(k) : -1;
  for (int k = threadIdx.x; k < kBN; k += kThreads) sm.col_index[k] = k < cols.count ? cols.at(k) : -1;
  __syncthreads();
}

// Stage the k chunk [k0, k0 + kBK) of the tile's rows and columns (zeros outside).
template <typename In>
__device__ void stage_chunk(SharedTile<In>& sm, const In* __restrict__ rows,
                            const In* __restrict__ cols, int64_t dim, int64_t k0) {
  for (int e = threadIdx.x; e < kBM * kBK; e += kThreads) {
    const int r = e / kBK, kk = e % kBK;
    const int64_t row = sm.row_index[r];
    sm.a[r * kLdk + kk] =
        (row >= 0 && k0 + kk < dim) ? rows[row * dim + k0 + kk] : Convert<In>::zero();
  }
  for (int e = threadIdx.x; e < kBN * kBK; e += kThreads) {
    const int c = e / kBK, kk = e % kBK;
    const int64_t col = sm.col_index[c];
    sm.b[c * kLdk + kk] =
        (col >= 0 && k0 + kk < dim) ? cols[col * dim + k0 + kk] : Convert<In>::zero();
  }
}

// S tile on tensor cores: warp w computes rows [16w, 16w + 16) x all 64 columns.
template <typename In>
__device__ void s_tile_mma(SharedTile<In>& sm, const In* rows, const In* cols, int64_t dim) {
  using namespace nvcuda;
  using Traits = MmaTraits<In>;
  constexpr int kK = Traits::kK;
  const int warp = threadIdx.x / 32;
  wmma::fragment<wmma::accumulator, 16, 16, kK, float> acc[kBN / 16];
  for (int f = 0; f < kBN / 16; ++f) wmma::fill_fragment(acc[f], 0.0f);
  for (int64_t k0 = 0; k0 < dim; k0 += kBK) {
    __syncthreads();  // everyone is done with the previous chunk (and the previous S)
    stage_chunk(sm, rows, cols, dim, k0);
    __syncthreads();
    for (int kk = 0; kk < kBK; kk += kK) {
      wmma::fragment<wmma::matrix_a, 16, 16, kK, typename Traits::Element, wmma::row_major> a;
      wmma::load_matrix_sync(a, sm.a + warp * 16 * kLdk + kk, kLdk);
      if constexpr (std::is_same_v<In, float>) {
        for (int t = 0; t < a.num_elements; ++t) a.x[t] = wmma::__float_to_tf32(a.x[t]);
      }
      for (int f = 0; f < kBN / 16; ++f) {
        // S = A B^T: B^T's (k, j) element is column j's k-th value, i.e. col-major B^T.
        wmma::fragment<wmma::matrix_b, 16, 16, kK, typename Traits::Element, wmma::col_major> bt;
        wmma::load_matrix_sync(bt, sm.b + f * 16 * kLdk + kk, kLdk);
        if constexpr (std::is_same_v<In, float>) {
          for (int t = 0; t < bt.num_elements; ++t) bt.x[t] = wmma::__float_to_tf32(bt.x[t]);
        }
        wmma::mma_sync(acc[f], a, bt, acc[f]);
      }
    }
  }
  for (int f = 0; f < kBN / 16; ++f) {
    wmma::store_matrix_sync(sm.s + warp * 16 * kLds + f * 16, acc[f], kLds, wmma::mem_row_major);
  }
  __syncthreads();
}

// S tile with IEEE fp32 FMAs: thread t computes row t / 2, columns [32 (t % 2), + 32),
// each element's k loop in ascending order.
template <typename In>
__device__ void s_tile_fma(SharedTile<In>& sm, const In* rows, const In* cols, int64_t dim) {
  const int r = threadIdx.x / 2, c0 = (threadIdx.x % 2) * 32;
  float acc[32];
  for (int c = 0; c < 32; ++c) acc[c] = 0.0f;
  for (int64_t k0 = 0; k0 < dim; k0 += kBK) {
    __syncthreads();
    stage_chunk(sm, rows, cols, dim, k0);
    __syncthreads();
    for (int kk = 0; kk < kBK; ++kk) {
      const float a = Convert<In>::to_float(sm.a[r * kLdk + kk]);
      for (int c = 0; c < 32; ++c) {
        acc[c] = fmaf(a, Convert<In>::to_float(sm.b[(c0 + c) * kLdk + kk]), acc[c]);
      }
    }
  }
  for (int c = 0; c < 32; ++c) sm.s[r * kLds + c0 + c] = acc[c];
  __syncthreads();
}

template <typename In, bool kTensorCores>
__device__ void s_tile(SharedTile<In>& sm, const In* rows, TileSide row_side, const In* cols,
                       TileSide col_side, int64_t dim) {
  stage_indices(sm, row_side, col_side);
  if constexpr (kTensorCores) {
    s_tile_mma(sm, rows, cols, dim);
  } else {
    s_tile_fma(sm, rows, cols, dim);
  }
}

struct TileShape {
  TileSide rows, cols;
};

// ---------------------------------------------------------------- host side

struct Prepared {
  at::Tensor rows, cols, col_pos, row_ids, col_ids;
  Problem problem;
};

// Checks the inputs both ops take and gathers them (contiguous, fp32 col_pos) into a Problem.
Prepared prepare(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& col_pos,
                 int64_t row_offset, const std::optional<at::Tensor>& row_ids,
                 const std::optional<at::Tensor>& col_ids, double margin);

template <typename T>
struct TypeTag {
  using type = T;
};
template <bool kValue>
using BoolTag = std::integral_constant<bool, kValue>;

// Calls fn(TypeTag<In>, BoolTag<kTensorCores>) for the input dtype: tensor cores for
// 16-bit inputs, and for fp32 only when TF32 is allowed.
template <typename Fn>
void dispatch_input(at::ScalarType dtype, bool allow_tf32, Fn&& fn) {
  if (dtype == at::kHalf) {
    fn(TypeTag<__half>{}, BoolTag<true>{});
  } else if (dtype == at::kBFloat16) {
    fn(TypeTag<__nv_bfloat16>{}, BoolTag<true>{});
  } else if (allow_tf32) {
    fn(TypeTag<float>{}, BoolTag<true>{});
  } else {
    fn(TypeTag<float>{}, BoolTag<false>{});
  }
}

template <typename In>
const In* data_as(const at::Tensor& t) {
  return reinterpret_cast<const In*>(t.data_ptr());
}

using PartialsResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor, at::Tensor>;

// The op entries (selhn::partials, selhn::dense_backward; schemas in selhn_ops.cpp).
PartialsResult partials_cuda(const at::Tensor& rows, const at::Tensor& cols,
                             const at::Tensor& col_pos, int64_t row_offset,
                             const std::optional<at::Tensor>& row_ids,
                             const std::optional<at::Tensor>& col_ids, double margin,
                             bool deterministic, bool allow_tf32);

std::tuple<at::Tensor, at::Tensor> dense_backward_cuda(
    const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& col_pos,
    int64_t row_offset, const std::optional<at::Tensor>& row_ids,
    const std::optional<at::Tensor>& col_ids, double margin, const at::Tensor& row_coef,
    const at::Tensor& col_coef, const at::Tensor& row_gated, const at::Tensor& col_gated,
    bool deterministic, bool allow_tf32);

}  // namespace selhn::cuda
