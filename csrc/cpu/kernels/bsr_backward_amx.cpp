// AMX path for bfloat16 blocks, backward (see bsr_linear_amx.cpp for the forward and the tile operation):
//
//  * grad_x[M, K] = grad_y[M, N] @ W: the forward's token-major sparse GEMM (run_sparse_gemm) with W's block columns
//    as out-blocks, walked through the column index (bsr_column_index): grad_y is the A operand in place, and each
//    kept block is packed transposed in VNNI order (pairs of W's rows per input column). Each work item owns its
//    grad_x columns; no atomics.
//  * grad_values[b] = grad_y[:, rows(b)]^T @ x[:, cols(b)] over the M tokens: here the reduced dimension is the
//    tokens, so both operands are laid out once per call: the narrower of grad_y and x transposed ([features][Mp],
//    the A operand: 16 features x 32 tokens), the other with token pairs interleaved ([Mp/2][features][2], the B
//    operand's VNNI order), Mp = M rounded up to 32 with zero tokens. Work items are block rows, handed out
//    dynamically; each block belongs to one thread. Accumulation is float32 over all M; one rounding to bfloat16.
#include "bsr_backward_isa.h"

#if PYSPARSE_X86
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC bug 105593 (see bsr_linear_avx512.cpp)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#if defined(__clang__)
#pragma clang attribute push(                                                                                      \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,amx-tile,amx-bf16"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,amx-tile,amx-bf16")
#endif

namespace pysparse {
namespace amx {
namespace {

#include "amx_tiles.inc"

// Bytes of grad_values' two token layouts per chunk of tokens (see bsr_grad_values).
constexpr int64_t kRelayoutBytes = int64_t(2) << 20;

// Interleaves the 16-bit lanes of a (lanes 0-15) and b: a0 b0 a1 b1 ... a15 b15.
__m512i interleave16(__m256i a, __m256i b) {
  const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                       5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  return _mm512_permutex2var_epi16(_mm512_castsi256_si512(a), idx, _mm512_castsi256_si512(b));
}

// W's element (i, j) of block b, in either layout.
uint16_t weight_at(const uint16_t* v, bool transposed, int64_t b, int64_t bh, int64_t bw, int64_t i, int64_t j) {
  return v[b * bh * bw + (transposed ? j * bh + i : i * bw + j)];
}

// Column-index position e (block id `b`) for grad_input: sub-tile (k chunk kci over W's rows, 16-column half h of
// W's columns) in VNNI order, pairs of W's rows per column: dst[i'][j][s] = W[kci*kc + 2i' + s][h*16 + j].
void pack_grad_input(const uint16_t* v, bool transposed, int64_t e, int64_t b, int64_t bh, int64_t bw, int kc,
                     uint16_t* packed) {
  const int64_t nkc = bh / kc, nh = bw / 16;
  for (int64_t kci = 0; kci < nkc; ++kci) {
    for (int64_t h = 0; h < nh; ++h) {
      uint16_t* dst = packed + ((e * nkc + kci) * nh + h) * kc * 16;
      for (int i = 0; i < kc / 2; ++i) {
        if (transposed) {  // rare in bfloat16: SparseLinear keeps row-major blocks on this path
          for (int j = 0; j < 16; ++j) {
            dst[(i * 16 + j) * 2] = weight_at(v, transposed, b, bh, bw, kci * kc + 2 * i, h * 16 + j);
            dst[(i * 16 + j) * 2 + 1] = weight_at(v, transposed, b, bh, bw, kci * kc + 2 * i + 1, h * 16 + j);
          }
        } else {  // rows 2i and 2i + 1 of the block, 16 columns each, interleaved
          const uint16_t* row = v + b * bh * bw + (kci * kc + 2 * i) * bw + h * 16;
          const __m256i r0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
          const __m256i r1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + bw));
          _mm512_storeu_si512(dst + i * 32, interleave16(r0, r1));
        }
      }
    }
  }
}

// Row t of a [M][ld] bf16 matrix, 16 columns from n0, or zeros past M.
__m256i row16(const uint16_t* a, int64_t ld, int64_t M, int64_t t, int64_t n0) {
  return t < M ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + t * ld + n0)) : _mm256_setzero_si256();
}

// at[n][t] = a[t][n] for t < Mp (zero past M); N a multiple of 16, Mp of 32. Each step interleaves token pairs
// (a 32-bit lane holds tokens 2t', 2t'+1 of one column) and transposes 16 x 16 lanes: 32 tokens x 16 columns.
// Called inside a parallel region: the team shares the steps.
void transpose_tokens(const uint16_t* a, int64_t ld, int64_t M, int64_t N, int64_t Mp, uint16_t* at) {
#pragma omp for schedule(static) collapse(2)
  for (int64_t t0 = 0; t0 < Mp; t0 += 32) {
    for (int64_t n0 = 0; n0 < N; n0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        r[i] = interleave16(row16(a, ld, M, t0 + 2 * i, n0), row16(a, ld, M, t0 + 2 * i + 1, n0));
      }
      transpose16x16(r);
      for (int j = 0; j < 16; ++j) _mm512_storeu_si512(at + (n0 + j) * Mp + t0, r[j]);
    }
  }
}

