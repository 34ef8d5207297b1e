// The register-blocked GEMM kernels (the S tile and the gradient products), written once
// against a small vector-ops type and included once per instruction set, each time inside
// its own namespace and ``#pragma GCC target`` region (selhn_cpu_simd.cpp), so the same
// template compiles to AVX2 and AVX-512 code. No include guard on purpose.
//
// The including namespace defines, for T = float and T = double, an ops type with:
//   T, V (vector of L lanes), L, MR (rows per micro block), zero(), load(p), broadcast(p)
//   (one scalar to every lane), fma(a, b, c) = a * b + c rounded once, store(p, v).
//
// Every element S_ij is one FMA chain over k = 0, 1, ..., D - 1 starting from +0, lane j
// of a vector FMA doing exactly std::fma(a_ik, b_jk, acc). Blocking only decides which
// chains run side by side and where a chain's running value waits between k blocks (in
// the output, exactly), never the operations inside a chain, so S_ij depends on row i,
// column j and D alone (and equals the portable std::fma loop bit for bit).
//
// Blocking: a micro block of MR rows x NR = 2L columns keeps its 2 * MR accumulators in
// registers (6 x 16 fp32 on AVX2's 16 ymm registers, 12 x 32 on AVX-512's 32). For S both
// operands are packed k-major (rows in panels of MR, columns in slices of NR), so the
// inner loop reads two streams, and k runs in blocks of kc so one column slice block
// (kc x NR) stays in the L1 cache while every row panel of the tile passes over it. The
// gradient products read their A operand (the tile's weights) unpacked, row-major or
// transposed, at compile-time strides.

// Columns per panel slice: two vectors, so each broadcast row value feeds two FMAs.
template <class Ops>
constexpr int64_t panel_width() {
  return 2 * Ops::L;
}

// k block: a column slice block of kc x NR values fills 16 KiB (half of a 32 KiB L1).
template <class Ops>
constexpr int64_t k_block() {
  return 16384 / (panel_width<Ops>() * static_cast<int64_t>(sizeof(typename Ops::T)));
}

// Packs the n x dim row-major block ``x`` into ceil(n / W) panels of dim x W (k-major:
// element (k, c) of panel q = x's row q * W + c), zero-padding the last panel. W = NR packs
// columns for the S tile, W = MR packs rows. k runs in blocks of one cache line of each
// source row: with dim a power of two, the W rows of a panel fall into few cache sets, so
// reading them k by k would evict lines before their next element is read.
template <class Ops, int64_t W>
void pack_k_major(const typename Ops::T* x, int64_t n, int64_t dim, typename Ops::T* out) {
  using T = typename Ops::T;
  constexpr int64_t KB = 64 / sizeof(T);
  for (int64_t j0 = 0; j0 < n; j0 += W) {
    T* panel = out + j0 * dim;  // panel q starts at q * dim * W = j0 * dim
    const int64_t count = std::min(W, n - j0);
    for (int64_t k0 = 0; k0 < dim; k0 += KB) {
      const int64_t kb = std::min(KB, dim - k0);
      T* dst = panel + k0 * W;
      const T* src = x + j0 * dim + k0;
      if (count == W) {
        for (int64_t k = 0; k < kb; ++k) {
#pragma GCC unroll 16
          for (int64_t c = 0; c < W; ++c) dst[k * W + c] = src[c * dim + k];
        }
        continue;
      }
      for (int64_t k = 0; k < kb; ++k) {
        int64_t c = 0;
        for (; c < count; ++c) dst[k * W + c] = src[c * dim + k];
        for (; c < W; ++c) dst[k * W + c] = T(0);
      }
    }
  }
}

template <class Ops>
void pack_columns(const typename Ops::T* b, int64_t nb, int64_t dim, typename Ops::T* out) {
  pack_k_major<Ops, panel_width<Ops>()>(b, nb, dim, out);
}

template <class Ops>
void pack_rows(const typename Ops::T* a, int64_t na, int64_t dim, typename Ops::T* out) {
  pack_k_major<Ops, Ops::MR>(a, na, dim, out);
}

