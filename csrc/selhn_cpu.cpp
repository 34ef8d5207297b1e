// The C++ CPU backend of the kernel interface (selhn_ext/kernel_interface.py).
//
// S = rows @ cols.T is computed in tiles of kBlockRows x kBlockCols by a dot-product
// kernel whose result for element (i, j) depends only on row i, column j and D: every
// element runs the same sequence of vector FMAs over k and the same fixed-order lane
// reduction, whatever its position in a tile or which rows share its tile. So the backward
// can recompute tiles made of compacted gated rows (or columns) and still reproduce the
// forward's S bit for bit, which keeps the forward's active counts (used for the diagonal)
// equal to the recomputed active set.
//
// Order of floating-point reductions:
// * Max/argmax (packed key for fp32, ``beats`` for fp64) and active counts are exact, so
//   their merge order never matters.
// * Default mode: hinge sums are accumulated in the order tiles are visited: a row's sum
//   over its column tiles in visit order, a column's partial sum per thread in that
//   thread's visit order, and the per-thread column partials merged in thread-id order.
//   The gradient side that two threads share is accumulated in per-thread buffers merged
//   in thread-id order. So results are reproducible run to run for a fixed thread count,
//   but change with the thread count or the visit order.
// * deterministic=True: every floating-point sum runs in ascending tile order with one
//   owner per output, whatever the thread count and schedule. The forward makes a row pass
//   and a column pass (S computed twice); the backward recomputes each gated tile once per
//   output side (twice the tiles). Results are identical bit for bit across thread counts
//   and visit orders.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SELHN_X86 1
#endif

#include "selhn_tile_math.h"

