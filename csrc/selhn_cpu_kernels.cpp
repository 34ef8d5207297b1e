// Tile math of the C++ CPU backend and the choice of instruction set.
//
// S = rows @ cols.T is computed in tiles by a register-blocked kernel (selhn_s_tile_simd.h)
// compiled three ways from one template: AVX-512F, AVX2+FMA (chosen at run time) and a
// portable one-lane version. Element (i, j) is one FMA chain over k = 0 .. D-1 from +0 on
// every path: it depends only on row i, column j and D, whatever its position in a tile,
// which rows share its tile or which path ran. So the backward can recompute tiles of
// permuted rows and columns and still reproduce the forward's S bit for bit, which keeps
// the forward's active counts (used for the diagonal) equal to the recomputed active set.
// The per-tile fold and weights (selhn_fold_simd.h) are compiled the same three ways for
// fp32 and one-lane for fp64, and sum in one order on every path: every output is
// bit-identical across paths.
#include "selhn_cpu.h"
#include "selhn_cpu_lane_ops.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

// The SIMD paths are compiled per instruction set with ``#pragma GCC target`` regions, a
// GCC feature; other compilers build the portable path only.
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define SELHN_X86 1
#endif

namespace selhn::cpu {

std::atomic<bool> g_reverse_tile_order{false};
std::atomic<int64_t> g_backward_tiles{0};

namespace portable {
#include "selhn_s_tile_simd.h"
#include "selhn_fold_simd.h"

constexpr TileKernels<float> kF32 = make_tile_kernels<OneLaneGemm<float>, OneLaneFold<float>>(SimdPath::kPortable);
constexpr TileKernels<double> kF64 =
    make_tile_kernels<OneLaneGemm<double>, OneLaneFold<double>>(SimdPath::kPortable);
}  // namespace portable

#if defined(SELHN_X86)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "selhn_cpu_avx2_ops.h"
#include "selhn_s_tile_simd.h"
#include "selhn_fold_simd.h"
// fp64 folds one lane at a time on every path (the fold is a small part of fp64's cost).
constexpr TileKernels<float> kF32 = make_tile_kernels<GemmF32, FoldF32>(SimdPath::kAvx2);
constexpr TileKernels<double> kF64 = make_tile_kernels<GemmF64, OneLaneFold<double>>(
    SimdPath::kAvx2);
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {
#include "selhn_cpu_avx512_ops.h"
#include "selhn_s_tile_simd.h"
#include "selhn_fold_simd.h"
constexpr TileKernels<float> kF32 = make_tile_kernels<GemmF32, FoldF32>(SimdPath::kAvx512);
constexpr TileKernels<double> kF64 = make_tile_kernels<GemmF64, OneLaneFold<double>>(
    SimdPath::kAvx512);
}  // namespace avx512
#pragma GCC pop_options
#endif  // SELHN_X86

namespace {

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
std::atomic<int> g_simd_path{static_cast<int>(g_best_simd_path)};

// The emulated AVX-512 path runs the AVX-512 source on AVX2+FMA instructions.
bool emulation_runs() {
  return emulated_avx512_kernels_f32() != nullptr && g_best_simd_path != SimdPath::kPortable;
}

template <typename T>
const TileKernels<T>* kernels_for(SimdPath path) {
  constexpr bool f32 = std::is_same_v<T, float>;
  switch (path) {
#if defined(SELHN_X86)
    case SimdPath::kAvx512:
      if constexpr (f32) return &avx512::kF32; else return &avx512::kF64;
    case SimdPath::kAvx2:
      if constexpr (f32) return &avx2::kF32; else return &avx2::kF64;
#endif
    case SimdPath::kAvx512Emulated:
      if constexpr (f32) return emulated_avx512_kernels_f32(); else return emulated_avx512_kernels_f64();
    default:
      if constexpr (f32) return &portable::kF32; else return &portable::kF64;
  }
}

}  // namespace

template <typename T>
const TileKernels<T>& tile_kernels() {
  return *kernels_for<T>(current_simd_path());
}
template const TileKernels<float>& tile_kernels<float>();
template const TileKernels<double>& tile_kernels<double>();

SimdPath current_simd_path() {
  return static_cast<SimdPath>(g_simd_path.load(std::memory_order_relaxed));
}

std::vector<SimdPath> available_simd_paths() {
  std::vector<SimdPath> out;
  for (int k = static_cast<int>(g_best_simd_path); k >= 0; --k) {
    out.push_back(static_cast<SimdPath>(k));
  }
  if (emulation_runs()) out.push_back(SimdPath::kAvx512Emulated);
  return out;
}

void set_simd_path(SimdPath path) { g_simd_path.store(static_cast<int>(path)); }

const char* simd_path_name(SimdPath path) {
  switch (path) {
    case SimdPath::kAvx512:
      return "avx512";
    case SimdPath::kAvx2:
      return "avx2";
    case SimdPath::kAvx512Emulated:
      return "avx512-emulated";
    default:
      return "portable";
  }
}

}  // namespace selhn::cpu