// Packs the n x dim row-major block ``x`` into NR-wide column strips (strip q holds
// columns [q * NR, q * NR + NR) of every row, n x NR, zero-padded), the layout the
// gradient products read their right-hand side in. One strip at a time, so the writes run
// in order and each source line is read once.
template <class Ops>
void pack_strips(const typename Ops::T* x, int64_t n, int64_t dim, typename Ops::T* out) {
  using T = typename Ops::T;
  constexpr int64_t NR = panel_width<Ops>();
  for (int64_t j0 = 0; j0 < dim; j0 += NR) {
    T* dst = out + j0 * n;
    const int64_t count = std::min(NR, dim - j0);
    if (count == NR) {
      for (int64_t k = 0; k < n; ++k) {
        const T* src = x + k * dim + j0;
#pragma GCC unroll 16
        for (int64_t c = 0; c < NR; ++c) dst[k * NR + c] = src[c];
      }
      continue;
    }
    for (int64_t k = 0; k < n; ++k) {
      int64_t c = 0;
      for (; c < count; ++c) dst[k * NR + c] = x[k * dim + j0 + c];
      for (; c < NR; ++c) dst[k * NR + c] = T(0);
    }
  }
}

// The accumulators of an MR_ x NR block: start from c (rows x cols valid, stride ldc) or
// from zero, and store back the valid part.
template <class Ops, int MR_>
struct Accumulators {
  using T = typename Ops::T;
  using V = typename Ops::V;
  static constexpr int L = Ops::L;
  static constexpr int64_t NR = panel_width<Ops>();
  V lo[MR_], hi[MR_];

  void start(bool from_zero, const T* c, int64_t cols, int64_t ldc) {
    if (from_zero) {
#pragma GCC unroll 16
      for (int r = 0; r < MR_; ++r) lo[r] = hi[r] = Ops::zero();
      return;
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR_; ++r) {
      if (cols == NR) {
        lo[r] = Ops::load(c + r * ldc);
        hi[r] = Ops::load(c + r * ldc + L);
      } else {
        T tmp[NR] = {};
        for (int64_t j = 0; j < cols; ++j) tmp[j] = c[r * ldc + j];
        lo[r] = Ops::load(tmp);
        hi[r] = Ops::load(tmp + L);
      }
    }
  }

  void finish(T* c, int64_t cols, int64_t ldc) const {
#pragma GCC unroll 16
    for (int r = 0; r < MR_; ++r) {
      if (cols == NR) {
        Ops::store(c + r * ldc, lo[r]);
        Ops::store(c + r * ldc + L, hi[r]);
      } else {
        T tmp[NR];
        Ops::store(tmp, lo[r]);
        Ops::store(tmp + L, hi[r]);
        for (int64_t j = 0; j < cols; ++j) c[r * ldc + j] = tmp[j];
      }
    }
  }

  // K steps of acc += a[k] (x) b[k]: element (r, k) of a at a[r * RS + k * KS] (a packed
  // panel: RS = 1, KS = MR), b packed k-major with stride NR (a slice or a strip).
  template <int64_t RS, int64_t KS>
  void run(const T* a, const T* b, int64_t K) {
    for (int64_t k = 0; k < K; ++k) {
      const V b_lo = Ops::load(b + k * NR);
      const V b_hi = Ops::load(b + k * NR + L);
#pragma GCC unroll 16
      for (int r = 0; r < MR_; ++r) {
        const V x = Ops::broadcast(a + k * KS + r * RS);
        lo[r] = Ops::fma(x, b_lo, lo[r]);
        hi[r] = Ops::fma(x, b_hi, hi[r]);
      }
    }
  }
};

// One micro block: c (rows x cols) = (from_zero ? 0 : c) + A @ b_panel over K steps, A's
// element (r, k) at a[r * RS + k * KS].
template <class Ops, int MR_, int64_t RS, int64_t KS>
void micro_block(const typename Ops::T* a, const typename Ops::T* b, int64_t K, bool from_zero,
                 typename Ops::T* c, int64_t cols, int64_t ldc) {
  Accumulators<Ops, MR_> acc;
  acc.start(from_zero, c, cols, ldc);
  acc.template run<RS, KS>(a, b, K);
  acc.finish(c, cols, ldc);
}

// The last rows < MR of a block: a micro block of exactly that many rows.
template <class Ops, int MR_, int64_t RS, int64_t KS>
void tail_block(int64_t rows, const typename Ops::T* a, const typename Ops::T* b, int64_t K,
                bool from_zero, typename Ops::T* c, int64_t cols, int64_t ldc) {
  if constexpr (MR_ > 0) {
    if (rows == MR_) {
      micro_block<Ops, MR_, RS, KS>(a, b, K, from_zero, c, cols, ldc);
    } else {
      tail_block<Ops, MR_ - 1, RS, KS>(rows, a, b, K, from_zero, c, cols, ldc);
    }
  }
}

