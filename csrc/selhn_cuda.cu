// The CUDA backend of the kernel interface (selhn_ext/kernel_interface.py).
//
// S tiles of kBM x kBN are computed by one block of 128 threads: on tensor cores through
// WMMA for fp16/bf16 (fp32 accumulation) and for fp32 when TF32 is allowed, otherwise with
// IEEE fp32 FMAs. Every element of S runs the same sequence of operations over k whatever
// its position in a tile or which rows share the tile, so the backward, which recomputes
// tiles of compacted gated rows (or columns), reproduces the forward's S bit for bit.
//
// Forward, default mode: one block per tile; its row and column partials are merged with
// atomicMax on the packed (max, index) key, atomicAdd on the int32 active counts (both
// exact) and atomicAdd on the fp32 hinge sums (order-dependent).
// Forward, deterministic: a row-owner pass (one block per row tile, column tiles in
// ascending order) and a column-owner pass; no atomics.
// Backward: gated indices are compacted on the device (one block, prefix sums in index
// order); grids are sized for the worst case and blocks past the device-side count exit
// at once, so the host never waits. Default mode: one block per (gated group, partner
// tile), both gradient sides merged with fp32 atomicAdd. Deterministic: a partner-owner
// pass and an anchor-owner pass, each output row written by one block in a fixed order.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "selhn_tile_math.h"

