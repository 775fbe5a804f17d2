// Hopper (sm_90a) block-sparse linear for many tokens, bf16 / fp16, fp32 accumulation, warpgroup MMA.
//
// Parallel strategy: a work item is a tile of 2 * 64 * H tokens (H = 1 or 2) x one block row of BH outputs
// (BH in {32, 64}); a CTA of two warpgroups computes it, warpgroup wg owning tokens [64 H wg, 64 H (wg + 1))
// x all BH outputs as H wgmma m64 x BH tiles whose fp32 accumulators stay in registers. The K loop is the
// mma.sync kernel's (bsr_row_stages.cuh): the row's kept blocks as one compressed K axis in 64-column
// stages, cp.async'ed kStages deep into 128-byte-swizzled, 1024-byte-aligned tiles that the wgmma
// descriptors read directly (no ldmatrix, no operand registers). Per stage every thread waits for its
// copies, fences them into the async proxy, and meets the others at a barrier; each warpgroup then issues
// its 4 k16 steps x H MMAs asynchronously, issues the copies of the stage kStages - 1 ahead (into the slot
// the previous stage used, whose MMAs completed before the barrier) while the tensor cores run, and waits.
// A CTA walks items blockIdx.x, blockIdx.x + gridDim.x, ... with one continuous copy cursor. The launch
// gives each item its own CTA (a persistent grid, one CTA per resident slot, measured no faster on an
// H200: benchmarks/NOTES_cuda.md v4) unless the item count exceeds a grid's limit.
// Requirements (checked by the dispatcher): sm_90a build and a compute-capability 9.0 device, BH in {32, 64},
// bw in {16, 32, 64}, K and the row stride of x multiples of 8, 16-byte aligned x and values.
#pragma once
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "cuda/bsr_row_stages.cuh"
#include "cuda/wgmma_utils.cuh"

