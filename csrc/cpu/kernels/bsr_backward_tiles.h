// Backward kernels of the block-sparse linear (see bsr_backward.h), written once over an instruction-set description
// `Isa` and compiled per path: included by bsr_backward_avx512.cpp, bsr_backward_avx2.cpp and bsr_backward_generic.cpp
// inside their own (anonymous) namespace, after the pragma that gives every function below that path's target
// attributes. Not a standalone header.
//
// `Isa` provides V (a vector of L floats), zero/load/store/bcast/fma/add, load_n / store_n (the first n lanes, n may
// be <= 0 or >= L; masked lanes are neither read nor written), stream(p, v) and fence() (a store past the caches to a
// vector-aligned p, a plain store where the path has none, and the fence that orders them), transpose(V r[L]) (an L x L
// tile's rows become its columns; in registers on AVX2), and the register-tile shapes: kGiVecs and gi_tokens(nv) for
// grad_input, kGvVecs and gv_rows(nv) for grad_values.
//
// grad_input (grad_x = grad_y @ W): register tile = T tokens x NV vectors of grad_x columns of one block column. Per
// row i of each block in that column it loads NV vectors of the block's row i (contiguous in row-major blocks) and
// broadcasts grad_y[t][row] for the T tokens: T*NV FMAs per NV + T loads, and grad_y / grad_x are read and written
// in their natural row-major layout (nothing packed, nothing transposed). Block-transposed weights are made
// row-major once per call, into a scratch all work items read. Work items are (token chunk, block column) pairs, chunk
// major, handed out dynamically: the grad_y rows of a chunk stay in cache while its block columns are worked.
//
// Column vectors (bw == 1, e.g. 16x1) would use one lane of L in those tiles, so both products have their own:
// grad_input runs its vectors over L tokens (register tile = up to kGiColumnRows rows of a block row's grad_y,
// reused by every block of the row, each weight broadcast), grad_values groups the blocks of a block row (register
// tile = R blocks x the vectors of bh rows, each block's x column broadcast per token).
//
// grad_values (SDDMM): for a kept block, out[a][b] = sum_t A[t][a] * B[t][b] with (A, B) = (grad_y's block rows,
// x's block columns) for row-major blocks, (x's, grad_y's) for block-transposed ones: both layouts are one kernel,
// written straight into the gradient's storage. Register tile = R rows a x NV vectors of b over the tokens of a
// chunk. Per chunk, x's block columns and each block row's grad_y columns are copied into contiguous [token][block]
// slabs, so the tiles stream unit-stride memory (strided rows cost a page, and a TLB entry, per token). Threads own
// contiguous block rows of equal nonzero-block count and share the packing of x; no output is shared.

#define PYSPARSE_BWD_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define PYSPARSE_BWD_UNROLL PYSPARSE_BWD_PRAGMA(unroll)
#else
#define PYSPARSE_BWD_UNROLL PYSPARSE_BWD_PRAGMA(GCC unroll 32)
#endif
// Register tiles stay out of line: inlined into the drivers, GCC spills the accumulators.
#define PYSPARSE_BWD_NOINLINE __attribute__((noinline))

using V = typename Isa::V;
constexpr int L = Isa::L;

// Scratch (slabs, transposed tiles, row-major copies) 64-byte aligned, so the tiles' vector loads never span two lines.
#include "aligned_scratch.inc"

// grad_y bytes per grad_input work item: the chunk's grad_y rows stay in L2 while its block columns run; in 64..512
// tokens (fewer tokens make more items, each setting up its column's blocks).
constexpr int64_t kGiChunkBytes = int64_t(1) << 20;
// Tokens per grad_values chunk: x's rows of a chunk (chunk * K floats) stay in L2 across a thread's blocks. Blocks
// take 64 (32x32 at 90%, M = 1024-4096: 5-14% faster than 256); column vectors, which transpose x's chunk L tokens
// at a time, keep 256 (64 ran their layers 5-15% slower).
constexpr int64_t kGvChunk = 64;
constexpr int64_t kGvChunkColumns = 256;

// A full vector of results to p: past the caches when `stream` and p is vector-aligned (Isa::stream needs it).
inline void store_out(float* p, V v, bool stream) {
  if (stream && reinterpret_cast<uintptr_t>(p) % (L * sizeof(float)) == 0) {
    Isa::stream(p, v);
  } else {
    Isa::store(p, v);
  }
}

// Lanes of vector v valid among the first n: 0..L.
inline int lanes(int n, int v) { return std::max(0, std::min(L, n - v * L)); }

