// AVX-512 path of the unstructured kernels (F, VL): 16 floats per vector, 32 vector registers. Function-level target
// attributes as in bsr_linear_avx512.cpp: the library still loads on CPUs without AVX-512.
#include "unstructured_linear_isa.h"

#if PYSPARSE_X86
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
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

__m128 lane128(__m512 v, int lane) {
  switch (lane) {
    case 0: return _mm512_castps512_ps128(v);
    case 1: return _mm512_extractf32x4_ps(v, 1);
    case 2: return _mm512_extractf32x4_ps(v, 2);
    default: return _mm512_extractf32x4_ps(v, 3);
  }
}

// In-register transpose of a 16x16 tile: r[i][c] -> r[c][i] (4 rounds of 16 shuffles).
void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[4i + j], 128-bit lane l: column 4l + j of rows 4i..4i+3.
  __m512 u[16];
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 even_a = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88), odd_a = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xDD);
    const __m512 even_b = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88);
    const __m512 odd_b = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xDD);
    r[j] = _mm512_shuffle_f32x4(even_a, even_b, 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(even_a, even_b, 0xDD);
    r[4 + j] = _mm512_shuffle_f32x4(odd_a, odd_b, 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(odd_a, odd_b, 0xDD);
  }
}

struct Isa {
  using V = __m512;
  static constexpr int64_t L = 16;
  // 4 rows x 4 vectors: 16 accumulators (2 FMA pipes x 4 cycles of latency need 8), 64 tokens per tile, whose
  // packed x ((K + 1) x 256 B: 0.8 MB at K = 3072) stays in the 2 MB L2 of the Xeons and Zen 4's 1 MB.
  static constexpr int kMaxVecs = 4;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float f) { return _mm512_set1_ps(f); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }

  static void store_rows(V r0, V r1, V r2, V r3, float* y, int64_t ldy, int64_t tokens, int64_t rows) {
    const V t0 = _mm512_unpacklo_ps(r0, r1), t1 = _mm512_unpackhi_ps(r0, r1);
    const V t2 = _mm512_unpacklo_ps(r2, r3), t3 = _mm512_unpackhi_ps(r2, r3);
    // u[j], 128-bit lane l: the 4 rows at token 4l + j.
    const V u[4] = {_mm512_shuffle_ps(t0, t2, 0x44), _mm512_shuffle_ps(t0, t2, 0xEE), _mm512_shuffle_ps(t1, t3, 0x44),
                    _mm512_shuffle_ps(t1, t3, 0xEE)};
    const __mmask8 keep = __mmask8((1u << rows) - 1);
#pragma GCC unroll 16
    for (int t = 0; t < 16; ++t) {
      if (t >= tokens) break;
      const __m128 q = lane128(u[t & 3], t >> 2);
      if (rows == 4) {
        _mm_storeu_ps(y + t * ldy, q);
      } else {
        _mm_mask_storeu_ps(y + t * ldy, keep, q);
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

  static void gather_group(const float* xrow, const float* values, const int32_t* columns, int64_t s0, int64_t s1,
                           float out[4]) {
    // 16 slots = 4 steps per gather; lane l belongs to row l % 4.
    __m512 acc = _mm512_setzero_ps();
    int64_t slot = s0 * kUnstructuredGroupRows;
    const int64_t end = s1 * kUnstructuredGroupRows;
    for (; slot + 16 <= end; slot += 16) {
      const __m512i idx = _mm512_loadu_si512(columns + slot);
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(values + slot), _mm512_i32gather_ps(idx, xrow, 4), acc);
    }
    if (slot < end) {
      const __mmask16 m = __mmask16((1u << (end - slot)) - 1);
      const __m512i idx = _mm512_maskz_loadu_epi32(m, columns + slot);
      const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, xrow, 4);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, values + slot), xv, acc);
    }
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1));
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(acc), hi);
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
};

#include "unstructured_linear_kernels.inc"

}  // namespace

void unstructured_linear(const float* x, const float* values, const int32_t* columns, const int32_t* group_ptr,
                         const float* bias, float* y, const UnstructuredProblem& p, int num_threads) {
  linear_impl(x, values, columns, group_ptr, bias, y, p, num_threads);
}

}  // namespace avx512
}  // namespace pysparse

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // PYSPARSE_X86