// xp[t'][k][s] = x[2t' + s][k] (zero past M): the B operand of grad_values, 16 token pairs x 16 columns per tile row
// group. K a multiple of 16. Called inside a parallel region, as transpose_tokens.
void pair_tokens(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, int64_t Mp, uint16_t* xp) {
#pragma omp for schedule(static)
  for (int64_t tp = 0; tp < Mp / 2; ++tp) {
    for (int64_t k0 = 0; k0 < K; k0 += 16) {
      const __m512i v = interleave16(row16(x, ldx, M, 2 * tp, k0), row16(x, ldx, M, 2 * tp + 1, k0));
      _mm512_storeu_si512(xp + (tp * K + k0) * 2, v);
    }
  }
}

// The accumulator tiles back from memory (store_accumulators' layout): grad_values' sums carried between chunks.
void load_accumulators(const float* acc) {
  _tile_loadd(0, acc, kPassOutputs * 4);
  _tile_loadd(1, acc + 16, kPassOutputs * 4);
  _tile_loadd(2, acc + 16 * kPassOutputs, kPassOutputs * 4);
  _tile_loadd(3, acc + 16 * kPassOutputs + 16, kPassOutputs * 4);
}

// dst[v][u] = src[u][v] for a 32 x 32 float tile (rows of kPassOutputs), by 16 x 16 quarters.
void transpose32(const float* src, float* dst) {
  for (int uq = 0; uq < 2; ++uq) {
    for (int vq = 0; vq < 2; ++vq) {
      __m512i r[16];
      for (int k = 0; k < 16; ++k) r[k] = _mm512_load_si512(src + (uq * 16 + k) * kPassOutputs + vq * 16);
      transpose16x16(r);
      for (int k = 0; k < 16; ++k) _mm512_store_si512(dst + (vq * 16 + k) * kPassOutputs + uq * 16, r[k]);
    }
  }
}

}  // namespace

bool backward_applies(const BsrProblem& p) {
  return p.bh % 16 == 0 && p.bw % 16 == 0 && p.K % p.bw == 0 && p.N % p.bh == 0;
}

void bsr_grad_input(const bfloat16_t* grad_y, const bfloat16_t* values, bool transposed, const int32_t* col_ptr,
                    const int32_t* entries, bfloat16_t* grad_x, const BsrProblem& p, int num_threads) {
  if (p.M == 0 || p.K == 0) return;
  SparseGemm g;
  g.a = reinterpret_cast<const uint16_t*>(grad_y), g.lda = p.N, g.M = p.M, g.a_cols = p.N;
  g.ptr = col_ptr, g.a_block = entries, g.a_block_stride = 2;  // entries[e] = (block row, block id)
  g.a_width = p.bh, g.out_width = p.bw, g.n_out_blocks = p.n_block_cols, g.n_out = p.K;
  g.kc = p.bh % 32 == 0 ? 32 : 16;
  static thread_local std::vector<uint16_t> packed_buf;
  uint16_t* packed = scratch(packed_buf, size_t(p.nnz * p.bh * p.bw));
  g.packed = packed;
  const auto* v = reinterpret_cast<const uint16_t*>(values);
  run_sparse_gemm(
      g, p.nnz, num_threads,
      [&](int64_t e) { pack_grad_input(v, transposed, e, entries[2 * e + 1], p.bh, p.bw, g.kc, packed); },
      [&](int64_t t0) { return Epilogue{grad_x + t0 * p.K, p.K}; });
}

