// The C++ CPU backend of the kernel interface (selhn_ext/kernel_interface.py).
//
// S = rows @ cols.T is computed in tiles of kBlockRows x kBlockCols by a register-blocked
// kernel (selhn_s_tile_simd.h: AVX-512F or AVX2+FMA chosen at run time, or a portable
// loop) in which element (i, j) is one FMA chain over k = 0 .. D-1 from +0: it depends only
// on row i, column j and D, whatever its position in a tile, which rows share its tile or
// which path ran. So the backward can recompute tiles made of compacted gated rows (or
// columns) and still reproduce the forward's S bit for bit, which keeps the forward's
// active counts (used for the diagonal) equal to the recomputed active set.
//
// The dense backward has two regimes, chosen from the gated counts (read on the host):
// * compacted: tiles of the gated rows x all columns, then of all rows x the gated
//   columns, each with two products (W @ partners, W.T @ anchors);
// * merged, when that recomputes no more tiles (most anchors gated): one pass over every
//   tile with W = row part + column part, so S is recomputed once and two products run.
//
// Order of floating-point reductions:
// * Max/argmax (packed key for fp32, ``beats`` for fp64) and active counts are exact, so
//   their merge order never matters.
// * Within a tile, each anchor's hinge sum is gathered in a fixed order (16 interleaved
//   chains for a row, rows ascending for a column) and then added to its running sum, on
//   every path; the gradient products continue each output's FMA chain tile by tile.
// * Default mode: hinge sums are accumulated in the order tiles are visited: a row's sum
//   over its column tiles in visit order, a column's partial sum per thread in that
//   thread's visit order, and the per-thread column partials merged in thread-id order.
//   The gradient side that two threads share is accumulated in per-thread buffers merged
//   in thread-id order. So results are reproducible run to run for a fixed thread count,
//   but change with the thread count or the visit order.
// * deterministic=True: every floating-point sum runs in ascending tile order with one
//   owner per output, whatever the thread count and schedule. The forward makes a row pass
//   and a column pass (S computed twice); the backward recomputes each tile once per
//   output side (twice the tiles), in either regime. Results are identical bit for bit
//   across thread counts and visit orders.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

// The SIMD paths are compiled per instruction set with ``#pragma GCC target`` regions, a
// GCC feature; other compilers build the portable path only.
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
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
//
// Three paths compute the same bits: the portable std::fma loop, and the register-blocked
// kernel of selhn_s_tile_simd.h compiled for AVX2+FMA and for AVX-512F, chosen at run time.

enum class SimdPath : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// Portable kernel: each element is the FMA chain over k that the SIMD kernels run per lane.
template <typename T>
void s_tile_portable(const T* a, int64_t na, const T* b, int64_t nb, int64_t dim, T* s,
                     int64_t lds) {
  for (int64_t i = 0; i < na; ++i) {
    const T* x = a + i * dim;
    for (int64_t j = 0; j < nb; ++j) {
      const T* y = b + j * dim;
      T acc = T(0);
      for (int64_t k = 0; k < dim; ++k) acc = std::fma(x[k], y[k], acc);
      s[i * lds + j] = acc;
    }
  }
}

