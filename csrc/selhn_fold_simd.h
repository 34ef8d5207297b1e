// The per-tile fold (forward statistics) and weights (dense backward), written once against
// a fold-ops type (L lanes of T, lane masks M, int32 lanes VI, DL-lane double vectors VD;
// selhn_cpu_avx2_ops.h, selhn_cpu_avx512_ops.h, or one lane in selhn_cpu_kernels.cpp) and
// included once per instruction set, like selhn_s_tile_simd.h. No include guard on purpose.
//
// Every path runs the same operations per element in the same order, so they give the same
// bits: a row's hinge sum gathers its tile's hinges in 16 chains (column j mod 16, in
// ascending j) combined by one fixed pairwise tree; a column's gathers them over the rows
// in ascending order; the max keeps the first of equal candidates and the first NaN.
// Invalid lanes add +0, which changes no sum (sums start at +0 and hinges are >= +0).

// Lanes [j, j + L) of local row i that are existing, valid negative pairs.
template <class F, typename T>
typename F::M valid_lanes(const Problem<T>& p, const Tile<T>& t, int64_t i, int64_t j) {
  typename F::M m = F::lanes(t.nc - j);
  m = F::without_lane(m, p.diag_col[t.r0 + i] - t.c0 - j);
  if (p.row_ids != nullptr) m = F::ids_differ(m, p.row_ids[t.r0 + i], p.col_ids + t.c0 + j);
  return m;
}

// The 16 chains combined by a fixed pairwise tree.
inline double sum_chains(const double* chains) {
  double level[kSumLanes];
  for (int k = 0; k < kSumLanes; ++k) level[k] = chains[k];
  for (int width = kSumLanes / 2; width >= 1; width /= 2) {
    for (int k = 0; k < width; ++k) level[k] = level[2 * k] + level[2 * k + 1];
  }
  return level[0];
}

// Folds the tile's rows into row_part (local row index).
template <class F>
void fold_rows(const Problem<typename F::T>& p, const Tile<typename F::T>& t,
               AnchorPartial<typename F::T>* row_part) {
  using T = typename F::T;
  using V = typename F::V;
  using M = typename F::M;
  using VI = typename F::VI;
  using VD = typename F::VD;
  constexpr int L = F::L, DL = F::DL;
  const V margin = F::set1(p.margin), zero = F::zero();
  for (int64_t i = 0; i < t.nr; ++i) {
    const T* s_row = t.s + i * kBlockCols;
    const V d = F::set1(p.d_row[t.r0 + i]);
    V best = F::set1(-std::numeric_limits<T>::infinity());
    VI best_pos = F::iset1(-1);
    VD chains[kSumLanes / DL];
    for (auto& c : chains) c = F::dzero();
    int32_t active = 0;
    for (int64_t j = 0; j < t.nc; j += L) {
      const M valid = valid_lanes<F>(p, t, i, j);
      const V v = F::select(valid, F::load(s_row + j), zero);
      const V arg = F::sub(F::add(margin, v), d);
      const M positive = F::gt(arg, zero);
      const V h = F::select(F::and_(valid, F::or_(positive, F::is_nan(arg))), arg, zero);
      VD wide[L / DL];
      F::widen(h, wide);
      for (int q = 0; q < L / DL; ++q) {
        VD& chain = chains[(j % kSumLanes) / DL + q];
        chain = F::dadd(chain, wide[q]);
      }
      active += F::count(F::and_(valid, positive));
      const M better = F::and_(valid, F::or_(F::or_(F::negative(best_pos), F::gt(v, best)),
                                             F::andnot(F::is_nan(v), F::is_nan(best))));
      best = F::select(better, v, best);
      best_pos = F::iselect(better, F::iadd(F::iota(), F::iset1(static_cast<int32_t>(j))),
                            best_pos);
    }
    // Lane winners to the row's winner: ``beats`` picks the same pair in any order.
    T lane_best[L];
    int32_t lane_pos[L];
    double sums[kSumLanes];
    F::store(lane_best, best);
    F::istore(lane_pos, best_pos);
    for (int q = 0; q < kSumLanes / DL; ++q) F::dstore(sums + q * DL, chains[q]);
    T best_value = -std::numeric_limits<T>::infinity();
    int32_t pos = -1;
    for (int k = 0; k < L; ++k) {
      if (lane_pos[k] >= 0 && beats(lane_best[k], lane_pos[k], best_value, pos)) {
        best_value = lane_best[k];
        pos = lane_pos[k];
      }
    }
    AnchorPartial<T>& part = row_part[i];
    if (pos >= 0) part.max.add(best_value, t.c0 + pos);
    part.hinge_sum += sum_chains(sums);
    part.active += active;
  }
}