namespace selhn {
namespace {

constexpr int64_t kBlockRows = 64;   // BM
constexpr int64_t kBlockCols = 128;  // BN

// Test-only switches: visit tiles in reverse order; count the tiles the backward computes.
std::atomic<bool> g_reverse_tile_order{false};
std::atomic<int64_t> g_backward_tiles{0};

// ---------------------------------------------------------------- S tile kernels

// Fixed-order reduction of the per-lane partial dot products (pairwise tree).
template <typename T, int L>
inline T reduce_lanes(T* lanes) {
  for (int width = L / 2; width >= 1; width /= 2) {
    for (int t = 0; t < width; ++t) lanes[t] = lanes[2 * t] + lanes[2 * t + 1];
  }
  return lanes[0];
}

// Portable kernel: L lanes of partial sums over k (lane = k mod L), then the tail.
template <typename T>
void s_tile_generic(const T* a, int64_t na, const T* b, int64_t nb, int64_t dim, T* s,
                    int64_t lds) {
  constexpr int L = 8;
  const int64_t full = dim / L * L;
  for (int64_t i = 0; i < na; ++i) {
    const T* x = a + i * dim;
    for (int64_t j = 0; j < nb; ++j) {
      const T* y = b + j * dim;
      T lanes[L] = {};
      for (int64_t k = 0; k < full; k += L) {
        for (int t = 0; t < L; ++t) lanes[t] += x[k + t] * y[k + t];
      }
      T sum = reduce_lanes<T, L>(lanes);
      for (int64_t k = full; k < dim; ++k) sum += x[k] * y[k];
      s[i * lds + j] = sum;
    }
  }
}

#if defined(SELHN_X86)
#define SELHN_AVX2 __attribute__((target("avx2,fma"), always_inline)) inline

struct Avx2Float {
  using T = float;
  using V = __m256;
  static constexpr int L = 8;
  SELHN_AVX2 static V zero() { return _mm256_setzero_ps(); }
  SELHN_AVX2 static V load(const T* p) { return _mm256_loadu_ps(p); }
  SELHN_AVX2 static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  SELHN_AVX2 static void store(T* p, V v) { _mm256_storeu_ps(p, v); }
};

struct Avx2Double {
  using T = double;
  using V = __m256d;
  static constexpr int L = 4;
  SELHN_AVX2 static V zero() { return _mm256_setzero_pd(); }
  SELHN_AVX2 static V load(const T* p) { return _mm256_loadu_pd(p); }
  SELHN_AVX2 static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  SELHN_AVX2 static void store(T* p, V v) { _mm256_storeu_pd(p, v); }
};

// The end of one element: the lanes, reduced in fixed order, plus the tail k >= full.
template <class Ops>
SELHN_AVX2 typename Ops::T finish_dot(typename Ops::V acc, const typename Ops::T* x,
                                      const typename Ops::T* y, int64_t full, int64_t dim) {
  using T = typename Ops::T;
  alignas(32) T lanes[Ops::L];
  Ops::store(lanes, acc);
  T sum = reduce_lanes<T, Ops::L>(lanes);
  for (int64_t k = full; k < dim; ++k) sum += x[k] * y[k];  // -ffp-contract=off: no FMA
  return sum;
}

// 2 x 4 register blocks where they fit, single elements elsewhere; both run the same
// per-element instruction sequence, so the blocking never changes a bit of S.
template <class Ops>
__attribute__((target("avx2,fma"))) void s_tile_avx2(const typename Ops::T* a, int64_t na,
                                                     const typename Ops::T* b, int64_t nb,
                                                     int64_t dim, typename Ops::T* s,
                                                     int64_t lds) {
  using V = typename Ops::V;
  constexpr int L = Ops::L;
  const int64_t full = dim / L * L;
  int64_t i = 0;
  for (; i + 2 <= na; i += 2) {
    const auto* x0 = a + i * dim;
    const auto* x1 = x0 + dim;
    int64_t j = 0;
    for (; j + 4 <= nb; j += 4) {
      const auto* y0 = b + j * dim;
      const auto* y1 = y0 + dim;
      const auto* y2 = y1 + dim;
      const auto* y3 = y2 + dim;
      V c00 = Ops::zero(), c01 = Ops::zero(), c02 = Ops::zero(), c03 = Ops::zero();
      V c10 = Ops::zero(), c11 = Ops::zero(), c12 = Ops::zero(), c13 = Ops::zero();
      for (int64_t k = 0; k < full; k += L) {
        const V a0 = Ops::load(x0 + k), a1 = Ops::load(x1 + k);
        V bk = Ops::load(y0 + k);
        c00 = Ops::fma(a0, bk, c00);
        c10 = Ops::fma(a1, bk, c10);
        bk = Ops::load(y1 + k);
        c01 = Ops::fma(a0, bk, c01);
        c11 = Ops::fma(a1, bk, c11);
        bk = Ops::load(y2 + k);
        c02 = Ops::fma(a0, bk, c02);
        c12 = Ops::fma(a1, bk, c12);
        bk = Ops::load(y3 + k);
        c03 = Ops::fma(a0, bk, c03);
        c13 = Ops::fma(a1, bk, c13);
      }
      auto* out0 = s + i * lds + j;
      auto* out1 = out0 + lds;
      out0[0] = finish_dot<Ops>(c00, x0, y0, full, dim);
      out0[1] = finish_dot<Ops>(c01, x0, y1, full, dim);
      out0[2] = finish_dot<Ops>(c02, x0, y2, full, dim);
      out0[3] = finish_dot<Ops>(c03, x0, y3, full, dim);
      out1[0] = finish_dot<Ops>(c10, x1, y0, full, dim);
      out1[1] = finish_dot<Ops>(c11, x1, y1, full, dim);
      out1[2] = finish_dot<Ops>(c12, x1, y2, full, dim);
      out1[3] = finish_dot<Ops>(c13, x1, y3, full, dim);
    }
    for (; j < nb; ++j) {
      const auto* y = b + j * dim;
      V c0 = Ops::zero(), c1 = Ops::zero();
      for (int64_t k = 0; k < full; k += L) {
        const V bk = Ops::load(y + k);
        c0 = Ops::fma(Ops::load(x0 + k), bk, c0);
        c1 = Ops::fma(Ops::load(x1 + k), bk, c1);
      }
      s[i * lds + j] = finish_dot<Ops>(c0, x0, y, full, dim);
      s[(i + 1) * lds + j] = finish_dot<Ops>(c1, x1, y, full, dim);
    }
  }
  for (; i < na; ++i) {
    const auto* x = a + i * dim;
    for (int64_t j = 0; j < nb; ++j) {
      const auto* y = b + j * dim;
      V c = Ops::zero();
      for (int64_t k = 0; k < full; k += L) c = Ops::fma(Ops::load(x + k), Ops::load(y + k), c);
      s[i * lds + j] = finish_dot<Ops>(c, x, y, full, dim);
    }
  }
}

bool cpu_has_avx2_fma() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}
#endif  // SELHN_X86

// s[i * lds + j] = <a_i, b_j> for the na x nb tile; a and b are row-major with D columns.
template <typename T>
void s_tile(const T* a, int64_t na, const T* b, int64_t nb, int64_t dim, T* s, int64_t lds) {
#if defined(SELHN_X86)
  if (cpu_has_avx2_fma()) {
    if constexpr (std::is_same_v<T, float>) {
      s_tile_avx2<Avx2Float>(a, na, b, nb, dim, s, lds);
    } else {
      s_tile_avx2<Avx2Double>(a, na, b, nb, dim, s, lds);
    }
    return;
  }
#endif
  s_tile_generic<T>(a, na, b, nb, dim, s, lds);
}

// ---------------------------------------------------------------- forward statistics

template <typename T>
struct MaxTracker;

// fp32: the packed 64-bit key of selhn_tile_math.h, the same one the CUDA kernel uses.
template <>
struct MaxTracker<float> {
  uint64_t key = kEmptyMaxKey;
  void add(float v, int64_t index) { key = max_key_merge(key, pack_max_key(v, index)); }
  void merge(const MaxTracker& other) { key = max_key_merge(key, other.key); }
  float value() const { return max_key_value(key); }
  int64_t index() const { return max_key_index(key); }
};

// fp64 does not fit a 64-bit key with its index: the same rule through ``beats``.
template <>
struct MaxTracker<double> {
  double best = -std::numeric_limits<double>::infinity();
  int64_t best_index = -1;
  void add(double v, int64_t index) {
    if (beats(v, index, best, best_index)) {
      best = v;
      best_index = index;
    }
  }
  void merge(const MaxTracker& other) {
    if (other.best_index >= 0) add(other.best, other.best_index);
  }
  double value() const { return best; }
  int64_t index() const { return best_index; }
};

// One anchor's partial statistics. Hinge sums accumulate in double for both dtypes.
template <typename T>
struct AnchorPartial {
  MaxTracker<T> max;
  double hinge_sum = 0.0;
  int32_t active = 0;
  void merge(const AnchorPartial& other) {
    max.merge(other.max);
    hinge_sum += other.hinge_sum;
    active += other.active;
  }
};

// The inputs of one call, upcast to the compute dtype and made contiguous.
template <typename T>
struct Problem {
  const T* rows;
  const T* cols;
  const T* col_pos;
  const int64_t* row_ids;  // nullptr without ids
  const int64_t* col_ids;
  int64_t b, n, dim, row_offset;
  T margin;
  int64_t row_tiles() const { return (b + kBlockRows - 1) / kBlockRows; }
  int64_t col_tiles() const { return (n + kBlockCols - 1) / kBlockCols; }
  bool valid(int64_t row, int64_t col) const {
    const bool has_ids = row_ids != nullptr;
    return valid_pair(col, row_offset + row, has_ids, has_ids ? row_ids[row] : 0,
                      has_ids ? col_ids[col] : 0);
  }
};

// Fold one S tile (rows [r0, r0 + nr), columns [c0, c0 + nc)) into the row partials
// (indexed by local row, or nullptr) and the column partials (indexed by local column, or
// nullptr), visiting columns in ascending order within each row.
template <typename T>
void fold_tile(const Problem<T>& p, const T* s, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
               AnchorPartial<T>* row_part, AnchorPartial<T>* col_part) {
  for (int64_t i = 0; i < nr; ++i) {
    const int64_t row = r0 + i;
    const T d_row = p.col_pos[p.row_offset + row];
    AnchorPartial<T> acc = row_part ? row_part[i] : AnchorPartial<T>{};
    for (int64_t j = 0; j < nc; ++j) {
      const int64_t col = c0 + j;
      if (!p.valid(row, col)) continue;
      const T sij = s[i * kBlockCols + j];
      if (row_part) {
        const T arg = hinge_argument(p.margin, sij, d_row);
        acc.max.add(sij, col);
        acc.hinge_sum += static_cast<double>(hinge(arg));
        acc.active += hinge_active(arg);
      }
      if (col_part) {
        const T arg = hinge_argument(p.margin, sij, p.col_pos[col]);
        AnchorPartial<T>& c = col_part[j];
        c.max.add(sij, p.row_offset + row);
        c.hinge_sum += static_cast<double>(hinge(arg));
        c.active += hinge_active(arg);
      }
    }
    if (row_part) row_part[i] = acc;
  }
}

template <typename T>
void compute_tile(const Problem<T>& p, int64_t rt, int64_t ct, T* s, int64_t* nr, int64_t* nc) {
  const int64_t r0 = rt * kBlockRows, c0 = ct * kBlockCols;
  *nr = std::min(kBlockRows, p.b - r0);
  *nc = std::min(kBlockCols, p.n - c0);
  s_tile<T>(p.rows + r0 * p.dim, *nr, p.cols + c0 * p.dim, *nc, p.dim, s, kBlockCols);
}

// Loop position -> tile index, reversed when the test-only switch is on.
inline int64_t visit(int64_t step, int64_t count, bool reverse) {
  return reverse ? count - 1 - step : step;
}

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

template <typename T>
void partials_impl(const Problem<T>& p, bool deterministic, std::vector<AnchorPartial<T>>& rows,
                   std::vector<AnchorPartial<T>>& cols) {
  const int64_t n_rt = p.row_tiles(), n_ct = p.col_tiles();
  const bool reverse = g_reverse_tile_order.load();
  const int threads = at::get_num_threads();
  if (deterministic) {
    // Row pass: one owner per row tile; columns in ascending tile order.
#pragma omp parallel num_threads(threads)
    {
      std::vector<T> s(kBlockRows * kBlockCols);
#pragma omp for schedule(static)
      for (int64_t step = 0; step < n_rt; ++step) {
        const int64_t rt = visit(step, n_rt, reverse);
        for (int64_t ct = 0; ct < n_ct; ++ct) {
          int64_t nr, nc;
          compute_tile(p, rt, ct, s.data(), &nr, &nc);
          fold_tile(p, s.data(), rt * kBlockRows, nr, ct * kBlockCols, nc,
                    rows.data() + rt * kBlockRows, static_cast<AnchorPartial<T>*>(nullptr));
        }
      }
    }
    // Column pass: one owner per column tile; rows in ascending tile order.
#pragma omp parallel num_threads(threads)
    {
      std::vector<T> s(kBlockRows * kBlockCols);
#pragma omp for schedule(static)
      for (int64_t step = 0; step < n_ct; ++step) {
        const int64_t ct = visit(step, n_ct, reverse);
        for (int64_t rt = 0; rt < n_rt; ++rt) {
          int64_t nr, nc;
          compute_tile(p, rt, ct, s.data(), &nr, &nc);
          fold_tile(p, s.data(), rt * kBlockRows, nr, ct * kBlockCols, nc,
                    static_cast<AnchorPartial<T>*>(nullptr), cols.data() + ct * kBlockCols);
        }
      }
    }
    return;
  }
  // One pass: each thread owns whole row tiles and keeps partials of every column, merged
  // below in thread-id order.
  std::vector<std::vector<AnchorPartial<T>>> col_parts;
#pragma omp parallel num_threads(threads)
  {
#pragma omp single
    col_parts.resize(omp_get_num_threads());
    std::vector<AnchorPartial<T>>& mine = col_parts[omp_get_thread_num()];
    mine.assign(p.n, AnchorPartial<T>{});
    std::vector<T> s(kBlockRows * kBlockCols);
#pragma omp for schedule(static)
    for (int64_t step = 0; step < n_rt; ++step) {
      const int64_t rt = visit(step, n_rt, reverse);
      for (int64_t cstep = 0; cstep < n_ct; ++cstep) {
        const int64_t ct = visit(cstep, n_ct, reverse);
        int64_t nr, nc;
        compute_tile(p, rt, ct, s.data(), &nr, &nc);
        fold_tile(p, s.data(), rt * kBlockRows, nr, ct * kBlockCols, nc,
                  rows.data() + rt * kBlockRows, mine.data() + ct * kBlockCols);
      }
    }
  }
  at::parallel_for(0, p.n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      for (const auto& part : col_parts) cols[j].merge(part[j]);
    }
  });
}

