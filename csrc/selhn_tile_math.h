// Tile math shared by the C++ CPU kernel and the CUDA kernel: hinge, pair validity,
// the dense backward weight, the NaN-propagating max and the packed (max, index) key.
// Compiled by g++ (host only) and by nvcc (host and device).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__)
#define SELHN_HD __host__ __device__ __forceinline__
#else
#define SELHN_HD inline
#endif

namespace selhn {

// x != x is the NaN test that survives every compiler flag used here (no -ffast-math).
template <typename T>
SELHN_HD bool is_nan(T x) {
  return x != x;
}

// relu(x) that propagates NaN, like torch.relu: a NaN hinge argument poisons the sum.
template <typename T>
SELHN_HD T hinge(T x) {
  return (x > T(0) || is_nan(x)) ? x : T(0);
}

// A hinge is active iff its argument is strictly positive (NaN is not active).
template <typename T>
SELHN_HD bool hinge_active(T x) {
  return x > T(0);
}

// The hinge argument margin + S - d, evaluated in this order in the compute dtype
// (the order the reference uses: (margin + S) - d).
template <typename T>
SELHN_HD T hinge_argument(T margin, T s, T d) {
  return (margin + s) - d;
}

// (i, j) is a valid negative pair when j is not i's positive column and, with ids,
// the ids differ. ``has_ids`` false means every non-positive pair is valid.
SELHN_HD bool valid_pair(int64_t col, int64_t positive_col, bool has_ids, int64_t row_id,
                         int64_t col_id) {
  return col != positive_col && (!has_ids || row_id != col_id);
}

// The off-diagonal weight of one valid pair in the dense (gated) backward:
// row_gated * row_coef * 1[row hinge active] + col_gated * col_coef * 1[col hinge active].
template <typename T>
SELHN_HD T dense_pair_weight(bool row_gated, T row_coef, T row_arg, bool col_gated, T col_coef,
                             T col_arg) {
  T w = T(0);
  if (row_gated && hinge_active(row_arg)) w += row_coef;
  if (col_gated && hinge_active(col_arg)) w += col_coef;
  return w;
}

// NaN-propagating max (IEEE maxNum would drop the NaN).
template <typename T>
SELHN_HD T nan_max(T a, T b) {
  if (is_nan(a)) return a;
  if (is_nan(b)) return b;
  return a > b ? a : b;
}

// Does candidate (v, i) beat the current best (best_v, best_i)? NaN is larger than
// everything, -0.0 equals +0.0 (IEEE ==), ties go to the smaller index, and an empty best
// (best_i < 0) loses to anything. The generic rule, used for fp64 on the CPU; the packed
// key below implements the same rule for fp32 in one 64-bit integer.
template <typename T>
SELHN_HD bool beats(T v, int64_t i, T best_v, int64_t best_i) {
  if (best_i < 0) return true;
  const bool v_nan = is_nan(v), best_nan = is_nan(best_v);
  if (v_nan != best_nan) return v_nan;
  if (!v_nan && v != best_v) return v > best_v;
  return i < best_i;
}

SELHN_HD uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
#endif
}

SELHN_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
#endif
}

// Monotone map float -> uint32: a < b implies key(a) < key(b); -0.0 and +0.0 share a key;
// every NaN maps to the largest key 0xFFFFFFFF. No finite or infinite value maps to 0.
SELHN_HD uint32_t float_order_key(float v) {
  if (is_nan(v)) return 0xFFFFFFFFu;
  if (v == 0.0f) v = 0.0f;  // -0.0 -> +0.0
  const uint32_t u = float_bits(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

SELHN_HD float float_from_order_key(uint32_t key) {
  if (key == 0xFFFFFFFFu) return std::numeric_limits<float>::quiet_NaN();
  const uint32_t u = (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;
  return bits_float(u);
}

// The empty key: no valid pair seen yet; every real key is larger.
constexpr uint64_t kEmptyMaxKey = 0;

// Pack (value, index) so that the unsigned max of two keys is the pair ``beats`` prefers:
// value order in the high word, the complemented index in the low word (smaller index,
// larger key). Index must be in [0, 2^32 - 2].
SELHN_HD uint64_t pack_max_key(float v, int64_t index) {
  return (static_cast<uint64_t>(float_order_key(v)) << 32) |
         static_cast<uint64_t>(0xFFFFFFFFu - static_cast<uint32_t>(index));
}

SELHN_HD float max_key_value(uint64_t key) {
  if (key == kEmptyMaxKey) return -std::numeric_limits<float>::infinity();
  return float_from_order_key(static_cast<uint32_t>(key >> 32));
}

SELHN_HD int64_t max_key_index(uint64_t key) {
  if (key == kEmptyMaxKey) return -1;
  return static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFu));
}

SELHN_HD uint64_t max_key_merge(uint64_t a, uint64_t b) {
  return a > b ? a : b;
}

}  // namespace selhn