namespace selhn {
namespace {

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

// ---------------------------------------------------------------- forward

struct PartialsOut {
  unsigned long long* row_key;
  float* row_sum;
  int32_t* row_active;
  unsigned long long* col_key;
  float* col_sum;
  int32_t* col_active;
};

struct TileShape {
  TileSide rows, cols;
};

struct Running {
  uint64_t key = kEmptyMaxKey;
  float sum = 0.0f;
  int32_t active = 0;
};

// Threads 0..63 fold tile row t, threads 64..127 fold tile column t - 64, in ascending order.
template <typename In>
__device__ void fold_tile(const Problem& p, const SharedTile<In>& sm, int nr, int nc,
                          bool rows_wanted, bool cols_wanted, Running& run) {
  const int t = threadIdx.x;
  if (t < kBM) {
    if (!rows_wanted || t >= nr) return;
    const int64_t row = sm.row_index[t];
    const float d = p.col_pos[p.row_offset + row];
    for (int c = 0; c < nc; ++c) {
      const int64_t col = sm.col_index[c];
      if (!p.valid(row, col)) continue;
      const float s = sm.s[t * kLds + c];
      const float arg = hinge_argument(p.margin, s, d);
      run.key = max_key_merge(run.key, pack_max_key(s, col));
      run.sum += hinge(arg);
      run.active += hinge_active(arg);
    }
  } else {
    const int c = t - kBM;
    if (!cols_wanted || c >= nc) return;
    const int64_t col = sm.col_index[c];
    const float d = p.col_pos[col];
    for (int r = 0; r < nr; ++r) {
      const int64_t row = sm.row_index[r];
      if (!p.valid(row, col)) continue;
      const float s = sm.s[r * kLds + c];
      const float arg = hinge_argument(p.margin, s, d);
      run.key = max_key_merge(run.key, pack_max_key(s, p.row_offset + row));
      run.sum += hinge(arg);
      run.active += hinge_active(arg);
    }
  }
}

enum PartialsMode { kTileAtomics = 0, kRowOwner = 1, kColOwner = 2 };

template <typename In, bool kTensorCores, int kMode>
__global__ void __launch_bounds__(kThreads)
    partials_kernel(const In* __restrict__ rows, const In* __restrict__ cols, Problem p,
                    PartialsOut out) {
  __shared__ SharedTile<In> sm;
  const int64_t n_rt = (p.b + kBM - 1) / kBM, n_ct = (p.n + kBN - 1) / kBN;
  const int t = threadIdx.x;
  Running run;
  auto tile = [&](int64_t rt, int64_t ct, bool rows_wanted, bool cols_wanted) {
    const TileSide rs{nullptr, rt * kBM, static_cast<int>(min64(kBM, p.b - rt * kBM))};
    const TileSide cs{nullptr, ct * kBN, static_cast<int>(min64(kBN, p.n - ct * kBN))};
    s_tile<In, kTensorCores>(sm, rows, rs, cols, cs, p.dim);
    fold_tile(p, sm, rs.count, cs.count, rows_wanted, cols_wanted, run);
    return TileShape{rs, cs};
  };
  if constexpr (kMode == kTileAtomics) {
    const TileShape shape = tile(blockIdx.x, blockIdx.y, true, true);
    const TileSide& rs = shape.rows;
    const TileSide& cs = shape.cols;
    if (t < kBM && t < rs.count) {
      const int64_t row = rs.start + t;
      atomicMax(out.row_key + row, static_cast<unsigned long long>(run.key));
      atomicAdd(out.row_sum + row, run.sum);
      atomicAdd(out.row_active + row, run.active);
    } else if (t >= kBM && t - kBM < cs.count) {
      const int64_t col = cs.start + (t - kBM);
      atomicMax(out.col_key + col, static_cast<unsigned long long>(run.key));
      atomicAdd(out.col_sum + col, run.sum);
      atomicAdd(out.col_active + col, run.active);
    }
  } else if constexpr (kMode == kRowOwner) {
    const int64_t rt = blockIdx.x;
    for (int64_t ct = 0; ct < n_ct; ++ct) tile(rt, ct, true, false);
    const int64_t row = rt * kBM + t;
    if (t < kBM && row < p.b) {
      out.row_key[row] = run.key;
      out.row_sum[row] = run.sum;
      out.row_active[row] = run.active;
    }
  } else {
    const int64_t ct = blockIdx.x;
    for (int64_t rt = 0; rt < n_rt; ++rt) tile(rt, ct, false, true);
    const int64_t col = ct * kBN + (t - kBM);
    if (t >= kBM && col < p.n) {
      out.col_key[col] = run.key;
      out.col_sum[col] = run.sum;
      out.col_active[col] = run.active;
    }
  }
}

__global__ void unpack_keys_kernel(const unsigned long long* __restrict__ keys, int64_t n,
                                   float* __restrict__ max_out, int64_t* __restrict__ arg_out) {
  const int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (k >= n) return;
  max_out[k] = max_key_value(keys[k]);
  arg_out[k] = max_key_index(keys[k]);
}

// ---------------------------------------------------------------- backward

// list[0 .. count) = the indices k with flags[k], ascending; one block, no host sync.
__global__ void __launch_bounds__(kCompactThreads)
    compact_kernel(const bool* __restrict__ flags, int64_t n, int32_t* __restrict__ list,
                   int32_t* __restrict__ count) {
  __shared__ int warp_totals[kCompactThreads / 32];
  __shared__ int base;
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  if (t == 0) base = 0;
  __syncthreads();
  for (int64_t start = 0; start < n; start += kCompactThreads) {
    const int64_t k = start + t;
    const bool flag = k < n && flags[k];
    const unsigned ballot = __ballot_sync(0xffffffffu, flag);
    if (lane == 0) warp_totals[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < kCompactThreads / 32; ++w) {
      before += w < warp ? warp_totals[w] : 0;
      total += warp_totals[w];
    }
    if (flag) list[base + before + __popc(ballot & ((1u << lane) - 1u))] = static_cast<int32_t>(k);
    __syncthreads();  // every thread has read ``base`` and ``warp_totals``
    if (t == 0) base += total;
    __syncthreads();
  }
  if (t == 0) *count = base;
}

enum BackwardMode { kBothAtomics = 0, kPartnerOwner = 1, kAnchorOwner = 2 };

// grad[index[k]] (+)= sum_m W[k, m] * other[other_index[m]] for the tile's k on one side.
template <typename In, bool kRowSide, bool kAtomic>
__device__ void accumulate_side(const SharedTile<In>& sm, const In* __restrict__ other,
                                float* __restrict__ grad, int nr, int nc, int64_t dim) {
  const int n_out = kRowSide ? nr : nc, n_sum = kRowSide ? nc : nr;
  for (int k = 0; k < n_out; ++k) {
    const int64_t target = kRowSide ? sm.row_index[k] : sm.col_index[k];
    for (int64_t d = threadIdx.x; d < dim; d += kThreads) {
      float acc = 0.0f;
      for (int m = 0; m < n_sum; ++m) {
        const float w = kRowSide ? sm.s[k * kLds + m] : sm.s[m * kLds + k];
        const int64_t source = kRowSide ? sm.col_index[m] : sm.row_index[m];
        if (w != 0.0f) acc = fmaf(w, Convert<In>::to_float(other[source * dim + d]), acc);
      }
      if constexpr (kAtomic) {
        if (acc != 0.0f) atomicAdd(grad + target * dim + d, acc);
      } else {
        grad[target * dim + d] += acc;
      }
    }
  }
}

template <typename In, bool kTensorCores, bool kAnchorsAreRows, int kMode>
__global__ void __launch_bounds__(kThreads)
    dense_backward_kernel(const In* __restrict__ rows, const In* __restrict__ cols, Problem p,
                          const int32_t* __restrict__ gated_list,
                          const int32_t* __restrict__ gated_count,
                          const float* __restrict__ coef, float* __restrict__ grad_rows,
                          float* __restrict__ grad_cols) {
  __shared__ SharedTile<In> sm;
  constexpr int kGroup = kAnchorsAreRows ? kBM : kBN;
  constexpr int kPartnerTile = kAnchorsAreRows ? kBN : kBM;
  const int64_t n_gated = *gated_count;
  const int64_t n_groups = (n_gated + kGroup - 1) / kGroup;
  const int64_t n_partners = kAnchorsAreRows ? p.n : p.b;
  const int64_t n_tiles = (n_partners + kPartnerTile - 1) / kPartnerTile;

  auto tile = [&](int64_t g, int64_t t) {
    const TileSide anchors{gated_list, g * kGroup,
                           static_cast<int>(min64(kGroup, n_gated - g * kGroup))};
    const TileSide partners{nullptr, t * kPartnerTile,
                            static_cast<int>(min64(kPartnerTile, n_partners - t * kPartnerTile))};
    const TileSide rs = kAnchorsAreRows ? anchors : partners;
    const TileSide cs = kAnchorsAreRows ? partners : anchors;
    s_tile<In, kTensorCores>(sm, rows, rs, cols, cs, p.dim);
    // S -> W in place (the gated term of this phase only).
    for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
      const int r = e / kBN, c = e % kBN;
      float w = 0.0f;
      if (r < rs.count && c < cs.count) {
        const int64_t row = sm.row_index[r], col = sm.col_index[c];
        if (p.valid(row, col)) {
          const float a_coef = coef[kAnchorsAreRows ? row : col];
          const float d = p.col_pos[kAnchorsAreRows ? p.row_offset + row : col];
          const float arg = hinge_argument(p.margin, sm.s[r * kLds + c], d);
          w = dense_pair_weight(kAnchorsAreRows, a_coef, arg, !kAnchorsAreRows, a_coef, arg);
        }
      }
      sm.s[r * kLds + c] = w;
    }
    __syncthreads();
    return TileShape{rs, cs};
  };

