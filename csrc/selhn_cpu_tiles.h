// The one tile visitor of the CPU backend: the OpenMP loop skeleton every pass of the
// forward and the backward runs, templated on the pass.
//
// Ownership decides the order of every floating-point sum:
// * Owner::kRowGroups: each thread owns contiguous groups of row tiles (balanced by the
//   number of tiles it will visit) and runs over the column tiles for each group, so each
//   row's outputs are summed over column tiles by one thread in visit order.
// * Owner::kColumnTiles: each thread owns column tiles and runs over the row tiles.
// The inner loop runs in ascending tile order when ``ascending`` is set (the deterministic
// passes: one owner per output, ascending order, so bits do not depend on the thread count
// or the visit order); otherwise it follows the visit order, which the test-only switch
// reverses. A pass's per-thread partials (the side two threads share) are the pass's own,
// merged by the pass in thread-id order.
#pragma once

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <vector>

#include "selhn_cpu.h"

namespace selhn::cpu {

enum class Owner { kRowGroups, kColumnTiles };

// Loop position -> tile index, reversed when the test-only switch is on.
inline int64_t visit(int64_t step, int64_t count, bool reverse) {
  return reverse ? count - 1 - step : step;
}

// The operands of one visited tile: S, and with ``strips`` the tile's rows and columns
// packed as right-hand sides of the gradient products.
template <typename T>
struct TileOperands {
  Tile<T> tile;
  const T* row_strips;
  const T* col_strips;
};

// Splits [0, count) into ``parts`` contiguous ranges of about equal cost.
inline std::vector<int64_t> balanced_ranges(const std::vector<int64_t>& cost, int parts) {
  int64_t total = 0;
  for (int64_t c : cost) total += c;
  std::vector<int64_t> bounds(parts + 1, static_cast<int64_t>(cost.size()));
  bounds[0] = 0;
  int64_t done = 0, k = 0;
  for (int part = 1; part < parts; ++part) {
    const int64_t target = total * part / parts;
    while (k < static_cast<int64_t>(cost.size()) && done + cost[k] <= target) done += cost[k++];
    bounds[part] = k;
  }
  return bounds;
}

// Runs pass.tile(local, operands) over every tile (rt, ct) with pass.wanted(rt, ct).
// Pass provides: wanted(rt, ct); begin(thread) -> Local; tile(Local&, const TileOperands&).
template <typename T, class Pass>
void visit_tiles(const Problem<T>& p, Owner owner, bool ascending, bool strips, Pass& pass) {
  const int64_t n_rt = p.row_tiles(), n_ct = p.col_tiles(), dim = p.dim;
  if (n_rt == 0 || n_ct == 0) return;
  const bool reverse = g_reverse_tile_order.load();
  const int threads = at::get_num_threads();
  const bool by_rows = owner == Owner::kRowGroups;
  // Row tiles per group share each packed column tile (up to 8, 512 rows, so packing a
  // column tile costs little per tile), as long as every thread still gets a group.
  const int64_t group = by_rows ? std::clamp<int64_t>(n_rt / std::max(threads, 1), 1, 8) : 1;
  const int64_t n_units = by_rows ? (n_rt + group - 1) / group : n_ct;
  auto unit_rows = [&](int64_t u) {
    return by_rows ? std::make_pair(u * group, std::min(n_rt, (u + 1) * group))
                   : std::make_pair(int64_t{0}, n_rt);
  };
  std::vector<int64_t> cost(n_units, 0);  // tiles each visit step will compute
  for (int64_t step = 0; step < n_units; ++step) {
    const int64_t u = visit(step, n_units, reverse);
    const auto [r_begin, r_end] = unit_rows(u);
    for (int64_t rt = r_begin; rt < r_end; ++rt) {
      for (int64_t ct = by_rows ? 0 : u; ct < (by_rows ? n_ct : u + 1); ++ct) {
        cost[step] += pass.wanted(rt, ct) ? 1 : 0;
      }
    }
  }
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num();
    const std::vector<int64_t> bounds = balanced_ranges(cost, omp_get_num_threads());
    auto local = pass.begin(tid);
    const TileKernels<T>& k = tile_kernels<T>();
    const int64_t rows_block = k.packed_size(kBlockRows, dim);
    const int64_t cols_block = k.packed_size(kBlockCols, dim);
    std::vector<T> rows_packed(group * rows_block), cols_packed(cols_block);
    std::vector<T> rows_stripped(strips ? group * rows_block : 0);
    std::vector<T> cols_stripped(strips ? cols_block : 0);
    std::vector<T> s(kBlockRows * kBlockCols);
    auto rows_of = [&](int64_t rt) { return std::min(kBlockRows, p.b - rt * kBlockRows); };
    auto cols_of = [&](int64_t ct) { return std::min(kBlockCols, p.n - ct * kBlockCols); };
    auto pack_row_tile = [&](int64_t rt, int64_t slot) {
      const T* src = p.rows + rt * kBlockRows * dim;
      k.pack_rows(src, rows_of(rt), dim, rows_packed.data() + slot * rows_block);
      if (strips) k.pack_strips(src, rows_of(rt), dim, rows_stripped.data() + slot * rows_block);
    };
    auto pack_col_tile = [&](int64_t ct) {
      const T* src = p.cols + ct * kBlockCols * dim;
      k.pack_columns(src, cols_of(ct), dim, cols_packed.data());
      if (strips) k.pack_strips(src, cols_of(ct), dim, cols_stripped.data());
    };
    auto run_tile = [&](int64_t rt, int64_t slot, int64_t ct) {
      const Tile<T> t{s.data(), rt * kBlockRows, rows_of(rt), ct * kBlockCols, cols_of(ct)};
      k.multiply(rows_packed.data() + slot * rows_block, t.nr, cols_packed.data(), t.nc, dim,
                 s.data(), kBlockCols);
      pass.tile(local, TileOperands<T>{t, rows_stripped.data() + slot * rows_block,
                                       cols_stripped.data()});
    };
    for (int64_t step = bounds[tid]; step < bounds[tid + 1]; ++step) {
      if (cost[step] == 0) continue;
      const int64_t u = visit(step, n_units, reverse);
      const auto [r_begin, r_end] = unit_rows(u);
      if (by_rows) {
        for (int64_t rt = r_begin; rt < r_end; ++rt) pack_row_tile(rt, rt - r_begin);
        for (int64_t c_step = 0; c_step < n_ct; ++c_step) {
          const int64_t ct = ascending ? c_step : visit(c_step, n_ct, reverse);
          bool packed = false;
          for (int64_t rt = r_begin; rt < r_end; ++rt) {
            if (!pass.wanted(rt, ct)) continue;
            if (!packed) pack_col_tile(ct);
            packed = true;
            run_tile(rt, rt - r_begin, ct);
          }
        }
      } else {
        pack_col_tile(u);
        for (int64_t r_step = 0; r_step < n_rt; ++r_step) {
          const int64_t rt = ascending ? r_step : visit(r_step, n_rt, reverse);
          if (!pass.wanted(rt, u)) continue;
          pack_row_tile(rt, 0);
          run_tile(rt, 0, u);
        }
      }
    }
  }
}

}  // namespace selhn::cpu
