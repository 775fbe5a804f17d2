// Portable block-sparse linear kernel (any block size, any dtype, float32 accumulation): the path for CPUs
// without AVX2 (and non-x86 builds), and the reference the SIMD paths are tested against in C++.
//
// Parallel strategy: x is packed once per call into float32 token tiles laid out [K][kTile] (zero padded),
// so the inner loop is a contiguous axpy over kTile tokens that the compiler vectorises. Work items are
// (token tile, block row) pairs; each item owns a [bh x kTile] accumulator for the whole walk over its
// block row's nonzero blocks, so no two threads write the same output and no reduction pass is needed.
// Items are handed out dynamically because block rows hold different numbers of blocks.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "isa_kernels.h"

namespace pysparse {
namespace generic {
namespace {

constexpr int64_t kTile = 32;  // tokens per tile: 32 floats = two AVX-512 or four AVX2 vectors per row

template <typename T>
void pack_x_tiles(const T* x, const BsrProblem& p, int64_t k_padded, float* packed, int num_threads) {
  const int64_t n_tiles = (p.M + kTile - 1) / kTile;
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t tile = 0; tile < n_tiles; ++tile) {
    float* dst = packed + tile * k_padded * kTile;
    const int64_t t0 = tile * kTile;
    const int64_t rows = std::min(kTile, p.M - t0);
    std::fill(dst, dst + k_padded * kTile, 0.0f);
    for (int64_t t = 0; t < rows; ++t) {
      const T* src = x + (t0 + t) * p.ldx;
      for (int64_t k = 0; k < p.K; ++k) dst[k * kTile + t] = to_float(src[k]);
    }
  }
}

template <typename T>
void block_row_tile(const float* x_tile, const T* values, const int32_t* crow, const int32_t* col, const T* bias,
                    T* y, const BsrProblem& p, int64_t block_row, int64_t t0, float* acc) {
  const int64_t bh = p.bh, bw = p.bw, block_elems = bh * bw;
  std::fill(acc, acc + bh * kTile, 0.0f);
  for (int64_t b = crow[block_row]; b < crow[block_row + 1]; ++b) {
    const T* w = values + b * block_elems;
    const float* xb = x_tile + int64_t(col[b]) * bw * kTile;
    // Weights over padding columns (past K) are skipped: a non-finite padding value must not reach y.
    const int64_t jn = std::min(bw, p.K - int64_t(col[b]) * bw);
    for (int64_t i = 0; i < bh; ++i) {
      float* __restrict a = acc + i * kTile;
      const T* wrow = w + i * bw;
      for (int64_t j = 0; j < jn; ++j) {
        const float wij = to_float(wrow[j]);
        const float* __restrict xr = xb + j * kTile;
#pragma omp simd
        for (int64_t t = 0; t < kTile; ++t) a[t] += wij * xr[t];
      }
    }
  }
  const int64_t n0 = block_row * bh;
  const int64_t rows = std::min(bh, p.N - n0);
  const int64_t tokens = std::min(kTile, p.M - t0);
  for (int64_t t = 0; t < tokens; ++t) {
    T* yrow = y + (t0 + t) * p.N + n0;
    for (int64_t i = 0; i < rows; ++i) {
      const float b = bias ? to_float(bias[n0 + i]) : 0.0f;
      const float r = p.residual ? to_float(static_cast<const T*>(p.residual)[(t0 + t) * p.N + n0 + i]) : 0.0f;
      yrow[i] = from_float<T>(activate(acc[i * kTile + t] + b + r, p.act));
    }
  }
}

}  // namespace

template <typename T>
void bsr_linear(const T* x, const T* values, const int32_t* crow, const int32_t* col, const T* bias, T* y,
                    const BsrProblem& p, int num_threads) {
  if (p.M == 0 || p.N == 0) return;
  const int64_t k_padded = p.n_block_cols * p.bw;
  const int64_t n_tiles = (p.M + kTile - 1) / kTile;
  std::vector<float> packed(size_t(n_tiles * k_padded * kTile));
  pack_x_tiles(x, p, k_padded, packed.data(), num_threads);
  const int64_t items = n_tiles * p.n_block_rows;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> acc(size_t(p.bh * kTile));
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t tile = item / p.n_block_rows, block_row = item % p.n_block_rows;
      block_row_tile(packed.data() + tile * k_padded * kTile, values, crow, col, bias, y, p, block_row,
                     tile * kTile, acc.data());
    }
  }
}

template void bsr_linear<float>(const float*, const float*, const int32_t*, const int32_t*, const float*, float*,
                                const BsrProblem&, int);
template void bsr_linear<bfloat16_t>(const bfloat16_t*, const bfloat16_t*, const int32_t*, const int32_t*,
                                     const bfloat16_t*, bfloat16_t*, const BsrProblem&, int);
template void bsr_linear<float16_t>(const float16_t*, const float16_t*, const int32_t*, const int32_t*,
                                    const float16_t*, float16_t*, const BsrProblem&, int);

}  // namespace generic
}  // namespace pysparse
