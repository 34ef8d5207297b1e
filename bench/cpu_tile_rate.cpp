// Single-thread rate of the CPU backend's AVX2 GEMM kernels (csrc/selhn_s_tile_simd.h)
// against the core's FMA peak, measured by a plain loop of independent FMAs.
//
//   g++ -O3 -ffp-contract=off -I csrc bench/cpu_tile_rate.cpp -o /tmp/tile_rate && /tmp/tile_rate
//
// Shapes are those of B = 4096, D = 512 fp32: the forward's S tile (64 x 128 over D, row
// tiles in groups sharing a packed column tile), and the dense backward's two products per
// tile (W @ cols: 64 x 512 over K = 128; W.T @ rows: 128 x 512 over K = 64), both reading
// the tile's weights W (64 x 128, row-major) in place.
#include <immintrin.h>

#include <algorithm>
#include <ctime>
#include <cstdint>
#include <cstdio>
#include <vector>

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
constexpr int64_t kBlockCols = 128;  // as in selhn_cpu.h
template <typename T>
constexpr int64_t weight_stride() {
  return kBlockCols + 64 / static_cast<int64_t>(sizeof(T));
}
#include "selhn_cpu_avx2_ops.h"
#include "selhn_s_tile_simd.h"

// 12 independent FMA chains, each step one vector FMA per chain: the core's FMA peak.
float fma_peak(int64_t steps) {
  __m256 acc[12];
  for (int r = 0; r < 12; ++r) acc[r] = _mm256_set1_ps(float(r));
  const __m256 a = _mm256_set1_ps(1.0000001f), b = _mm256_set1_ps(0.9999999f);
  for (int64_t k = 0; k < steps; ++k) {
#pragma GCC unroll 12
    for (int r = 0; r < 12; ++r) acc[r] = _mm256_fmadd_ps(a, acc[r], b);
  }
  float out = 0, tmp[8];
  for (int r = 0; r < 12; ++r) {
    _mm256_storeu_ps(tmp, acc[r]);
    out += tmp[0];
  }
  return out;
}
}  // namespace avx2
#pragma GCC pop_options

namespace {

// This thread's CPU time, so that time the scheduler gives other processes on a shared
// machine does not count.
double thread_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

template <class F>
double best_seconds(int reps, F&& f) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const double t0 = thread_seconds();
    f();
    best = std::min(best, thread_seconds() - t0);
  }
  return best;
}

}  // namespace

int main() {
  using Ops = avx2::GemmF32;
  constexpr int64_t BM = 64, BN = 128, D = 512, GROUP = 8, COL_TILES = 16;
  std::vector<float> rows(GROUP * BM * D), cols(COL_TILES * BN * D);
  for (size_t k = 0; k < rows.size(); ++k) rows[k] = float(k % 97) / 97.0f - 0.5f;
  for (size_t k = 0; k < cols.size(); ++k) cols[k] = float(k % 89) / 89.0f - 0.5f;
  const int64_t rows_room = (BM + 16) * D, cols_room = (BN + 16) * D;
  std::vector<float> rows_packed(GROUP * rows_room), cols_packed(cols_room), s(BM * BN);
  for (int64_t g = 0; g < GROUP; ++g) {
    avx2::pack_rows<Ops>(rows.data() + g * BM * D, BM, D, rows_packed.data() + g * rows_room);
  }
  volatile float sink = 0;

  const int64_t peak_steps = 1 << 24;
  const double t_peak = best_seconds(5, [&] { sink = avx2::fma_peak(peak_steps); });
  const double peak = 12.0 * 8 * 2 * peak_steps / t_peak / 1e9;
  std::printf("FMA peak (12 chains)          %6.1f GFLOP/s\n", peak);

  // Forward: per column tile, pack it, then every row tile of the group multiplies it.
  const double t_s = best_seconds(5, [&] {
    for (int64_t ct = 0; ct < COL_TILES; ++ct) {
      avx2::pack_columns<Ops>(cols.data() + ct * BN * D, BN, D, cols_packed.data());
      for (int64_t g = 0; g < GROUP; ++g) {
        avx2::multiply_packed<Ops>(rows_packed.data() + g * rows_room, BM, cols_packed.data(),
                                   BN, D, s.data(), BN);
      }
    }
    sink = s[7];
  });
  const double flops_s = 2.0 * GROUP * BM * COL_TILES * BN * D;
  std::printf("S tiles (pack + multiply)     %6.1f GFLOP/s  %4.0f%% of peak\n",
              flops_s / t_s / 1e9, 100 * flops_s / t_s / 1e9 / peak);
  const double t_m = best_seconds(5, [&] {
    for (int64_t ct = 0; ct < COL_TILES; ++ct) {
      for (int64_t g = 0; g < GROUP; ++g) {
        avx2::multiply_packed<Ops>(rows_packed.data() + g * rows_room, BM, cols_packed.data(),
                                   BN, D, s.data(), BN);
      }
    }
    sink = s[7];
  });
  std::printf("S tiles (multiply only)       %6.1f GFLOP/s  %4.0f%% of peak\n",
              flops_s / t_m / 1e9, 100 * flops_s / t_m / 1e9 / peak);

  // Backward products: weights (as the A panels) times strips of the other side.
  // The gradient rows of a row group (GROUP tiles of BM x D), as W @ cols meets them.
  std::vector<float> w(BM * avx2::weight_stride<float>()), strips(cols_room);
  std::vector<float> grad(GROUP * BN * D, 0.0f);
  for (size_t k = 0; k < w.size(); ++k) w[k] = float(k % 5) * 0.01f;
  avx2::pack_strips<Ops>(cols.data(), BN, D, strips.data());
  const int reps = 64;
  const double t_r = best_seconds(5, [&] {
    for (int r = 0; r < reps; ++r) {
      avx2::add_product<Ops>(w.data(), false, BM, BN, strips.data(), D,
                             grad.data() + (r % GROUP) * BM * D);
    }
    sink = grad[3];
  });
  const double flops_p = 2.0 * reps * BM * BN * D;
  std::printf("W @ cols   (64 x 512, K 128)  %6.1f GFLOP/s  %4.0f%% of peak\n",
              flops_p / t_r / 1e9, 100 * flops_p / t_r / 1e9 / peak);
  avx2::pack_strips<Ops>(rows.data(), BM, D, strips.data());
  const double t_c = best_seconds(5, [&] {
    for (int r = 0; r < reps; ++r) {
      avx2::add_product<Ops>(w.data(), true, BN, BM, strips.data(), D, grad.data());
    }
    sink = grad[3];
  });
  std::printf("W.T @ rows (128 x 512, K 64)  %6.1f GFLOP/s  %4.0f%% of peak\n",
              flops_p / t_c / 1e9, 100 * flops_p / t_c / 1e9 / peak);
  return 0;
}