// ---- grad_input ---------------------------------------------------------------------------------------------
// T tokens x NV vectors: gx[t][0 : out_n] = sum over the n blocks (row-major, `w[e]` at column j0 of row 0, row
// stride bw) of gy[t][rows[e]*bh + i] * w[e][i][.]. kTail: only the first wn columns of the last vector are inside
// the block (masked loads). gy / gx point at token 0 of the tile.
template <int T, int NV, bool kTail>
PYSPARSE_BWD_NOINLINE void gi_tile(const float* gy, const float* const* w, const int32_t* rows, int64_t n,
                                   const BsrProblem& p, int wn, float* gx, int out_n, bool stream) {
  V acc[T][NV];
  PYSPARSE_BWD_UNROLL for (int t = 0; t < T; ++t) {
    PYSPARSE_BWD_UNROLL for (int v = 0; v < NV; ++v) acc[t][v] = Isa::zero();
  }
  const int last = wn - (NV - 1) * L;
  const int64_t row_bytes = p.N * int64_t(sizeof(float)), block_bytes = p.bh * int64_t(sizeof(float));
  for (int64_t e = 0; e < n; ++e) {
    const int64_t r0 = int64_t(rows[e]) * p.bh;
    const int64_t ih = std::min(p.bh, p.N - r0);  // grad_y has no rows past N
    const float* wr = w[e];
    const float* g = gy + r0;
    // The tile reads bh values of each of its T grad_y rows per block, a row stride apart: lines the hardware
    // prefetchers do not follow, met in L3 once grad_y outgrows L2. So each block asks for the next block's lines
    // (Zen 3, 90%, M = 1024-4096: 16x16 1.07-1.44x faster, 32x32 1.00-1.28x; BENCHMARKS.md).
    if (e + 1 < n) {
      const char* next = reinterpret_cast<const char*>(gy + int64_t(rows[e + 1]) * p.bh);
      PYSPARSE_BWD_UNROLL for (int t = 0; t < T; ++t) {
        for (int64_t off = 0; off < block_bytes; off += 64) __builtin_prefetch(next + t * row_bytes + off);
      }
    }
    for (int64_t i = 0; i < ih; ++i, wr += p.bw) {
      V wv[NV];
      PYSPARSE_BWD_UNROLL for (int v = 0; v < NV; ++v) {
        wv[v] = (kTail && v == NV - 1) ? Isa::load_n(wr + v * L, last) : Isa::load(wr + v * L);
      }
      PYSPARSE_BWD_UNROLL for (int t = 0; t < T; ++t) {
        const V b = Isa::bcast(g + t * p.N + i);
        PYSPARSE_BWD_UNROLL for (int v = 0; v < NV; ++v) acc[t][v] = Isa::fma(wv[v], b, acc[t][v]);
      }
    }
  }
  PYSPARSE_BWD_UNROLL for (int t = 0; t < T; ++t) {
    PYSPARSE_BWD_UNROLL for (int v = 0; v < NV; ++v) {
      const int k = lanes(out_n, v);
      if (k == L) {
        store_out(gx + t * p.K + v * L, acc[t][v], stream);
      } else if (k > 0) {
        Isa::store_n(gx + t * p.K + v * L, acc[t][v], k);
      }
    }
  }
}

// Tokens [t0, t1) of one column group: full tiles, then the rest in tiles of 4, 2, 1.
template <int NV, bool kTail>
void gi_tokens(const float* gy, const float* const* w, const int32_t* rows, int64_t n, const BsrProblem& p, int wn,
               float* gx, int out_n, int64_t t0, int64_t t1, bool stream) {
  constexpr int T = Isa::gi_tokens(NV);
  int64_t t = t0;
  for (; t + T <= t1; t += T) gi_tile<T, NV, kTail>(gy + t * p.N, w, rows, n, p, wn, gx + t * p.K, out_n, stream);
  if constexpr (T > 4) {
    for (; t + 4 <= t1; t += 4) gi_tile<4, NV, kTail>(gy + t * p.N, w, rows, n, p, wn, gx + t * p.K, out_n, stream);
  }
  if constexpr (T > 2) {
    for (; t + 2 <= t1; t += 2) gi_tile<2, NV, kTail>(gy + t * p.N, w, rows, n, p, wn, gx + t * p.K, out_n, stream);
  }
  for (; t < t1; ++t) gi_tile<1, NV, kTail>(gy + t * p.N, w, rows, n, p, wn, gx + t * p.K, out_n, stream);
}

