// The CUDA dense (gated) backward: compaction of the gated indices, the gradient kernels
// and the launcher.
//
// Gated indices are compacted on the device (one block, prefix sums in index
// order); grids are sized for the worst case and blocks past the device-side count exit
// at once, so the host never waits. Default mode: one block per (gated group, partner
// tile), both gradient sides merged with fp32 atomicAdd. Deterministic: a partner-owner
// pass and an anchor-owner pass, each output row written by one block in a fixed order.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "selhn_cuda.cuh"

namespace selhn::cuda {
namespace {

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

}  // namespace

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

}  // namespace selhn::cuda
