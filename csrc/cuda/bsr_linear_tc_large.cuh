// Tensor-core block-sparse linear for many tokens (M > 16), bf16 / fp16, fp32 accumulation.
//
// Parallel strategy: one CTA (4 warps) owns a tile of kTileM = 128 tokens x one block row of BH outputs
// (BH in {16, 32, 64}); warp w owns tokens [32w, 32w + 32) x all BH outputs, so every output is written by
// one thread and no reduction is needed. The CTA's "K loop" walks the nonzero blocks of its block row: for
// each block it copies the x slice [128 tokens x bw] and the weight block [BH x bw] into shared memory with
// cp.async, kStages deep, while the tensor cores (mma.sync m16n8k16 fed by ldmatrix) consume an earlier
// stage. Shared rows are 64 elements (128 bytes) wide with the 16-byte chunks XOR-swizzled by row, so the
// 8 rows an ldmatrix reads fall in 8 different bank groups. blockIdx.x runs over block rows so CTAs that
// run together share one token tile of x in L2 (x traffic dominates: each kept block re-reads M x bw of x).
// Requirements (checked by the dispatcher): bw a multiple of 16 and <= 64, K and the row stride of x
// multiples of 8, 16-byte aligned x and values.
#pragma once
#include <c10/cuda/CUDAException.h>

#include "cuda/mma_utils.cuh"
#include "cpu/kernels/bsr_linear.h"

namespace pysparse {

namespace tc_large {
constexpr int kTileM = 128;
constexpr int kThreads = 128;
constexpr int kRowElems = 64;  // smem row pitch in elements: one 64-wide block column, 128 bytes
constexpr int kStages = 4;

template <int BH>
constexpr int stage_elems() {
  return (kTileM + BH) * kRowElems;
}

__device__ __forceinline__ int swz(int row, int chunk) { return row * kRowElems + ((chunk ^ (row & 7)) << 3); }
}  // namespace tc_large

template <typename T, int BH>
__global__ void __launch_bounds__(tc_large::kThreads)
    bsr_linear_tc_large_kernel(const T* __restrict__ x, const T* __restrict__ values,
                               const int32_t* __restrict__ crow, const int32_t* __restrict__ col,
                               const T* __restrict__ bias, T* __restrict__ y, BsrProblem p) {
  using namespace tc_large;
  using namespace cuda_mma;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t block_row = blockIdx.x;
  const int64_t t0 = int64_t(blockIdx.y) * kTileM;
  const int bw = int(p.bw);
  const int chunks_per_row = bw >> 3;  // 16-byte chunks in one block row of bw elements
  // Indices were validated at pack/load; clamping keeps even a malformed call inside its buffers.
  const int64_t begin = max(int64_t(crow[block_row]), int64_t(0));
  const int64_t end = min(int64_t(crow[block_row + 1]), p.nnz);
  const int n_blocks = int(max(end - begin, int64_t(0)));

  auto load_stage = [&](int stage, int64_t b) {
    T* sx = smem + stage * stage_elems<BH>();
    T* sw = sx + kTileM * kRowElems;
    const int64_t c = col[b];
    const bool col_ok = c >= 0 && c < p.n_block_cols;
    const int64_t k0 = c * bw;
    for (int i = tid; i < kTileM * chunks_per_row; i += kThreads) {
      const int row = i / chunks_per_row, chunk = i % chunks_per_row;
      const int64_t t = t0 + row, k = k0 + chunk * 8;
      const bool ok = col_ok && t < p.M && k < p.K;
      cp_async_16(sx + swz(row, chunk), ok ? x + t * p.ldx + k : x, ok);
    }
    const T* wb = values + b * int64_t(BH) * bw;
    for (int i = tid; i < BH * chunks_per_row; i += kThreads) {
      const int row = i / chunks_per_row, chunk = i % chunks_per_row;
      const bool ok = col_ok && k0 + chunk * 8 < p.K;  // zero the padding columns: 0 * inf must not happen
      cp_async_16(sw + swz(row, chunk), ok ? wb + row * bw + chunk * 8 : values, ok);
    }
  };

  float acc[2][BH / 8][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < BH / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_blocks) load_stage(s, begin + s);
    cp_async_commit();
  }

  for (int i = 0; i < n_blocks; ++i) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage i landed for every thread; stage i-1 is no longer read by anyone
    const int next = i + kStages - 1;
    if (next < n_blocks) load_stage(next % kStages, begin + next);
    cp_async_commit();

    const T* sx = smem + (i % kStages) * stage_elems<BH>();
    const T* sw = sx + kTileM * kRowElems;
    for (int kk = 0; kk < bw / 16; ++kk) {
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int row = warp * 32 + mt * 16 + (lane & 15);
        ldmatrix_x4(a[mt], sx + swz(row, kk * 2 + (lane >> 4)));
      }
#pragma unroll
      for (int n16 = 0; n16 < BH / 16; ++n16) {
        uint32_t b[4];
        const int row = n16 * 16 + (lane & 7) + ((lane >> 4) << 3);
        ldmatrix_x4(b, sw + swz(row, kk * 2 + ((lane >> 3) & 1)));
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma_16816<T>(acc[mt][2 * n16], a[mt], b[0], b[1]);
          mma_16816<T>(acc[mt][2 * n16 + 1], a[mt], b[2], b[3]);
        }
      }
    }
  }
  cp_async_wait<0>();

  // Epilogue: thread holds rows g, g+8 x columns 2q, 2q+1 of each 16x8 tile.
  const int g = lane >> 2, q = lane & 3;
  const bool pair_ok = (p.N % 2) == 0;
#pragma unroll
  for (int nt = 0; nt < BH / 8; ++nt) {
    const int64_t n = block_row * BH + nt * 8 + 2 * q;
    if (n >= p.N) continue;
    const bool has2 = n + 1 < p.N;
    const float b0 = bias ? to_f32(bias[n]) : 0.f;
    const float b1 = (bias && has2) ? to_f32(bias[n + 1]) : 0.f;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t t = t0 + warp * 32 + mt * 16 + g + h * 8;
        if (t >= p.M) continue;
        T* dst = y + t * p.N + n;
        const float v0 = acc[mt][nt][2 * h] + b0, v1 = acc[mt][nt][2 * h + 1] + b1;
        if (pair_ok && has2) {
          *reinterpret_cast<uint32_t*>(dst) = pack2<T>(v0, v1);
        } else {
          dst[0] = from_f32<T>(v0);
          if (has2) dst[1] = from_f32<T>(v1);
        }
      }
    }
  }
}

template <typename T, int BH>
void launch_bsr_linear_tc_large(const T* x, const T* values, const int32_t* crow, const int32_t* col, const T* bias,
                                T* y, const BsrProblem& p, cudaStream_t stream) {
  using namespace tc_large;
  constexpr int smem_bytes = kStages * stage_elems<BH>() * int(sizeof(T));
  // > 48 KB of dynamic shared memory must be opted into, per function and device; the call is host-only.
  C10_CUDA_CHECK(cudaFuncSetAttribute(bsr_linear_tc_large_kernel<T, BH>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  const dim3 grid(unsigned(p.n_block_rows), unsigned((p.M + kTileM - 1) / kTileM));
  bsr_linear_tc_large_kernel<T, BH><<<grid, kThreads, smem_bytes, stream>>>(x, values, crow, col, bias, y, p);
}

}  // namespace pysparse
