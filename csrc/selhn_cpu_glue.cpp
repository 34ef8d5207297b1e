// The sparse and diagonal backward of the CPU backend (kernel_interface's
// sparse_and_diagonal_backward): the hardest-negative pairs and the diagonal added to the
// dense gradients in place, O(B * D).
//
// Same operations, same order, same bits as the PyTorch glue on the CPU: every term is a
// product w * x rounded to the compute dtype and then added (the build disables FMA
// contraction), and each gradient row receives its terms in the glue's order:
//   grad_rows[i]: its hardest caption's term, then the terms of the caption anchors whose
//                 hardest image is row i (ascending caption), then the diagonal;
//   grad_cols[c]: the terms of the image anchors whose hardest caption is c (ascending
//                 row), then its own hardest image's term, then the diagonal.
// The anchors of each gradient row are listed first (a counting sort, O(B)), then the rows
// are split among threads: each row has one owner, so the bits do not depend on the thread
// count. The glue's placeholder terms (weight 0 at index 0 for an anchor without a hardest
// negative, or whose hardest image lives in another process's block) are left out.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "selhn_cpu.h"

namespace selhn::cpu {
namespace {

// For each of ``count`` targets, the sources k (ascending) with target[k] == it; -1 targets
// are skipped. start has count + 1 entries.
struct Lists {
  std::vector<int64_t> start, items;
  Lists(const std::vector<int64_t>& target, int64_t count) : start(count + 1, 0) {
    for (int64_t t : target) {
      if (t >= 0) ++start[t + 1];
    }
    for (int64_t k = 0; k < count; ++k) start[k + 1] += start[k];
    items.resize(start[count]);
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t k = 0; k < static_cast<int64_t>(target.size()); ++k) {
      if (target[k] >= 0) items[next[target[k]]++] = k;
    }
  }
};

// g[0 .. dim) += w * x, the product rounded before the add.
template <typename T>
inline void add_scaled(T* g, T w, const T* x, int64_t dim) {
  for (int64_t e = 0; e < dim; ++e) g[e] = g[e] + w * x[e];
}

// One direction's weights, upcast and contiguous.
template <typename T>
struct Weights {
  at::Tensor upstream, hardest, dense, hard, active;
  Weights(const at::Tensor& up, const at::Tensor& idx, const at::Tensor& dw,
          const at::Tensor& hw, const at::Tensor& act, at::ScalarType cdt)
      : upstream(up.to(cdt).contiguous()),
        hardest(idx.to(at::kLong).contiguous()),
        dense(dw.to(cdt).contiguous()),
        hard(hw.to(cdt).contiguous()),
        active(act.to(cdt).contiguous()) {}
  const T* up() const { return upstream.data_ptr<T>(); }
  const int64_t* arg() const { return hardest.data_ptr<int64_t>(); }
  // upstream * dense weight * active (the glue's left-to-right products).
  T dense_term(int64_t k) const {
    return up()[k] * dense.data_ptr<T>()[k] * active.data_ptr<T>()[k];
  }
  T hard_term(int64_t k) const { return up()[k] * hard.data_ptr<T>()[k]; }
};

template <typename T>
void run(const T* rows, const T* cols, int64_t b, int64_t n, int64_t dim, int64_t offset,
         const Weights<T>& row, const Weights<T>& col, T* grad_rows, T* grad_cols) {
  // Per image anchor i: its hardest caption k_i (or -1) and weight; per caption anchor j:
  // its hardest image as a local row (or -1) and weight; the diagonal weight of each row.
  std::vector<int64_t> k(b), q(n);
  std::vector<T> w_row(b), w_col(n), w_col_mine(n), g_diag(b);
  for (int64_t j = 0; j < n; ++j) {
    w_col[j] = col.hard_term(j);
    const int64_t local = col.arg()[j] - offset;
    const bool mine = col.arg()[j] >= 0 && local >= 0 && local < b;
    q[j] = mine ? local : -1;
    w_col_mine[j] = mine ? w_col[j] : T(0);
  }
  for (int64_t i = 0; i < b; ++i) {
    k[i] = row.arg()[i] >= 0 ? row.arg()[i] : -1;
    w_row[i] = k[i] >= 0 ? row.hard_term(i) : T(0);
    const int64_t pos = offset + i;
    g_diag[i] = -((row.dense_term(i) + w_row[i]) + (col.dense_term(pos) + w_col[pos]));
  }
  const Lists by_row(q, b), by_col(k, n);
  at::parallel_for(0, b, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* g = grad_rows + i * dim;
      if (k[i] >= 0) add_scaled(g, w_row[i], cols + k[i] * dim, dim);
      for (int64_t s = by_row.start[i]; s < by_row.start[i + 1]; ++s) {
        const int64_t j = by_row.items[s];
        add_scaled(g, w_col_mine[j], cols + j * dim, dim);
      }
      add_scaled(g, g_diag[i], cols + (offset + i) * dim, dim);
    }
  });
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      T* g = grad_cols + c * dim;
      for (int64_t s = by_col.start[c]; s < by_col.start[c + 1]; ++s) {
        const int64_t i = by_col.items[s];
        add_scaled(g, w_row[i], rows + i * dim, dim);
      }
      if (q[c] >= 0) add_scaled(g, w_col_mine[c], rows + q[c] * dim, dim);
      if (c >= offset && c < offset + b) {
        add_scaled(g, g_diag[c - offset], rows + (c - offset) * dim, dim);
      }
    }
  });
}