namespace pysparse {

namespace tc_wgmma {
constexpr int kThreads = 256;  // two warpgroups
// 128 tokens x 4 stages ~99 KB (2 CTAs per SM), 256 x 4 ~161 KB (1 per SM). Fewer stages for more CTAs per SM
// (256 x 2, 128 x 3) measured slower on an H200 (benchmarks/NOTES_cuda.md v4).
constexpr int kStages = 4;
template <int H>
constexpr int tile_m() { return 128 * H; }
template <int BH, int H>
constexpr int stage_bytes() { return (tile_m<H>() + BH) * row_stages::kRowElems * 2; }  // multiple of 1024
template <int BH, int H>
constexpr int smem_bytes() { return kStages * stage_bytes<BH, H>() + 1024; }
}  // namespace tc_wgmma

template <typename T, int BH, int H>
__global__ void __launch_bounds__(tc_wgmma::kThreads, 1)
    bsr_linear_wgmma_kernel(const T* __restrict__ x, const T* __restrict__ values, const int32_t* __restrict__ crow,
                            const int32_t* __restrict__ col, const T* __restrict__ bias, T* __restrict__ y,
                            BsrProblem p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace tc_wgmma;
  using namespace row_stages;
  using namespace cuda_mma;
  constexpr int kTileM = tile_m<H>();
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // The swizzle is a function of address bits 7-9, so every tile must start 1024-byte aligned.
  const uint32_t raw_addr = smem_addr(smem_raw);
  unsigned char* tiles = smem_raw + (((raw_addr + 1023) & ~1023u) - raw_addr);
  auto stage_x = [&](int64_t g) { return reinterpret_cast<T*>(tiles + (g % kStages) * stage_bytes<BH, H>()); };

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wg = warp >> 2;
  // Work items: (token tile, block row), block row fastest, so the CTAs running at one time share a token
  // tile of x in L2. CTA b takes items b, b + gridDim.x, ...
  const int64_t n_items = p.n_block_rows * ((p.M + kTileM - 1) / kTileM);
  const int64_t stride = gridDim.x;
  StageLoader<T, kTileM, BH, kThreads> loader(x, values, col, RowRange{0, 0}, 0, p);
  auto row_of = [&](int64_t item) { return row_range(crow, item % p.n_block_rows, p.nnz); };
  auto t0_of = [&](int64_t item) { return (item / p.n_block_rows) * kTileM; };
  // The load cursor runs kStages - 1 stages ahead of the MMAs through the CTA's whole item list, so a
  // tile's epilogue and the next tile's first stages overlap the copies already in flight.
  int64_t load_item = int64_t(blockIdx.x) - stride;
  int load_stage = 0, load_n = 0;
  int64_t issued = 0;
  auto issue_next = [&]() {
    while (load_stage >= load_n) {
      load_item += stride;
      if (load_item >= n_items) return;
      loader.row = row_of(load_item);
      loader.cols = col + loader.row.begin;
      loader.t0 = t0_of(load_item);
      load_stage = 0;
      load_n = loader.n_stages();
    }
    T* sx = stage_x(issued++);
    loader.load(sx, sx + kTileM * kRowElems, load_stage++);
  };

  float acc[H][BH / 8][4];
  auto zero_acc = [&]() {
#pragma unroll
    for (int h = 0; h < H; ++h)
#pragma unroll
      for (int j = 0; j < BH / 8; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[h][j][r] = 0.f;
  };
  zero_acc();
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    issue_next();
    cp_async_commit();
  }

  int64_t consumed = 0;
  for (int64_t item = blockIdx.x; item < n_items; item += stride) {
    const int n_stages = loader.stages_in(row_of(item));
    for (int s = 0; s < n_stages; ++s, ++consumed) {
      // One commit group per stage, in order: waiting for all but the newest kStages - 2 lands this one.
      cp_async_wait<kStages - 2>();
      wgmma::fence_proxy_async_smem();
      __syncthreads();  // this stage landed for every thread; every MMA of the previous stage has completed

      const uint32_t sx = smem_addr(stage_x(consumed));
      const uint32_t sa = sx + uint32_t(wg * H * 64 * kRowElems * 2), sw = sx + uint32_t(kTileM * kRowElems * 2);
#pragma unroll
      for (int h = 0; h < H; ++h) wgmma::pin(acc[h]);
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < kRowElems / 16; ++kk) {
        const uint64_t desc_w = wgmma::desc_k_major_sw128(sw + kk * 32);
#pragma unroll
        for (int h = 0; h < H; ++h)
          wgmma::mma_m64k16<T, BH>(acc[h], wgmma::desc_k_major_sw128(sa + h * 64 * kRowElems * 2 + kk * 32), desc_w);
      }
      wgmma::commit();
      // Into the slot the previous stage used (its MMAs completed before the barrier), while these run.
      issue_next();
      cp_async_commit();
      wgmma::wait<0>();
#pragma unroll
      for (int h = 0; h < H; ++h) wgmma::pin(acc[h]);
    }
    store_tile<T, 64>(acc, bias, y, p, t0_of(item) + wg * H * 64 + (warp & 3) * 16, (item % p.n_block_rows) * BH,
                      lane);
    zero_acc();
  }
  cp_async_wait<0>();
#endif
}

template <typename T, int BH, int H>
void launch_bsr_linear_wgmma(const T* x, const T* values, const int32_t* crow, const int32_t* col, const T* bias,
                             T* y, const BsrProblem& p, const cudaDeviceProp& prop, cudaStream_t stream) {
  using namespace tc_wgmma;
  constexpr int smem = smem_bytes<BH, H>();
  C10_CUDA_CHECK(cudaFuncSetAttribute(bsr_linear_wgmma_kernel<T, BH, H>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int64_t n_items = p.n_block_rows * ((p.M + tile_m<H>() - 1) / tile_m<H>());
  const int64_t resident = int64_t(prop.multiProcessorCount) *
                           std::max<int64_t>(1, int64_t(prop.sharedMemPerMultiprocessor) / (smem + 1024));
  const int64_t grid = n_items > INT32_MAX ? resident : n_items;
  bsr_linear_wgmma_kernel<T, BH, H><<<unsigned(grid), kThreads, smem, stream>>>(x, values, crow, col, bias, y, p);
}

}  // namespace pysparse