template <int NV>
void gi_group(bool tail, const float* gy, const float* const* w, const int32_t* rows, int64_t n,
              const BsrProblem& p, int wn, float* gx, int out_n, int64_t t0, int64_t t1, bool stream) {
  if (tail) {
    gi_tokens<NV, true>(gy, w, rows, n, p, wn, gx, out_n, t0, t1, stream);
  } else {
    gi_tokens<NV, false>(gy, w, rows, n, p, wn, gx, out_n, t0, t1, stream);
  }
}

// Groups of up to kGiVecs vectors: nv in 1..kGiVecs chooses the instantiation.
template <int NV = Isa::kGiVecs>
void gi_dispatch(int nv, bool tail, const float* gy, const float* const* w, const int32_t* rows, int64_t n,
                 const BsrProblem& p, int wn, float* gx, int out_n, int64_t t0, int64_t t1, bool stream) {
  if constexpr (NV > 1) {
    if (nv < NV) return gi_dispatch<NV - 1>(nv, tail, gy, w, rows, n, p, wn, gx, out_n, t0, t1, stream);
  }
  gi_group<NV>(tail, gy, w, rows, n, p, wn, gx, out_n, t0, t1, stream);
}

// ---- grad_input, column vectors (bw == 1) ----------------------------------------------------------------------
// Per block row, for L tokens: g[i] = grad_y[tokens][r*bh + i0 + i] as vectors over the tokens, held in registers
// (reused by every block of the row), then for each block of the row gxT[c] += sum_i w[i] * g[i] with w[i]
// broadcast. gxT is the item's [K][L] accumulator (grad_x transposed), acc splits the sum for latency. ni (<= RB)
// rows are valid: the rest of the block is padding past N, never read.
// kLoaded > 0: kLoaded more rows follow the RB in registers, all valid, their grad_y vectors loaded per block from gyt
// (in L1): a full block row of RB + kLoaded rows (16x1 on AVX2, 32x1 on AVX-512, kLoaded = RB) then takes one
// unrolled read-modify-write of each block's accumulator instead of one per RB rows: 1.08-1.27x on Zen 3 (16x1, 90%
// and 70%, M = 1024); the same with a runtime count of rows past RB ran 0.90-1.00x, so the count stays a constant.
template <int RB, int kLoaded = 0>
PYSPARSE_BWD_NOINLINE void gi_column_row(const float* gyt, int ni, const float* values, const int32_t* ids,
                                         const int32_t* cols, int64_t n, int64_t bh, float* gxt) {
  V g[RB];
  PYSPARSE_BWD_UNROLL for (int i = 0; i < RB; ++i) g[i] = i < ni ? Isa::load(gyt + i * L) : Isa::zero();
  const int64_t block = kLoaded > 0 ? RB + kLoaded : bh;  // a constant where the block row is full
  for (int64_t e = 0; e < n; ++e) {
    const float* w = values + int64_t(ids[e]) * block;
    float* o = gxt + int64_t(cols[e]) * L;
    V acc[4] = {Isa::load(o), Isa::zero(), Isa::zero(), Isa::zero()};
    if (kLoaded > 0 || ni == RB) {
      PYSPARSE_BWD_UNROLL for (int i = 0; i < RB; ++i) acc[i % 4] = Isa::fma(g[i], Isa::bcast(w + i), acc[i % 4]);
      PYSPARSE_BWD_UNROLL for (int i = RB; i < RB + kLoaded; ++i) {
        acc[i % 4] = Isa::fma(Isa::load(gyt + i * L), Isa::bcast(w + i), acc[i % 4]);
      }
    } else {
      for (int i = 0; i < ni; ++i) acc[0] = Isa::fma(Isa::load(gyt + i * L), Isa::bcast(w + i), acc[0]);
    }
    Isa::store(o, Isa::add(Isa::add(acc[0], acc[1]), Isa::add(acc[2], acc[3])));
  }
}

// dst[j * ldd + t] = src[t * lds + j] for the n columns of tn <= L rows, t < L (zero past tn): L x L tiles transposed
// by Isa::transpose, so both sides move whole vectors (a column walk would take a cache line per element).
void transpose_rows(const float* src, int64_t lds, int64_t n, int64_t tn, float* dst, int64_t ldd) {
  for (int64_t j0 = 0; j0 < n; j0 += L) {
    const int w = int(std::min<int64_t>(L, n - j0));
    V tile[L];
    for (int64_t t = 0; t < L; ++t) tile[t] = t < tn ? Isa::load_n(src + t * lds + j0, w) : Isa::zero();
    Isa::transpose(tile);
    for (int j = 0; j < w; ++j) Isa::store(dst + (j0 + j) * ldd, tile[j]);
  }
}