  if constexpr (kMode == kBothAtomics) {
    const int64_t g = blockIdx.x;
    if (g >= n_groups) return;  // worst-case grid: past the device-side count
    const TileShape shape = tile(g, blockIdx.y);
    const int nr = shape.rows.count, nc = shape.cols.count;
    accumulate_side<In, true, true>(sm, cols, grad_rows, nr, nc, p.dim);
    accumulate_side<In, false, true>(sm, rows, grad_cols, nr, nc, p.dim);
  } else if constexpr (kMode == kPartnerOwner) {
    const int64_t t = blockIdx.x;
    for (int64_t g = 0; g < n_groups; ++g) {
      const TileShape shape = tile(g, t);
      const int nr = shape.rows.count, nc = shape.cols.count;
      if constexpr (kAnchorsAreRows) {
        accumulate_side<In, false, false>(sm, rows, grad_cols, nr, nc, p.dim);
      } else {
        accumulate_side<In, true, false>(sm, cols, grad_rows, nr, nc, p.dim);
      }
    }
  } else {
    const int64_t g = blockIdx.x;
    if (g >= n_groups) return;
    for (int64_t t = 0; t < n_tiles; ++t) {
      const TileShape shape = tile(g, t);
      const int nr = shape.rows.count, nc = shape.cols.count;
      if constexpr (kAnchorsAreRows) {
        accumulate_side<In, true, false>(sm, cols, grad_rows, nr, nc, p.dim);
      } else {
        accumulate_side<In, false, false>(sm, rows, grad_cols, nr, nc, p.dim);
      }
    }
  }
}

// ---------------------------------------------------------------- host side

struct Prepared {
  at::Tensor rows, cols, col_pos, row_ids, col_ids;
  Problem problem;
};

Prepared prepare(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& col_pos,
                 int64_t row_offset, const std::optional<at::Tensor>& row_ids,
                 const std::optional<at::Tensor>& col_ids, double margin) {
  TORCH_CHECK(rows.is_cuda() && cols.is_cuda() && col_pos.is_cuda(),
              "selhn cuda: rows, cols and col_pos must be CUDA tensors");
  TORCH_CHECK(rows.dim() == 2 && cols.dim() == 2 && rows.size(1) == cols.size(1),
              "selhn cuda: rows (b, D) and cols (N, D) must share D, got ", rows.sizes(),
              " and ", cols.sizes());
  TORCH_CHECK(rows.size(1) >= 1, "selhn cuda: D must be at least 1");
  const auto dtype = rows.scalar_type();
  TORCH_CHECK(dtype == cols.scalar_type(), "selhn cuda: rows and cols dtypes differ");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "selhn cuda: takes float16, bfloat16 or float32 embeddings, got ", dtype,
              " (float64 runs on the cpu, chunked and reference backends)");
  TORCH_CHECK(col_pos.dim() == 1 && col_pos.size(0) == cols.size(0),
              "selhn cuda: col_pos must have shape (N,)");
  TORCH_CHECK(row_offset >= 0 && row_offset + rows.size(0) <= cols.size(0),
              "selhn cuda: rows [row_offset, row_offset + b) must lie within the N columns");
  TORCH_CHECK(cols.size(0) < (int64_t{1} << 31), "selhn cuda: N must be below 2^31");
  TORCH_CHECK((cols.size(0) + kBN - 1) / kBN <= 65535 && (rows.size(0) + kBM - 1) / kBM <= 65535,
              "selhn cuda: at most 65535 tiles per grid dimension (N and b up to 4,194,240)");
  TORCH_CHECK(row_ids.has_value() == col_ids.has_value(),
              "selhn cuda: pass both row_ids and col_ids or neither");
  Prepared out;
  out.rows = rows.contiguous();
  out.cols = cols.contiguous();
  out.col_pos = col_pos.to(at::kFloat).contiguous();
  if (row_ids.has_value()) {
    TORCH_CHECK(row_ids->numel() == rows.size(0) && col_ids->numel() == cols.size(0),
                "selhn cuda: row_ids must have shape (b,) and col_ids (N,)");
    out.row_ids = row_ids->to(at::kLong).contiguous();
    out.col_ids = col_ids->to(at::kLong).contiguous();
  }
  Problem& p = out.problem;
  p.col_pos = out.col_pos.data_ptr<float>();
  p.row_ids = out.row_ids.defined() ? out.row_ids.data_ptr<int64_t>() : nullptr;
  p.col_ids = out.col_ids.defined() ? out.col_ids.data_ptr<int64_t>() : nullptr;
  p.b = rows.size(0);
  p.n = cols.size(0);
  p.dim = rows.size(1);
  p.row_offset = row_offset;
  p.margin = static_cast<float>(margin);
  return out;
}

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

