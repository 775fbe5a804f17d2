// Generic CUDA block-sparse linear: any block size, float32 / float16 / bfloat16, float32 accumulation.
//
// Parallel strategy: one CTA per (block row, 32-token tile, 32-output chunk of the block row). Thread
// (tx, ty) owns output row chunk*32+tx for tokens ty, ty+8, ty+16, ty+24 and walks the block row's
// nonzero blocks; every output is written by exactly one thread, so no atomics. This is the correctness
// fallback for block sizes without a tensor-core path; it reads x and W through the caches.
#pragma once
#include <cuda_runtime.h>

#include "common/bsr_problem.h"

namespace pysparse {

template <typename T>
__global__ void bsr_linear_generic_kernel(const T* __restrict__ x, const T* __restrict__ values,
                                          const int32_t* __restrict__ crow, const int32_t* __restrict__ col,
                                          const T* __restrict__ bias, T* __restrict__ y, BsrProblem p) {
  constexpr int kTokens = 32, kRowsPerCta = 32, kTokenGroups = 8;
  const int64_t block_row = blockIdx.x;
  const int64_t t0 = int64_t(blockIdx.y) * kTokens;
  const int64_t i = int64_t(blockIdx.z) * kRowsPerCta + threadIdx.x;  // row inside the block
  const int64_t n = block_row * p.bh + i;
  if (i >= p.bh) return;
  float acc[kTokens / kTokenGroups] = {0.f, 0.f, 0.f, 0.f};
  // Indices are validated at pack/load time; clamping keeps even a malformed call inside its buffers.
  const int64_t begin = max(int64_t(crow[block_row]), int64_t(0));
  const int64_t end = min(int64_t(crow[block_row + 1]), p.nnz);
  for (int64_t b = begin; b < end; ++b) {
    const int64_t c = col[b];
    if (c < 0 || c >= p.n_block_cols) continue;
    const T* w = values + (b * p.bh + i) * p.bw;
    const int64_t k0 = c * p.bw;
    const int64_t kmax = min(p.bw, p.K - k0);
    for (int64_t j = 0; j < kmax; ++j) {
      const float wij = static_cast<float>(w[j]);
#pragma unroll
      for (int s = 0; s < kTokens / kTokenGroups; ++s) {
        const int64_t t = t0 + threadIdx.y + s * kTokenGroups;
        if (t < p.M) acc[s] += wij * static_cast<float>(x[t * p.ldx + k0 + j]);
      }
    }
  }
  if (n >= p.N) return;
  const float bn = bias ? static_cast<float>(bias[n]) : 0.f;
#pragma unroll
  for (int s = 0; s < kTokens / kTokenGroups; ++s) {
    const int64_t t = t0 + threadIdx.y + s * kTokenGroups;
    if (t < p.M) y[t * p.N + n] = static_cast<T>(acc[s] + bn);
  }
}

template <typename T>
void launch_bsr_linear_generic(const T* x, const T* values, const int32_t* crow, const int32_t* col, const T* bias,
                               T* y, const BsrProblem& p, cudaStream_t stream) {
  const dim3 block(32, 8);
  const dim3 grid(unsigned(p.n_block_rows), unsigned((p.M + 31) / 32), unsigned((p.bh + 31) / 32));
  bsr_linear_generic_kernel<T><<<grid, block, 0, stream>>>(x, values, crow, col, bias, y, p);
}

}  // namespace pysparse
