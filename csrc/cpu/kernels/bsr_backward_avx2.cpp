// AVX2 + FMA path of the bsr_linear backward kernels: 8 floats per vector, 16 vector registers.
// Function-level target attributes (pragma below): the library builds with plain flags and still loads on CPUs
// without AVX2; bsr_backward.cpp calls this only where cpuid reports the features.
#include "bsr_backward_isa.h"
#include "avx2_reduce.h"

#if PYSPARSE_X86
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
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

// kMaskTable + 8 - n: the maskload / maskstore mask of the first n lanes (0 <= n <= 8).
alignas(64) constexpr int32_t kMaskTable[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

struct Isa {
  using V = __m256;
  static constexpr int L = 8;
  // grad_input: 6 tokens x 2 vectors = 12 accumulators + 2 weight vectors + 1 broadcast of the 16 registers; one
  // vector (8-wide blocks) takes 12 tokens.
  static constexpr int kGiVecs = 2;
  static constexpr int gi_tokens(int nv) { return nv == 1 ? 12 : 6; }
  // grad_values: 6 rows x 2 vectors, or 12 rows x 1 vector.
  // grad_input of column vectors: 8 rows of grad_y (vectors over the tokens) in registers
  static constexpr int kGiColumnRows = 8;
  static constexpr int kGvVecs = 2;
  static constexpr int gv_rows(int nv) { return nv == 1 ? 12 : 6; }
  static __m256i mask(int n) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMaskTable + 8 - std::max(0, std::min(L, n))));
  }
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load_n(const float* p, int n) { return _mm256_maskload_ps(p, mask(n)); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void stream(float* p, V v) { _mm256_stream_ps(p, v); }  // p 32-byte aligned
  static void fence() { _mm_sfence(); }
  static void store_n(float* p, V v, int n) { _mm256_maskstore_ps(p, mask(n), v); }
  static V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static void transpose(V* r) { transpose8x8(r); }  // r[i][j] -> r[j][i], in registers
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

}  // namespace avx2
}  // namespace pysparse

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // PYSPARSE_X86