// ---------------------------------------------------------------- input handling

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

template <typename T>
Problem<T> make_problem(const Prepared& in, int64_t row_offset, double margin) {
  Problem<T> p;
  p.rows = in.rows.data_ptr<T>();
  p.cols = in.cols.data_ptr<T>();
  p.col_pos = in.col_pos.data_ptr<T>();
  p.row_ids = in.row_ids.defined() ? in.row_ids.data_ptr<int64_t>() : nullptr;
  p.col_ids = in.col_ids.defined() ? in.col_ids.data_ptr<int64_t>() : nullptr;
  p.b = in.rows.size(0);
  p.n = in.cols.size(0);
  p.dim = in.rows.size(1);
  p.row_offset = row_offset;
  p.margin = static_cast<T>(margin);
  return p;
}

using PartialsResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor, at::Tensor>;

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
    return std::make_tuple(at::empty({len}, float_opts), at::empty({len}, float_opts.dtype(at::kLong)),
                           at::empty({len}, float_opts), at::empty({len}, float_opts.dtype(at::kInt)));
  };
  auto [row_max, row_arg, row_sum, row_active] = new_stats(b);
  auto [col_max, col_arg, col_sum, col_active] = new_stats(n);
  AT_DISPATCH_FLOATING_TYPES(in.rows.scalar_type(), "selhn_partials_cpu", [&] {
    const Problem<scalar_t> p = make_problem<scalar_t>(in, row_offset, margin);
    std::vector<AnchorPartial<scalar_t>> row_parts(b), col_parts(n);
    partials_impl(p, deterministic, row_parts, col_parts);
    write_stats(row_parts, row_max, row_arg, row_sum, row_active);
    write_stats(col_parts, col_max, col_arg, col_sum, col_active);
  });
  return {row_max, row_arg, row_sum, row_active, col_max, col_arg, col_sum, col_active};
}

