// The AVX-512F vector operations the kernel templates are written against (16 fp32 or 8
// fp64 lanes, 32 zmm registers). Included by selhn_cpu_kernels.cpp inside an ``avx512f``
// target region, and by selhn_cpu_avx512_emulated.cpp over SIMDe's portable AVX-512
// intrinsics, so the same source runs on CPUs without AVX-512 in the tests. Use only
// AVX-512F intrinsics here. No include guard on purpose.

// GEMM operations: 12 rows x 2 vectors of accumulators leave room for the operands.
struct GemmF32 {
  using T = float;
  using V = __m512;
  static constexpr int L = 16, MR = 12;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const T* p) { return _mm512_loadu_ps(p); }
  static V broadcast(const T* p) { return _mm512_set1_ps(*p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(T* p, V v) { _mm512_storeu_ps(p, v); }
};
struct GemmF64 {
  using T = double;
  using V = __m512d;
  static constexpr int L = 8, MR = 12;
  static V zero() { return _mm512_setzero_pd(); }
  static V load(const T* p) { return _mm512_loadu_pd(p); }
  static V broadcast(const T* p) { return _mm512_set1_pd(*p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static void store(T* p, V v) { _mm512_storeu_pd(p, v); }
};

// Fold operations for fp32: masks are mask registers.
struct FoldF32 {
  using T = float;
  using V = __m512;
  using M = __mmask16;
  using VI = __m512i;
  using VD = __m512d;
  static constexpr int L = 16, DL = 8;
  static VI iota() {
    return _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  }
  static M lanes(int64_t n) { return n >= L ? M(0xFFFF) : M((1u << n) - 1); }
  static M without_lane(M m, int64_t lane) {
    return lane < 0 || lane >= L ? m : M(m & ~(1u << lane));
  }
  static M ids_differ(M m, int64_t id, const int64_t* ids) {
    const __m512i target = _mm512_set1_epi64(id);
    const __mmask8 lo = _mm512_mask_cmpneq_epi64_mask(
        __mmask8(m), target, _mm512_maskz_loadu_epi64(__mmask8(m), ids));
    const __mmask8 hi = _mm512_mask_cmpneq_epi64_mask(
        __mmask8(m >> 8), target, _mm512_maskz_loadu_epi64(__mmask8(m >> 8), ids + 8));
    return M(lo | (hi << 8));
  }
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(T x) { return _mm512_set1_ps(x); }
  static V load(const T* p) { return _mm512_loadu_ps(p); }
  static V load_masked(M m, const T* p) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(T* p, V v) { _mm512_storeu_ps(p, v); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static M gt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static M is_nan(V a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
  static M nonzero(V a) { return _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_NEQ_UQ); }
  static M and_(M a, M b) { return M(a & b); }
  static M or_(M a, M b) { return M(a | b); }
  static M andnot(M a, M b) { return M(a & ~b); }
  static M none() { return M(0); }
  static V select(M m, V a, V b) { return _mm512_mask_mov_ps(b, m, a); }
  static int count(M m) { return __builtin_popcount(m); }
  static VI iset1(int32_t x) { return _mm512_set1_epi32(x); }
  static VI iadd(VI a, VI b) { return _mm512_add_epi32(a, b); }
  static VI iselect(M m, VI a, VI b) { return _mm512_mask_mov_epi32(b, m, a); }
  static M negative(VI a) { return _mm512_cmplt_epi32_mask(a, _mm512_setzero_si512()); }
  static VI count_lanes(VI c, M m) { return _mm512_mask_add_epi32(c, m, c, _mm512_set1_epi32(1)); }
  static VI iload(const int32_t* p) { return _mm512_loadu_si512(p); }
  static void istore(int32_t* p, VI v) { _mm512_storeu_si512(p, v); }
  static VD dzero() { return _mm512_setzero_pd(); }
  static VD dadd(VD a, VD b) { return _mm512_add_pd(a, b); }
  static VD dload(const double* p) { return _mm512_loadu_pd(p); }
  static void dstore(double* p, VD v) { _mm512_storeu_pd(p, v); }
  static void widen(V h, VD* out) {
    out[0] = _mm512_cvtps_pd(_mm512_castps512_ps256(h));
    out[1] = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(h), 1)));
  }
};