// The other way for a work item's result: dst[t * ldd + c] = src[c * L + t] for c < n, t < tn (src: [n][L], one
// vector of L tokens per column), an L x L tile at a time.
void store_columns_transposed(const float* src, int64_t n, int64_t tn, float* dst, int64_t ldd) {
  for (int64_t c0 = 0; c0 < n; c0 += L) {
    const int w = int(std::min<int64_t>(L, n - c0));
    V tile[L];
    for (int i = 0; i < L; ++i) tile[i] = i < w ? Isa::load(src + (c0 + i) * L) : Isa::zero();
    Isa::transpose(tile);
    for (int64_t t = 0; t < tn; ++t) {
      if (w == L) {
        Isa::store(dst + t * ldd + c0, tile[t]);
      } else {
        Isa::store_n(dst + t * ldd + c0, tile[t], w);
      }
    }
  }
}

// Work items are groups of L tokens (dynamic): each walks the block rows in order with its own grad_x^T accumulator
// and writes its tokens' rows of grad_x once at the end; no output is shared. The row order of the blocks is rebuilt
// from the column index (O(nnz), small next to the product).
void grad_input_columns(const float* gy, const float* values, const int32_t* col_ptr, const int32_t* entries,
                        float* gx, const BsrProblem& p, int num_threads) {
  constexpr int RB = Isa::kGiColumnRows;
  std::vector<int32_t> row_start(size_t(p.n_block_rows + 1), 0), ids(size_t(p.nnz)), cols(size_t(p.nnz));
  for (int64_t e = 0; e < p.nnz; ++e) ++row_start[size_t(entries[2 * e]) + 1];
  for (int64_t r = 0; r < p.n_block_rows; ++r) row_start[r + 1] += row_start[r];
  {
    std::vector<int32_t> next(row_start.begin(), row_start.end() - 1);
    for (int64_t c = 0; c < p.n_block_cols; ++c) {
      for (int32_t e = col_ptr[c]; e < col_ptr[c + 1]; ++e) {
        const int32_t slot = next[entries[2 * e]]++;
        ids[slot] = entries[2 * e + 1];
        cols[slot] = int32_t(c);
      }
    }
  }
  const int64_t n_groups = (p.M + L - 1) / L;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> gxt_buf, gyt_buf;
    float* const gxt = scratch(gxt_buf, size_t(p.K * L));
    float* const gyt = scratch(gyt_buf, size_t(p.N * L));
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < n_groups; ++item) {
      const int64_t t0 = item * L, tn = std::min<int64_t>(L, p.M - t0);
      std::fill(gxt, gxt + p.K * L, 0.0f);
      // grad_y's rows of the group, transposed: gyt[j][t] (tokens past tn are 0)
      transpose_rows(gy + t0 * p.N, p.N, p.N, tn, gyt, L);
      for (int64_t r = 0; r < p.n_block_rows; ++r) {
        const int64_t n = row_start[r + 1] - row_start[r], ih = std::min(p.bh, p.N - r * p.bh);
        if (n == 0) continue;
        if (p.bh == 2 * RB && ih == p.bh) {
          gi_column_row<RB, RB>(gyt + r * p.bh * L, int(ih), values, ids.data() + row_start[r],
                                cols.data() + row_start[r], n, p.bh, gxt);
          continue;
        }
        for (int64_t i0 = 0; i0 < ih; i0 += RB) {
          gi_column_row<RB>(gyt + (r * p.bh + i0) * L, int(std::min<int64_t>(RB, ih - i0)), values + i0,
                            ids.data() + row_start[r], cols.data() + row_start[r], n, p.bh, gxt);
        }
      }
      store_columns_transposed(gxt, p.K, tn, gx + t0 * p.K, p.K);
    }
  }
}

