// The CUDA forward statistics (partials): the per-tile fold, its kernels and the launcher.
//
// Default mode: one block per tile; its row and column partials are merged with
// atomicMax on the packed (max, index) key, atomicAdd on the int32 active counts (both
// exact) and atomicAdd on the fp32 hinge sums (order-dependent).
// Deterministic: a row-owner pass (one block per row tile, column tiles in
// ascending order) and a column-owner pass; no atomics.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "selhn_cuda.cuh"

namespace selhn::cuda {
namespace {

struct PartialsOut {
  unsigned long long* row_key;
  float* row_sum;
  int32_t* row_active;
  unsigned long long* col_key;
  float* col_sum;
  int32_t* col_active;
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

}  // namespace

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

}  // namespace selhn::cuda