PartialsResult partials_cuda(const at::Tensor& rows, const at::Tensor& cols,
                             const at::Tensor& col_pos, int64_t row_offset,
                             const std::optional<at::Tensor>& row_ids,
                             const std::optional<at::Tensor>& col_ids, double margin,
                             bool deterministic, bool allow_tf32) {
  const c10::cuda::CUDAGuard guard(rows.device());
  const Prepared in = prepare(rows, cols, col_pos, row_offset, row_ids, col_ids, margin);
  const Problem& p = in.problem;
  const auto opts = in.col_pos.options();
  at::Tensor row_key = at::zeros({p.b}, opts.dtype(at::kLong));  // zero = the empty key
  at::Tensor col_key = at::zeros({p.n}, opts.dtype(at::kLong));
  at::Tensor row_sum = at::zeros({p.b}, opts), col_sum = at::zeros({p.n}, opts);
  at::Tensor row_active = at::zeros({p.b}, opts.dtype(at::kInt));
  at::Tensor col_active = at::zeros({p.n}, opts.dtype(at::kInt));
  const PartialsOut out{reinterpret_cast<unsigned long long*>(row_key.data_ptr<int64_t>()),
                        row_sum.data_ptr<float>(), row_active.data_ptr<int32_t>(),
                        reinterpret_cast<unsigned long long*>(col_key.data_ptr<int64_t>()),
                        col_sum.data_ptr<float>(), col_active.data_ptr<int32_t>()};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t n_rt = (p.b + kBM - 1) / kBM, n_ct = (p.n + kBN - 1) / kBN;
  if (p.b > 0 && p.n > 0) {
    dispatch_input(in.rows.scalar_type(), allow_tf32, [&](auto in_tag, auto tc_tag) {
      using In = typename decltype(in_tag)::type;
      constexpr bool kTC = decltype(tc_tag)::value;
      const In* r = data_as<In>(in.rows);
      const In* c = data_as<In>(in.cols);
      if (!deterministic) {
        partials_kernel<In, kTC, kTileAtomics>
            <<<dim3(n_rt, n_ct), kThreads, 0, stream>>>(r, c, p, out);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        partials_kernel<In, kTC, kRowOwner><<<n_rt, kThreads, 0, stream>>>(r, c, p, out);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        partials_kernel<In, kTC, kColOwner><<<n_ct, kThreads, 0, stream>>>(r, c, p, out);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  at::Tensor row_max = at::empty({p.b}, opts), col_max = at::empty({p.n}, opts);
  at::Tensor row_arg = at::empty({p.b}, opts.dtype(at::kLong));
  at::Tensor col_arg = at::empty({p.n}, opts.dtype(at::kLong));
  for (auto [keys, max_out, arg_out] :
       {std::make_tuple(row_key, row_max, row_arg), std::make_tuple(col_key, col_max, col_arg)}) {
    const int64_t n = keys.numel();
    if (n == 0) continue;
    unpack_keys_kernel<<<(n + 255) / 256, 256, 0, stream>>>(
        reinterpret_cast<const unsigned long long*>(keys.data_ptr<int64_t>()), n,
        max_out.data_ptr<float>(), arg_out.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {row_max, row_arg, row_sum, row_active, col_max, col_arg, col_sum, col_active};
}

std::tuple<at::Tensor, at::Tensor> dense_backward_cuda(
    const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& col_pos,
    int64_t row_offset, const std::optional<at::Tensor>& row_ids,
    const std::optional<at::Tensor>& col_ids, double margin, const at::Tensor& row_coef,
    const at::Tensor& col_coef, const at::Tensor& row_gated, const at::Tensor& col_gated,
    bool deterministic, bool allow_tf32) {
  const c10::cuda::CUDAGuard guard(rows.device());
  const Prepared in = prepare(rows, cols, col_pos, row_offset, row_ids, col_ids, margin);
  const Problem& p = in.problem;
  TORCH_CHECK(row_coef.numel() == p.b && row_gated.numel() == p.b,
              "selhn cuda: row_coef and row_gated must have shape (b,)");
  TORCH_CHECK(col_coef.numel() == p.n && col_gated.numel() == p.n,
              "selhn cuda: col_coef and col_gated must have shape (N,)");
  const auto opts = in.col_pos.options();
  const at::Tensor row_coef_f = row_coef.to(at::kFloat).contiguous();
  const at::Tensor col_coef_f = col_coef.to(at::kFloat).contiguous();
  const at::Tensor row_flags = row_gated.to(at::kBool).contiguous();
  const at::Tensor col_flags = col_gated.to(at::kBool).contiguous();
  at::Tensor grad_rows = at::zeros({p.b, p.dim}, opts);
  at::Tensor grad_cols = at::zeros({p.n, p.dim}, opts);
  if (p.b == 0 || p.n == 0) return {grad_rows, grad_cols};
  at::Tensor row_list = at::empty({p.b}, opts.dtype(at::kInt));
  at::Tensor col_list = at::empty({p.n}, opts.dtype(at::kInt));
  at::Tensor counts = at::zeros({2}, opts.dtype(at::kInt));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  compact_kernel<<<1, kCompactThreads, 0, stream>>>(row_flags.data_ptr<bool>(), p.b,
                                                    row_list.data_ptr<int32_t>(),
                                                    counts.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  compact_kernel<<<1, kCompactThreads, 0, stream>>>(col_flags.data_ptr<bool>(), p.n,
                                                    col_list.data_ptr<int32_t>(),
                                                    counts.data_ptr<int32_t>() + 1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t n_rt = (p.b + kBM - 1) / kBM, n_ct = (p.n + kBN - 1) / kBN;
  float* gr = grad_rows.data_ptr<float>();
  float* gc = grad_cols.data_ptr<float>();
  const int32_t* row_count = counts.data_ptr<int32_t>();
  const int32_t* col_count = row_count + 1;
  dispatch_input(in.rows.scalar_type(), allow_tf32, [&](auto in_tag, auto tc_tag) {
    using In = typename decltype(in_tag)::type;
    constexpr bool kTC = decltype(tc_tag)::value;
    const In* r = data_as<In>(in.rows);
    const In* c = data_as<In>(in.cols);
    const int32_t* rl = row_list.data_ptr<int32_t>();
    const int32_t* cl = col_list.data_ptr<int32_t>();
    const float* rc = row_coef_f.data_ptr<float>();
    const float* cc = col_coef_f.data_ptr<float>();
    // Worst-case grids: n_rt row groups (every row gated), n_ct column groups.
    if (!deterministic) {
      dense_backward_kernel<In, kTC, false, kBothAtomics>
          <<<dim3(n_ct, n_rt), kThreads, 0, stream>>>(r, c, p, cl, col_count, cc, gr, gc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dense_backward_kernel<In, kTC, true, kBothAtomics>
          <<<dim3(n_rt, n_ct), kThreads, 0, stream>>>(r, c, p, rl, row_count, rc, gr, gc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      // Column phase: owners of row tiles, then owners of gated column groups; then the
      // row phase likewise. Each launch finishes before the next on the stream.
      dense_backward_kernel<In, kTC, false, kPartnerOwner>
          <<<n_rt, kThreads, 0, stream>>>(r, c, p, cl, col_count, cc, gr, gc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dense_backward_kernel<In, kTC, false, kAnchorOwner>
          <<<n_ct, kThreads, 0, stream>>>(r, c, p, cl, col_count, cc, gr, gc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dense_backward_kernel<In, kTC, true, kPartnerOwner>
          <<<n_ct, kThreads, 0, stream>>>(r, c, p, rl, row_count, rc, gr, gc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dense_backward_kernel<In, kTC, true, kAnchorOwner>
          <<<n_rt, kThreads, 0, stream>>>(r, c, p, rl, row_count, rc, gr, gc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_rows, grad_cols};
}

}  // namespace
}  // namespace selhn

TORCH_LIBRARY_IMPL(selhn, CUDA, m) {
  m.impl("partials", &selhn::partials_cuda);
  m.impl("dense_backward", &selhn::dense_backward_cuda);
}
