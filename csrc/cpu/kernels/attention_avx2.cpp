// AVX2 + FMA path of the CPU attention kernel (also what AVX-512 machines run: see attention.cpp).
// Compiled with function-level target attributes, as bsr_linear_avx2.cpp: no -mavx2 flag, the library still loads on
// CPUs without AVX2, and the dispatcher calls this only where cpuid reports the features.
#include "activation.h"  // Activation, for simd_activation.inc
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

#include "simd_activation.inc"  // exp_nonpositive8

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
  // exp(x) for x <= 0 (softmax arguments): simd_activation.inc's, shared with GELU's backward.
  static V exp(V x) { return exp_nonpositive8(x); }
};

#include "attention_kernels.inc"

}  // namespace

void attention(const float* q, const float* k, const float* v, float* out, float* lse, const AttentionProblem& p,
               int num_threads) {
  attention_impl(q, k, v, out, lse, p, num_threads);
}

void attention_backward(const float* q, const float* k, const float* v, const float* out, const float* grad_out,
                        const float* lse, float* dq, float* dk, float* dv, const AttentionProblem& p, int num_threads) {
  attention_backward_impl(q, k, v, out, grad_out, lse, dq, dk, dv, p, num_threads);
}

}  // namespace avx2
}  // namespace pysparse

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // PYSPARSE_X86
