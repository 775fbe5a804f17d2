// Argument checks shared by the CPU and CUDA implementations of pysparse::channel_sparse_linear / _conv2d.
// prepare_* read tensor metadata only (no device data); check_channel_index reads a CPU index array.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace pysparse {

struct ChannelSparseArgs {
  at::Tensor x;                    // linear: [M, K] view with unit stride along K; conv: contiguous [B, C, H, W]
  at::Tensor values;               // linear: [No, Ki]; conv: [No, Ki, kh, kw]; contiguous
  at::Tensor out_index;            // int32 [No], contiguous
  at::Tensor in_index;             // int32 [Ki], contiguous
  std::optional<at::Tensor> bias;  // [N], contiguous
  int64_t n_out = 0;               // N: out_features / out_channels of the dense layer
  int64_t n_in = 0;                // K: in_features / in_channels of the dense layer
  std::vector<int64_t> out_shape;  // linear only: input.shape[:-1] + [N]
};

ChannelSparseArgs prepare_channel_sparse_linear(const at::Tensor& input, const at::Tensor& values,
                                                const at::Tensor& out_index, const at::Tensor& in_index,
                                                const std::optional<at::Tensor>& bias, int64_t out_features);

ChannelSparseArgs prepare_channel_sparse_conv2d(const at::Tensor& input, const at::Tensor& values,
                                                const at::Tensor& out_index, const at::Tensor& in_index,
                                                const std::optional<at::Tensor>& bias, int64_t out_channels);

// "" when idx (int32, n entries) is strictly increasing within [0, limit), else a message saying what is wrong.
std::string check_channel_index(const int32_t* idx, int64_t n, int64_t limit, const char* name);

}  // namespace pysparse
