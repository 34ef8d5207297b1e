// The op entry points of the C++ CPU backend (kernel_interface.partials and
// dense_backward), their input checks, and the test-only hooks. The tile math is in
// selhn_cpu_kernels.cpp, the passes in selhn_cpu_forward.cpp and selhn_cpu_backward.cpp.
#include <torch/library.h>

#include <numeric>

#include "selhn_cpu.h"

namespace selhn::cpu {
namespace {

void check_inputs(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& col_pos,
                  int64_t row_offset, const std::optional<at::Tensor>& row_ids,
                  const std::optional<at::Tensor>& col_ids) {
  TORCH_CHECK(rows.dim() == 2 && cols.dim() == 2, "selhn: rows and cols must be 2-D, got ",
              rows.sizes(), " and ", cols.sizes());
  TORCH_CHECK(rows.size(1) == cols.size(1), "selhn: rows and cols must share D, got ",
              rows.size(1), " and ", cols.size(1));
  TORCH_CHECK(rows.scalar_type() == cols.scalar_type(), "selhn: rows and cols dtypes differ");
  TORCH_CHECK(at::isFloatingType(rows.scalar_type()), "selhn: embeddings must be floating");
  TORCH_CHECK(col_pos.dim() == 1 && col_pos.size(0) == cols.size(0),
              "selhn: col_pos must have shape (N,) = (", cols.size(0), ",), got ",
              col_pos.sizes());
  TORCH_CHECK(row_offset >= 0 && row_offset + rows.size(0) <= cols.size(0),
              "selhn: rows [row_offset, row_offset + b) = [", row_offset, ", ",
              row_offset + rows.size(0), ") must lie within the N = ", cols.size(0), " columns");
  TORCH_CHECK(cols.size(0) < (int64_t{1} << 31), "selhn: N must be below 2^31");
  TORCH_CHECK(row_ids.has_value() == col_ids.has_value(),
              "selhn: pass both row_ids and col_ids or neither");
  if (row_ids.has_value()) {
    TORCH_CHECK(row_ids->dim() == 1 && row_ids->size(0) == rows.size(0),
                "selhn: row_ids must have shape (b,)");
    TORCH_CHECK(col_ids->dim() == 1 && col_ids->size(0) == cols.size(0),
                "selhn: col_ids must have shape (N,)");
  }
}

struct Prepared {
  at::Tensor rows, cols, col_pos, row_ids, col_ids;
};

Prepared prepare(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& col_pos,
                 const std::optional<at::Tensor>& row_ids,
                 const std::optional<at::Tensor>& col_ids) {
  const auto cdt = rows.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Prepared out;
  out.rows = rows.to(cdt).contiguous();
  out.cols = cols.to(cdt).contiguous();
  out.col_pos = col_pos.to(cdt).contiguous();
  if (row_ids.has_value()) {
    out.row_ids = row_ids->to(at::kLong).contiguous();
    out.col_ids = col_ids->to(at::kLong).contiguous();
  }
  return out;
}

using PartialsResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor, at::Tensor>;

template <typename T>
void write_stats(const std::vector<AnchorPartial<T>>& parts, at::Tensor& max, at::Tensor& arg,
                 at::Tensor& sum, at::Tensor& active) {
  T* max_p = max.data_ptr<T>();
  int64_t* arg_p = arg.data_ptr<int64_t>();
  T* sum_p = sum.data_ptr<T>();
  int32_t* active_p = active.data_ptr<int32_t>();
  for (size_t k = 0; k < parts.size(); ++k) {
    max_p[k] = parts[k].max.value();
    arg_p[k] = parts[k].max.index();
    sum_p[k] = static_cast<T>(parts[k].hinge_sum);
    active_p[k] = parts[k].active;
  }
}

PartialsResult partials_cpu(const at::Tensor& rows, const at::Tensor& cols,
                            const at::Tensor& col_pos, int64_t row_offset,
                            const std::optional<at::Tensor>& row_ids,
                            const std::optional<at::Tensor>& col_ids, double margin,
                            bool deterministic, bool allow_tf32) {
  (void)allow_tf32;  // fp32 on the CPU is always IEEE
  check_inputs(rows, cols, col_pos, row_offset, row_ids, col_ids);
  const Prepared in = prepare(rows, cols, col_pos, row_ids, col_ids);
  const int64_t b = in.rows.size(0), n = in.cols.size(0);
  const auto float_opts = in.rows.options();
  auto new_stats = [&](int64_t len) {
    return std::make_tuple(at::empty({len}, float_opts),
                           at::empty({len}, float_opts.dtype(at::kLong)),
                           at::empty({len}, float_opts),
                           at::empty({len}, float_opts.dtype(at::kInt)));
  };
  auto [row_max, row_arg, row_sum, row_active] = new_stats(b);
  auto [col_max, col_arg, col_sum, col_active] = new_stats(n);
  // Row i's positive is column row_offset + i.
  std::vector<int64_t> diag(b);
  std::iota(diag.begin(), diag.end(), row_offset);
  AT_DISPATCH_FLOATING_TYPES(in.rows.scalar_type(), "selhn_partials_cpu", [&] {
    const scalar_t* d = in.col_pos.data_ptr<scalar_t>();
    const Problem<scalar_t> p{in.rows.data_ptr<scalar_t>(),
                              in.cols.data_ptr<scalar_t>(),
                              d + row_offset,
                              diag.data(),
                              d,
                              in.row_ids.defined() ? in.row_ids.data_ptr<int64_t>() : nullptr,
                              in.col_ids.defined() ? in.col_ids.data_ptr<int64_t>() : nullptr,
                              b,
                              n,
                              in.rows.size(1),
                              row_offset,
                              static_cast<scalar_t>(margin)};
    std::vector<AnchorPartial<scalar_t>> row_parts(b), col_parts(n);
    partials_pass(p, deterministic, row_parts, col_parts);
    write_stats(row_parts, row_max, row_arg, row_sum, row_active);
    write_stats(col_parts, col_max, col_arg, col_sum, col_active);
  });
  return {row_max, row_arg, row_sum, row_active, col_max, col_arg, col_sum, col_active};
}

// The anchors in the order the backward's tiles see them: the gated ones first (ascending),
// then the others; and how many are gated.
std::pair<at::Tensor, int64_t> gated_first(const at::Tensor& gated) {
  const at::Tensor flags = gated.to(at::kBool).contiguous();
  const bool* f = flags.data_ptr<bool>();
  const int64_t count = flags.numel();
  at::Tensor order = at::empty({count}, at::kLong);
  int64_t* o = order.data_ptr<int64_t>();
  int64_t next = 0;
  for (int64_t k = 0; k < count; ++k) {
    if (f[k]) o[next++] = k;
  }
  const int64_t n_gated = next;
  for (int64_t k = 0; k < count; ++k) {
    if (!f[k]) o[next++] = k;
  }
  return {order, n_gated};
}

bool is_identity(const at::Tensor& order) {
  const int64_t* o = order.data_ptr<int64_t>();
  for (int64_t k = 0; k < order.numel(); ++k) {
    if (o[k] != k) return false;
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor> dense_backward_cpu(
    const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& col_pos,
    int64_t row_offset, const std::optional<at::Tensor>& row_ids,
    const std::optional<at::Tensor>& col_ids, double margin, const at::Tensor& row_coef,
    const at::Tensor& col_coef, const at::Tensor& row_gated, const at::Tensor& col_gated,
    bool deterministic, bool allow_tf32) {
  (void)allow_tf32;
  check_inputs(rows, cols, col_pos, row_offset, row_ids, col_ids);
  TORCH_CHECK(row_coef.numel() == rows.size(0) && row_gated.numel() == rows.size(0),
              "selhn: row_coef and row_gated must have shape (b,)");
  TORCH_CHECK(col_coef.numel() == cols.size(0) && col_gated.numel() == cols.size(0),
              "selhn: col_coef and col_gated must have shape (N,)");
  const Prepared in = prepare(rows, cols, col_pos, row_ids, col_ids);
  at::Tensor grad_rows = at::zeros_like(in.rows);
  at::Tensor grad_cols = at::zeros_like(in.cols);
  // The CPU may read the gates on the host: the ordering costs O(B), no device sync.
  const auto [row_order, gated_rows] = gated_first(row_gated);
  const auto [col_order, gated_cols] = gated_first(col_gated);
  if (gated_rows == 0 && gated_cols == 0) return {grad_rows, grad_cols};
  const int64_t b = in.rows.size(0), n = in.cols.size(0);
  // Everything per anchor in the gated-first order (index_select copies exactly). When
  // the gated anchors already come first (every anchor gated, for one), that order is the
  // identity: the inputs and gradients are used in place, with no copies.
  const bool rows_in_order = is_identity(row_order), cols_in_order = is_identity(col_order);
  const at::Tensor rows_p = rows_in_order ? in.rows : in.rows.index_select(0, row_order);
  const at::Tensor cols_p = cols_in_order ? in.cols : in.cols.index_select(0, col_order);
  const at::Tensor row_global = row_order + row_offset;  // each row's positive column
  const at::Tensor d_row = in.col_pos.index_select(0, row_global);
  const at::Tensor d_col = in.col_pos.index_select(0, col_order);
  const at::Tensor col_position = at::empty({n}, at::kLong).index_put_(
      {col_order}, at::arange(n, at::kLong));
  const at::Tensor diag = col_position.index_select(0, row_global);
  const at::Tensor gated_row_mask = at::arange(b, at::kLong) < gated_rows;
  const at::Tensor gated_col_mask = at::arange(n, at::kLong) < gated_cols;
  const auto cdt = in.rows.scalar_type();
  const at::Tensor rc = row_coef.to(cdt).index_select(0, row_order)
                            .where(gated_row_mask, at::zeros({}, cdt)).contiguous();
  const at::Tensor cc = col_coef.to(cdt).index_select(0, col_order)
                            .where(gated_col_mask, at::zeros({}, cdt)).contiguous();
  at::Tensor row_ids_p, col_ids_p;
  if (in.row_ids.defined()) {
    row_ids_p = in.row_ids.index_select(0, row_order);
    col_ids_p = in.col_ids.index_select(0, col_order);
  }
  at::Tensor grad_rows_p = rows_in_order ? grad_rows : at::zeros_like(rows_p);
  at::Tensor grad_cols_p = cols_in_order ? grad_cols : at::zeros_like(cols_p);
  AT_DISPATCH_FLOATING_TYPES(cdt, "selhn_dense_backward_cpu", [&] {
    const Problem<scalar_t> p{rows_p.data_ptr<scalar_t>(),
                              cols_p.data_ptr<scalar_t>(),
                              d_row.data_ptr<scalar_t>(),
                              diag.data_ptr<int64_t>(),
                              d_col.data_ptr<scalar_t>(),
                              row_ids_p.defined() ? row_ids_p.data_ptr<int64_t>() : nullptr,
                              col_ids_p.defined() ? col_ids_p.data_ptr<int64_t>() : nullptr,
                              b,
                              n,
                              in.rows.size(1),
                              row_offset,
                              static_cast<scalar_t>(margin)};
    dense_backward_pass(p, rc.data_ptr<scalar_t>(), cc.data_ptr<scalar_t>(), gated_rows,
                        gated_cols, deterministic, grad_rows_p.data_ptr<scalar_t>(),
                        grad_cols_p.data_ptr<scalar_t>());
  });
  if (!rows_in_order) grad_rows.index_copy_(0, row_order, grad_rows_p);
  if (!cols_in_order) grad_cols.index_copy_(0, col_order, grad_cols_p);
  return {grad_rows, grad_cols};
}

// ---------------------------------------------------------------- test-only hooks

void set_reverse_tile_order(bool reverse) { g_reverse_tile_order.store(reverse); }

int64_t backward_tile_count(bool reset) {
  return reset ? g_backward_tiles.exchange(0) : g_backward_tiles.load();
}

std::vector<int64_t> cpu_tile_shape() { return {kBlockRows, kBlockCols}; }

// The S tile paths this CPU can run, fastest first, then the test-only emulated one.
std::vector<std::string> cpu_simd_paths() {
  std::vector<std::string> out;
  for (SimdPath path : available_simd_paths()) out.push_back(simd_path_name(path));
  return out;
}

// Selects the kernel path by name ("best" restores the default).
void select_simd_path(const std::string& name) {
  const std::vector<SimdPath> paths = available_simd_paths();
  if (name == "best") {
    set_simd_path(paths.front());
    return;
  }
  for (SimdPath path : paths) {
    if (name == simd_path_name(path)) {
      set_simd_path(path);
      return;
    }
  }
  TORCH_CHECK(false, "selhn: S tile path ", name, " is not available on this CPU");
}

}  // namespace
}  // namespace selhn::cpu

TORCH_LIBRARY_IMPL(selhn, CPU, m) {
  m.impl("partials", &selhn::cpu::partials_cpu);
  m.impl("dense_backward", &selhn::cpu::dense_backward_cpu);
}

// Test-only: tile visiting order, the backward's recomputed-tile counter, the tile shape,
// the kernel paths.
TORCH_LIBRARY_FRAGMENT(selhn, m) {
  m.def("_cpu_set_reverse_tile_order(bool reverse) -> ()", &selhn::cpu::set_reverse_tile_order);
  m.def("_cpu_backward_tile_count(bool reset) -> int", &selhn::cpu::backward_tile_count);
  m.def("_cpu_tile_shape() -> int[]", &selhn::cpu::cpu_tile_shape);
  m.def("_cpu_simd_paths() -> str[]", &selhn::cpu::cpu_simd_paths);
  m.def("_cpu_set_simd_path(str name) -> ()", &selhn::cpu::select_simd_path);
}
