// AVX2 + FMA path of the unstructured kernels: 8 floats per vector, 16 vector registers. Function-level target
// attributes as in bsr_linear_avx2.cpp: the library still loads on CPUs without AVX2.
#include "unstructured_linear_isa.h"

#include "avx2_reduce.h"

#if PYSPARSE_X86
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace pysparse {
namespace avx2 {
namespace {

#include "simd_activation.inc"  // activate8: the fused epilogue of store_transposed

struct Isa {
  using V = __m256;
  static constexpr int64_t L = 8;
  // Tiles of 8 vectors (64 tokens: 8 independent multiply-add chains per entry, a 128-column block of x 32 KB) on
  // 128-wide column blocks, of 4 (32 tokens) on wider ones, whose x would not stay in L1 at 64 (AMD Zen 3, 2 threads,
  // one binary alternating the variants, 4 FFN shapes and MiniLM's 384x384 / 384x1152: 64 tokens on 128 columns ran
  // 1.04-1.17x the 32 tokens on 256 columns at 50-70% sparsity from 64 tokens on, but 64 tokens on 256 columns
  // 0.8-0.9x; BENCHMARKS.md). Between one and two 64-token tiles per thread the halves would be unequal: 32 tokens.
  static constexpr int kMaxVecs = 8;
  static int64_t tile_vecs(const UnstructuredProblem& p, int num_threads) {
    const bool wide = p.block_cols == kUnstructuredBlockCols && (p.M <= 64 || p.M >= 64 * int64_t(num_threads));
    return wide ? 8 : 4;
  }
  // grad_values: 32-token tiles, 8 entries reduced together (4 + 8 accumulators + a load fit the 16 registers).
  static constexpr int kGradValuesVecs = 4;
  static constexpr int kSumGroup = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float f) { return _mm256_set1_ps(f); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }

  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static float hsum(V v) { return hsum8(v); }

  // out[e] (+)= the sum of acc[e]'s lanes, e < 8.
  static void add_sums(const V* acc, float* out, bool first) {
    const __m256 sums = hsum8x8(acc);
    _mm256_storeu_ps(out, first ? sums : _mm256_add_ps(_mm256_loadu_ps(out), sums));
  }

  static void fence() {}  // no streaming stores on this path (store_transposed ignores `stream`)
  static void store_transposed(const float* yT, int64_t ld_t, int64_t rows, int64_t tokens, float* y, int64_t ldy,
                               const float* res, Activation act, bool) {
    __m256 r[8];
    const bool plain = res == nullptr && act == Activation::kNone;
    if (rows == 8 && tokens == 8 && plain) {  // whole tiles (all but a ragged edge): no masks, no branches
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(yT + i * ld_t);
      transpose8x8(r);
      for (int t = 0; t < 8; ++t) _mm256_storeu_ps(y + t * ldy, r[t]);
      return;
    }
    for (int i = 0; i < 8; ++i) r[i] = i < rows ? _mm256_loadu_ps(yT + i * ld_t) : _mm256_setzero_ps();
    transpose8x8(r);
    const __m256i keep = first_lanes(rows);
    for (int64_t t = 0; t < tokens; ++t) {
      __m256 v = r[t];
      if (!plain) {  // the epilogue in registers: activation(sum + residual)
        if (res != nullptr) v = _mm256_add_ps(v, _mm256_maskload_ps(res + t * ldy, keep));
        v = activate8(v, act);
      }
      _mm256_maskstore_ps(y + t * ldy, keep, v);
    }
  }

  static void pack_tile(const float* x, int64_t ldx, int64_t tokens, int64_t kn, float* dst, int64_t width) {
    const __m256i cols = first_lanes(kn);
    for (int64_t t0 = 0; t0 < width; t0 += 8) {
      __m256 r[8];
      for (int64_t i = 0; i < 8; ++i) {
        r[i] = t0 + i < tokens ? _mm256_maskload_ps(x + (t0 + i) * ldx, cols) : _mm256_setzero_ps();
      }
      transpose8x8(r);
      for (int64_t k = 0; k < kn; ++k) _mm256_storeu_ps(dst + k * width + t0, r[k]);
    }
  }

  // Lanes whose column is outside [first, last] are neither gathered nor added; false when there is one.
  static bool gather_row(const float* xrow, const float* values, const int32_t* columns, int64_t begin, int64_t end,
                         int32_t first, int32_t last, V& acc) {
    const __m256i lo = _mm256_set1_epi32(first - 1), hi = _mm256_set1_epi32(last + 1);
    __m256i bad = _mm256_setzero_si256();
    // in: lo < idx < hi; out-of-block lanes fold into `bad`.
    const auto inside = [&](__m256i idx, __m256i lanes) {
      const __m256i in = _mm256_and_si256(_mm256_cmpgt_epi32(idx, lo), _mm256_cmpgt_epi32(hi, idx));
      bad = _mm256_or_si256(bad, _mm256_andnot_si256(in, lanes));
      return _mm256_and_si256(in, lanes);
    };
    const __m256i all = _mm256_set1_epi32(-1);
    int64_t i = begin;
    for (; i + 8 <= end; i += 8) {
      const __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(columns + i));
      const __m256 xv = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), xrow, idx,
                                                 _mm256_castsi256_ps(inside(idx, all)), 4);
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(values + i), xv, acc);
    }
    if (i < end) {
      const __m256i m = first_lanes(end - i);
      const __m256i idx = _mm256_maskload_epi32(columns + i, m);
      const __m256 xv = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), xrow, idx, _mm256_castsi256_ps(inside(idx, m)),
                                                 4);
      acc = _mm256_fmadd_ps(_mm256_maskload_ps(values + i, m), xv, acc);
    }
    return _mm256_testz_si256(bad, bad);
  }
};

#define PYSPARSE_UNSTRUCTURED_GATHERS 1
#include "unstructured_linear_kernels.inc"
#undef PYSPARSE_UNSTRUCTURED_GATHERS

}  // namespace

bool unstructured_linear(const float* x, const float* values, const int32_t* columns, const int32_t* segment_ptr,
                         const float* bias, float* y, const UnstructuredProblem& p, int num_threads) {
  return linear_impl(x, values, columns, segment_ptr, bias, y, p, num_threads, kUnstructuredGatherTokensAvx2);
}

bool unstructured_linear_gathers(const float* x, const float* values, const int32_t* columns,
                                 const int32_t* segment_ptr, const float* bias, float* y, const UnstructuredProblem& p,
                                 int num_threads) {
  return linear_impl(x, values, columns, segment_ptr, bias, y, p, num_threads, kUnstructuredGatherTokens);
}

void unstructured_linear_grad_values(const float* grad_y, const float* x, const int32_t* columns,
                                     const int32_t* segment_ptr, float* grad_values, const UnstructuredProblem& p,
                                     int num_threads) {
  grad_values_impl(grad_y, x, columns, segment_ptr, grad_values, p, num_threads);
}

}  // namespace avx2
}  // namespace pysparse

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // PYSPARSE_X86
