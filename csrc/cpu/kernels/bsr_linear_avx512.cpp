// AVX-512 path (F, BW, VL, DQ; BF16 where present): 16 floats per vector, 32 vector registers.
// Compiled with function-level target attributes (pragma below), so no -mavx512* flag is needed and the library
// still loads on CPUs without AVX-512; dispatch.cpp calls this only where cpuid reports the features, and passes
// native_bf16 only where the CPU has AVX512-BF16.
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

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's AVX-512 intrinsics trip its own -Wuninitialized on _mm512_undefined_* (GCC bug 105593, fixed in 13).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif
// Only the vdpbf16ps kernel may use AVX512-BF16, so the rest also runs on AVX-512 CPUs without it.
#define PYSPARSE_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))

namespace pysparse {
namespace avx512 {
namespace {

struct Isa : Avx512Tiles {
  using V = __m512;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void stream(float* p, V v) { _mm512_stream_ps(p, v); }  // p 64-byte aligned
  static V bcast(const float* p) { return _mm512_set1_ps(*p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static __m256 half(V v, int h) { return h ? _mm512_extractf32x8_ps(v, 1) : _mm512_castps512_ps256(v); }
  static __m256 fold(V v) { return _mm256_add_ps(half(v, 0), half(v, 1)); }
  static V join(__m256 lo, __m256 hi) { return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1); }
  static float hsum(V v) { return _mm512_reduce_add_ps(v); }
  static V load_cvt(const float* p) { return load(p); }
  static V load_cvt(const bfloat16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static V load_cvt(const float16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
};

#define PYSPARSE_ISA_HAS_BF16_DOT 1
#include "simd_kernels.inc"
#undef PYSPARSE_ISA_HAS_BF16_DOT

}  // namespace

template <typename T>
void bsr_linear(const T* x, const T* values, const int32_t* crow, const int32_t* col, const T* bias, T* y,
                const BsrProblem& p, int num_threads, bool native_bf16, bool bcast) {
  bsr_linear_impl(x, values, crow, col, bias, y, p, num_threads, native_bf16, bcast);
}

template <typename T>
bool reads_transposed(const BsrProblem& p, bool native_bf16) {
  return reads_transposed_values<T>(p, true, native_bf16);
}
template bool reads_transposed<float>(const BsrProblem&, bool);
template bool reads_transposed<bfloat16_t>(const BsrProblem&, bool);
template bool reads_transposed<float16_t>(const BsrProblem&, bool);

template void bsr_linear<float>(const float*, const float*, const int32_t*, const int32_t*, const float*, float*,
                                const BsrProblem&, int, bool, bool);
template void bsr_linear<bfloat16_t>(const bfloat16_t*, const bfloat16_t*, const int32_t*, const int32_t*,
                                     const bfloat16_t*, bfloat16_t*, const BsrProblem&, int, bool, bool);
template void bsr_linear<float16_t>(const float16_t*, const float16_t*, const int32_t*, const int32_t*,
                                    const float16_t*, float16_t*, const BsrProblem&, int, bool, bool);

}  // namespace avx512
}  // namespace pysparse

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // PYSPARSE_X86
