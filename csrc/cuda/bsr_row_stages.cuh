// Shared-memory staging of one block row's nonzero blocks for the large-M tensor-core kernels (mma.sync and
// wgmma): the row's kept blocks form one compressed K axis, cut into stages of 64 columns (64 / bw
// consecutive blocks). A stage holds the matching x slices [kTileM tokens x 64] and weight blocks [BH x 64].
// Rows are 64 elements (128 bytes) with the 16-byte chunks XOR-swizzled by row (chunk ^ row % 8): the
// ldmatrix reads of the mma.sync kernel hit 8 different bank groups, and with 1024-byte aligned tiles it is
// exactly the 128-byte swizzle the wgmma descriptors describe.
#pragma once
#include "common/bsr_problem.h"
#include "cuda/mma_utils.cuh"

namespace pysparse::row_stages {

constexpr int kRowElems = 64;   // stage row pitch in elements: 64 columns of the compressed K, 128 bytes
constexpr int kColCache = 512;  // column indices of one block row kept in shared memory

__device__ __forceinline__ int swz(int row, int chunk) { return row * kRowElems + ((chunk ^ (row & 7)) << 3); }

// The kept blocks [begin, begin + n_blocks) of a block row. Indices were validated at pack/load; clamping
// keeps even a malformed call inside its buffers.
struct RowRange {
  int64_t begin, n_blocks;
};
__device__ __forceinline__ RowRange row_range(const int32_t* crow, int64_t block_row, int64_t nnz) {
  const int64_t begin = max(int64_t(crow[block_row]), int64_t(0));
  const int64_t end = min(int64_t(crow[block_row + 1]), nnz);
  return {begin, max(end - begin, int64_t(0))};
}

// Copies the row's column indices into s_col (kColCache entries) so that issuing a stage's copies never
// waits on a global load; rows longer than the cache read them from global memory. Ends with a barrier.
__device__ __forceinline__ const int32_t* cache_cols(int32_t* s_col, const int32_t* col, RowRange r, int threads) {
  for (int64_t j = threadIdx.x; j < min(r.n_blocks, int64_t(kColCache)); j += threads) s_col[j] = col[r.begin + j];
  __syncthreads();
  return r.n_blocks <= kColCache ? s_col : col + r.begin;
}

// Issues one stage's cp.async copies. Stage s holds blocks s * (64 / bw) + j at columns [j*bw, (j+1)*bw) of
// its rows; blocks past the row's end, columns past K and tokens past M are zero-filled (0 * inf in the
// padding must not reach the output). Each thread always copies the same 16-byte chunk column (tid % 8) of
// rows tid / 8 + (kThreads / 8) * r, so the block and column it reads are fixed per stage.
template <typename T, int kTileM, int BH, int kThreads>
struct StageLoader {
  static constexpr int kRowsPerPass = kThreads / 8;
  const T* x;
  const T* values;
  const int32_t* cols;
  RowRange row;
  int64_t t0;
  BsrProblem p;
  int chunk, row0, block_in_stage, k_in_block, blocks_per_stage;

  __device__ StageLoader(const T* x_, const T* values_, const int32_t* cols_, RowRange row_, int64_t t0_,
                         const BsrProblem& p_)
      : x(x_), values(values_), cols(cols_), row(row_), t0(t0_), p(p_) {
    const int bw = int(p.bw), chunks_per_block = bw >> 3;
    chunk = threadIdx.x & 7;
    row0 = threadIdx.x >> 3;
    block_in_stage = chunk / chunks_per_block;
    k_in_block = (chunk % chunks_per_block) * 8;
    blocks_per_stage = kRowElems / bw;  // bw divides 64 (dispatcher)
  }
  __device__ int stages_in(RowRange r) const { return int((r.n_blocks + blocks_per_stage - 1) / blocks_per_stage); }
  __device__ int n_stages() const { return stages_in(row); }

  __device__ __forceinline__ void load(T* sx, T* sw, int s) const {
    using cuda_mma::cp_async_16;
    const int64_t j = int64_t(s) * blocks_per_stage + block_in_stage;
    const int64_t c = j < row.n_blocks ? int64_t(cols[j]) : -1;
    const int64_t k = c * p.bw + k_in_block;
    const bool col_ok = c >= 0 && c < p.n_block_cols && k < p.K;
#pragma unroll
    for (int r = 0; r < kTileM / kRowsPerPass; ++r) {
      const int rw = row0 + kRowsPerPass * r;
      const bool ok = col_ok && t0 + rw < p.M;
      cp_async_16(sx + swz(rw, chunk), ok ? x + (t0 + rw) * p.ldx + k : x, ok);
    }
    const T* wb = values + ((row.begin + j) * BH) * p.bw + k_in_block;
#pragma unroll
    for (int r = 0; r < (BH + kRowsPerPass - 1) / kRowsPerPass; ++r) {
      const int rw = row0 + kRowsPerPass * r;
      if (BH % kRowsPerPass != 0 && rw >= BH) break;
      cp_async_16(sw + swz(rw, chunk), col_ok ? wb + rw * p.bw : values, col_ok);
    }
  }
};

// Output tile epilogue shared by both kernels: acc holds, per 16-token group mt and 8-output group nt, the
// mma / wgmma accumulator fragment (rows g, g + 8 x columns 2q, 2q + 1 with g = lane / 4, q = lane % 4) of
// tokens token0 + kMtStride * mt (+ g, + g + 8) and outputs n0 + 8 * nt (+ 2q, + 2q + 1); adds the bias,
// rounds, and writes pairs where the row allows.
template <typename T, int kMtStride, int MT, int NT>
__device__ __forceinline__ void store_tile(const float (&acc)[MT][NT][4], const T* __restrict__ bias, T* __restrict__ y,
                                           const BsrProblem& p, int64_t token0, int64_t n0, int lane) {
  using namespace cuda_mma;
  const int g = lane >> 2, q = lane & 3;
  const bool pair_ok = (p.N % 2) == 0;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int64_t n = n0 + nt * 8 + 2 * q;
    if (n >= p.N) continue;
    const bool has2 = n + 1 < p.N;
    const float b0 = bias ? to_f32(bias[n]) : 0.f;
    const float b1 = (bias && has2) ? to_f32(bias[n + 1]) : 0.f;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t t = token0 + mt * kMtStride + g + h * 8;
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

}  // namespace pysparse::row_stages