#if defined(SELHN_X86)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
// 16 ymm registers: 6 rows x 2 vectors of accumulators, two column vectors, one broadcast.
struct F32 {
  using T = float;
  using V = __m256;
  static constexpr int L = 8, MR = 6;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const T* p) { return _mm256_loadu_ps(p); }
  static V broadcast(const T* p) { return _mm256_broadcast_ss(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(T* p, V v) { _mm256_storeu_ps(p, v); }
};
struct F64 {
  using T = double;
  using V = __m256d;
  static constexpr int L = 4, MR = 6;
  static V zero() { return _mm256_setzero_pd(); }
  static V load(const T* p) { return _mm256_loadu_pd(p); }
  static V broadcast(const T* p) { return _mm256_broadcast_sd(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static void store(T* p, V v) { _mm256_storeu_pd(p, v); }
};
#include "selhn_s_tile_simd.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {
// 32 zmm registers: 12 rows x 2 vectors of accumulators leave room for the operands.
struct F32 {
  using T = float;
  using V = __m512;
  static constexpr int L = 16, MR = 12;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const T* p) { return _mm512_loadu_ps(p); }
  static V broadcast(const T* p) { return _mm512_set1_ps(*p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(T* p, V v) { _mm512_storeu_ps(p, v); }
};
struct F64 {
  using T = double;
  using V = __m512d;
  static constexpr int L = 8, MR = 12;
  static V zero() { return _mm512_setzero_pd(); }
  static V load(const T* p) { return _mm512_loadu_pd(p); }
  static V broadcast(const T* p) { return _mm512_set1_pd(*p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static void store(T* p, V v) { _mm512_storeu_pd(p, v); }
};
#include "selhn_s_tile_simd.h"
}  // namespace avx512
#pragma GCC pop_options
#endif  // SELHN_X86

// The fastest path this CPU runs.
SimdPath best_simd_path() {
#if defined(SELHN_X86)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return SimdPath::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return SimdPath::kAvx2;
#endif
  return SimdPath::kPortable;
}

const SimdPath g_best_simd_path = best_simd_path();
// Test-only: force a slower path (never a faster one than the CPU runs).
std::atomic<int> g_simd_path{static_cast<int>(g_best_simd_path)};

// A block of columns prepared for S tiles: packed into panel slices on the SIMD paths
// (once, then reused by every row block multiplied with it), referenced as is on the
// portable path. Each thread owns its own.
template <typename T>
class ColumnPanel {
 public:
  // Prepares the nb x dim row-major column block b (which must outlive the panel's use).
  void pack(const T* b, int64_t nb, int64_t dim) {
    path_ = static_cast<SimdPath>(g_simd_path.load(std::memory_order_relaxed));
    cols_ = b;
    nb_ = nb;
    dim_ = dim;
#if defined(SELHN_X86)
    if (path_ == SimdPath::kPortable) return;
    constexpr int64_t kWidest = 32;  // the widest panel slice (AVX-512 fp32)
    const int64_t padded = (nb + kWidest - 1) / kWidest * kWidest;
    if (static_cast<int64_t>(buffer_.size()) < padded * dim) buffer_.resize(padded * dim);
    if (path_ == SimdPath::kAvx512) {
      if constexpr (std::is_same_v<T, float>) {
        avx512::pack_panel<avx512::F32>(b, nb, dim, buffer_.data());
      } else {
        avx512::pack_panel<avx512::F64>(b, nb, dim, buffer_.data());
      }
    } else if constexpr (std::is_same_v<T, float>) {
      avx2::pack_panel<avx2::F32>(b, nb, dim, buffer_.data());
    } else {
      avx2::pack_panel<avx2::F64>(b, nb, dim, buffer_.data());
    }
#endif
  }

  int64_t columns() const { return nb_; }

  // s[i * lds + j] = <a_i, b_j> for the na rows a (row-major, dim columns).
  void multiply(const T* a, int64_t na, T* s, int64_t lds) const {
#if defined(SELHN_X86)
    if (path_ == SimdPath::kAvx512) {
      if constexpr (std::is_same_v<T, float>) {
        avx512::multiply_panel<avx512::F32>(a, na, buffer_.data(), nb_, dim_, s, lds);
      } else {
        avx512::multiply_panel<avx512::F64>(a, na, buffer_.data(), nb_, dim_, s, lds);
      }
      return;
    }
    if (path_ == SimdPath::kAvx2) {
      if constexpr (std::is_same_v<T, float>) {
        avx2::multiply_panel<avx2::F32>(a, na, buffer_.data(), nb_, dim_, s, lds);
      } else {
        avx2::multiply_panel<avx2::F64>(a, na, buffer_.data(), nb_, dim_, s, lds);
      }
      return;
    }
#endif
    s_tile_portable<T>(a, na, cols_, nb_, dim_, s, lds);
  }

 private:
  SimdPath path_ = SimdPath::kPortable;
  const T* cols_ = nullptr;
  int64_t nb_ = 0, dim_ = 0;
  std::vector<T> buffer_;
};

// c (m x dim) += A @ b for the gradient products: A is m x K with element (i, k) at
// a[i * a_row + k * a_k] (W or W.T read in place), b is K x dim and c is m x dim, both
// row-major. Every c element continues its own FMA chain over k = 0 .. K-1 on every path,
// so the products give the same bits on every path, and their summation order is exactly
// the order in which the caller visits the tiles.
template <typename T>
void add_product(const T* a, int64_t a_row, int64_t a_k, int64_t m, int64_t K, const T* b,
                 int64_t dim, T* c) {
  const auto path = static_cast<SimdPath>(g_simd_path.load(std::memory_order_relaxed));
#if defined(SELHN_X86)
  if (path != SimdPath::kPortable) {
    static thread_local std::vector<T> scratch;  // the zero-padded last column strip
    constexpr int64_t kWidest = 32;
    if (static_cast<int64_t>(scratch.size()) < (K + m) * kWidest) scratch.resize((K + m) * kWidest);
    if (path == SimdPath::kAvx512) {
      if constexpr (std::is_same_v<T, float>) {
        avx512::add_product<avx512::F32>(a, a_row, a_k, m, K, b, dim, dim, c, dim, scratch.data());
      } else {
        avx512::add_product<avx512::F64>(a, a_row, a_k, m, K, b, dim, dim, c, dim, scratch.data());
      }
    } else if constexpr (std::is_same_v<T, float>) {
      avx2::add_product<avx2::F32>(a, a_row, a_k, m, K, b, dim, dim, c, dim, scratch.data());
    } else {
      avx2::add_product<avx2::F64>(a, a_row, a_k, m, K, b, dim, dim, c, dim, scratch.data());
    }
    return;
  }
#endif
  (void)path;
  for (int64_t i = 0; i < m; ++i) {
    T* c_row = c + i * dim;
    for (int64_t k = 0; k < K; ++k) {
      const T x = a[i * a_row + k * a_k];
      const T* b_row = b + k * dim;
      for (int64_t j = 0; j < dim; ++j) c_row[j] = std::fma(x, b_row[j], c_row[j]);
    }
  }
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

// The row hinge sums of one tile run in 16 interleaved chains (column j mod 16, so a
// 16-wide vector adds them at once) combined by this fixed pairwise tree; every path of
// the fold sums in exactly this order.
constexpr int kSumLanes = 16;

inline double sum_lanes(const double* lanes) {
  double level[kSumLanes];
  for (int k = 0; k < kSumLanes; ++k) level[k] = lanes[k];
  for (int width = kSumLanes / 2; width >= 1; width /= 2) {
    for (int k = 0; k < width; ++k) level[k] = level[2 * k] + level[2 * k + 1];
  }
  return level[0];
}

// The best (value, position) among one tile's candidates, offered in ascending position
// order: a later candidate wins only if strictly larger or the first NaN, so ties and
// NaNs keep the smallest position, as ``beats`` and the packed key decide. The tile's
// winner then goes into the running MaxTracker once, with its global index.
template <typename T>
struct TileBest {
  T value = -std::numeric_limits<T>::infinity();
  int32_t pos = -1;
  void offer(T v, int32_t at) {
    if (pos < 0 || v > value || (is_nan(v) && !is_nan(value))) {
      value = v;
      pos = at;
    }
  }
};

// One tile's contributions to its column anchors (local column j), gathered over the rows
// in ascending order before they go into the partials.
template <typename T>
struct ColumnTileStats {
  T best_value[kBlockCols];
  int32_t best_pos[kBlockCols];  // local row, -1 if none
  double sum[kBlockCols];
  int32_t active[kBlockCols];
  void reset(int64_t nc) {
    for (int64_t j = 0; j < nc; ++j) {
      best_value[j] = -std::numeric_limits<T>::infinity();
      best_pos[j] = -1;
      sum[j] = 0.0;
      active[j] = 0;
    }
  }
  void add_to(const Problem<T>& p, int64_t r0, int64_t nc, AnchorPartial<T>* col_part) const {
    for (int64_t j = 0; j < nc; ++j) {
      AnchorPartial<T>& part = col_part[j];
      if (best_pos[j] >= 0) part.max.add(best_value[j], p.row_offset + r0 + best_pos[j]);
      part.hinge_sum += sum[j];
      part.active += active[j];
    }
  }
};

// Adds one row's tile contributions (best, 16 sum chains, active count) to its partial.
template <typename T>
void add_row_tile(AnchorPartial<T>& part, T best_value, int32_t best_pos, int64_t c0,
                  const double* sums, int32_t active) {
  if (best_pos >= 0) part.max.add(best_value, c0 + best_pos);
  part.hinge_sum += sum_lanes(sums);
  part.active += active;
}

// Fold one S tile (rows [r0, r0 + nr), columns [c0, c0 + nc), stride kBlockCols) into the
// row partials (indexed by local row, or nullptr) and the column partials (indexed by
// local column, or nullptr). Each anchor's tile contributions are gathered first and
// added to its partial once, so the result depends on the tile order only.
template <typename T>
void fold_tile_scalar(const Problem<T>& p, const T* s, int64_t r0, int64_t nr, int64_t c0,
                      int64_t nc, AnchorPartial<T>* row_part, AnchorPartial<T>* col_part) {
  const bool has_ids = p.row_ids != nullptr;
  // Local column j is invalid for local row i when it is the row's positive or, with ids,
  // has the row's id.
  auto valid = [&](int64_t i, int64_t j) {
    return c0 + j != p.row_offset + r0 + i &&
           (!has_ids || p.row_ids[r0 + i] != p.col_ids[c0 + j]);
  };
  if (row_part) {
    for (int64_t i = 0; i < nr; ++i) {
      const T* s_row = s + i * kBlockCols;
      const T d_row = p.col_pos[p.row_offset + r0 + i];
      TileBest<T> best;
      double sums[kSumLanes] = {};
      int32_t active = 0;
      for (int64_t j = 0; j < nc; ++j) {
        if (!valid(i, j)) continue;
        const T arg = hinge_argument(p.margin, s_row[j], d_row);
        best.offer(s_row[j], static_cast<int32_t>(j));
        sums[j % kSumLanes] += static_cast<double>(hinge(arg));
        active += hinge_active(arg);
      }
      add_row_tile(row_part[i], best.value, best.pos, c0, sums, active);
    }
  }
  if (col_part) {
    ColumnTileStats<T> cols;
    cols.reset(nc);
    for (int64_t i = 0; i < nr; ++i) {
      const T* s_row = s + i * kBlockCols;
      for (int64_t j = 0; j < nc; ++j) {
        if (!valid(i, j)) continue;
        const T v = s_row[j];
        const T arg = hinge_argument(p.margin, v, p.col_pos[c0 + j]);
        if (cols.best_pos[j] < 0 || v > cols.best_value[j] ||
            (is_nan(v) && !is_nan(cols.best_value[j]))) {
          cols.best_value[j] = v;
          cols.best_pos[j] = static_cast<int32_t>(i);
        }
        cols.sum[j] += static_cast<double>(hinge(arg));
        cols.active[j] += hinge_active(arg);
      }
    }
    cols.add_to(p, r0, nc, col_part);
  }
}

#if defined(SELHN_X86)
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {

// The fp32 fold, 16 columns at a time; the same operations per element and the same
// summation order as fold_tile_scalar, so the same bits.
void fold_tile_f32(const Problem<float>& p, const float* s, int64_t r0, int64_t nr, int64_t c0,
                   int64_t nc, AnchorPartial<float>* row_part, AnchorPartial<float>* col_part) {
  const bool has_ids = p.row_ids != nullptr;
  const __m512 margin = _mm512_set1_ps(p.margin);
  const __m512 zero = _mm512_setzero_ps();
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  // Lanes of local columns [j, j + 16) that exist and are valid negatives of local row i.
  auto valid_mask = [&](int64_t i, int64_t j) -> __mmask16 {
    __mmask16 in = j + 16 <= nc ? __mmask16(0xFFFF) : __mmask16((1u << (nc - j)) - 1);
    const int64_t diag = p.row_offset + r0 + i - c0 - j;  // the positive's lane
    if (diag >= 0 && diag < 16) in &= __mmask16(~(1u << diag));
    if (has_ids) {
      const __m512i row_id = _mm512_set1_epi64(p.row_ids[r0 + i]);
      const int64_t* ids = p.col_ids + c0 + j;
      const __mmask8 lo = _mm512_mask_cmpneq_epi64_mask(
          __mmask8(in), row_id, _mm512_maskz_loadu_epi64(__mmask8(in), ids));
      const __mmask8 hi = _mm512_mask_cmpneq_epi64_mask(
          __mmask8(in >> 8), row_id, _mm512_maskz_loadu_epi64(__mmask8(in >> 8), ids + 8));
      in = __mmask16(lo | (hi << 8));
    }
    return in;
  };
  // hinge(arg) in the lanes where it counts, 0 elsewhere; widened to double in halves.
  auto hinge_halves = [&](__m512 arg, __m512d* lo, __m512d* hi) {
    const __mmask16 keep =
        _mm512_cmp_ps_mask(arg, zero, _CMP_GT_OQ) | _mm512_cmp_ps_mask(arg, arg, _CMP_UNORD_Q);
    const __m512 h = _mm512_maskz_mov_ps(keep, arg);
    *lo = _mm512_cvtps_pd(_mm512_castps512_ps256(h));
    *hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(h), 1)));
  };
  // Lanes where candidate v beats the current best (TileBest::offer, lane by lane).
  auto better = [&](__mmask16 valid, __m512 v, __m512 best, __m512i best_pos) -> __mmask16 {
    const __mmask16 empty = _mm512_cmplt_epi32_mask(best_pos, _mm512_setzero_si512());
    const __mmask16 v_nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __mmask16 best_nan = _mm512_cmp_ps_mask(best, best, _CMP_UNORD_Q);
    return valid & (empty | _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ) | (v_nan & ~best_nan));
  };
  if (row_part) {
    for (int64_t i = 0; i < nr; ++i) {
      const float* s_row = s + i * kBlockCols;
      const __m512 d_row = _mm512_set1_ps(p.col_pos[p.row_offset + r0 + i]);
      __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      __m512i best_pos = _mm512_set1_epi32(-1);
      __m512d sum_lo = _mm512_setzero_pd(), sum_hi = _mm512_setzero_pd();
      int32_t active = 0;
      for (int64_t j = 0; j < nc; j += 16) {
        const __mmask16 valid = valid_mask(i, j);
        const __m512 v = _mm512_maskz_loadu_ps(valid, s_row + j);
        const __m512 arg = _mm512_sub_ps(_mm512_add_ps(margin, v), d_row);
        __m512d h_lo, h_hi;
        hinge_halves(arg, &h_lo, &h_hi);
        sum_lo = _mm512_mask_add_pd(sum_lo, __mmask8(valid), sum_lo, h_lo);
        sum_hi = _mm512_mask_add_pd(sum_hi, __mmask8(valid >> 8), sum_hi, h_hi);
        active += __builtin_popcount(valid & _mm512_cmp_ps_mask(arg, zero, _CMP_GT_OQ));
        const __mmask16 win = better(valid, v, best, best_pos);
        best = _mm512_mask_mov_ps(best, win, v);
        best_pos = _mm512_mask_mov_epi32(
            best_pos, win, _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(j))));
      }
      // Lane winners to the row's winner: ``beats`` picks the same pair in any order.
      alignas(64) float lane_best[16];
      alignas(64) int32_t lane_pos[16];
      alignas(64) double sums[kSumLanes];
      _mm512_store_ps(lane_best, best);
      _mm512_store_si512(lane_pos, best_pos);
      _mm512_store_pd(sums, sum_lo);
      _mm512_store_pd(sums + 8, sum_hi);
      float best_value = -std::numeric_limits<float>::infinity();
      int32_t pos = -1;
      for (int k = 0; k < 16; ++k) {
        if (lane_pos[k] >= 0 && beats(lane_best[k], lane_pos[k], best_value, pos)) {
          best_value = lane_best[k];
          pos = lane_pos[k];
        }
      }
      add_row_tile(row_part[i], best_value, pos, c0, sums, active);
    }
  }
  if (col_part) {
    ColumnTileStats<float> cols;
    cols.reset(nc);
    const __m512i one = _mm512_set1_epi32(1);
    for (int64_t i = 0; i < nr; ++i) {
      const float* s_row = s + i * kBlockCols;
      const __m512i row = _mm512_set1_epi32(static_cast<int32_t>(i));
      for (int64_t j = 0; j < nc; j += 16) {
        const __mmask16 valid = valid_mask(i, j);
        const __m512 v = _mm512_maskz_loadu_ps(valid, s_row + j);
        const __m512 d_col = _mm512_maskz_loadu_ps(valid, p.col_pos + c0 + j);
        const __m512 arg = _mm512_sub_ps(_mm512_add_ps(margin, v), d_col);
        __m512d h_lo, h_hi;
        hinge_halves(arg, &h_lo, &h_hi);
        double* sum = cols.sum + j;
        _mm512_mask_storeu_pd(sum, __mmask8(valid),
                              _mm512_add_pd(_mm512_maskz_loadu_pd(__mmask8(valid), sum), h_lo));
        _mm512_mask_storeu_pd(
            sum + 8, __mmask8(valid >> 8),
            _mm512_add_pd(_mm512_maskz_loadu_pd(__mmask8(valid >> 8), sum + 8), h_hi));
        const __mmask16 active = valid & _mm512_cmp_ps_mask(arg, zero, _CMP_GT_OQ);
        int32_t* count = cols.active + j;
        _mm512_mask_storeu_epi32(
            count, active, _mm512_add_epi32(_mm512_maskz_loadu_epi32(active, count), one));
        const __m512 best = _mm512_maskz_loadu_ps(valid, cols.best_value + j);
        const __m512i best_pos = _mm512_maskz_loadu_epi32(valid, cols.best_pos + j);
        const __mmask16 win = better(valid, v, best, best_pos);
        _mm512_mask_storeu_ps(cols.best_value + j, win, v);
        _mm512_mask_storeu_epi32(cols.best_pos + j, win, row);
      }
    }
    cols.add_to(p, r0, nc, col_part);
  }
}

}  // namespace avx512
#pragma GCC pop_options
#endif  // SELHN_X86

