// One-lane operations for the kernel templates (selhn_s_tile_simd.h, selhn_fold_simd.h):
// the portable path, and the fp64 fold on every path.
#pragma once

#include <cmath>
#include <cstdint>

#include "selhn_tile_math.h"

namespace selhn::cpu {

// One lane: the same templates as the vector paths, with std::fma per element.
template <typename T_>
struct OneLaneGemm {
  using T = T_;
  using V = T;
  static constexpr int L = 1, MR = 4;
  static V zero() { return T(0); }
  static V load(const T* p) { return *p; }
  static V broadcast(const T* p) { return *p; }
  static V fma(V a, V b, V c) { return std::fma(a, b, c); }
  static void store(T* p, V v) { *p = v; }
};

template <typename T_>
struct OneLaneFold {
  using T = T_;
  using V = T;
  using M = bool;
  using VI = int32_t;
  using VD = double;
  static constexpr int L = 1, DL = 1;
  static VI iota() { return 0; }
  static M lanes(int64_t n) { return n > 0; }
  static M without_lane(M m, int64_t lane) { return m && lane != 0; }
  static M ids_differ(M m, int64_t id, const int64_t* ids) { return m && ids[0] != id; }
  static V zero() { return T(0); }
  static V set1(T x) { return x; }
  static V load(const T* p) { return *p; }
  static V load_masked(M m, const T* p) { return m ? *p : T(0); }
  static void store(T* p, V v) { *p = v; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static M gt(V a, V b) { return a > b; }
  static M is_nan(V a) { return selhn::is_nan(a); }
  static M nonzero(V a) { return a != T(0); }
  static M and_(M a, M b) { return a && b; }
  static M or_(M a, M b) { return a || b; }
  static M andnot(M a, M b) { return a && !b; }
  static M none() { return false; }
  static V select(M m, V a, V b) { return m ? a : b; }
  static int count(M m) { return m ? 1 : 0; }
  static VI iset1(int32_t x) { return x; }
  static VI iadd(VI a, VI b) { return a + b; }
  static VI iselect(M m, VI a, VI b) { return m ? a : b; }
  static M negative(VI a) { return a < 0; }
  static VI count_lanes(VI c, M m) { return c + (m ? 1 : 0); }
  static VI iload(const int32_t* p) { return *p; }
  static void istore(int32_t* p, VI v) { *p = v; }
  static VD dzero() { return 0.0; }
  static VD dadd(VD a, VD b) { return a + b; }
  static VD dload(const double* p) { return *p; }
  static void dstore(double* p, VD v) { *p = v; }
  static void widen(V h, VD* out) { out[0] = static_cast<double>(h); }
};

}  // namespace selhn::cpu