void grad_input(const float* gy, const float* values, bool transposed, const int32_t* col_ptr,
                const int32_t* entries, float* gx, const BsrProblem& p, int num_threads) {
  if (p.M == 0 || p.K == 0) return;
  if (p.bw == 1) return grad_input_columns(gy, values, col_ptr, entries, gx, p, num_threads);  // never transposed
  const int64_t bh = p.bh, bw = p.bw, block = bh * bw;
  const int64_t chunk =
      std::clamp<int64_t>(kGiChunkBytes / (std::max<int64_t>(p.N, 1) * int64_t(sizeof(float))) / 16 * 16, 64, 512);
  const int64_t n_chunks = (p.M + chunk - 1) / chunk;
  const int64_t n_items = n_chunks * p.n_block_cols;
  // A grad_x larger than the caches is written past them: the items write it in strips of a block column's width,
  // rows a row stride apart, and a normal store first reads each line in (3072->768, M = 1024, in a training step:
  // 4.8-5.5 ms with normal stores, 2.7-2.9 ms streaming).
  const bool stream = p.M * p.K * int64_t(sizeof(float)) > kStreamStoreBytes;
  // Block-transposed weights are made row-major once per call, shared by the items (a transpose per item repeated
  // it for every token chunk: 384->1536 and 768->3072 at 90%, M = 1024, ran 17-21% slower than row-major weights).
  std::vector<float> row_major_buf;
  float* const row_major = transposed ? scratch(row_major_buf, size_t(p.nnz * block)) : nullptr;
  const float* blocks = transposed ? row_major : values;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<const float*> w;  // per block of the column: its row-major data
    std::vector<int32_t> rows;
    if (transposed) {
#pragma omp for schedule(static)
      for (int64_t b = 0; b < p.nnz; ++b) {
        const float* src = values + b * block;
        float* dst = row_major + b * block;
        for (int64_t i = 0; i < bh; ++i) {
          for (int64_t j = 0; j < bw; ++j) dst[i * bw + j] = src[j * bh + i];
        }
      }  // implicit barrier: every block is row-major before any item reads one
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < n_items; ++item) {
      const int64_t c = item % p.n_block_cols;
      const int64_t t0 = (item / p.n_block_cols) * chunk, t1 = std::min(p.M, t0 + chunk);
      const int64_t c0 = c * bw, cw = std::min(bw, p.K - c0);  // grad_x columns of this block column
      const int64_t e0 = col_ptr[c], n = col_ptr[c + 1] - e0;
      if (n == 0) {
        for (int64_t t = t0; t < t1; ++t) std::fill(gx + t * p.K + c0, gx + t * p.K + c0 + cw, 0.0f);
        continue;
      }
      w.resize(n);
      rows.resize(n);
      for (int64_t e = 0; e < n; ++e) {
        rows[e] = entries[2 * (e0 + e)];
        w[e] = blocks + int64_t(entries[2 * (e0 + e) + 1]) * block;
      }
      constexpr int64_t G = Isa::kGiVecs * L;
      for (int64_t j0 = 0; j0 < cw; j0 += G) {
        const int wn = int(std::min(G, bw - j0));   // weight columns of the group inside the block
        const int out_n = int(std::min(G, cw - j0));  // of them, those inside grad_x
        if (j0 > 0) {
          for (auto& ptr : w) ptr += G;  // to this group's first column
        }
        gi_dispatch((wn + L - 1) / L, wn % L != 0, gy, w.data(), rows.data(), n, p, wn, gx + c0 + j0, out_n, t0, t1,
                    stream);
      }
    }
    if (stream) Isa::fence();  // streaming stores are weakly ordered: visible before the parallel region ends
  }
}

// ---- grad_values --------------------------------------------------------------------------------------------
// Writes (accumulate: adds) R rows x the first gw columns of a register tile to out (row stride ldo).
template <int R, int NV>
inline void gv_store(const V (&acc)[R][NV], float* out, int64_t ldo, int gw, bool accumulate) {
  PYSPARSE_BWD_UNROLL for (int r = 0; r < R; ++r) {
    PYSPARSE_BWD_UNROLL for (int v = 0; v < NV; ++v) {
      float* o = out + r * ldo + v * L;
      const int k = lanes(gw, v);
      if (k == L) {
        Isa::store(o, accumulate ? Isa::add(Isa::load(o), acc[r][v]) : acc[r][v]);
      } else if (k > 0) {
        Isa::store_n(o, accumulate ? Isa::add(Isa::load_n(o, k), acc[r][v]) : acc[r][v], k);
      }
    }
  }
}

