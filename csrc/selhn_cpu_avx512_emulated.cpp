// Test-only: the AVX-512 kernels (selhn_cpu_avx512_ops.h with the shared templates)
// compiled through SIMDe's portable implementation of the AVX-512F intrinsics, so that a
// CPU without AVX-512 runs the AVX-512 source in the cross-path bit-identity tests
// (torch.ops.selhn._cpu_set_simd_path("avx512-emulated")). SIMDe builds each 512-bit
// operation from AVX2+FMA instructions (a fused multiply-add stays one rounding), so this
// path exists only when the SIMDe headers are installed (Debian: libsimde-dev) and runs
// only on CPUs with AVX2 and FMA. Never chosen by default.
#include "selhn_cpu.h"
#include "selhn_cpu_lane_ops.h"

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__) && \
    __has_include(<simde/x86/avx512.h>)
#include <algorithm>
#include <cmath>

#pragma GCC push_options
#pragma GCC target("avx2,fma")
// SIMDe reads the native instruction sets from the compiler's macros, which a target
// region does not set: name them, so 512-bit operations split into AVX2/FMA halves.
#define SIMDE_X86_AVX2_NATIVE
#define SIMDE_X86_FMA_NATIVE
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

// The AVX-512F intrinsics the kernels use that SIMDe does not implement, defined lane by
// lane as Intel's guide does (masked-off lanes are not read).
namespace selhn::cpu::avx512_emulated {
inline __m512 maskz_loadu_ps(__mmask16 k, const void* p) {
  alignas(64) float lanes[16];
  for (int l = 0; l < 16; ++l) lanes[l] = (k >> l) & 1 ? static_cast<const float*>(p)[l] : 0.0f;
  return _mm512_loadu_ps(lanes);
}
inline __m512i maskz_loadu_epi64(__mmask8 k, const void* p) {
  alignas(64) int64_t lanes[8];
  for (int l = 0; l < 8; ++l) lanes[l] = (k >> l) & 1 ? static_cast<const int64_t*>(p)[l] : 0;
  return _mm512_loadu_si512(lanes);
}
inline __mmask8 mask_cmpneq_epi64_mask(__mmask8 k, __m512i a, __m512i b) {
  return __mmask8(k & ~_mm512_mask_cmpeq_epi64_mask(k, a, b));
}
inline __mmask16 cmplt_epi32_mask(__m512i a, __m512i b) { return _mm512_cmpgt_epi32_mask(b, a); }
inline __m512d cvtps_pd(__m256 a) {
  alignas(32) float in[8];
  alignas(64) double out[8];
  _mm256_store_ps(in, a);
  for (int l = 0; l < 8; ++l) out[l] = static_cast<double>(in[l]);
  return _mm512_load_pd(out);
}
}  // namespace selhn::cpu::avx512_emulated
#define _mm512_maskz_loadu_ps selhn::cpu::avx512_emulated::maskz_loadu_ps
#define _mm512_maskz_loadu_epi64 selhn::cpu::avx512_emulated::maskz_loadu_epi64
#define _mm512_mask_cmpneq_epi64_mask selhn::cpu::avx512_emulated::mask_cmpneq_epi64_mask
#define _mm512_cmplt_epi32_mask selhn::cpu::avx512_emulated::cmplt_epi32_mask
#define _mm512_cvtps_pd selhn::cpu::avx512_emulated::cvtps_pd

namespace selhn::cpu {
namespace avx512_emulated {
#include "selhn_cpu_avx512_ops.h"
#include "selhn_s_tile_simd.h"
#include "selhn_fold_simd.h"
constexpr TileKernels<float> kF32 = make_tile_kernels<GemmF32, FoldF32>(SimdPath::kAvx512Emulated);
constexpr TileKernels<double> kF64 =
    make_tile_kernels<GemmF64, OneLaneFold<double>>(SimdPath::kAvx512Emulated);
}  // namespace avx512_emulated

const TileKernels<float>* emulated_avx512_kernels_f32() { return &avx512_emulated::kF32; }
const TileKernels<double>* emulated_avx512_kernels_f64() { return &avx512_emulated::kF64; }
}  // namespace selhn::cpu
#pragma GCC pop_options

#else
namespace selhn::cpu {
const TileKernels<float>* emulated_avx512_kernels_f32() { return nullptr; }
const TileKernels<double>* emulated_avx512_kernels_f64() { return nullptr; }
}  // namespace selhn::cpu
#endif
