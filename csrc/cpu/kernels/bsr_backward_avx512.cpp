// AVX-512 path (F, BW, VL, DQ) of the bsr_linear backward kernels: 16 floats per vector, 32 vector registers.
// Function-level target attributes (pragma below): the library builds with plain flags and still loads on CPUs
// without AVX-512; bsr_backward.cpp calls this only where cpuid reports the features.
#include "avx512_transpose.h"
#include "bsr_backward_isa.h"

#if PYSPARSE_X86
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's AVX-512 intrinsics trip its own -Wuninitialized on _mm512_undefined_* (GCC bug 105593, fixed in 13).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#endif

namespace pysparse {
namespace avx512 {
namespace {

struct Isa {
  using V = __m512;
  static constexpr int L = 16;
  // grad_input: 12 tokens x 2 vectors = 24 accumulators + 2 weight vectors + 1 broadcast of the 32 registers; one
  // vector (16-wide blocks) takes 16 tokens.
  static constexpr int kGiVecs = 2;
  static constexpr int gi_tokens(int nv) { return nv == 1 ? 16 : 12; }
  // grad_values: 8 rows x 2 vectors (32 wide blocks: 4 tiles per block); one vector takes 16 rows.
  // grad_input of column vectors: 16 rows of grad_y (vectors over the tokens) in registers
  static constexpr int kGiColumnRows = 16;
  static constexpr int kGvVecs = 2;
  static constexpr int gv_rows(int nv) { return nv == 1 ? 16 : 8; }
  static __mmask16 mask(int n) { return n <= 0 ? 0 : n >= L ? 0xffff : __mmask16((1u << n) - 1); }
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void stream(float* p, V v) { _mm512_stream_ps(p, v); }  // p 64-byte aligned
  static void fence() { _mm_sfence(); }
  static void store_n(float* p, V v, int n) { _mm512_mask_storeu_ps(p, mask(n), v); }
  static V bcast(const float* p) { return _mm512_set1_ps(*p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static void transpose(V* r) { transpose16(r); }  // r[i][j] -> r[j][i], in registers
};

#include "bsr_backward_tiles.h"

}  // namespace

void bsr_grad_input(const float* grad_y, const float* values, bool transposed, const int32_t* col_ptr,
                    const int32_t* entries, float* grad_x, const BsrProblem& p, int num_threads) {
  grad_input(grad_y, values, transposed, col_ptr, entries, grad_x, p, num_threads);
}

void bsr_grad_values(const float* grad_y, const float* x, const int32_t* crow, const int32_t* col, bool transposed,
                     float* grad_values_out, const BsrProblem& p, int num_threads, float* grad_bias) {
  grad_values(grad_y, x, crow, col, transposed, grad_values_out, p, num_threads, grad_bias);
}

}  // namespace avx512
}  // namespace pysparse

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // PYSPARSE_X86