template <typename T>
void fold_tile(const Problem<T>& p, const T* s, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
               AnchorPartial<T>* row_part, AnchorPartial<T>* col_part) {
#if defined(SELHN_X86)
  if constexpr (std::is_same_v<T, float>) {
    if (static_cast<SimdPath>(g_simd_path.load(std::memory_order_relaxed)) ==
        SimdPath::kAvx512) {
      avx512::fold_tile_f32(p, s, r0, nr, c0, nc, row_part, col_part);
      return;
    }
  }
#endif
  fold_tile_scalar(p, s, r0, nr, c0, nc, row_part, col_part);
}

// Packs column tile ct into the panel.
template <typename T>
void pack_col_tile(const Problem<T>& p, int64_t ct, ColumnPanel<T>& panel) {
  const int64_t c0 = ct * kBlockCols;
  panel.pack(p.cols + c0 * p.dim, std::min(kBlockCols, p.n - c0), p.dim);
}

// S of row tile rt against the column tile in the panel, into s (stride kBlockCols).
template <typename T>
void compute_tile(const Problem<T>& p, int64_t rt, const ColumnPanel<T>& panel, T* s,
                  int64_t* nr, int64_t* nc) {
  const int64_t r0 = rt * kBlockRows;
  *nr = std::min(kBlockRows, p.b - r0);
  *nc = panel.columns();
  panel.multiply(p.rows + r0 * p.dim, *nr, s, kBlockCols);
}

