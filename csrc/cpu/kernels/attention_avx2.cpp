// AVX2 + FMA path of the CPU attention kernel (also what AVX-512 machines run: see attention.cpp).
// Compiled with function-level target attributes, as bsr_linear_avx2.cpp: no -mavx2 flag, the library still loads on
// CPUs without AVX2, and the dispatcher calls this only where cpuid reports the features.
#include "attention.h"
#include "avx2_reduce.h"
#include "isa_kernels.h"

#if PYSPARSE_X86
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
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

struct Isa {
  using V = __m256;
  static constexpr int L = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static float hmax(V v) { return hmax8(v); }
  static float hsum(V v) { return hsum8(v); }
  // rows[t] <- column t of the 8 x 8 matrix whose rows are rows[0..7].
  static void transpose8(V* rows) { transpose8x8(rows); }
  // exp(x) for x <= 0 (softmax arguments): x = n ln2 + r with |r| <= ln2 / 2, exp(r) by the degree-7 polynomial of
  // Cephes' expf (relative error ~1e-7), 2^n built in the exponent bits. Below -87.3 (where 2^n would be
  // denormal) the result is 0; max(lo, x) keeps a NaN x (maxps returns its second operand on NaN).
  static V exp(V x) {
    const V lo = _mm256_set1_ps(-87.3f);
    const V tiny = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(lo, x);
    const V n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    V y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(tiny, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
  }
};

#include "attention_kernels.inc"

}  // namespace

void attention(const float* q, const float* k, const float* v, float* out, const AttentionProblem& p,
               int num_threads) {
  attention_impl(q, k, v, out, p, num_threads);
}

}  // namespace avx2
}  // namespace pysparse

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // PYSPARSE_X86
