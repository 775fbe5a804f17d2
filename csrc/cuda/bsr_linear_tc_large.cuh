// Tensor-core block-sparse linear for many tokens (M > 16), bf16 / fp16, fp32 accumulation, mma.sync
// (sm80+; on sm90a builds the wgmma kernel takes the shapes it handles).
//
// Parallel strategy: one CTA (WM = 2 or 4 warps) owns a tile of 32 * WM tokens x one block row of BH outputs
// (BH in {16, 32, 64}); warp w owns tokens [32w, 32w + 32) x all BH outputs, so every output is written by
// one thread and no reduction is needed. The CTA's "K loop" walks the nonzero blocks of its block row as
// one compressed K axis in stages of 64 columns (bsr_row_stages.cuh), copied with cp.async several stages
// deep while the tensor cores (mma.sync m16n8k16 fed by ldmatrix) consume an earlier stage; each stage's 4
// k16 steps unroll at compile time, whatever bw is. blockIdx.x runs over block rows so CTAs that run
// together share one token tile of x in L2 (x traffic dominates: each kept block re-reads tokens x bw of x).
// Measured on an H200 (benchmarks/NOTES_cuda.md, v3): 128 tokens (4 warps, 3 CTAs per SM) is fastest
// wherever the grid fills the chip; 256 tokens (8 warps, one CTA per SM) was 1.3x slower.
// Requirements (checked by the dispatcher): bw in {16, 32, 64}, K and the row stride of x
// multiples of 8, 16-byte aligned x and values.
#pragma once
#include <c10/cuda/CUDAException.h>

#include "cuda/bsr_row_stages.cuh"

namespace pysparse {

namespace tc_large {
template <int WM>
constexpr int tile_m() { return 32 * WM; }
// 64 tokens: 4 stages, up to 3 CTAs per SM (64 KB each for BH = 64); 128 tokens: 3 stages, 3 CTAs (72 KB).
template <int WM>
constexpr int stages() { return WM == 4 ? 3 : 4; }
template <int BH, int WM>
constexpr int stage_elems() { return (tile_m<WM>() + BH) * row_stages::kRowElems; }
}  // namespace tc_large

template <typename T, int BH, int WM>
__global__ void __launch_bounds__(32 * WM, 3)
    bsr_linear_tc_large_kernel(const T* __restrict__ x, const T* __restrict__ values,
                               const int32_t* __restrict__ crow, const int32_t* __restrict__ col,
                               const T* __restrict__ bias, T* __restrict__ y, BsrProblem p) {
  using namespace tc_large;
  using namespace row_stages;
  using namespace cuda_mma;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  constexpr int kThreads = 32 * WM, kTileM = tile_m<WM>(), kStages = stages<WM>();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t block_row = blockIdx.x;
  const int64_t t0 = int64_t(blockIdx.y) * kTileM;

  __shared__ int32_t s_col[kColCache];
  const RowRange row = row_range(crow, block_row, p.nnz);
  const int32_t* cols = cache_cols(s_col, col, row, kThreads);
  const StageLoader<T, kTileM, BH, kThreads> loader(x, values, cols, row, t0, p);
  const int n_stages_total = loader.n_stages();
  auto load_stage = [&](int slot, int s) {
    T* sx = smem + slot * stage_elems<BH, WM>();
    loader.load(sx, sx + kTileM * kRowElems, s);
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
    if (s < n_stages_total) load_stage(s, s);
    cp_async_commit();
  }

  for (int i = 0; i < n_stages_total; ++i) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage i landed for every thread; stage i-1 is no longer read by anyone
    const int next = i + kStages - 1;
    if (next < n_stages_total) load_stage(next % kStages, next);
    cp_async_commit();

    const T* sx = smem + (i % kStages) * stage_elems<BH, WM>();
    const T* sw = sx + kTileM * kRowElems;
#pragma unroll
    for (int kk = 0; kk < kRowElems / 16; ++kk) {
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int r = warp * 32 + mt * 16 + (lane & 15);
        ldmatrix_x4(a[mt], sx + swz(r, kk * 2 + (lane >> 4)));
      }
#pragma unroll
      for (int n16 = 0; n16 < BH / 16; ++n16) {
        uint32_t b[4];
        const int r = n16 * 16 + (lane & 7) + ((lane >> 4) << 3);
        ldmatrix_x4(b, sw + swz(r, kk * 2 + ((lane >> 3) & 1)));
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma_16816<T>(acc[mt][2 * n16], a[mt], b[0], b[1]);
          mma_16816<T>(acc[mt][2 * n16 + 1], a[mt], b[2], b[3]);
        }
      }
    }
  }
  cp_async_wait<0>();
  store_tile<T, 16>(acc, bias, y, p, t0 + warp * 32, block_row * BH, lane);
}

template <typename T, int BH, int WM>
void launch_bsr_linear_tc_large(const T* x, const T* values, const int32_t* crow, const int32_t* col, const T* bias,
                                T* y, const BsrProblem& p, cudaStream_t stream) {
  using namespace tc_large;
  constexpr int smem_bytes = stages<WM>() * stage_elems<BH, WM>() * int(sizeof(T));
  // > 48 KB of dynamic shared memory must be opted into, per function and device; the call is host-only.
  C10_CUDA_CHECK(cudaFuncSetAttribute(bsr_linear_tc_large_kernel<T, BH, WM>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  const dim3 grid(unsigned(p.n_block_rows), unsigned((p.M + tile_m<WM>() - 1) / tile_m<WM>()));
  bsr_linear_tc_large_kernel<T, BH, WM><<<grid, 32 * WM, smem_bytes, stream>>>(x, values, crow, col, bias, y, p);
}

}  // namespace pysparse
