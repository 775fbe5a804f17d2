// AMX path for bfloat16 blocks (Intel Sapphire Rapids and later), forward: tdpbf16ps multiplies a 16 x 32 bf16 tile
// by a 32 x 16 one into a 16 x 16 float32 tile, 16 times the products per instruction of an AVX-512 FMA. Compiled
// with function-level target attributes like the AVX-512 path; dispatch.cpp calls it only where cpuid reports
// AMX-TILE, AMX-BF16 and AVX512-BF16 and the OS granted this process the tile state (usable below).
//
// y[M, N] = x[M, K] @ W^T: a tile row is a token, so x is read in place as the A operand (16 tokens x 32 input
// columns, row stride ldx) and y comes out token-major. The B operand wants the block in VNNI order (pairs of input
// columns per output: [k/2][n][2]), repacked once per call over the kept blocks (as many bytes as the weights: small
// against the products at the token counts this path takes). Threads and tiles: run_sparse_gemm (amx_tiles.inc).
#include "isa_kernels.h"

#if PYSPARSE_X86
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

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

// Position b's sub-tile (k chunk kci, 16-output half h) in VNNI order: 16-bit pairs of input columns per output. A
// row-major block row already holds each output's pairs contiguously, so this is a 16 x 16 transpose of 32-bit words
// (kc = 16: 16 x 8, the upper lanes zero).
void pack_forward(const bfloat16_t* values, int64_t b, int64_t bh, int64_t bw, int kc, uint16_t* packed) {
  const int64_t nkc = bw / kc, nh = bh / 16;
  const auto* block = reinterpret_cast<const uint16_t*>(values) + b * bh * bw;
  const __mmask16 words = __mmask16((1u << (kc / 2)) - 1);
  for (int64_t kci = 0; kci < nkc; ++kci) {
    for (int64_t h = 0; h < nh; ++h) {
      uint16_t* dst = packed + ((b * nkc + kci) * nh + h) * kc * 16;
      __m512i r[16];
      for (int n = 0; n < 16; ++n) r[n] = _mm512_maskz_loadu_epi32(words, block + (h * 16 + n) * bw + kci * kc);
      transpose16x16(r);
      for (int i = 0; i < kc / 2; ++i) _mm512_storeu_si512(dst + i * 32, r[i]);
    }
  }
}

}  // namespace

bool usable() {
#if defined(__linux__)
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = (d >> 24) & 1, bf16 = (d >> 22) & 1;
  if (!tile || !bf16) return false;
  // Linux grants the 8 KiB tile state per process on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); without it
  // the first tile instruction faults.
  constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
#else
  return false;
#endif
}

bool applies(const BsrProblem& p) {
  return p.bh % 16 == 0 && p.bw % 16 == 0 && p.K % p.bw == 0;
}

void bsr_linear(const bfloat16_t* x, const bfloat16_t* values, const int32_t* crow, const int32_t* col,
                const bfloat16_t* bias, bfloat16_t* y, const BsrProblem& p, int num_threads) {
  if (p.M == 0 || p.N == 0) return;
  SparseGemm g;
  g.a = reinterpret_cast<const uint16_t*>(x), g.lda = p.ldx, g.M = p.M, g.a_cols = p.K;
  g.ptr = crow, g.a_block = col, g.a_block_stride = 1;
  g.a_width = p.bw, g.out_width = p.bh, g.n_out_blocks = p.n_block_rows, g.n_out = p.N;
  g.kc = p.bw % 32 == 0 ? 32 : 16;
  static thread_local std::vector<uint16_t> packed_buf;
  uint16_t* packed = scratch(packed_buf, size_t(p.nnz * p.bh * p.bw));
  g.packed = packed;
  const auto* residual = static_cast<const bfloat16_t*>(p.residual);
  run_sparse_gemm(
      g, p.nnz, num_threads, [&](int64_t b) { pack_forward(values, b, p.bh, p.bw, g.kc, packed); },
      [&](int64_t t0) {
        return Epilogue{y + t0 * p.N, p.N, bias, residual ? residual + t0 * p.N : nullptr, p.act};
      });
}

}  // namespace amx
}  // namespace pysparse

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // PYSPARSE_X86