void bsr_grad_values(const bfloat16_t* grad_y, const bfloat16_t* x, const int32_t* crow, const int32_t* col,
                     bool transposed, bfloat16_t* grad_values, const BsrProblem& p, int num_threads) {
  if (p.nnz == 0) return;
  if (p.M == 0) {
    std::memset(static_cast<void*>(grad_values), 0, sizeof(bfloat16_t) * size_t(p.nnz * p.bh * p.bw));
    return;
  }
  // The tiles compute C[u][v] = sum_t A[u][t] B[t][v]: the operand on the u side is transposed ([features][tokens]),
  // the other gets its token pairs interleaved. Transposing is the costlier layout, so it goes to the narrower of
  // grad_y (u = the block's rows i) and x (u = its columns j).
  const bool a_is_grad = p.N <= p.K;
  const auto* gy16 = reinterpret_cast<const uint16_t*>(grad_y);
  const auto* x16 = reinterpret_cast<const uint16_t*>(x);
  const uint16_t* a_src = a_is_grad ? gy16 : x16;
  const uint16_t* b_src = a_is_grad ? x16 : gy16;
  const int64_t a_ld = a_is_grad ? p.N : p.ldx, b_ld = a_is_grad ? p.ldx : p.N;
  const int64_t a_cols = a_is_grad ? p.N : p.K, b_cols = a_is_grad ? p.K : p.N;
  const int64_t u_size = a_is_grad ? p.bh : p.bw, v_size = a_is_grad ? p.bw : p.bh;
  const int64_t nu = (u_size + 31) / 32, nv = (v_size + 31) / 32;
  // Tokens go in chunks whose two layouts together stay near kRelayoutBytes, so they are read back from cache, not
  // memory (768->3072 at M = 4096: 30 MB in one piece); between chunks each block's float32 sums wait in `partial`.
  const int64_t Mp = (p.M + kGroupTokens - 1) / kGroupTokens * kGroupTokens;
  const int64_t Mc = std::min(Mp, std::max<int64_t>(kGroupTokens, kRelayoutBytes / (2 * (a_cols + b_cols)) /
                                                                      kGroupTokens * kGroupTokens));
  const int64_t chunks = (Mp + Mc - 1) / Mc;
  static thread_local std::vector<uint16_t> at_buf, bp_buf;
  static thread_local std::vector<float> partial_buf;
  uint16_t* at = scratch(at_buf, size_t(a_cols * Mc));
  uint16_t* bp = scratch(bp_buf, size_t(Mc * b_cols));
  float* partial = chunks > 1 ? scratch(partial_buf, size_t(p.nnz * nu * nv * kGroupTokens * kPassOutputs)) : nullptr;
  // The block's storage: rows of `row_len` contiguous elements along j (row-major) or i (block-transposed). Where that
  // is the v side, acc's rows are stored as they are; otherwise acc is transposed first.
  const int64_t row_len = transposed ? p.bh : p.bw;
  const bool v_contiguous = a_is_grad != transposed;

#pragma omp parallel num_threads(std::max(num_threads, 1))
  {
    configure_tiles(32);
    alignas(64) float acc[kGroupTokens * kPassOutputs], acc_t[kGroupTokens * kPassOutputs];
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t t0 = c * Mc, mc = std::min(Mc, Mp - t0), rows = std::min(mc, p.M - t0);
      transpose_tokens(a_src + t0 * a_ld, a_ld, rows, a_cols, mc, at);  // each ends with the team's barrier
      pair_tokens(b_src + t0 * b_ld, b_ld, rows, b_cols, mc, bp);
      const bool first = c == 0, last = c + 1 == chunks;
#pragma omp for schedule(dynamic, 1)
      for (int64_t r = 0; r < p.n_block_rows; ++r) {
        for (int64_t b = crow[r]; b < crow[r + 1]; ++b) {
          const int64_t a_base = a_is_grad ? r * p.bh : int64_t(col[b]) * p.bw;
          const int64_t b_base = a_is_grad ? int64_t(col[b]) * p.bw : r * p.bh;
          for (int64_t u0 = 0; u0 < u_size; u0 += 32) {
            for (int64_t v0 = 0; v0 < v_size; v0 += 32) {
              const bool two_u = u_size - u0 > 16, two_v = v_size - v0 > 16;
              float* part = partial ? partial + ((b * nu + u0 / 32) * nv + v0 / 32) * kGroupTokens * kPassOutputs
                                    : nullptr;
              if (first) {
                zero_accumulators();
              } else {
                load_accumulators(part);
              }
              const uint16_t* a = at + (a_base + u0) * mc;
              const uint16_t* bq = bp + (b_base + v0) * 2;
              for (int64_t t = 0; t < mc; t += kGroupTokens) {
                const uint16_t* bt = bq + t / 2 * b_cols * 2;
                _tile_loadd(4, a + t, mc * 2);
                _tile_loadd(6, bt, b_cols * 4);
                _tile_dpbf16ps(0, 4, 6);
                if (two_v) {
                  _tile_loadd(7, bt + 32, b_cols * 4);
                  _tile_dpbf16ps(1, 4, 7);
                }
                if (two_u) {
                  _tile_loadd(5, a + 16 * mc + t, mc * 2);
                  _tile_dpbf16ps(2, 5, 6);
                  if (two_v) _tile_dpbf16ps(3, 5, 7);
                }
              }
              if (!last) {
                store_accumulators(part);
                continue;
              }
              store_accumulators(acc);
              const int64_t us = std::min<int64_t>(32, u_size - u0), vs = std::min<int64_t>(32, v_size - v0);
              bfloat16_t* gv = grad_values + b * p.bh * p.bw;
              if (v_contiguous) {
                store_outputs(acc, us, vs, Epilogue{gv + u0 * row_len + v0, row_len});
              } else {
                transpose32(acc, acc_t);
                store_outputs(acc_t, vs, us, Epilogue{gv + v0 * row_len + u0, row_len});
              }
            }
          }
        }
      }
    }
    _tile_release();
  }
}

}  // namespace amx
}  // namespace pysparse

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // PYSPARSE_X86
