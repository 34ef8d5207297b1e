// Declarations shared by the C++ CPU backend's translation units:
//   selhn_cpu_kernels.cpp  tile math: the S tile, the gradient products, the per-tile fold
//                          and weights, per instruction set, and the choice among them;
//   selhn_cpu_forward.cpp  the forward statistics (partials);
//   selhn_cpu_backward.cpp the dense (gated) backward;
//   selhn_cpu.cpp          the op entry points, input checks and test hooks;
//   selhn_cpu_avx512_emulated.cpp  test only: the AVX-512 kernels built over SIMDe.
// selhn_cpu_tiles.h holds the one tile visitor (the OpenMP loop skeleton) both passes use.
//
// How S is computed so every path and every blocking gives the same bits, and in which
// order every sum runs, is described at the top of selhn_cpu_kernels.cpp and
// selhn_cpu_tiles.h.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "selhn_tile_math.h"

namespace selhn::cpu {

// The tile of S that statistics are gathered over (the unit of every summation order): the
// same on every path, so every path sums in the same order. Register and cache blocking
// inside a tile is chosen per instruction set (selhn_s_tile_simd.h).
constexpr int64_t kBlockRows = 64;   // BM
constexpr int64_t kBlockCols = 128;  // BN
// The row stride of a tile's weights (kBlockRows x kBlockCols), one cache line more than
// its columns: W.T @ rows walks W down its columns, and at a power-of-two stride those
// lines would all fall into an eighth of the L1 cache's sets and evict each other.
template <typename T>
constexpr int64_t weight_stride() {
  return kBlockCols + 64 / static_cast<int64_t>(sizeof(T));
}
// Row hinge sums within a tile run in 16 interleaved chains (column j mod 16).
constexpr int kSumLanes = 16;

enum class SimdPath : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Emulated = 3 };

// The path kernels run on (test hooks may force another one this CPU runs).
SimdPath current_simd_path();
// The paths this build and CPU can run, fastest first, then the test-only ones.
std::vector<SimdPath> available_simd_paths();
void set_simd_path(SimdPath path);
const char* simd_path_name(SimdPath path);

// Test-only switches: visit tiles in reverse order; count the tiles the backward computes.
extern std::atomic<bool> g_reverse_tile_order;
extern std::atomic<int64_t> g_backward_tiles;

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

// One call's inputs, upcast to the compute dtype and contiguous, in the order the tiles
// see them (the backward permutes gated anchors to the front). Per row: its positive score
// and the column of its positive; with ids, every row's and column's id.
template <typename T>
struct Problem {
  const T* rows;            // (b, dim)
  const T* cols;            // (n, dim)
  const T* d_row;           // (b,) the row's positive score
  const int64_t* diag_col;  // (b,) the column of the row's positive
  const T* d_col;           // (n,) the column's positive score
  const int64_t* row_ids;   // (b,) or nullptr without ids
  const int64_t* col_ids;   // (n,) or nullptr
  int64_t b, n, dim;
  int64_t row_offset;  // global index of row 0 (reported in column argmaxes)
  T margin;
  int64_t row_tiles() const { return (b + kBlockRows - 1) / kBlockRows; }
  int64_t col_tiles() const { return (n + kBlockCols - 1) / kBlockCols; }
};

// One S tile: rows [r0, r0 + nr) x columns [c0, c0 + nc), stored with stride kBlockCols.
template <typename T>
struct Tile {
  const T* s;
  int64_t r0, nr, c0, nc;
};

// One tile's contributions to its column anchors (local column j), gathered over the rows
// in ascending order before they go into the partials.
template <typename T>
struct ColumnTileStats {
  T best_value[kBlockCols];
  int32_t best_pos[kBlockCols];  // local row, -1 if none
  double sum[kBlockCols];
  int32_t active[kBlockCols];
};

// ---------------------------------------------------------------- tile kernels
//
// Every path packs its operands in its own layout; the sizes below are in elements. The
// kernels are chosen by the path current when the table is fetched.

template <typename T>
struct TileKernels {
  SimdPath path;
  int64_t (*packed_size)(int64_t n, int64_t dim);  // room for any of the three packings
  // S side: the tile's rows and columns, k-major over dim.
  void (*pack_rows)(const T* x, int64_t n, int64_t dim, T* out);
  void (*pack_columns)(const T* x, int64_t n, int64_t dim, T* out);
  // s[i * lds + j] = <row_i, col_j> from the two packings.
  void (*multiply)(const T* rows, int64_t nr, const T* cols, int64_t nc, int64_t dim, T* s,
                   int64_t lds);
  // Gradient side: the n x dim block as the right-hand side of a product.
  void (*pack_strips)(const T* x, int64_t n, int64_t dim, T* out);
  // c (m x dim, row-major) += A @ b: A (m x K) = W, or W.T when ``transposed``, W as
  // written by ``weights``; b packed by pack_strips. Each c element continues its FMA chain
  // over k = 0 .. K-1.
  void (*add_product)(const T* w, bool transposed, int64_t m, int64_t K, const T* b,
                      int64_t dim, T* c);
  // Folds a tile into the row partials (by local row, or nullptr) and the column stats
  // (by local column, or nullptr; reset and filled here).
  void (*fold)(const Problem<T>& p, const Tile<T>& t, AnchorPartial<T>* row_part,
               ColumnTileStats<T>* col_stats);
  // The dense backward weights of a tile: W_ij = row_coef_i * [row hinge active] +
  // col_coef_j * [column hinge active] on valid pairs (coefficients 0 for anchors that are
  // not gated), written row-major into w (kBlockRows x kBlockCols, row stride
  // weight_stride<T>()), the A operand of both
  // gradient products. Returns false when every weight is zero.
  bool (*weights)(const Problem<T>& p, const Tile<T>& t, const T* row_coef, const T* col_coef,
                  T* w);
};

template <typename T>
const TileKernels<T>& tile_kernels();

// The AVX-512 kernels compiled through SIMDe's portable AVX-512 intrinsics (test only);
// nullptr when this build has no such path.
const TileKernels<float>* emulated_avx512_kernels_f32();
const TileKernels<double>* emulated_avx512_kernels_f64();

// ---------------------------------------------------------------- the two passes

template <typename T>
void partials_pass(const Problem<T>& p, bool deterministic, std::vector<AnchorPartial<T>>& rows,
                   std::vector<AnchorPartial<T>>& cols);

// grad_rows (b, dim) and grad_cols (n, dim), zero on entry, receive W @ cols and W.T @ rows
// over the tiles that hold a gated row (the first gated_rows rows) or a gated column (the
// first gated_cols columns).
template <typename T>
void dense_backward_pass(const Problem<T>& p, const T* row_coef, const T* col_coef,
                         int64_t gated_rows, int64_t gated_cols, bool deterministic,
                         T* grad_rows, T* grad_cols);

}  // namespace selhn::cpu