// R rows x NV vectors: out[r][0 : gw] (+)= sum over nt tokens of a[t][r] * b[t][0 : bn], zero past bn. kTail: the
// loads are masked to bn columns (bn < NV*L); accumulate: add to what out holds (a later token chunk).
template <int R, int NV, bool kTail>
PYSPARSE_BWD_NOINLINE void gv_tile(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t nt, int bn,
                                   float* out, int64_t ldo, int gw, bool accumulate) {
  V acc[R][NV];
  PYSPARSE_BWD_UNROLL for (int r = 0; r < R; ++r) {
    PYSPARSE_BWD_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = Isa::zero();
  }
  for (int64_t t = 0; t < nt; ++t, a += lda, b += ldb) {
    V bv[NV];
    PYSPARSE_BWD_UNROLL for (int v = 0; v < NV; ++v) {
      bv[v] = kTail ? Isa::load_n(b + v * L, bn - v * L) : Isa::load(b + v * L);
    }
    PYSPARSE_BWD_UNROLL for (int r = 0; r < R; ++r) {
      const V s = Isa::bcast(a + r);
      PYSPARSE_BWD_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = Isa::fma(bv[v], s, acc[r][v]);
    }
  }
  gv_store<R, NV>(acc, out, ldo, gw, accumulate);
}

// Rows [0, na) of one column group: full tiles, then the rest in tiles of 4, 2, 1.
template <int NV, bool kTail>
void gv_rows(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t nt, int bn, float* out, int64_t ldo,
             int gw, bool accumulate, int64_t na) {
  constexpr int R = Isa::gv_rows(NV);
  int64_t r = 0;
  for (; r + R <= na; r += R) gv_tile<R, NV, kTail>(a + r, lda, b, ldb, nt, bn, out + r * ldo, ldo, gw, accumulate);
  if constexpr (R > 4) {
    for (; r + 4 <= na; r += 4) gv_tile<4, NV, kTail>(a + r, lda, b, ldb, nt, bn, out + r * ldo, ldo, gw, accumulate);
  }
  if constexpr (R > 2) {
    for (; r + 2 <= na; r += 2) gv_tile<2, NV, kTail>(a + r, lda, b, ldb, nt, bn, out + r * ldo, ldo, gw, accumulate);
  }
  for (; r < na; ++r) gv_tile<1, NV, kTail>(a + r, lda, b, ldb, nt, bn, out + r * ldo, ldo, gw, accumulate);
}

template <int NV = Isa::kGvVecs>
void gv_dispatch(int nv, bool tail, const float* a, int64_t lda, const float* b, int64_t ldb, int64_t nt, int bn,
                 float* out, int64_t ldo, int gw, bool accumulate, int64_t na) {
  if constexpr (NV > 1) {
    if (nv < NV) return gv_dispatch<NV - 1>(nv, tail, a, lda, b, ldb, nt, bn, out, ldo, gw, accumulate, na);
  }
  if (tail) {
    gv_rows<NV, true>(a, lda, b, ldb, nt, bn, out, ldo, gw, accumulate, na);
  } else {
    gv_rows<NV, false>(a, lda, b, ldb, nt, bn, out, ldo, gw, accumulate, na);
  }
}

// One block over the nt tokens of a chunk (a, b at its first token): out is the block's [na][nb] storage; rows past
// va and columns past vb are padding (written 0 by the first chunk, never read from a / b). accumulate: a later chunk.
void gv_block(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t nt, bool accumulate, float* out,
              int64_t na, int64_t nb, int64_t va, int64_t vb) {
  if (!accumulate && va < na) std::fill(out + va * nb, out + na * nb, 0.0f);
  constexpr int64_t G = Isa::kGvVecs * L;
  for (int64_t b0 = 0; b0 < nb; b0 += G) {
    const int gw = int(std::min(G, nb - b0));
    const int bn = int(std::max<int64_t>(0, std::min<int64_t>(gw, vb - b0)));
    if (bn == 0) {  // all padding
      if (!accumulate) {
        for (int64_t r = 0; r < va; ++r) std::fill(out + r * nb + b0, out + r * nb + b0 + gw, 0.0f);
      }
      continue;
    }
    const int nv = (gw + L - 1) / L;
    gv_dispatch(nv, bn < nv * L, a, lda, b + b0, ldb, nt, bn, out + b0, nb, gw, accumulate, va);
  }
}

// Column vectors (bw == 1): R blocks of one block row x NV vectors of its bh rows: out[r][0 : gw] (+)= sum over nt
// tokens of xa[r][t] * b[t][0 : bn] (xa[r]: block r's x column, contiguous over tokens; b: the block row's grad_y
// slab), zero past bn. The blocks of a block row are consecutive in storage, so block r's gradient is out + r * ldo.
template <int R, int NV, bool kTail>
PYSPARSE_BWD_NOINLINE void gv_column_tile(const float* const* xa, const float* b, int64_t ldb, int64_t nt, int bn,
                                          float* out, int64_t ldo, int gw, bool accumulate) {
  V acc[R][NV];
  PYSPARSE_BWD_UNROLL for (int r = 0; r < R; ++r) {
    PYSPARSE_BWD_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = Isa::zero();
  }
  for (int64_t t = 0; t < nt; ++t, b += ldb) {
    V bv[NV];
    PYSPARSE_BWD_UNROLL for (int v = 0; v < NV; ++v) {
      bv[v] = kTail ? Isa::load_n(b + v * L, bn - v * L) : Isa::load(b + v * L);
    }
    PYSPARSE_BWD_UNROLL for (int r = 0; r < R; ++r) {
      const V s = Isa::bcast(xa[r] + t);
      PYSPARSE_BWD_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = Isa::fma(bv[v], s, acc[r][v]);
    }
  }
  gv_store<R, NV>(acc, out, ldo, gw, accumulate);
}