// Row tiles are handed to threads in groups of consecutive tiles that share each packed
// column panel (up to 4, 256 rows: with the panel they stay in a core's L2 cache), as long
// as every thread still gets a group.
struct RowGroups {
  int64_t size, count, row_tiles;
  RowGroups(int64_t n_rt, int threads) : row_tiles(n_rt) {
    size = std::clamp<int64_t>(n_rt / std::max(threads, 1), 1, 4);
    count = (n_rt + size - 1) / size;
  }
  int64_t begin(int64_t group) const { return group * size; }
  int64_t end(int64_t group) const { return std::min(row_tiles, (group + 1) * size); }
};

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
  const RowGroups groups(n_rt, threads);
  if (deterministic) {
    // Row pass: one owner per row tile; columns in ascending tile order.
#pragma omp parallel num_threads(threads)
    {
      std::vector<T> s(kBlockRows * kBlockCols);
      ColumnPanel<T> panel;
#pragma omp for schedule(static)
      for (int64_t step = 0; step < groups.count; ++step) {
        const int64_t group = visit(step, groups.count, reverse);
        for (int64_t ct = 0; ct < n_ct; ++ct) {
          pack_col_tile(p, ct, panel);
          for (int64_t rt = groups.begin(group); rt < groups.end(group); ++rt) {
            int64_t nr, nc;
            compute_tile(p, rt, panel, s.data(), &nr, &nc);
            fold_tile(p, s.data(), rt * kBlockRows, nr, ct * kBlockCols, nc,
                      rows.data() + rt * kBlockRows, static_cast<AnchorPartial<T>*>(nullptr));
          }
        }
      }
    }
    // Column pass: one owner per column tile; rows in ascending tile order.
#pragma omp parallel num_threads(threads)
    {
      std::vector<T> s(kBlockRows * kBlockCols);
      ColumnPanel<T> panel;
#pragma omp for schedule(static)
      for (int64_t step = 0; step < n_ct; ++step) {
        const int64_t ct = visit(step, n_ct, reverse);
        pack_col_tile(p, ct, panel);
        for (int64_t rt = 0; rt < n_rt; ++rt) {
          int64_t nr, nc;
          compute_tile(p, rt, panel, s.data(), &nr, &nc);
          fold_tile(p, s.data(), rt * kBlockRows, nr, ct * kBlockCols, nc,
                    static_cast<AnchorPartial<T>*>(nullptr), cols.data() + ct * kBlockCols);
        }
      }
    }
    return;
  }
  // One pass: each thread owns whole row groups and keeps partials of every column, merged
  // below in thread-id order.
  // One slot per possible thread, so no barrier is needed to size it (a team may be
  // smaller than asked; its unused slots stay empty).
  std::vector<std::vector<AnchorPartial<T>>> col_parts(threads);
