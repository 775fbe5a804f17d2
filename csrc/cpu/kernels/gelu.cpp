// GELU and its derivative (gelu.h): the AVX2 form on the AVX2 and AVX-512 paths (an elementwise pass over memory:
// 8 lanes keep up with the loads and stores), plain C++ on the generic path. Parallel strategy: the array is cut into
// fixed chunks of kChunk floats, shared out statically (one writer per element, nothing shared).
#include "gelu.h"

#include <algorithm>
#include <cmath>

#include "activation.h"   // activate: the scalar GELU of the generic path
#include "avx2_reduce.h"  // first_lanes
#include "bsr_linear.h"   // active_cpu_isa_id
#include "isa_kernels.h"

#if PYSPARSE_X86
#include <immintrin.h>
#endif

namespace pysparse {
namespace {

constexpr int64_t kChunk = 16384;  // 64 KB of floats per task: many per thread on a layer's output, little scheduling
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

template <typename Body>
void over_chunks(int64_t n, int num_threads, Body body) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) body(c * kChunk, std::min(n, (c + 1) * kChunk));
}

float gelu_grad_scalar(float v) {
  return 0.5f * (1.0f + std::erf(v * 0.70710678118654752f)) + v * kInvSqrt2Pi * std::exp(-0.5f * v * v);
}

}  // namespace

#if PYSPARSE_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace avx2 {
namespace {

#include "simd_activation.inc"  // gelu8, gelu_grad8

void gelu_range(const float* z, float* y, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) _mm256_storeu_ps(y + i, gelu8(_mm256_loadu_ps(z + i)));
  if (i < end) {
    const __m256i keep = first_lanes(end - i);
    _mm256_maskstore_ps(y + i, keep, gelu8(_mm256_maskload_ps(z + i, keep)));
  }
}

void gelu_backward_range(const float* dy, const float* z, float* dz, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    _mm256_storeu_ps(dz + i, _mm256_mul_ps(_mm256_loadu_ps(dy + i), gelu_grad8(_mm256_loadu_ps(z + i))));
  }
  if (i < end) {
    const __m256i keep = first_lanes(end - i);
    const __m256 g = gelu_grad8(_mm256_maskload_ps(z + i, keep));
    _mm256_maskstore_ps(dz + i, keep, _mm256_mul_ps(_mm256_maskload_ps(dy + i, keep), g));
  }
}

}  // namespace
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // PYSPARSE_X86

void gelu_cpu(const float* z, float* y, int64_t n, int num_threads) {
#if PYSPARSE_X86
  if (active_cpu_isa_id() != CpuIsa::kGeneric) {
    over_chunks(n, num_threads, [&](int64_t b, int64_t e) { avx2::gelu_range(z, y, b, e); });
    return;
  }
#endif
  over_chunks(n, num_threads, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) y[i] = activate(z[i], Activation::kGelu);
  });
}

void gelu_backward_cpu(const float* dy, const float* z, float* dz, int64_t n, int num_threads) {
#if PYSPARSE_X86
  if (active_cpu_isa_id() != CpuIsa::kGeneric) {
    over_chunks(n, num_threads, [&](int64_t b, int64_t e) { avx2::gelu_backward_range(dy, z, dz, b, e); });
    return;
  }
#endif
  over_chunks(n, num_threads, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) dz[i] = dy[i] * gelu_grad_scalar(z[i]);
  });
}

}  // namespace pysparse