// Asks for the rows x cols block of c at ``c`` (stride ldc) to be brought into the cache.
template <typename T>
inline void prefetch_block(const T* c, int64_t rows, int64_t cols, int64_t ldc) {
#if defined(__GNUC__)
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; j += kLine) __builtin_prefetch(c + r * ldc + j, 1, 3);
  }
#endif
}

// c (m x n, stride ldc) = (from_zero ? 0 : c) + A @ B over K steps, A given in blocks of MR
// rows (block stride a_block values, element (r, k) of a block at r * RS + k * KS) and B
// as NR-wide k-major slices (slice stride b_slice). Slices outer, row blocks inner: each
// slice block is reused from L1 by every row block. A gradient product reads each c line
// once, from L2 or L3, so each micro block first asks for the next one's c lines, which
// then arrive while it runs instead of stalling the next block's start.
template <class Ops, int64_t RS, int64_t KS>
void multiply_blocks(const typename Ops::T* a, int64_t a_block, int64_t m,
                     const typename Ops::T* b, int64_t b_slice, int64_t n, int64_t K,
                     bool from_zero, typename Ops::T* c, int64_t ldc) {
  constexpr int64_t NR = panel_width<Ops>();
  constexpr int MR = Ops::MR;
  for (int64_t j0 = 0; j0 < n; j0 += NR) {
    const auto* slice = b + (j0 / NR) * b_slice;
    const int64_t cols = std::min(NR, n - j0);
    for (int64_t i = 0; i < m; i += MR) {
      if (!from_zero && i + MR < m) {
        prefetch_block(c + (i + MR) * ldc + j0, std::min<int64_t>(MR, m - i - MR), cols, ldc);
      } else if (!from_zero && j0 + NR < n) {
        prefetch_block(c + j0 + NR, std::min<int64_t>(MR, m), std::min(NR, n - j0 - NR), ldc);
      }
      const auto* a_rows = a + (i / MR) * a_block;
      if (i + MR <= m) {
        micro_block<Ops, MR, RS, KS>(a_rows, slice, K, from_zero, c + i * ldc + j0, cols, ldc);
      } else {
        tail_block<Ops, MR - 1, RS, KS>(m - i, a_rows, slice, K, from_zero, c + i * ldc + j0,
                                        cols, ldc);
      }
    }
  }
}

// s[i * lds + j] = <a_i, b_j> for the na x nb tile, from rows packed by pack_rows and
// columns packed by pack_columns (both over the full dim), in k blocks of k_block().
template <class Ops>
void multiply_packed(const typename Ops::T* rows, int64_t na, const typename Ops::T* cols,
                     int64_t nb, int64_t dim, typename Ops::T* s, int64_t lds) {
  constexpr int64_t KC = k_block<Ops>();
  for (int64_t k0 = 0; k0 < dim; k0 += KC) {
    const int64_t kc = std::min(KC, dim - k0);
    multiply_blocks<Ops, 1, Ops::MR>(rows + k0 * Ops::MR, dim * Ops::MR, na,
                                     cols + k0 * panel_width<Ops>(), dim * panel_width<Ops>(),
                                     nb, kc, k0 == 0, s, lds);
  }
}

// The gradient products: c (m x dim, stride dim) += A @ b, with A = W (m x K) or W.T, W the
// tile's weights row-major with row stride weight_stride<T>() (as tile_weights writes
// them), and b (K x dim) as NR-wide strips (pack_strips). The micro blocks broadcast A's elements
// straight from W, so one buffer serves both products. Each c element continues its own
// FMA chain over k = 0 .. K-1.
template <class Ops>
void add_product(const typename Ops::T* w, bool transposed, int64_t m, int64_t K,
                 const typename Ops::T* b, int64_t dim, typename Ops::T* c) {
  constexpr int64_t MR = Ops::MR, NR = panel_width<Ops>();
  constexpr int64_t WS = weight_stride<typename Ops::T>();
  if (transposed) {  // A(r, k) = W(k, r)
    multiply_blocks<Ops, 1, WS>(w, MR, m, b, K * NR, dim, K, false, c, dim);
  } else {  // A(r, k) = W(r, k)
    multiply_blocks<Ops, WS, 1>(w, MR * WS, m, b, K * NR, dim, K, false, c, dim);
  }
}