#pragma omp parallel num_threads(threads)
  {
    std::vector<AnchorPartial<T>>& mine = col_parts[omp_get_thread_num()];
    mine.assign(p.n, AnchorPartial<T>{});
    std::vector<T> s(kBlockRows * kBlockCols);
    ColumnPanel<T> panel;
#pragma omp for schedule(static)
    for (int64_t step = 0; step < groups.count; ++step) {
      const int64_t group = visit(step, groups.count, reverse);
      for (int64_t cstep = 0; cstep < n_ct; ++cstep) {
        const int64_t ct = visit(cstep, n_ct, reverse);
        pack_col_tile(p, ct, panel);
        for (int64_t rt = groups.begin(group); rt < groups.end(group); ++rt) {
          int64_t nr, nc;
          compute_tile(p, rt, panel, s.data(), &nr, &nc);
          fold_tile(p, s.data(), rt * kBlockRows, nr, ct * kBlockCols, nc,
                    rows.data() + rt * kBlockRows, mine.data() + ct * kBlockCols);
        }
      }
    }
  }
  at::parallel_for(0, p.n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      for (const auto& part : col_parts) {
        if (!part.empty()) cols[j].merge(part[j]);
      }
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
  int64_t group_count(int64_t g) const {
    return std::min(group_size(), static_cast<int64_t>(index.size()) - g * group_size());
  }
  int64_t partner_tile_count(int64_t t) const {
    return std::min(partner_tile(), partner_count() - t * partner_tile());
  }
  // The column side of S goes into the panel: partner tile t in the row phase, anchor
  // group g in the column phase. Each call packs only in its own phase.
  void pack_partner_tile(int64_t t, ColumnPanel<T>& panel) const {
    if (anchors_are_rows) {
      panel.pack(partner_rows() + t * partner_tile() * p->dim, partner_tile_count(t), p->dim);
    }
  }
  void pack_anchor_group(int64_t g, ColumnPanel<T>& panel) const {
    if (!anchors_are_rows) {
      panel.pack(packed.template data_ptr<T>() + g * group_size() * p->dim, group_count(g),
                 p->dim);
    }
  }
};