// ---------------------------------------------------------------- dense backward

// The gated term of one side, on tiles of compacted gated anchors x all opposite anchors.
// "Anchor side" = the gated rows (row phase) or the gated columns (column phase).
template <typename T>
struct GatedPhase {
  const Problem<T>* p;
  bool anchors_are_rows;       // row phase: anchors are local rows, partners are columns
  std::vector<int64_t> index;  // compacted gated anchors (local row or column index)
  at::Tensor packed;           // (g, D) their embeddings, contiguous
  const T* coef;               // row_coef (b,) or col_coef (N,)
  int64_t groups() const {
    const int64_t size = anchors_are_rows ? kBlockRows : kBlockCols;
    return (static_cast<int64_t>(index.size()) + size - 1) / size;
  }
  int64_t group_size() const { return anchors_are_rows ? kBlockRows : kBlockCols; }
  int64_t partner_count() const { return anchors_are_rows ? p->n : p->b; }
  int64_t partner_tile() const { return anchors_are_rows ? kBlockCols : kBlockRows; }
  int64_t partner_tiles() const {
    return (partner_count() + partner_tile() - 1) / partner_tile();
  }
  const T* partner_rows() const { return anchors_are_rows ? p->cols : p->rows; }
};

// One recomputed tile: anchors of group g x partners of tile t. Fills w (ng x np, row-major,
// anchors first) with the gated weights and returns the shapes.
template <typename T>
void gated_weights(const GatedPhase<T>& ph, int64_t g, int64_t t, T* s, T* w, int64_t* ng,
                   int64_t* np) {
  const Problem<T>& p = *ph.p;
  const int64_t a0 = g * ph.group_size(), p0 = t * ph.partner_tile();
  *ng = std::min(ph.group_size(), static_cast<int64_t>(ph.index.size()) - a0);
  *np = std::min(ph.partner_tile(), ph.partner_count() - p0);
  const T* anchors = ph.packed.template data_ptr<T>() + a0 * p.dim;
  const T* partners = ph.partner_rows() + p0 * p.dim;
  // S is always (row side) x (column side), as in the forward, so each element is the
  // same dot product <row_i, col_j> with the same operand order.
  if (ph.anchors_are_rows) {
    s_tile<T>(anchors, *ng, partners, *np, p.dim, s, *np);
  } else {
    s_tile<T>(partners, *np, anchors, *ng, p.dim, s, *ng);
  }
  g_backward_tiles.fetch_add(1, std::memory_order_relaxed);
  for (int64_t a = 0; a < *ng; ++a) {
    const int64_t anchor = ph.index[a0 + a];
    const T coef = ph.coef[anchor];
    for (int64_t q = 0; q < *np; ++q) {
      const int64_t partner = p0 + q;
      const int64_t row = ph.anchors_are_rows ? anchor : partner;
      const int64_t col = ph.anchors_are_rows ? partner : anchor;
      const T sij = ph.anchors_are_rows ? s[a * *np + q] : s[q * *ng + a];
      T weight = T(0);
      if (p.valid(row, col)) {
        const T arg = hinge_argument(p.margin, sij, p.col_pos[ph.anchors_are_rows
                                                                  ? p.row_offset + row
                                                                  : col]);
        weight = dense_pair_weight(ph.anchors_are_rows, coef, arg, !ph.anchors_are_rows, coef,
                                   arg);
      }
      w[a * *np + q] = weight;
    }
  }
}

