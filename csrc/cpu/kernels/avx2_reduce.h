// Horizontal reductions, the 8x8 transpose and the ragged-tail lane mask of 8-float AVX2 vectors, shared by the
// AVX2 translation units (bsr_linear_avx2.cpp, bsr_backward_avx2.cpp, attention_avx2.cpp,
// unstructured_linear_avx2.cpp, gelu.cpp; unstructured_linear_avx512.cpp after folding to 256 bits). Each function
// carries its own target attribute, so this header compiles under plain flags and inlines into those files' avx2
// regions.
#pragma once
#include "isa_kernels.h"

#include <cstdint>

#if PYSPARSE_X86
#include <immintrin.h>

namespace pysparse {
namespace avx2 {

// Mask of the first n (0..8) of 8 lanes (maskload / maskstore of a ragged tail).
__attribute__((target("avx2"))) inline __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

__attribute__((target("avx2"))) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2"))) inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// The lane sums of v[0..7] as one vector: a tree of horizontal adds, then the two 128-bit halves added.
__attribute__((target("avx2"))) inline __m256 hsum8x8(const __m256 v[8]) {
  const __m256 q0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 q1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31));
}

// In-register transpose of an 8x8 tile: r[i][c] -> r[c][i].
__attribute__((target("avx2"))) inline __attribute__((always_inline)) void transpose8x8(__m256 r[8]) {
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

}  // namespace avx2
}  // namespace pysparse
#endif  // PYSPARSE_X86