// One recomputed tile: anchors of group g x partners of tile t, with the panel holding the
// tile's column side (see pack_partner_tile / pack_anchor_group). Fills w (ng x np,
// row-major, anchors first) with the gated weights and returns the shapes.
template <typename T>
void gated_weights(const GatedPhase<T>& ph, int64_t g, int64_t t, const ColumnPanel<T>& panel,
                   T* s, T* w, int64_t* ng, int64_t* np) {
  const Problem<T>& p = *ph.p;
  const int64_t a0 = g * ph.group_size(), p0 = t * ph.partner_tile();
  *ng = ph.group_count(g);
  *np = ph.partner_tile_count(t);
  // S is always (row side) x (column side), as in the forward, so each element is the
  // same FMA chain <row_i, col_j>.
  if (ph.anchors_are_rows) {
    panel.multiply(ph.packed.template data_ptr<T>() + a0 * p.dim, *ng, s, *np);
  } else {
    panel.multiply(ph.partner_rows() + p0 * p.dim, *np, s, *ng);
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
  // In default mode it also accumulates the anchors' side: thread 0 straight into
  // grad_anchor (zero on entry), the others into their own buffers, added in thread-id
  // order below.
  std::vector<at::Tensor> anchor_buffers(threads);  // one slot per possible thread
#pragma omp parallel num_threads(threads)
  {
    T* mine_p = nullptr;
    if (!deterministic) {
      const int tid = omp_get_thread_num();
      at::Tensor mine = tid == 0 ? grad_anchor : at::zeros_like(grad_anchor);
      anchor_buffers[tid] = mine;
      mine_p = mine.template data_ptr<T>();
    }
    std::vector<T> s(tile_elems), w(tile_elems);
    ColumnPanel<T> panel;
#pragma omp for schedule(static)
    for (int64_t step = 0; step < n_tiles; ++step) {
      const int64_t t = visit(step, n_tiles, reverse);
      ph.pack_partner_tile(t, panel);
      for (int64_t g = 0; g < n_groups; ++g) {
        ph.pack_anchor_group(g, panel);
        int64_t ng, np;
        gated_weights(ph, g, t, panel, s.data(), w.data(), &ng, &np);
        const int64_t a0 = g * ph.group_size(), p0 = t * ph.partner_tile();
        // Partners' side += W.T @ anchors; anchors' side += W @ partners.
        add_product(w.data(), 1, np, np, ng, packed + a0 * dim, dim, grad_partner_p + p0 * dim);
        if (!deterministic) {
          add_product(w.data(), np, 1, ng, np, ph.partner_rows() + p0 * dim, dim,
                      mine_p + a0 * dim);
        }
      }
    }
  }
  if (!deterministic) {
    for (size_t t = 1; t < anchor_buffers.size(); ++t) {
      if (anchor_buffers[t].defined()) grad_anchor.add_(anchor_buffers[t]);
    }
    return;
  }
  // Anchor-owner pass (deterministic): each anchor group owned by one thread, partner tiles
  // ascending; recomputes the tiles instead of sharing buffers.
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> s(tile_elems), w(tile_elems);
    ColumnPanel<T> panel;
#pragma omp for schedule(static)
    for (int64_t step = 0; step < n_groups; ++step) {
      const int64_t g = visit(step, n_groups, reverse);
      ph.pack_anchor_group(g, panel);
      for (int64_t t = 0; t < n_tiles; ++t) {
        ph.pack_partner_tile(t, panel);
        int64_t ng, np;
        gated_weights(ph, g, t, panel, s.data(), w.data(), &ng, &np);
        const int64_t a0 = g * ph.group_size(), p0 = t * ph.partner_tile();
        add_product(w.data(), np, 1, ng, np, ph.partner_rows() + p0 * dim, dim,
                    grad_anchor_p + a0 * dim);
      }
    }
  }
}