// The n blocks of one block row in tiles of R (at most 8: one general register per block's x pointer), then 4, 2, 1.
template <int NV, bool kTail>
void gv_column_blocks(const float* const* xa, int64_t n, const float* b, int64_t ldb, int64_t nt, int bn, float* out,
                      int64_t ldo, int gw, bool accumulate) {
  constexpr int R = std::min(8, Isa::gv_rows(NV));
  int64_t r = 0;
  for (; r + R <= n; r += R) gv_column_tile<R, NV, kTail>(xa + r, b, ldb, nt, bn, out + r * ldo, ldo, gw, accumulate);
  if constexpr (R > 4) {
    for (; r + 4 <= n; r += 4) gv_column_tile<4, NV, kTail>(xa + r, b, ldb, nt, bn, out + r * ldo, ldo, gw, accumulate);
  }
  if constexpr (R > 2) {
    for (; r + 2 <= n; r += 2) gv_column_tile<2, NV, kTail>(xa + r, b, ldb, nt, bn, out + r * ldo, ldo, gw, accumulate);
  }
  for (; r < n; ++r) gv_column_tile<1, NV, kTail>(xa + r, b, ldb, nt, bn, out + r * ldo, ldo, gw, accumulate);
}

template <int NV = Isa::kGvVecs>
void gv_column_dispatch(int nv, bool tail, const float* const* xa, int64_t n, const float* b, int64_t ldb, int64_t nt,
                        int bn, float* out, int64_t ldo, int gw, bool accumulate) {
  if constexpr (NV > 1) {
    if (nv < NV) return gv_column_dispatch<NV - 1>(nv, tail, xa, n, b, ldb, nt, bn, out, ldo, gw, accumulate);
  }
  if (tail) {
    gv_column_blocks<NV, true>(xa, n, b, ldb, nt, bn, out, ldo, gw, accumulate);
  } else {
    gv_column_blocks<NV, false>(xa, n, b, ldb, nt, bn, out, ldo, gw, accumulate);
  }
}

// All n blocks of a block row of column vectors over the nt tokens of a chunk: out is their [n][bh] storage, xa
// their x columns, b the row's grad_y slab ([nt][bh]); rows of the block past vr are padding (written 0).
void gv_column_row(const float* const* xa, int64_t n, const float* b, int64_t nt, bool accumulate, float* out,
                   int64_t bh, int64_t vr) {
  constexpr int64_t G = Isa::kGvVecs * L;
  for (int64_t b0 = 0; b0 < bh; b0 += G) {
    const int gw = int(std::min(G, bh - b0));
    const int bn = int(std::max<int64_t>(0, std::min<int64_t>(gw, vr - b0)));
    const int nv = (gw + L - 1) / L;
    // bn == 0 (all padding) runs too: masked loads of nothing, zeros written
    gv_column_dispatch(nv, bn < nv * L, xa, n, b + b0, bh, nt, bn, out + b0, bh, gw, accumulate);
  }
}

// Copies rows [0, nt) x columns [0, n) of src (row stride ld) to dst with row stride w: a chunk of one block row's
// (or block column's) slice, made contiguous so the tiles stream it with unit stride (no page per token).
void pack_slab(const float* src, int64_t ld, int64_t nt, int64_t n, int64_t w, float* dst) {
  for (int64_t t = 0; t < nt; ++t) std::copy(src + t * ld, src + t * ld + n, dst + t * w);
}

// out[0 : n] += the column sums of rows [0, nt) of src (row stride ld): one chunk of tokens summed in registers, then
// added (two levels, so float32 keeps about the precision of torch's cascaded sum).
void add_column_sums(const float* src, int64_t ld, int64_t nt, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i += L) {
    const int k = int(std::min<int64_t>(L, n - i));
    V s = Isa::zero();
    for (int64_t t = 0; t < nt; ++t) s = Isa::add(s, Isa::load_n(src + t * ld + i, k));
    Isa::store_n(out + i, Isa::add(Isa::load_n(out + i, k), s), k);
  }
}

