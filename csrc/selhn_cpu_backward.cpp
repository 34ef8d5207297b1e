// The dense (gated) backward of the CPU backend (kernel_interface.dense_backward):
// grad_rows = W @ cols and grad_cols = W.T @ rows, W_ij = W_row + W_col of the gated pairs.
//
// One recompute per tile: the caller orders rows and columns with the gated anchors first,
// so the tiles that touch a gated anchor are those of the first ceil(gated rows / BM) row
// tiles and the first ceil(gated columns / BN) column tiles. Each is recomputed once, its
// W holds both sides' weights, and both products run from it; the other tiles are skipped,
// and so are the products of a tile whose W is all zero. That is never more work than
// separate passes over the gated rows and the gated columns (which recompute the tiles
// where both meet twice), nor than one pass over every tile: no choice to make, on any
// vector width.
//
// Order of floating-point sums: every gradient element continues one FMA chain over the
// tiles in visit order. Default mode: threads own row groups; grad_rows rows have one owner,
// the grad_cols side two threads share goes through per-thread buffers added in thread-id
// order (reproducible for a fixed thread count). deterministic=True: a row-owner pass for
// grad_rows and a column-owner pass for grad_cols, each in ascending tile order (S
// recomputed twice): identical bits across thread counts and visit orders.
#include "selhn_cpu.h"
#include "selhn_cpu_tiles.h"

#include <memory>

namespace selhn::cpu {
namespace {

template <typename T>
struct WeightPass {
  const Problem<T>& p;
  const T* row_coef;
  const T* col_coef;
  int64_t gated_row_tiles, gated_col_tiles;
  T* grad_rows;                  // nullptr: this pass leaves grad_rows alone
  T* grad_cols;                  // nullptr: this pass leaves grad_cols alone
  at::Tensor* col_buffers;       // per thread (default mode), or nullptr: grad_cols direct

  struct Local {
    std::vector<T> w;  // the tile's weights, read as W by one product and W.T by the other
    T* grad_cols = nullptr;
  };
  bool wanted(int64_t rt, int64_t ct) const {
    return rt < gated_row_tiles || ct < gated_col_tiles;
  }
  std::unique_ptr<Local> begin(int thread) {
    auto local = std::make_unique<Local>();
    local->w.resize(kBlockRows * weight_stride<T>());
    local->grad_cols = grad_cols;
    if (grad_cols != nullptr && col_buffers != nullptr && thread > 0) {
      col_buffers[thread] = at::zeros({p.n, p.dim}, at::CPU(c10::CppTypeToScalarType<T>::value));
      local->grad_cols = col_buffers[thread].template data_ptr<T>();
    }
    return local;
  }
  void tile(std::unique_ptr<Local>& local, const TileOperands<T>& op) {
    const Tile<T>& t = op.tile;
    const TileKernels<T>& k = tile_kernels<T>();
    g_backward_tiles.fetch_add(1, std::memory_order_relaxed);
    const T* w = local->w.data();
    if (!k.weights(p, t, row_coef, col_coef, local->w.data())) return;
    if (grad_rows != nullptr) {  // grad_rows tile += W @ cols tile
      k.add_product(w, false, t.nr, t.nc, op.col_strips, p.dim, grad_rows + t.r0 * p.dim);
    }
    if (local->grad_cols != nullptr) {  // grad_cols tile += W.T @ rows tile
      k.add_product(w, true, t.nc, t.nr, op.row_strips, p.dim, local->grad_cols + t.c0 * p.dim);
    }
  }
};

}  // namespace

template <typename T>
void dense_backward_pass(const Problem<T>& p, const T* row_coef, const T* col_coef,
                         int64_t gated_rows, int64_t gated_cols, bool deterministic,
                         T* grad_rows, T* grad_cols) {
  const int64_t row_tiles = (gated_rows + kBlockRows - 1) / kBlockRows;
  const int64_t col_tiles = (gated_cols + kBlockCols - 1) / kBlockCols;
  if (row_tiles == 0 && col_tiles == 0) return;
  if (deterministic) {
    WeightPass<T> rows_pass{p, row_coef, col_coef, row_tiles, col_tiles, grad_rows, nullptr,
                            nullptr};
    visit_tiles(p, Owner::kRowGroups, true, true, rows_pass);
    WeightPass<T> cols_pass{p, row_coef, col_coef, row_tiles, col_tiles, nullptr, grad_cols,
                            nullptr};
    visit_tiles(p, Owner::kColumnTiles, true, true, cols_pass);
    return;
  }
  // Thread 0 accumulates the column side straight into grad_cols, the others into their own
  // buffers, added in thread-id order below (one slot per possible thread).
  std::vector<at::Tensor> col_buffers(at::get_num_threads());
  WeightPass<T> pass{p, row_coef, col_coef, row_tiles, col_tiles, grad_rows, grad_cols,
                     col_buffers.data()};
  visit_tiles(p, Owner::kRowGroups, false, true, pass);
  for (size_t t = 1; t < col_buffers.size(); ++t) {
    if (!col_buffers[t].defined()) continue;
    const T* other = col_buffers[t].template data_ptr<T>();
    const int64_t count = p.n * p.dim;
    at::parallel_for(0, count, 1 << 16, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) grad_cols[e] += other[e];
    });
  }
}

template void dense_backward_pass<float>(const Problem<float>&, const float*, const float*,
                                         int64_t, int64_t, bool, float*, float*);
template void dense_backward_pass<double>(const Problem<double>&, const double*, const double*,
                                          int64_t, int64_t, bool, double*, double*);

}  // namespace selhn::cpu
