// Horizontal reductions of an 8-float AVX2 vector, shared by the AVX2 translation units (bsr_linear_avx2.cpp,
// attention_avx2.cpp). Each function carries its own target attribute, so this header compiles under plain flags and
// inlines into those files' avx2 regions.
#pragma once
#include "isa_kernels.h"

#if PYSPARSE_X86
#include <immintrin.h>

namespace pysparse {
namespace avx2 {

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

}  // namespace avx2
}  // namespace pysparse
#endif  // PYSPARSE_X86