// Gathers the tile's contributions to its columns into col (local column index). Each
// chunk of L columns keeps its statistics in registers while the rows pass in ascending
// order (the order every path sums a column in), and stores them once.
template <class F>
void fold_columns(const Problem<typename F::T>& p, const Tile<typename F::T>& t,
                  ColumnTileStats<typename F::T>* col) {
  using T = typename F::T;
  using V = typename F::V;
  using M = typename F::M;
  using VI = typename F::VI;
  using VD = typename F::VD;
  constexpr int L = F::L, DL = F::DL;
  static_assert(kBlockCols % L == 0, "whole vectors of column statistics are stored");
  for (int64_t j = 0; j < kBlockCols; ++j) {
    col->best_value[j] = -std::numeric_limits<T>::infinity();
    col->best_pos[j] = -1;
    col->sum[j] = 0.0;
    col->active[j] = 0;
  }
  const V margin = F::set1(p.margin), zero = F::zero();
  for (int64_t j = 0; j < t.nc; j += L) {
    const V d = F::load_masked(F::lanes(t.nc - j), p.d_col + t.c0 + j);
    VD sum[L / DL];
    for (auto& s : sum) s = F::dzero();
    VI active = F::iset1(0), best_pos = F::iset1(-1);
    V best = F::set1(-std::numeric_limits<T>::infinity());
    for (int64_t i = 0; i < t.nr; ++i) {
      const M valid = valid_lanes<F>(p, t, i, j);
      const V v = F::select(valid, F::load(t.s + i * kBlockCols + j), zero);
      const V arg = F::sub(F::add(margin, v), d);
      const M positive = F::gt(arg, zero);
      const V h = F::select(F::and_(valid, F::or_(positive, F::is_nan(arg))), arg, zero);
      VD wide[L / DL];
      F::widen(h, wide);
      for (int q = 0; q < L / DL; ++q) sum[q] = F::dadd(sum[q], wide[q]);
      active = F::count_lanes(active, F::and_(valid, positive));
      const M better = F::and_(valid, F::or_(F::or_(F::negative(best_pos), F::gt(v, best)),
                                             F::andnot(F::is_nan(v), F::is_nan(best))));
      best = F::select(better, v, best);
      best_pos = F::iselect(better, F::iset1(static_cast<int32_t>(i)), best_pos);
    }
    for (int q = 0; q < L / DL; ++q) F::dstore(col->sum + j + q * DL, sum[q]);
    F::istore(col->active + j, active);
    F::store(col->best_value + j, best);
    F::istore(col->best_pos + j, best_pos);
  }
}

template <class F>
void fold_tile(const Problem<typename F::T>& p, const Tile<typename F::T>& t,
               AnchorPartial<typename F::T>* row_part, ColumnTileStats<typename F::T>* col) {
  if (row_part != nullptr) fold_rows<F>(p, t, row_part);
  if (col != nullptr) fold_columns<F>(p, t, col);
}

// W_ij = (+0 + row_coef_i [row hinge active]) + col_coef_j [column hinge active] on valid
// pairs, +0 elsewhere: the order in which dense_pair_weight adds them. Written row-major
// with row stride weight_stride<T>() (whole vectors, so lanes past the tile's columns hold
// +0): the
// A operand of add_product, read as W for W @ cols and as W.T for W.T @ rows.
template <class F>
bool tile_weights(const Problem<typename F::T>& p, const Tile<typename F::T>& t,
                  const typename F::T* row_coef, const typename F::T* col_coef,
                  typename F::T* w) {
  using T = typename F::T;
  using V = typename F::V;
  using M = typename F::M;
  constexpr int L = F::L;
  static_assert(kBlockCols % L == 0 && weight_stride<T>() % L == 0, "whole vectors of weights");
  const V margin = F::set1(p.margin), zero = F::zero();
  M any = F::none();
  for (int64_t i = 0; i < t.nr; ++i) {
    const T* s_row = t.s + i * kBlockCols;
    const V d_row = F::set1(p.d_row[t.r0 + i]);
    const V rc = F::set1(row_coef[t.r0 + i]);
    for (int64_t j = 0; j < t.nc; j += L) {
      const M exists = F::lanes(t.nc - j);
      const M valid = valid_lanes<F>(p, t, i, j);
      const V v = F::load(s_row + j);
      const V base = F::add(margin, v);
      const M row_active = F::and_(valid, F::gt(F::sub(base, d_row), zero));
      const V d_col = F::load_masked(exists, p.d_col + t.c0 + j);
      const M col_active = F::and_(valid, F::gt(F::sub(base, d_col), zero));
      const V cc = F::load_masked(exists, col_coef + t.c0 + j);
      const V weight = F::add(F::add(zero, F::select(row_active, rc, zero)),
                              F::select(col_active, cc, zero));
      any = F::or_(any, F::and_(exists, F::nonzero(weight)));
      F::store(w + i * weight_stride<T>() + j, weight);
    }
  }
  return F::count(any) > 0;
}

// The kernel table of one path: GEMM ops G (for T) and fold ops F (for T). constexpr, so
// the tables are built at compile time: no code compiled for an instruction set this CPU
// lacks runs while the library loads.
template <class G, class F>
constexpr TileKernels<typename G::T> make_tile_kernels(SimdPath path) {
  using T = typename G::T;
  TileKernels<T> k{};
  k.path = path;
  k.packed_size = [](int64_t n, int64_t dim) -> int64_t {
    constexpr int64_t MR = G::MR, NR = panel_width<G>();
    const int64_t rows = std::max((n + MR - 1) / MR * MR, (n + NR - 1) / NR * NR);
    return rows * ((dim + NR - 1) / NR * NR);
  };
  k.pack_rows = &pack_rows<G>;
  k.pack_columns = &pack_columns<G>;
  k.multiply = &multiply_packed<G>;
  k.pack_strips = &pack_strips<G>;
  k.add_product = &add_product<G>;
  k.fold = &fold_tile<F>;
  k.weights = &tile_weights<F>;
  return k;
}
