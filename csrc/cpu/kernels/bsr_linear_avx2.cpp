// AVX2 + FMA (+ F16C) path: 8 floats per vector, 16 vector registers.
// Compiled with function-level target attributes (pragma below), so no -mavx2 flag is needed and the library still
// loads on CPUs without AVX2; dispatch.cpp calls this only where cpuid reports the features.
#include "avx2_reduce.h"
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
namespace avx2 {
namespace {

struct Isa {
  using V = __m256;
  static constexpr int L = 8;
  // 4 outputs x 3 vectors (24 tokens): 12 accumulators + 3 x vectors + 1 broadcast = 16 registers. A one-vector
  // tile takes 8 outputs: with 4 it would need 5 loads per 4 multiply-adds (load-bound).
  static constexpr int kVecs = 3;
  static constexpr int outer_rows(int vecs) { return vecs == 1 ? 8 : 4; }
  // Small-M register tile: outputs per tile for MT <= 3 tokens (R * MT accumulators + MT x vectors <= 16).
  static constexpr int dot_rows(int mt) { return mt == 1 ? 8 : 4; }
  // Broadcast kernel: tokens x vectors of outputs per tile (T*NVO accumulators + NVO weights + 1 broadcast <= 16).
  static constexpr int bcast_tokens(int nvo) { return nvo == 4 ? 2 : nvo == 2 ? 6 : 12; }
  // The broadcast kernel runs float32 up to 384 tokens, 16-bit weights at every M (bcast_applies). Above 384 the
  // outer-product kernel, whose 24-token tiles then each pack x once for all block rows and stream their outputs,
  // wins at high sparsity (Zen 3, 2 threads, 16x16 / 32x32 on 4 FFN shapes, its time over the broadcast kernel's,
  // geometric mean: 90% M = 96-256 1.02-1.32x, 384 0.91x, 512-4096 0.5-0.95x; 70% 1.0-1.27x up to 384, 0.85-1.03x
  // at 1024; 50% 0.91-1.16x at 256-4096; BENCHMARKS.md).
  static constexpr int64_t kBcastMaxTokens = 384;
  static constexpr bool kBcast16Bit = true;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void stream(float* p, V v) { _mm256_stream_ps(p, v); }  // p 32-byte aligned
  static V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static __m256 half(V v, int) { return v; }  // 256-bit half h of a vector
  static __m256 fold(V v) { return v; }        // a vector whose lane sum is v's, in 256 bits
  static float hsum(V v) { return hsum8(v); }
  static V load_cvt(const float* p) { return load(p); }
  static V load_cvt(const bfloat16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static V load_cvt(const float16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  // 2L bfloat16 as two vectors in one load, a shift and an and: even[i] = p[2i], odd[i] = p[2i + 1] (two widening
  // loads take twice the shuffle and shift ops, which compete with the FMAs for Zen 3's FP pipes); interleave puts
  // results computed that way back in order.
  static constexpr bool kBf16Split = true;
  static void load_bf16_split(const bfloat16_t* p, V& even, V& odd) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xffff0000u))));
  }
  static void interleave(V even, V odd, V& first, V& second) {
    const __m256 a = _mm256_unpacklo_ps(even, odd), b = _mm256_unpackhi_ps(even, odd);
    first = _mm256_permute2f128_ps(a, b, 0x20);
    second = _mm256_permute2f128_ps(a, b, 0x31);
  }
};

#define PYSPARSE_ISA_HAS_BF16_DOT 0
#include "simd_kernels.inc"
#undef PYSPARSE_ISA_HAS_BF16_DOT

}  // namespace

template <typename T>
void bsr_linear(const T* x, const T* values, const int32_t* crow, const int32_t* col, const T* bias, T* y,
                const BsrProblem& p, int num_threads, bool bcast) {
  bsr_linear_impl(x, values, crow, col, bias, y, p, num_threads, false, bcast);
}

template <typename T>
bool reads_transposed(const BsrProblem& p) {
  return reads_transposed_values<T>(p, true, false);
}
template bool reads_transposed<float>(const BsrProblem&);
template bool reads_transposed<bfloat16_t>(const BsrProblem&);
template bool reads_transposed<float16_t>(const BsrProblem&);

void bsr_conv2d(const float* x, const float* values, const int32_t* crow, const int32_t* col, const float* bias,
                float* y, const BsrProblem& p, const ConvGeometry& c, int num_threads) {
  bcast_conv2d(x, values, crow, col, bias, y, p, c, num_threads);
}

template void bsr_linear<float>(const float*, const float*, const int32_t*, const int32_t*, const float*, float*,
                                const BsrProblem&, int, bool);
template void bsr_linear<bfloat16_t>(const bfloat16_t*, const bfloat16_t*, const int32_t*, const int32_t*,
                                     const bfloat16_t*, bfloat16_t*, const BsrProblem&, int, bool);
template void bsr_linear<float16_t>(const float16_t*, const float16_t*, const int32_t*, const int32_t*,
                                    const float16_t*, float16_t*, const BsrProblem&, int, bool);

}  // namespace avx2
}  // namespace pysparse

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // PYSPARSE_X86