void check_side(const char* name, int64_t len, const at::Tensor& up, const at::Tensor& idx,
                const at::Tensor& dw, const at::Tensor& hw, const at::Tensor& act) {
  for (const at::Tensor* t : {&up, &idx, &dw, &hw, &act}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == len, "selhn: every ", name,
                " weight must have shape (", len, ",), got ", t->sizes());
  }
  TORCH_CHECK(!at::isFloatingType(idx.scalar_type()), "selhn: ", name,
              " hardest indices must be integers");
}

void sparse_and_diagonal_backward_cpu(
    const at::Tensor& rows, const at::Tensor& cols, int64_t row_offset, at::Tensor& grad_rows,
    at::Tensor& grad_cols, const at::Tensor& row_upstream, const at::Tensor& row_hardest,
    const at::Tensor& row_dense_weight, const at::Tensor& row_hard_weight,
    const at::Tensor& row_active, const at::Tensor& col_upstream, const at::Tensor& col_hardest,
    const at::Tensor& col_dense_weight, const at::Tensor& col_hard_weight,
    const at::Tensor& col_active) {
  TORCH_CHECK(rows.dim() == 2 && cols.dim() == 2 && rows.size(1) == cols.size(1),
              "selhn: rows and cols must be (b, D) and (N, D), got ", rows.sizes(), " and ",
              cols.sizes());
  const int64_t b = rows.size(0), n = cols.size(0), dim = rows.size(1);
  TORCH_CHECK(row_offset >= 0 && row_offset + b <= n, "selhn: rows [", row_offset, ", ",
              row_offset + b, ") must lie within the N = ", n, " columns");
  const auto cdt = rows.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad_rows.sizes() == rows.sizes() && grad_cols.sizes() == cols.sizes(),
              "selhn: the gradients must have the shapes of rows and cols");
  TORCH_CHECK(grad_rows.scalar_type() == cdt && grad_cols.scalar_type() == cdt &&
                  grad_rows.is_contiguous() && grad_cols.is_contiguous(),
              "selhn: the gradients must be contiguous in the compute dtype ", cdt);
  check_side("row", b, row_upstream, row_hardest, row_dense_weight, row_hard_weight,
             row_active);
  check_side("column", n, col_upstream, col_hardest, col_dense_weight, col_hard_weight,
             col_active);
  const at::Tensor rows_c = rows.to(cdt).contiguous(), cols_c = cols.to(cdt).contiguous();
  AT_DISPATCH_FLOATING_TYPES(cdt, "selhn_sparse_and_diagonal_backward_cpu", [&] {
    const Weights<scalar_t> row(row_upstream, row_hardest, row_dense_weight, row_hard_weight,
                                row_active, cdt);
    const Weights<scalar_t> col(col_upstream, col_hardest, col_dense_weight, col_hard_weight,
                                col_active, cdt);
    run<scalar_t>(rows_c.data_ptr<scalar_t>(), cols_c.data_ptr<scalar_t>(), b, n, dim,
                  row_offset, row, col, grad_rows.data_ptr<scalar_t>(),
                  grad_cols.data_ptr<scalar_t>());
  });
}

}  // namespace
}  // namespace selhn::cpu

TORCH_LIBRARY_IMPL(selhn, CPU, m) {
  m.impl("sparse_and_diagonal_backward", &selhn::cpu::sparse_and_diagonal_backward_cpu);
}
