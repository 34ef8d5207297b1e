// The register-blocked S tile kernel, written once against a small vector-ops type and
// included by selhn_cpu.cpp once per instruction set, each time inside its own namespace
// and ``#pragma GCC target`` region (so the same template compiles to AVX2 and AVX-512
// code). No include guard on purpose.
//
// The including namespace defines, for T = float and T = double, an ops type with:
//   T, V (vector of L lanes), L, MR (rows per micro block), zero(), load(p), broadcast(p)
//   (one scalar to every lane), fma(a, b, c) = a * b + c rounded once, store(p, v).
//
// Every element S_ij is one FMA chain over k = 0, 1, ..., D - 1 starting from +0, lane j
// of a vector FMA doing exactly std::fma(a_ik, b_jk, acc). Blocking only decides which
// chains run side by side, never the operations inside a chain, so S_ij depends on row i,
// column j and D alone (and equals the portable std::fma loop bit for bit).

// Columns per panel slice: two vectors, so each broadcast row value feeds two FMAs.
template <class Ops>
constexpr int64_t panel_width() {
  return 2 * Ops::L;
}

// Packs the nb x dim column block ``b`` (row-major) into ceil(nb / NR) slices of dim x NR
// (k-major, column c of slice q = b's row q * NR + c), zero-padding the last slice.
template <class Ops>
void pack_panel(const typename Ops::T* b, int64_t nb, int64_t dim, typename Ops::T* panel) {
  using T = typename Ops::T;
  constexpr int64_t NR = panel_width<Ops>();
  for (int64_t j0 = 0; j0 < nb; j0 += NR) {
    T* slice = panel + j0 * dim;  // slice q starts at q * dim * NR = j0 * dim
    const int64_t cols = std::min(NR, nb - j0);
    for (int64_t k = 0; k < dim; ++k) {
      T* out = slice + k * NR;
      int64_t c = 0;
      for (; c < cols; ++c) out[c] = b[(j0 + c) * dim + k];
      for (; c < NR; ++c) out[c] = T(0);
    }
  }
}

// An MR_ x NR block of S: rows a[0 .. MR_) (stride dim) against one panel slice; writes the
// first ``cols`` columns to s (stride lds). The accumulators stay in registers.
template <class Ops, int MR_>
inline void micro_block(const typename Ops::T* a, int64_t dim, const typename Ops::T* slice,
                        int64_t cols, typename Ops::T* s, int64_t lds) {
  using T = typename Ops::T;
  using V = typename Ops::V;
  constexpr int L = Ops::L;
  constexpr int64_t NR = panel_width<Ops>();
  V lo[MR_], hi[MR_];
#pragma GCC unroll 16
  for (int r = 0; r < MR_; ++r) lo[r] = hi[r] = Ops::zero();
  for (int64_t k = 0; k < dim; ++k) {
    const V b_lo = Ops::load(slice + k * NR);
    const V b_hi = Ops::load(slice + k * NR + L);
#pragma GCC unroll 16
    for (int r = 0; r < MR_; ++r) {
      const V x = Ops::broadcast(a + r * dim + k);
      lo[r] = Ops::fma(x, b_lo, lo[r]);
      hi[r] = Ops::fma(x, b_hi, hi[r]);
    }
  }
  for (int r = 0; r < MR_; ++r) {
    T* out = s + r * lds;
    if (cols == NR) {
      Ops::store(out, lo[r]);
      Ops::store(out + L, hi[r]);
    } else {
      T tmp[NR];
      Ops::store(tmp, lo[r]);
      Ops::store(tmp + L, hi[r]);
      for (int64_t c = 0; c < cols; ++c) out[c] = tmp[c];
    }
  }
}

// The last rows < MR of a tile: a micro block of exactly that many rows.
template <class Ops, int MR_>
inline void tail_block(int64_t rows, const typename Ops::T* a, int64_t dim,
                       const typename Ops::T* slice, int64_t cols, typename Ops::T* s,
                       int64_t lds) {
  if constexpr (MR_ > 0) {
    if (rows == MR_) {
      micro_block<Ops, MR_>(a, dim, slice, cols, s, lds);
    } else {
      tail_block<Ops, MR_ - 1>(rows, a, dim, slice, cols, s, lds);
    }
  }
}