// grad_anchor_side (ng x D) += W @ partners; grad_partner_side (np x D) += W.T @ anchors.
template <typename T>
at::Tensor wrap(const T* data, int64_t rows, int64_t cols) {
  return at::from_blob(const_cast<T*>(data), {rows, cols},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// Runs one gated phase. ``grad_anchor`` (g, D) receives the anchors' side in compacted
// order; ``grad_partner`` (partners, D) the partners' side.
template <typename T>
void run_gated_phase(const GatedPhase<T>& ph, bool deterministic, at::Tensor& grad_anchor,
                     at::Tensor& grad_partner) {
  const int64_t n_groups = ph.groups(), n_tiles = ph.partner_tiles(), dim = ph.p->dim;
  if (n_groups == 0) return;
  const bool reverse = g_reverse_tile_order.load();
  const int threads = at::get_num_threads();
  const int64_t tile_elems = kBlockRows * kBlockCols;
  const T* packed = ph.packed.template data_ptr<T>();
  T* grad_anchor_p = grad_anchor.template data_ptr<T>();
  T* grad_partner_p = grad_partner.template data_ptr<T>();

  // Partner-owner pass: each partner tile is owned by one thread, anchor groups ascending.
  // In default mode it also accumulates the anchors' side into per-thread buffers.
  std::vector<at::Tensor> anchor_buffers;
#pragma omp parallel num_threads(threads)
  {
#pragma omp single
    anchor_buffers.resize(omp_get_num_threads());
    at::Tensor mine;
    if (!deterministic) {
      mine = at::zeros_like(grad_anchor);
      anchor_buffers[omp_get_thread_num()] = mine;
    }
    std::vector<T> s(tile_elems), w(tile_elems);
#pragma omp for schedule(static)
    for (int64_t step = 0; step < n_tiles; ++step) {
      const int64_t t = visit(step, n_tiles, reverse);
      for (int64_t g = 0; g < n_groups; ++g) {
        int64_t ng, np;
        gated_weights(ph, g, t, s.data(), w.data(), &ng, &np);
        const int64_t a0 = g * ph.group_size(), p0 = t * ph.partner_tile();
        const at::Tensor w_t = wrap(w.data(), ng, np);
        const at::Tensor anchors = wrap(packed + a0 * dim, ng, dim);
        const at::Tensor partners = wrap(ph.partner_rows() + p0 * dim, np, dim);
        wrap(grad_partner_p + p0 * dim, np, dim).addmm_(w_t.t(), anchors);
        if (!deterministic) {
          mine.narrow(0, a0, ng).addmm_(w_t, partners);
        }
      }
    }
  }
  if (!deterministic) {
    for (const auto& buffer : anchor_buffers) grad_anchor.add_(buffer);  // thread-id order
    return;
  }
  // Anchor-owner pass (deterministic): each anchor group owned by one thread, partner tiles
  // ascending; recomputes the tiles instead of sharing buffers.
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> s(tile_elems), w(tile_elems);
#pragma omp for schedule(static)
    for (int64_t step = 0; step < n_groups; ++step) {
      const int64_t g = visit(step, n_groups, reverse);
      for (int64_t t = 0; t < n_tiles; ++t) {
        int64_t ng, np;
        gated_weights(ph, g, t, s.data(), w.data(), &ng, &np);
        const int64_t a0 = g * ph.group_size(), p0 = t * ph.partner_tile();
        wrap(grad_anchor_p + a0 * dim, ng, dim)
            .addmm_(wrap(w.data(), ng, np), wrap(ph.partner_rows() + p0 * dim, np, dim));
      }
    }
  }
}

std::vector<int64_t> gated_indices(const at::Tensor& gated) {
  const at::Tensor flags = gated.to(at::kBool).contiguous();
  const bool* f = flags.data_ptr<bool>();
  std::vector<int64_t> out;
  for (int64_t k = 0; k < flags.numel(); ++k) {
    if (f[k]) out.push_back(k);
  }
  return out;
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
  const auto cdt = in.rows.scalar_type();
  const at::Tensor row_coef_c = row_coef.to(cdt).contiguous();
  const at::Tensor col_coef_c = col_coef.to(cdt).contiguous();
  at::Tensor grad_rows = at::zeros_like(in.rows);
  at::Tensor grad_cols = at::zeros_like(in.cols);
  // The CPU may read the gates on the host: compaction here costs O(B), no device sync.
  std::vector<int64_t> gated_rows = gated_indices(row_gated);
  std::vector<int64_t> gated_cols = gated_indices(col_gated);
  AT_DISPATCH_FLOATING_TYPES(cdt, "selhn_dense_backward_cpu", [&] {
    const Problem<scalar_t> p = make_problem<scalar_t>(in, row_offset, margin);
    // Column phase first (it owns grad_rows by row tile), then the row phase; the order of
    // the two phases is fixed, so every output's sum order is too.
    GatedPhase<scalar_t> col_phase{&p, false, gated_cols, at::Tensor(),
                                   col_coef_c.data_ptr<scalar_t>()};
    GatedPhase<scalar_t> row_phase{&p, true, gated_rows, at::Tensor(),
                                   row_coef_c.data_ptr<scalar_t>()};
    for (GatedPhase<scalar_t>* ph : {&col_phase, &row_phase}) {
      const at::Tensor source = ph->anchors_are_rows ? in.rows : in.cols;
      const at::Tensor idx = at::tensor(ph->index, at::kLong);
      ph->packed = source.index_select(0, idx).contiguous();
      at::Tensor grad_anchor = at::zeros_like(ph->packed);
      at::Tensor& grad_partner = ph->anchors_are_rows ? grad_cols : grad_rows;
      run_gated_phase(*ph, deterministic, grad_anchor, grad_partner);
      at::Tensor& grad_anchor_full = ph->anchors_are_rows ? grad_rows : grad_cols;
      grad_anchor_full.index_add_(0, idx, grad_anchor);  // indices are unique: exact order
    }
  });
  return {grad_rows, grad_cols};
}

// ---------------------------------------------------------------- test-only helpers

void set_reverse_tile_order(bool reverse) { g_reverse_tile_order.store(reverse); }

int64_t backward_tile_count(bool reset) {
  return reset ? g_backward_tiles.exchange(0) : g_backward_tiles.load();
}

std::vector<int64_t> cpu_tile_shape() { return {kBlockRows, kBlockCols}; }

}  // namespace
}  // namespace selhn

TORCH_LIBRARY_IMPL(selhn, CPU, m) {
  m.impl("partials_cpu", &selhn::partials_cpu);
  m.impl("dense_backward_cpu", &selhn::dense_backward_cpu);
}

// Test-only: tile visiting order, the backward's recomputed-tile counter, the tile shape.
TORCH_LIBRARY_FRAGMENT(selhn, m) {
  m.def("_cpu_set_reverse_tile_order(bool reverse) -> ()", &selhn::set_reverse_tile_order);
  m.def("_cpu_backward_tile_count(bool reset) -> int", &selhn::backward_tile_count);
  m.def("_cpu_tile_shape() -> int[]", &selhn::cpu_tile_shape);
}
