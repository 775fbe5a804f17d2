// Argument checks shared by the CPU and CUDA implementations of pysparse::bsr_linear.
// Everything here reads tensor metadata only (no device data), so it costs nothing on CUDA.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "common/bsr_problem.h"

namespace pysparse {

struct BsrLinearArgs {
  at::Tensor x;       // [M, K] view of the input, unit stride along K
  at::Tensor values;  // [nnz, bh, bw], contiguous; undefined when values_t holds the weight (row_major_values)
  // The weight as given when it came block-transposed (each block column-major: strides [bh*bw, 1, bh], the layout
  // the CPU broadcast kernel reads, which SparseLinear stores where that kernel runs) and the op allowed it; its data
  // is then [nnz, bw, bh] contiguous. Otherwise undefined.
  at::Tensor values_t;
  at::Tensor crow;    // int32, contiguous
  at::Tensor col;     // int32, contiguous
  std::optional<at::Tensor> bias;  // [N], contiguous
  BsrProblem problem;
  std::vector<int64_t> out_shape;  // input.shape[:-1] + [N]: the output, written as [M, N] row-major
};

// The dtype checks shared by the bsr ops (input float32 / bfloat16 / float16, values alike, int32 indices).
void check_bsr_dtypes(const char* op, const at::Tensor& input, const at::Tensor& values,
                      const at::Tensor& crow_indices, const at::Tensor& col_indices);

// The rest of the weight checks (dtypes, devices, index shapes, bias) for an op named `op` whose weight is
// [out_features, K]: fills values (or values_t, with keep_block_transposed) / crow / col / bias and every problem
// field but M and ldx.
BsrLinearArgs check_bsr_weight(const char* op, const at::Tensor& input, const at::Tensor& values,
                               const at::Tensor& crow_indices, const at::Tensor& col_indices,
                               const std::optional<at::Tensor>& bias, int64_t out_features, int64_t K,
                               bool keep_block_transposed = false);

// The row-major [nnz, bh, bw] weight, made from values_t (a copy, this call only) when that holds it.
const at::Tensor& row_major_values(BsrLinearArgs& a);

// "relu" / "relu6" / "gelu" (exact) as the kernels' Activation; None (no activation) gives kNone; anything else raises.
Activation parse_activation(const char* op, const std::optional<c10::string_view>& activation);

// The residual an op adds before its activation, checked (the output's shape, the input's dtype and device) and
// made contiguous: the kernels read it with the output's row stride. Keep the result alive for the call.
at::Tensor prepare_residual(const char* op, const at::Tensor& residual, const at::Tensor& input,
                            at::IntArrayRef out_shape);

BsrLinearArgs prepare_bsr_linear(const at::Tensor& input, const at::Tensor& values, const at::Tensor& crow_indices,
                                 const at::Tensor& col_indices, const std::optional<at::Tensor>& bias,
                                 int64_t out_features, bool keep_block_transposed = false);

}  // namespace pysparse