void grad_values(const float* gy, const float* x, const int32_t* crow, const int32_t* col, bool transposed,
                 float* gv, const BsrProblem& p, int num_threads, float* gbias) {
  const int64_t bh = p.bh, bw = p.bw, block = bh * bw;
  if (gbias != nullptr) std::fill(gbias, gbias + p.N, 0.0f);
  if (p.nnz == 0 && gbias == nullptr) return;
  if (p.M == 0) {
    std::fill(gv, gv + p.nnz * block, 0.0f);
    return;
  }
  const int64_t chunk = bw == 1 ? kGvChunkColumns : kGvChunk;
  // x's chunk, one contiguous [chunk][bw] slab per block column, shared by the threads.
  std::vector<float> x_slabs_buf;
  float* const x_slabs = scratch(x_slabs_buf, size_t(p.n_block_cols * chunk * bw));
#pragma omp parallel num_threads(num_threads)
  {
    // This thread's block rows: those whose first block falls in its equal share of the nonzero blocks.
    const int64_t nt = omp_get_num_threads(), me = omp_get_thread_num();
    const int32_t* end = crow + p.n_block_rows + 1;
    const int64_t r_begin = me == 0 ? 0 : std::lower_bound(crow, end, int32_t(p.nnz * me / nt)) - crow;
    // The last thread also takes trailing rows without blocks (their bias gradient).
    const int64_t r_end =
        me == nt - 1 ? p.n_block_rows : std::lower_bound(crow, end, int32_t(p.nnz * (me + 1) / nt)) - crow;
    std::vector<float> gy_slab_buf;
    float* const gy_slab = scratch(gy_slab_buf, size_t(chunk * bh));
    std::vector<const float*> xa;  // column vectors: the x column of each block of the row
    for (int64_t t0 = 0; t0 < p.M; t0 += chunk) {
      const int64_t tn = std::min(chunk, p.M - t0);
      if (bw == 1) {  // each slab is one column of x over the chunk: transposed L tokens at a time
#pragma omp for schedule(static)
        for (int64_t g = 0; g < tn; g += L) {
          transpose_rows(x + (t0 + g) * p.ldx, p.ldx, p.K, std::min<int64_t>(L, tn - g), x_slabs + g, chunk);
        }
      } else {
#pragma omp for schedule(static)
        for (int64_t c = 0; c < p.n_block_cols; ++c) {
          pack_slab(x + t0 * p.ldx + c * bw, p.ldx, tn, std::min(bw, p.K - c * bw), bw,
                    x_slabs + c * chunk * bw);
        }
      }  // implicit barrier: every slab is packed
      for (int64_t r = r_begin; r < r_end; ++r) {
        const int64_t vr = std::min(bh, p.N - r * bh);  // rows of the block row inside grad_y
        if (crow[r] == crow[r + 1]) {
          if (gbias != nullptr) add_column_sums(gy + t0 * p.N + r * bh, p.N, tn, vr, gbias + r * bh);
          continue;
        }
        pack_slab(gy + t0 * p.N + r * bh, p.N, tn, vr, bh, gy_slab);
        if (gbias != nullptr) add_column_sums(gy_slab, bh, tn, vr, gbias + r * bh);
        if (bw == 1) {  // column vectors: never block-transposed
          xa.clear();
          for (int64_t blk = crow[r]; blk < crow[r + 1]; ++blk) xa.push_back(x_slabs + col[blk] * chunk);
          gv_column_row(xa.data(), int64_t(xa.size()), gy_slab, tn, t0 > 0, gv + crow[r] * bh, bh, vr);
          continue;
        }
        for (int64_t blk = crow[r]; blk < crow[r + 1]; ++blk) {
          const int64_t c = col[blk], vc = std::min(bw, p.K - c * bw);
          const float* xs = x_slabs + c * chunk * bw;
          float* out = gv + blk * block;
          if (transposed) {
            gv_block(xs, bw, gy_slab, bh, tn, t0 > 0, out, bw, bh, vc, vr);
          } else {
            gv_block(gy_slab, bh, xs, bw, tn, t0 > 0, out, bh, bw, vr, vc);
          }
        }
      }
#pragma omp barrier  // the next chunk's packing overwrites the slabs
    }
  }
}

#undef PYSPARSE_BWD_NOINLINE
#undef PYSPARSE_BWD_UNROLL
#undef PYSPARSE_BWD_PRAGMA
