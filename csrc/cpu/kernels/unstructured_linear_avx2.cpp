// AVX2 + FMA path of the unstructured kernels: 8 floats per vector, 16 vector registers. Function-level target
// attributes as in bsr_linear_avx2.cpp: the library still loads on CPUs without AVX2.
#include "unstructured_linear_isa.h"

#if PYSPARSE_X86
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
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

// In-register transpose of an 8x8 tile: r[i][c] -> r[c][i].
void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[4i + j], 128-bit lane l: column 4l + j of rows 4i..4i+3.
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
    r[4 + j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
  }
}

struct Isa {
  using V = __m256;
  static constexpr int64_t L = 8;
  // 4 rows x 3 vectors: 12 accumulators + the broadcast value of 16 registers (x is an FMA memory operand).
  static constexpr int kMaxVecs = 3;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float f) { return _mm256_set1_ps(f); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }

  static void store_rows(V r0, V r1, V r2, V r3, float* y, int64_t ldy, int64_t tokens, int64_t rows) {
    const V t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    const V t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    // u[j], 128-bit lane l: the 4 rows at token 4l + j.
    const V u[4] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xEE), _mm256_shuffle_ps(t1, t3, 0x44),
                    _mm256_shuffle_ps(t1, t3, 0xEE)};
    const __m128i keep = _mm_cmpgt_epi32(_mm_set1_epi32(int(rows)), _mm_setr_epi32(0, 1, 2, 3));
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) {
      if (t >= tokens) break;
      const __m128 q = t < 4 ? _mm256_castps256_ps128(u[t & 3]) : _mm256_extractf128_ps(u[t & 3], 1);
      if (rows == 4) {
        _mm_storeu_ps(y + t * ldy, q);
      } else {
        _mm_maskstore_ps(y + t * ldy, keep, q);
      }
    }
  }

  static void pack_tile(const float* x, int64_t ldx, int64_t tokens, int64_t kn, float* dst, int64_t width) {
    const __m256i cols = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(kn)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int64_t t0 = 0; t0 < width; t0 += 8) {
      __m256 r[8];
      for (int64_t i = 0; i < 8; ++i) {
        r[i] = t0 + i < tokens ? _mm256_maskload_ps(x + (t0 + i) * ldx, cols) : _mm256_setzero_ps();
      }
      transpose8(r);
      for (int64_t k = 0; k < kn; ++k) _mm256_storeu_ps(dst + k * width + t0, r[k]);
    }
  }

  static void gather_group(const float* xrow, const float* values, const int32_t* columns, int64_t s0, int64_t s1,
                           float out[4]) {
    // 8 slots = 2 steps per gather; lane l belongs to row l % 4. A group's slot count is a multiple of 4: the last
    // gather may take one step, in the low half.
    __m256 acc = _mm256_setzero_ps();
    int64_t slot = s0 * kUnstructuredGroupRows;
    const int64_t end = s1 * kUnstructuredGroupRows;
    for (; slot + 8 <= end; slot += 8) {
      const __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(columns + slot));
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(values + slot), _mm256_i32gather_ps(xrow, idx, 4), acc);
    }
    __m128 sum = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    if (slot < end) {
      const __m128i idx = _mm_loadu_si128(reinterpret_cast<const __m128i*>(columns + slot));
      sum = _mm_fmadd_ps(_mm_loadu_ps(values + slot), _mm_i32gather_ps(xrow, idx, 4), sum);
    }
    _mm_storeu_ps(out, sum);
  }
};

#include "unstructured_linear_kernels.inc"

}  // namespace

void unstructured_linear(const float* x, const float* values, const int32_t* columns, const int32_t* group_ptr,
                         const float* bias, float* y, const UnstructuredProblem& p, int num_threads) {
  linear_impl(x, values, columns, group_ptr, bias, y, p, num_threads);
}

}  // namespace avx2
}  // namespace pysparse

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // PYSPARSE_X86
