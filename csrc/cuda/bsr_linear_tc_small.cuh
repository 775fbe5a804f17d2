// Tensor-core block-sparse linear for few tokens (M <= 16, decode), bf16 / fp16, fp32 accumulation.
//
// The bound is the kept weight bytes streamed from memory once. Parallel strategy: one CTA (4 warps) per
// (block row, 8-row slice of it); the 4 warps split that slice's walk over the row's k steps (step s goes
// to warp s % 4) and add their 16x8 partial tiles in shared memory at the end, so even a matrix with few
// block rows keeps enough loads in flight. The row's column indices are staged in shared memory first, so
// weight loads never wait on an index load. Operands go straight from global memory into mma.sync
// fragments without shared memory: the dot product does not care about the order of k, so each lane loads
// 8 consecutive k (16 bytes; 4 k / 8 bytes when bw is not a multiple of 32) of one weight row and of the
// matching x rows, and the same permutation of k is applied to both operands (physical k 8q..8q+7 play
// virtual k 2q, 2q+1, 2q+8, 2q+9 of two consecutive m16n8k16 steps). Weight loads are marked streaming
// (read once); x is tiny and stays cached.
// Requirements (checked by the dispatcher): bh a multiple of 8, bw a multiple of 16, K and the row stride
// of x multiples of 8, 16-byte aligned x and values.
#pragma once
#include <type_traits>

#include "common/bsr_problem.h"
#include "cuda/mma_utils.cuh"

namespace pysparse {

namespace tc_small {
constexpr int kWarps = 4;
constexpr int kUnroll = 4;       // k steps whose loads are issued before their MMAs
constexpr int kColCache = 512;   // column indices of one block row kept in shared memory
}  // namespace tc_small

template <typename T, bool kWide>  // kWide: 16-byte loads covering 32 k (bw % 32 == 0), else 8-byte / 16 k
__global__ void __launch_bounds__(tc_small::kWarps * 32)
    bsr_linear_tc_small_kernel(const T* __restrict__ x, const T* __restrict__ values,
                               const int32_t* __restrict__ crow, const int32_t* __restrict__ col,
                               const T* __restrict__ bias, T* __restrict__ y, BsrProblem p) {
  using namespace tc_small;
  using namespace cuda_mma;
  using Vec = std::conditional_t<kWide, uint4, uint2>;
  constexpr int kStep = kWide ? 32 : 16;   // k covered by one load per lane
  constexpr int kLaneK = kStep / 4;        // consecutive k one lane loads
  __shared__ float partial[kWarps - 1][32][4];
  __shared__ int32_t s_col[kColCache];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int slices = int(p.bh >> 3);
  const int64_t block_row = blockIdx.x / slices;
  const int slice = blockIdx.x % slices;
  const int bw = int(p.bw), steps_per_block = bw / kStep;
  // Indices were validated at pack/load; clamping keeps even a malformed call inside its buffers.
  const int64_t begin = max(int64_t(crow[block_row]), int64_t(0));
  const int64_t end = min(int64_t(crow[block_row + 1]), p.nnz);
  const int64_t n_blocks = max(end - begin, int64_t(0));
  for (int64_t j = threadIdx.x; j < min(n_blocks, int64_t(kColCache)); j += kWarps * 32) s_col[j] = col[begin + j];
  const int32_t* cols = n_blocks <= kColCache ? s_col : col + begin;
  __syncthreads();

  const int64_t steps = n_blocks * steps_per_block;
  const bool row_lo = g < p.M, row_hi = g + 8 < p.M;
  const T* x_lo = x + int64_t(g) * p.ldx;
  const T* x_hi = x + int64_t(g + 8) * p.ldx;
  const T* w_row = values + (begin * p.bh + slice * 8 + g) * bw + kLaneK * q;

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t s0 = warp; s0 < steps; s0 += int64_t(kWarps) * kUnroll) {
    Vec w[kUnroll], xl[kUnroll], xh[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t s = s0 + int64_t(u) * kWarps;
      w[u] = xl[u] = xh[u] = Vec{};
      if (s >= steps) continue;
      const int64_t j = s / steps_per_block;
      const int kc = int(s % steps_per_block) * kStep;
      const int64_t c = cols[j];
      const int64_t k = c * bw + kc + kLaneK * q;
      if (c < 0 || c >= p.n_block_cols || k >= p.K) continue;  // padding / malformed: contributes nothing
      w[u] = __ldcs(reinterpret_cast<const Vec*>(w_row + j * p.bh * bw + kc));
      if (row_lo) xl[u] = __ldg(reinterpret_cast<const Vec*>(x_lo + k));
      if (row_hi) xh[u] = __ldg(reinterpret_cast<const Vec*>(x_hi + k));
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint32_t a0[4] = {xl[u].x, xh[u].x, xl[u].y, xh[u].y};
      mma_16816<T>(acc, a0, w[u].x, w[u].y);
      if constexpr (kWide) {
        const uint32_t a1[4] = {xl[u].z, xh[u].z, xl[u].w, xh[u].w};
        mma_16816<T>(acc, a1, w[u].z, w[u].w);
      }
    }
  }

  if (warp > 0) {
#pragma unroll
    for (int e = 0; e < 4; ++e) partial[warp - 1][lane][e] = acc[e];
  }
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int w2 = 0; w2 < kWarps - 1; ++w2)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[e] += partial[w2][lane][e];

  const int64_t n = block_row * p.bh + slice * 8 + 2 * q;
  if (n >= p.N) return;
  const bool has2 = n + 1 < p.N;
  const float b0 = bias ? to_f32(bias[n]) : 0.f;
  const float b1 = (bias && has2) ? to_f32(bias[n + 1]) : 0.f;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t t = g + h * 8;
    if (t >= p.M) continue;
    T* dst = y + t * p.N + n;
    const float v0 = acc[2 * h] + b0, v1 = acc[2 * h + 1] + b1;
    if ((p.N % 2) == 0 && has2) {
      *reinterpret_cast<uint32_t*>(dst) = pack2<T>(v0, v1);
    } else {
      dst[0] = from_f32<T>(v0);
      if (has2) dst[1] = from_f32<T>(v1);
    }
  }
}

template <typename T>
void launch_bsr_linear_tc_small(const T* x, const T* values, const int32_t* crow, const int32_t* col, const T* bias,
                                T* y, const BsrProblem& p, cudaStream_t stream) {
  const unsigned grid = unsigned(p.n_block_rows * (p.bh / 8));
  const unsigned threads = tc_small::kWarps * 32;
  if (p.bw % 32 == 0) {
    bsr_linear_tc_small_kernel<T, true><<<grid, threads, 0, stream>>>(x, values, crow, col, bias, y, p);
  } else {
    bsr_linear_tc_small_kernel<T, false><<<grid, threads, 0, stream>>>(x, values, crow, col, bias, y, p);
  }
}

}  // namespace pysparse
