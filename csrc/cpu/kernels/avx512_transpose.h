// The 16x16 in-register transpose of the AVX-512 translation units (unstructured_linear_avx512.cpp,
// bsr_backward_avx512.cpp). It carries its own target attribute, so this header compiles under plain flags.
#pragma once
#include "isa_kernels.h"

#if PYSPARSE_X86
#include <immintrin.h>

namespace pysparse {
namespace avx512 {

// In-register transpose of a 16x16 tile: r[i][c] -> r[c][i] (4 rounds of 16 shuffles).
__attribute__((target("avx512f"))) inline __attribute__((always_inline)) void transpose16(__m512 r[16]) {
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
    const __m512 even_a = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88);
    const __m512 odd_a = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xDD);
    const __m512 even_b = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88);
    const __m512 odd_b = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xDD);
    r[j] = _mm512_shuffle_f32x4(even_a, even_b, 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(even_a, even_b, 0xDD);
    r[4 + j] = _mm512_shuffle_f32x4(odd_a, odd_b, 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(odd_a, odd_b, 0xDD);
  }
}

}  // namespace avx512
}  // namespace pysparse
#endif  // PYSPARSE_X86
