// 16-lane vectors as pairs of AVX2 registers, under the AVX-512 path's tile shapes (see avx2_as_16_lanes.h). The
// accumulator tiles need twice the registers the hardware has, so this runs slowly; only its results matter.
#include "avx2_as_16_lanes.h"

#include "avx2_reduce.h"
#include "avx512_tiles.h"
#include "isa_kernels.h"

#if PYSPARSE_X86
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace pysparse {
namespace avx2_as_16_lanes {
namespace {

struct Isa : Avx512Tiles {
  struct V {
    __m256 lo, hi;
  };
  static V zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static V load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v.lo), _mm256_storeu_ps(p + 8, v.hi); }
  static void stream(float* p, V v) { _mm256_stream_ps(p, v.lo), _mm256_stream_ps(p + 8, v.hi); }
  static V bcast(const float* p) { return {_mm256_broadcast_ss(p), _mm256_broadcast_ss(p)}; }
  static V fma(V a, V b, V c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
  static V add(V a, V b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
  static __m256 half(V v, int h) { return h ? v.hi : v.lo; }
  static __m256 fold(V v) { return _mm256_add_ps(v.lo, v.hi); }
  static V join(__m256 lo, __m256 hi) { return {lo, hi}; }
  static float hsum(V v) { return avx2::hsum8(fold(v)); }
  static V load_cvt(const float* p) { return load(p); }
  template <typename T>
  static V load_cvt(const T* p);  // 16-bit types: defined below with the kernels' own 8-lane widening
};

#define PYSPARSE_ISA_HAS_BF16_DOT 0
#include "simd_kernels.inc"
#undef PYSPARSE_ISA_HAS_BF16_DOT

template <typename T>
Isa::V Isa::load_cvt(const T* p) {
  return {load8_f32(p), load8_f32(p + 8)};
}

}  // namespace

template <typename T>
void bsr_linear(const T* x, const T* values, const int32_t* crow, const int32_t* col, const T* bias, T* y,
                const BsrProblem& p, int num_threads, bool bcast) {
  bsr_linear_impl(x, values, crow, col, bias, y, p, num_threads < 1 ? 1 : num_threads, false, bcast);
}

template void bsr_linear<float>(const float*, const float*, const int32_t*, const int32_t*, const float*, float*,
                                const BsrProblem&, int, bool);
template void bsr_linear<bfloat16_t>(const bfloat16_t*, const bfloat16_t*, const int32_t*, const int32_t*,
                                     const bfloat16_t*, bfloat16_t*, const BsrProblem&, int, bool);
template void bsr_linear<float16_t>(const float16_t*, const float16_t*, const int32_t*, const int32_t*,
                                    const float16_t*, float16_t*, const BsrProblem&, int, bool);

}  // namespace avx2_as_16_lanes
}  // namespace pysparse

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // PYSPARSE_X86
