// The forward statistics of the CPU backend: each row's and each column's max, argmax,
// hinge sum and active count over every S tile (kernel_interface.partials).
//
// Order of floating-point reductions:
// * Max/argmax (packed key for fp32, ``beats`` for fp64) and active counts are exact, so
//   their merge order never matters.
// * Within a tile, each anchor's hinge sum is gathered in a fixed order (selhn_fold_simd.h)
//   and then added to its running sum.
// * Default mode: one pass, threads own row groups. A row's sum runs over its column tiles
//   in visit order; a column's partial sum per thread in that thread's visit order, and
//   the per-thread column partials are merged in thread-id order. Reproducible run to run
//   for a fixed thread count; the thread count or the visit order may change the last bits.
// * deterministic=True: a row pass (row owners) and a column pass (column-tile owners),
//   each summing in ascending tile order (S computed twice): identical bits across thread
//   counts and visit orders.
#include "selhn_cpu.h"
#include "selhn_cpu_tiles.h"

#include <memory>

namespace selhn::cpu {
namespace {

// Adds one tile's column contributions to the partials of its columns.
template <typename T>
void add_columns(const ColumnTileStats<T>& stats, const Tile<T>& t, AnchorPartial<T>* col_part) {
  for (int64_t j = 0; j < t.nc; ++j) {
    AnchorPartial<T>& part = col_part[t.c0 + j];
    if (stats.best_pos[j] >= 0) part.max.add(stats.best_value[j], t.r0 + stats.best_pos[j]);
    part.hinge_sum += stats.sum[j];
    part.active += stats.active[j];
  }
}

// Folds every tile into the rows (row_part, or nullptr) and the columns (col_parts[thread],
// or none): the pass behind each of the three loops.
template <typename T>
struct FoldPass {
  const Problem<T>& p;
  AnchorPartial<T>* row_part;                          // by row, or nullptr
  std::vector<std::vector<AnchorPartial<T>>>* col_parts;  // per thread, or nullptr

  struct Local {
    AnchorPartial<T>* cols = nullptr;
    ColumnTileStats<T> stats;
  };
  bool wanted(int64_t, int64_t) const { return true; }
  std::unique_ptr<Local> begin(int thread) {
    auto local = std::make_unique<Local>();
    if (col_parts != nullptr) {
      auto& mine = (*col_parts)[thread];
      mine.assign(p.n, AnchorPartial<T>{});
      local->cols = mine.data();
    }
    return local;
  }
  void tile(std::unique_ptr<Local>& local, const TileOperands<T>& op) {
    const Tile<T>& t = op.tile;
    const TileKernels<T>& k = tile_kernels<T>();
    k.fold(p, t, row_part ? row_part + t.r0 : nullptr, local->cols ? &local->stats : nullptr);
    if (local->cols != nullptr) {
      Tile<T> global = t;
      global.r0 += p.row_offset;  // column argmax indices are global rows
      add_columns(local->stats, global, local->cols);
    }
  }
};

}  // namespace

template <typename T>
void partials_pass(const Problem<T>& p, bool deterministic, std::vector<AnchorPartial<T>>& rows,
                   std::vector<AnchorPartial<T>>& cols) {
  const int threads = at::get_num_threads();
  if (deterministic) {
    FoldPass<T> row_pass{p, rows.data(), nullptr};
    visit_tiles(p, Owner::kRowGroups, true, false, row_pass);
    // Column pass: one owner per column tile, so each thread's "partials" are final for
    // the columns it owns; thread slots are merged below (disjoint columns).
    std::vector<std::vector<AnchorPartial<T>>> col_parts(threads);
    FoldPass<T> col_pass{p, nullptr, &col_parts};
    visit_tiles(p, Owner::kColumnTiles, true, false, col_pass);
    for (int64_t j = 0; j < p.n; ++j) {
      for (const auto& part : col_parts) {
        if (!part.empty()) cols[j].merge(part[j]);
      }
    }
    return;
  }
  // One slot per possible thread (a team may be smaller; its unused slots stay empty).
  std::vector<std::vector<AnchorPartial<T>>> col_parts(threads);
  FoldPass<T> pass{p, rows.data(), &col_parts};
  visit_tiles(p, Owner::kRowGroups, false, false, pass);
  at::parallel_for(0, p.n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      for (const auto& part : col_parts) {
        if (!part.empty()) cols[j].merge(part[j]);
      }
    }
  });
}

template void partials_pass<float>(const Problem<float>&, bool, std::vector<AnchorPartial<float>>&,
                                   std::vector<AnchorPartial<float>>&);
template void partials_pass<double>(const Problem<double>&, bool,
                                    std::vector<AnchorPartial<double>>&,
                                    std::vector<AnchorPartial<double>>&);

}  // namespace selhn::cpu