// ---- merged regime: one pass over every tile with W = row part + column part.

// The per-anchor inputs of W for both sides.
template <typename T>
struct DenseWeightInputs {
  const T* row_coef;
  const bool* row_gated;
  const T* col_coef;
  const bool* col_gated;
};

// Recomputes tile (rt, ct) into s (the panel holds column tile ct) and fills w (nr x nc,
// row-major) with the weights of both sides. Returns false when every weight is zero (the
// products can be skipped).
template <typename T>
bool merged_weights(const Problem<T>& p, const DenseWeightInputs<T>& in, int64_t rt, int64_t ct,
                    const ColumnPanel<T>& panel, T* s, T* w, int64_t* nr, int64_t* nc) {
  compute_tile(p, rt, panel, s, nr, nc);
  g_backward_tiles.fetch_add(1, std::memory_order_relaxed);
  const int64_t r0 = rt * kBlockRows, c0 = ct * kBlockCols;
  bool any = false;
  for (int64_t i = 0; i < *nr; ++i) {
    const int64_t row = r0 + i;
    const bool row_gated = in.row_gated[row];
    const T row_coef = in.row_coef[row];
    const T d_row = p.col_pos[p.row_offset + row];
    T* w_row = w + i * *nc;
    for (int64_t j = 0; j < *nc; ++j) {
      const int64_t col = c0 + j;
      T weight = T(0);
      if (p.valid(row, col)) {
        const T sij = s[i * kBlockCols + j];
        weight = dense_pair_weight(row_gated, row_coef, hinge_argument(p.margin, sij, d_row),
                                   static_cast<bool>(in.col_gated[col]), in.col_coef[col],
                                   hinge_argument(p.margin, sij, p.col_pos[col]));
      }
      any |= weight != T(0);
      w_row[j] = weight;
    }
  }
  return any;
}

// grad_rows = W @ cols and grad_cols = W.T @ rows over all tiles, S recomputed once per
// tile (twice in deterministic mode: a row-owner pass and a column-owner pass, each summing
// its outputs in ascending tile order).
template <typename T>
void run_merged(const Problem<T>& p, const DenseWeightInputs<T>& in, bool deterministic,
                at::Tensor& grad_rows, at::Tensor& grad_cols) {
  const int64_t n_rt = p.row_tiles(), n_ct = p.col_tiles(), dim = p.dim;
  const bool reverse = g_reverse_tile_order.load();
  const int threads = at::get_num_threads();
  const RowGroups groups(n_rt, threads);
  const int64_t tile_elems = kBlockRows * kBlockCols;
  T* grad_rows_p = grad_rows.template data_ptr<T>();
  T* grad_cols_p = grad_cols.template data_ptr<T>();
  if (!deterministic) {
    // Threads own row groups. Thread 0 accumulates the column side straight into
    // grad_cols, the others into their own buffers, added in thread-id order below.
    std::vector<at::Tensor> col_buffers(threads);  // one slot per possible thread
#pragma omp parallel num_threads(threads)
    {
      const int tid = omp_get_thread_num();
      at::Tensor mine = tid == 0 ? grad_cols : at::zeros_like(grad_cols);
      col_buffers[tid] = mine;
      T* mine_p = mine.template data_ptr<T>();
      std::vector<T> s(tile_elems), w(tile_elems);
      ColumnPanel<T> panel;
#pragma omp for schedule(static)
      for (int64_t step = 0; step < groups.count; ++step) {
        const int64_t group = visit(step, groups.count, reverse);
        for (int64_t cstep = 0; cstep < n_ct; ++cstep) {
          const int64_t ct = visit(cstep, n_ct, reverse);
          pack_col_tile(p, ct, panel);
          for (int64_t rt = groups.begin(group); rt < groups.end(group); ++rt) {
            int64_t nr, nc;
            if (!merged_weights(p, in, rt, ct, panel, s.data(), w.data(), &nr, &nc)) continue;
            const int64_t r0 = rt * kBlockRows, c0 = ct * kBlockCols;
            // grad_rows tile += W @ cols tile; this thread's grad_cols tile += W.T @ rows tile.
            add_product(w.data(), nc, 1, nr, nc, p.cols + c0 * dim, dim, grad_rows_p + r0 * dim);
            add_product(w.data(), 1, nc, nc, nr, p.rows + r0 * dim, dim, mine_p + c0 * dim);
          }
        }
      }
    }
    for (size_t t = 1; t < col_buffers.size(); ++t) {
      if (col_buffers[t].defined()) grad_cols.add_(col_buffers[t]);
    }
    return;
  }
  // Row-owner pass: each row group owned by one thread, column tiles ascending.
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> s(tile_elems), w(tile_elems);
    ColumnPanel<T> panel;
#pragma omp for schedule(static)
    for (int64_t step = 0; step < groups.count; ++step) {
      const int64_t group = visit(step, groups.count, reverse);
      for (int64_t ct = 0; ct < n_ct; ++ct) {
        pack_col_tile(p, ct, panel);
        for (int64_t rt = groups.begin(group); rt < groups.end(group); ++rt) {
          int64_t nr, nc;
          if (!merged_weights(p, in, rt, ct, panel, s.data(), w.data(), &nr, &nc)) continue;
          add_product(w.data(), nc, 1, nr, nc, p.cols + ct * kBlockCols * dim, dim,
                      grad_rows_p + rt * kBlockRows * dim);
        }
      }
    }
  }
  // Column-owner pass: each column tile owned by one thread, row tiles ascending.
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> s(tile_elems), w(tile_elems);
    ColumnPanel<T> panel;
