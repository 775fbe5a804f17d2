// AVX-512 path of the unstructured kernels (F, VL): 16 floats per vector, 32 vector registers. Function-level target
// attributes as in bsr_linear_avx512.cpp: the library still loads on CPUs without AVX-512.
#include "unstructured_linear_isa.h"

#include "avx2_reduce.h"
#include "avx512_transpose.h"

#if PYSPARSE_X86
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's AVX-512 intrinsics trip its own -Wuninitialized on _mm512_undefined_* (GCC bug 105593, fixed in 13).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx2,fma")
#endif

namespace pysparse {
namespace avx512 {
namespace {

#include "simd_activation.inc"  // activate8: the fused epilogue of store_transposed

struct Isa {
  using V = __m512;
  static constexpr int64_t L = 16;
  // 4 vectors: 64 tokens per tile, one column block of it 32 KB (L1). Each nonzero costs a broadcast, its column and
  // 4 x loads + multiply-adds; the next row's independent chain overlaps a row's latency.
  static constexpr int kMaxVecs = 4;
  static int64_t tile_vecs(const UnstructuredProblem&, int) { return kMaxVecs; }
  // grad_values: 128-token tiles (8 vectors of grad_y^T in registers, 8 accumulators): each entry's lane reduction
  // spread over twice the multiply-adds of 64 tokens (1.2-1.25x faster at 70-90%; 256 tokens spilled, 1.1x slower).
  static constexpr int kGradValuesVecs = 8;
  static constexpr int kSumGroup = 8;  // grad_values: 8 entries reduced together
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float f) { return _mm512_set1_ps(f); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }

  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static float hsum(V v) { return _mm512_reduce_add_ps(v); }

  // out[e] (+)= the sum of acc[e]'s lanes, e < 8: each folded to 256 bits, then AVX2's tree (hsum8x8).
  static void add_sums(const V* acc, float* out, bool first) {
    __m256 h[8];
    for (int e = 0; e < 8; ++e) {
      h[e] = _mm256_add_ps(_mm512_castps512_ps256(acc[e]),
                           _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[e]), 1)));
    }
    const __m256 sums = avx2::hsum8x8(h);
    _mm256_storeu_ps(out, first ? sums : _mm256_add_ps(_mm256_loadu_ps(out), sums));
  }

  // A token's 16 outputs: with `stream` and p 64-byte aligned, one whole line past the caches.
  static void store_row(float* p, __m512 v, bool stream) {
    if (stream && reinterpret_cast<uintptr_t>(p) % 64 == 0) {
      _mm512_stream_ps(p, v);
    } else {
      _mm512_storeu_ps(p, v);
    }
  }
  static void fence() { _mm_sfence(); }

  static void store_transposed(const float* yT, int64_t ld_t, int64_t rows, int64_t tokens, float* y, int64_t ldy,
                               const float* res, Activation act, bool stream) {
    __m512 r[16];
    const bool plain = res == nullptr && act == Activation::kNone;
    if (rows == 16 && tokens == 16 && plain) {  // whole tiles (all but a ragged edge): no masks, no branches
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(yT + i * ld_t);
      transpose16(r);
      for (int t = 0; t < 16; ++t) store_row(y + t * ldy, r[t], stream);
      return;
    }
    for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_loadu_ps(yT + i * ld_t) : _mm512_setzero_ps();
    transpose16(r);
    const __mmask16 keep = __mmask16((1u << rows) - 1);
    for (int64_t t = 0; t < tokens; ++t) {
      __m512 v = r[t];
      if (!plain) {  // the epilogue in registers: activation(sum + residual)
        if (res != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(keep, res + t * ldy));
        // Two 256-bit halves through activate8 (64-bit-lane moves: AVX512F, this path's target, lacks DQ's f32x8).
        const __m256 lo = activate8(_mm512_castps512_ps256(v), act);
        const __m256 hi = activate8(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)), act);
        v = _mm512_castpd_ps(
            _mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
      }
      if (rows == 16) {
        store_row(y + t * ldy, v, stream);
      } else {
        _mm512_mask_storeu_ps(y + t * ldy, keep, v);
      }
    }
  }

  static void pack_tile(const float* x, int64_t ldx, int64_t tokens, int64_t kn, float* dst, int64_t width) {
    const __mmask16 cols = __mmask16((1u << kn) - 1);
    for (int64_t t0 = 0; t0 < width; t0 += 16) {
      __m512 r[16];
      for (int64_t i = 0; i < 16; ++i) {
        r[i] = t0 + i < tokens ? _mm512_maskz_loadu_ps(cols, x + (t0 + i) * ldx) : _mm512_setzero_ps();
      }
      transpose16(r);
      for (int64_t k = 0; k < kn; ++k) _mm512_storeu_ps(dst + k * width + t0, r[k]);
    }
  }
};

#define PYSPARSE_UNSTRUCTURED_GATHERS 0  // batch 1-3 runs the AVX2 gathers (kUnstructuredGatherTokens)
#include "unstructured_linear_kernels.inc"
#undef PYSPARSE_UNSTRUCTURED_GATHERS

}  // namespace

bool unstructured_linear(const float* x, const float* values, const int32_t* columns, const int32_t* segment_ptr,
                         const float* bias, float* y, const UnstructuredProblem& p, int num_threads) {
  return linear_impl(x, values, columns, segment_ptr, bias, y, p, num_threads, 0);  // no gathers on this path
}

void unstructured_linear_grad_values(const float* grad_y, const float* x, const int32_t* columns,
                                     const int32_t* segment_ptr, float* grad_values, const UnstructuredProblem& p,
                                     int num_threads) {
  grad_values_impl(grad_y, x, columns, segment_ptr, grad_values, p, num_threads);
}

}  // namespace avx512
}  // namespace pysparse

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // PYSPARSE_X86