// s[i * lds + j] = <a_i, b_j> for the na x nb tile, from the column block packed by
// pack_panel; the caller packs once and reuses the panel for any number of row blocks.
template <class Ops>
void multiply_panel(const typename Ops::T* a, int64_t na, const typename Ops::T* panel,
                    int64_t nb, int64_t dim, typename Ops::T* s, int64_t lds) {
  constexpr int64_t NR = panel_width<Ops>();
  constexpr int MR = Ops::MR;
  for (int64_t j0 = 0; j0 < nb; j0 += NR) {
    const auto* slice = panel + j0 * dim;
    const int64_t cols = std::min(NR, nb - j0);
    int64_t i = 0;
    for (; i + MR <= na; i += MR) {
      micro_block<Ops, MR>(a + i * dim, dim, slice, cols, s + i * lds + j0, lds);
    }
    if (i < na) {
      tail_block<Ops, MR - 1>(na - i, a + i * dim, dim, slice, cols, s + i * lds + j0, lds);
    }
  }
}

// The gradient products. c (m x n, stride ldc) += A @ b, where A is m x K with element
// (i, k) at a[i * a_row + k * a_k] (so W and W.T are read in place) and b is K x n (stride
// ldb). Each c_ij continues its own FMA chain from its current value over k = 0 .. K-1.

// An MR_ x NR block of c over full NR-wide columns.
template <class Ops, int MR_>
inline void update_block(const typename Ops::T* a, int64_t a_row, int64_t a_k, int64_t K,
                         const typename Ops::T* b, int64_t ldb, typename Ops::T* c,
                         int64_t ldc) {
  using V = typename Ops::V;
  constexpr int L = Ops::L;
  V lo[MR_], hi[MR_];
#pragma GCC unroll 16
  for (int r = 0; r < MR_; ++r) {
    lo[r] = Ops::load(c + r * ldc);
    hi[r] = Ops::load(c + r * ldc + L);
  }
  for (int64_t k = 0; k < K; ++k) {
    const V b_lo = Ops::load(b + k * ldb);
    const V b_hi = Ops::load(b + k * ldb + L);
#pragma GCC unroll 16
    for (int r = 0; r < MR_; ++r) {
      const V x = Ops::broadcast(a + r * a_row + k * a_k);
      lo[r] = Ops::fma(x, b_lo, lo[r]);
      hi[r] = Ops::fma(x, b_hi, hi[r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR_; ++r) {
    Ops::store(c + r * ldc, lo[r]);
    Ops::store(c + r * ldc + L, hi[r]);
  }
}

template <class Ops, int MR_>
inline void update_tail(int64_t rows, const typename Ops::T* a, int64_t a_row, int64_t a_k,
                        int64_t K, const typename Ops::T* b, int64_t ldb, typename Ops::T* c,
                        int64_t ldc) {
  if constexpr (MR_ > 0) {
    if (rows == MR_) {
      update_block<Ops, MR_>(a, a_row, a_k, K, b, ldb, c, ldc);
    } else {
      update_tail<Ops, MR_ - 1>(rows, a, a_row, a_k, K, b, ldb, c, ldc);
    }
  }
}

// One NR-wide column strip of c, all m rows.
template <class Ops>
inline void update_strip(const typename Ops::T* a, int64_t a_row, int64_t a_k, int64_t m,
                         int64_t K, const typename Ops::T* b, int64_t ldb, typename Ops::T* c,
                         int64_t ldc) {
  constexpr int MR = Ops::MR;
  int64_t i = 0;
  for (; i + MR <= m; i += MR) {
    update_block<Ops, MR>(a + i * a_row, a_row, a_k, K, b, ldb, c + i * ldc, ldc);
  }
  if (i < m) {
    update_tail<Ops, MR - 1>(m - i, a + i * a_row, a_row, a_k, K, b, ldb, c + i * ldc, ldc);
  }
}

// c (m x n) += A @ b. The last n % NR columns go through zero-padded copies of their b and c
// columns (``scratch``: room for (K + m) * NR values), so every column takes the same path.
template <class Ops>
void add_product(const typename Ops::T* a, int64_t a_row, int64_t a_k, int64_t m, int64_t K,
                 const typename Ops::T* b, int64_t ldb, int64_t n, typename Ops::T* c,
                 int64_t ldc, typename Ops::T* scratch) {
  using T = typename Ops::T;
  constexpr int64_t NR = panel_width<Ops>();
  int64_t j0 = 0;
  for (; j0 + NR <= n; j0 += NR) update_strip<Ops>(a, a_row, a_k, m, K, b + j0, ldb, c + j0, ldc);
  if (j0 == n) return;
  const int64_t cols = n - j0;
  T* b_pad = scratch;
  T* c_pad = scratch + K * NR;
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t j = 0; j < NR; ++j) b_pad[k * NR + j] = j < cols ? b[k * ldb + j0 + j] : T(0);
  }
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < NR; ++j) c_pad[i * NR + j] = j < cols ? c[i * ldc + j0 + j] : T(0);
  }
  update_strip<Ops>(a, a_row, a_k, m, K, b_pad, NR, c_pad, NR);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < cols; ++j) c[i * ldc + j0 + j] = c_pad[i * NR + j];
  }
}
