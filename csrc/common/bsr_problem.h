// The description of one block-sparse linear call that the kernels of both devices take (csrc/cpu/kernels and
// csrc/cuda): y[M, N] = act(x[M, K] @ W^T + bias + residual), W [N, K] in BSR form. Plain data, no torch, no device
// code: the CPU kernel core, the ATen argument checks (bsr_linear_args.h) and the CUDA kernels all include it.
//
// W is stored as torch's BSR: crow[n_block_rows + 1], col[nnz], values[nnz][bh][bw] (row-major blocks).
// The last block row / column may overhang N / K (padding): kernels never read x past K nor write y past N.
#pragma once
#include <cstdint>

namespace pysparse {

// Elementwise activations the kernels fuse into their epilogue. kGelu: exact GELU, x * Phi(x) (erf form); kRelu6:
// min(max(x, 0), 6).
enum class Activation : int { kNone = 0, kRelu = 1, kGelu = 2, kRelu6 = 3 };

struct BsrProblem {
  int64_t M = 0;        // tokens (rows of x and y)
  int64_t K = 0;        // in_features
  int64_t N = 0;        // out_features
  int64_t bh = 1, bw = 1;
  int64_t n_block_rows = 0;  // ceil(N / bh)
  int64_t n_block_cols = 0;  // ceil(K / bw)
  int64_t nnz = 0;           // stored blocks
  int64_t ldx = 0;           // row stride of x, in elements (>= K)
  Activation act = Activation::kNone;  // applied to y after the bias (and the residual)
  // Optional [M, N] tensor of y's type, row stride N, added to y before the activation (a fused residual connection:
  // ResNet's relu(conv(x) + identity)). Never written; it may not overlap y.
  const void* residual = nullptr;
  // Optional [nnz][bw][bh] of the call's element type: the blocks transposed (out[b][j][i] = values[b][i][j]), the
  // layout the broadcast kernel reads. A caller that stores its weight so (SparseLinear does where
  // bsr_linear_reads_transposed<T>) passes it here; without it the kernel transposes float32 blocks itself on every
  // call (16-bit ones take the other kernels). When it is given and bsr_linear_reads_transposed<T>(p) holds, the
  // kernels never read `values`, which may then be null.
  const void* transposed_values = nullptr;
};

}  // namespace pysparse
