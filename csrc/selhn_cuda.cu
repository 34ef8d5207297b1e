// The op registration of the CUDA backend and the input checks its two launchers share.
// The kernels and launchers are in selhn_cuda_forward.cu and selhn_cuda_backward.cu, the
// shared tile code in selhn_cuda.cuh.
#include <torch/library.h>

#include "selhn_cuda.cuh"

namespace selhn::cuda {

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

}  // namespace selhn::cuda

TORCH_LIBRARY_IMPL(selhn, CUDA, m) {
  m.impl("partials", &selhn::cuda::partials_cuda);
  m.impl("dense_backward", &selhn::cuda::dense_backward_cuda);
}
