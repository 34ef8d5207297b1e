// The AVX2+FMA vector operations the kernel templates are written against (8 fp32 or 4 fp64
// lanes, 16 ymm registers). Included by selhn_cpu_kernels.cpp inside an
// ``avx2,fma`` target region. No include guard on purpose.

// GEMM operations (selhn_s_tile_simd.h): 6 rows x 2 vectors of accumulators, two column
// vectors and one broadcast use 15 of the 16 registers.
struct GemmF32 {
  using T = float;
  using V = __m256;
  static constexpr int L = 8, MR = 6;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const T* p) { return _mm256_loadu_ps(p); }
  static V broadcast(const T* p) { return _mm256_broadcast_ss(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(T* p, V v) { _mm256_storeu_ps(p, v); }
};
struct GemmF64 {
  using T = double;
  using V = __m256d;
  static constexpr int L = 4, MR = 6;
  static V zero() { return _mm256_setzero_pd(); }
  static V load(const T* p) { return _mm256_loadu_pd(p); }
  static V broadcast(const T* p) { return _mm256_broadcast_sd(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static void store(T* p, V v) { _mm256_storeu_pd(p, v); }
};

// Fold operations (selhn_fold_simd.h) for fp32: masks are vectors of all-ones lanes.
struct FoldF32 {
  using T = float;
  using V = __m256;
  using M = __m256;
  using VI = __m256i;
  using VD = __m256d;
  static constexpr int L = 8, DL = 4;
  static VI iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static M from_bits(int bits) {
    const VI bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_castsi256_ps(
        _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits), bit), bit));
  }
  static M lanes(int64_t n) {
    if (n >= L) return _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), iota()));
  }
  static M without_lane(M m, int64_t lane) {
    if (lane < 0 || lane >= L) return m;
    const VI hit = _mm256_cmpeq_epi32(iota(), _mm256_set1_epi32(static_cast<int>(lane)));
    return _mm256_andnot_ps(_mm256_castsi256_ps(hit), m);
  }
  // Lanes of m whose id differs from ``id`` (reads the ids of m's lanes only).
  static M ids_differ(M m, int64_t id, const int64_t* ids) {
    const __m256i wide = _mm256_castps_si256(m);
    const __m256i lo_mask = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(wide));
    const __m256i hi_mask = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(wide, 1));
    const __m256i target = _mm256_set1_epi64x(id);
    const __m256i lo = _mm256_cmpeq_epi64(_mm256_maskload_epi64(
        reinterpret_cast<const long long*>(ids), lo_mask), target);
    const __m256i hi = _mm256_cmpeq_epi64(_mm256_maskload_epi64(
        reinterpret_cast<const long long*>(ids + 4), hi_mask), target);
    const int same = _mm256_movemask_pd(_mm256_castsi256_pd(lo)) |
                     (_mm256_movemask_pd(_mm256_castsi256_pd(hi)) << 4);
    return _mm256_andnot_ps(from_bits(same), m);
  }
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(T x) { return _mm256_set1_ps(x); }
  static V load(const T* p) { return _mm256_loadu_ps(p); }
  static V load_masked(M m, const T* p) { return _mm256_maskload_ps(p, _mm256_castps_si256(m)); }
  static void store(T* p, V v) { _mm256_storeu_ps(p, v); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static M gt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static M is_nan(V a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
  static M nonzero(V a) { return _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_NEQ_UQ); }
  static M and_(M a, M b) { return _mm256_and_ps(a, b); }
  static M or_(M a, M b) { return _mm256_or_ps(a, b); }
  static M andnot(M a, M b) { return _mm256_andnot_ps(b, a); }  // a and not b
  static M none() { return _mm256_setzero_ps(); }
  static V select(M m, V a, V b) { return _mm256_blendv_ps(b, a, m); }
  static int count(M m) { return __builtin_popcount(_mm256_movemask_ps(m)); }
  static VI iset1(int32_t x) { return _mm256_set1_epi32(x); }
  static VI iadd(VI a, VI b) { return _mm256_add_epi32(a, b); }
  static VI iselect(M m, VI a, VI b) {
    return _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(b), _mm256_castsi256_ps(a), m));
  }
  static M negative(VI a) {
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_setzero_si256(), a));
  }
  static VI count_lanes(VI c, M m) { return _mm256_sub_epi32(c, _mm256_castps_si256(m)); }
  static VI iload(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const VI*>(p)); }
  static void istore(int32_t* p, VI v) { _mm256_storeu_si256(reinterpret_cast<VI*>(p), v); }
  static VD dzero() { return _mm256_setzero_pd(); }
  static VD dadd(VD a, VD b) { return _mm256_add_pd(a, b); }
  static VD dload(const double* p) { return _mm256_loadu_pd(p); }
  static void dstore(double* p, VD v) { _mm256_storeu_pd(p, v); }
  static void widen(V h, VD* out) {
    out[0] = _mm256_cvtps_pd(_mm256_castps256_ps128(h));
    out[1] = _mm256_cvtps_pd(_mm256_extractf128_ps(h, 1));
  }
};