#pragma omp for schedule(static)
    for (int64_t step = 0; step < n_ct; ++step) {
      const int64_t ct = visit(step, n_ct, reverse);
      pack_col_tile(p, ct, panel);
      for (int64_t rt = 0; rt < n_rt; ++rt) {
        int64_t nr, nc;
        if (!merged_weights(p, in, rt, ct, panel, s.data(), w.data(), &nr, &nc)) continue;
        add_product(w.data(), 1, nc, nc, nr, p.rows + rt * kBlockRows * dim, dim,
                    grad_cols_p + ct * kBlockCols * dim);
      }
    }
  }
}

// The merged pass recomputes every tile once; the compacted passes recompute the tiles of
// gated rows and of gated columns separately. Both run two products per recomputed tile,
// so take the one with fewer tiles (the compacted passes when few anchors are gated).
bool use_merged_pass(int64_t b, int64_t n, int64_t gated_rows, int64_t gated_cols) {
  auto tiles = [](int64_t count, int64_t size) { return (count + size - 1) / size; };
  const int64_t merged = tiles(b, kBlockRows) * tiles(n, kBlockCols);
  const int64_t compacted = tiles(gated_rows, kBlockRows) * tiles(n, kBlockCols) +
                            tiles(gated_cols, kBlockCols) * tiles(b, kBlockRows);
  return merged <= compacted;
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
  const bool merged = use_merged_pass(in.rows.size(0), in.cols.size(0),
                                      static_cast<int64_t>(gated_rows.size()),
                                      static_cast<int64_t>(gated_cols.size()));
  AT_DISPATCH_FLOATING_TYPES(cdt, "selhn_dense_backward_cpu", [&] {
    const Problem<scalar_t> p = make_problem<scalar_t>(in, row_offset, margin);
    if (merged) {
      const at::Tensor row_flags = row_gated.to(at::kBool).contiguous();
      const at::Tensor col_flags = col_gated.to(at::kBool).contiguous();
      const DenseWeightInputs<scalar_t> weights{
          row_coef_c.data_ptr<scalar_t>(), row_flags.data_ptr<bool>(),
          col_coef_c.data_ptr<scalar_t>(), col_flags.data_ptr<bool>()};
      run_merged(p, weights, deterministic, grad_rows, grad_cols);
      return;
    }
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

const char* simd_path_name(SimdPath path) {
  switch (path) {
    case SimdPath::kAvx512:
      return "avx512";
    case SimdPath::kAvx2:
      return "avx2";
    default:
      return "portable";
  }
}

// The S tile paths this CPU can run, fastest first.
std::vector<std::string> cpu_simd_paths() {
  std::vector<std::string> out;
  for (int k = static_cast<int>(g_best_simd_path); k >= 0; --k) {
    out.push_back(simd_path_name(static_cast<SimdPath>(k)));
  }
  return out;
}

// Selects the S tile path by name ("best" restores the default).
void set_simd_path(const std::string& name) {
  if (name == "best") {
    g_simd_path.store(static_cast<int>(g_best_simd_path));
    return;
  }
  for (int k = static_cast<int>(g_best_simd_path); k >= 0; --k) {
    if (name == simd_path_name(static_cast<SimdPath>(k))) {
      g_simd_path.store(k);
      return;
    }
  }
  TORCH_CHECK(false, "selhn: S tile path ", name, " is not available on this CPU");
}

}  // namespace
}  // namespace selhn

TORCH_LIBRARY_IMPL(selhn, CPU, m) {
  m.impl("partials", &selhn::partials_cpu);
  m.impl("dense_backward", &selhn::dense_backward_cpu);
}

// Test-only: tile visiting order, the backward's recomputed-tile counter, the tile shape,
// the S tile paths.
TORCH_LIBRARY_FRAGMENT(selhn, m) {
  m.def("_cpu_set_reverse_tile_order(bool reverse) -> ()", &selhn::set_reverse_tile_order);
  m.def("_cpu_backward_tile_count(bool reset) -> int", &selhn::backward_tile_count);
  m.def("_cpu_tile_shape() -> int[]", &selhn::cpu_tile_shape);
  m.def("_cpu_simd_paths() -> str[]", &selhn::cpu_simd_paths);
  m.def("_cpu_set_simd_path(str name) -> ()", &selhn::set_simd_path);
}
