#include "channel_sparse_args.h"

namespace pysparse {
namespace {

bool is_supported_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

void check_common(const char* op, const at::Tensor& input, const at::Tensor& values, const at::Tensor& out_index,
                  const at::Tensor& in_index, const std::optional<at::Tensor>& bias, int64_t n_out,
                  int64_t value_dims) {
  TORCH_CHECK_TYPE(is_supported_float(input.scalar_type()), op, ": input must be float32, bfloat16 or float16, got ",
                   input.scalar_type());
  TORCH_CHECK_TYPE(values.scalar_type() == input.scalar_type(), op, ": values must have the input's dtype ",
                   input.scalar_type(), ", got ", values.scalar_type());
  TORCH_CHECK_TYPE(out_index.scalar_type() == at::kInt && in_index.scalar_type() == at::kInt, op,
                   ": out_index and in_index must be int32 (the Python wrapper converts int64), got ",
                   out_index.scalar_type(), " and ", in_index.scalar_type());
  TORCH_CHECK_VALUE(out_index.dim() == 1 && in_index.dim() == 1, op,
                    ": out_index and in_index must be 1-D, got shapes ", out_index.sizes(), " and ", in_index.sizes());
  TORCH_CHECK_VALUE(values.dim() == value_dims, op, ": values must be ", value_dims, "-D, got shape ", values.sizes());
  TORCH_CHECK_VALUE(values.size(0) == out_index.numel() && values.size(1) == in_index.numel(), op,
                    ": values must have shape [len(out_index)=", out_index.numel(), ", len(in_index)=",
                    in_index.numel(), ", ...], got ", values.sizes());
  TORCH_CHECK_VALUE(n_out >= out_index.numel(), op, ": out_index keeps ", out_index.numel(),
                    " outputs, more than the dense layer's ", n_out);
  const auto device = input.device();
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"values", &values},
                                {"out_index", &out_index},
                                {"in_index", &in_index}}) {
    TORCH_CHECK_VALUE(t->device() == device, op, ": ", name, " must be on the input's device ", device, ", got ",
                      t->device());
  }
  if (bias.has_value()) {
    const auto& b = *bias;
    TORCH_CHECK_TYPE(b.scalar_type() == input.scalar_type(), op, ": bias must have the input's dtype ",
                     input.scalar_type(), ", got ", b.scalar_type());
    TORCH_CHECK_VALUE(b.device() == device, op, ": bias must be on the input's device ", device, ", got ", b.device());
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == n_out, op, ": bias must have shape [", n_out, "] (all outputs of "
                      "the dense layer), got ", b.sizes());
  }
}

}  // namespace

ChannelSparseArgs prepare_channel_sparse_linear(const at::Tensor& input, const at::Tensor& values,
                                                const at::Tensor& out_index, const at::Tensor& in_index,
                                                const std::optional<at::Tensor>& bias, int64_t out_features) {
  const char* op = "channel_sparse_linear";
  TORCH_CHECK_VALUE(out_features >= 0, op, ": out_features must be >= 0, got ", out_features);
  TORCH_CHECK_VALUE(input.dim() >= 1, op,
                    ": input must have at least 1 dimension [..., in_features], got a 0-d tensor");
  check_common(op, input, values, out_index, in_index, bias, out_features, 2);
  ChannelSparseArgs a;
  const int64_t K = input.size(-1);
  TORCH_CHECK_VALUE(in_index.numel() <= K, op, ": in_index keeps ", in_index.numel(),
                    " inputs, more than in_features=", K);
  at::Tensor x = input.reshape({-1, K});
  if (K > 1 && x.stride(1) != 1) x = x.contiguous();
  if (x.size(0) > 1 && x.stride(0) < K) x = x.contiguous();  // broadcast (stride 0) rows
  a.x = x;
  a.values = values.contiguous();
  a.out_index = out_index.contiguous();
  a.in_index = in_index.contiguous();
  if (bias.has_value()) a.bias = bias->contiguous();
  a.n_out = out_features;
  a.n_in = K;
  a.out_shape = input.sizes().vec();
  a.out_shape.back() = out_features;
  return a;
}

ChannelSparseArgs prepare_channel_sparse_conv2d(const at::Tensor& input, const at::Tensor& values,
                                                const at::Tensor& out_index, const at::Tensor& in_index,
                                                const std::optional<at::Tensor>& bias, int64_t out_channels) {
  const char* op = "channel_sparse_conv2d";
  TORCH_CHECK_VALUE(out_channels >= 0, op, ": out_channels must be >= 0, got ", out_channels);
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": input must be 4-D [batch, channels, height, width], got shape ",
                    input.sizes());
  check_common(op, input, values, out_index, in_index, bias, out_channels, 4);
  TORCH_CHECK_VALUE(in_index.numel() <= input.size(1), op, ": in_index keeps ", in_index.numel(),
                    " input channels, more than the input's ", input.size(1));
  ChannelSparseArgs a;
  a.x = input.contiguous();
  a.values = values.contiguous();
  a.out_index = out_index.contiguous();
  a.in_index = in_index.contiguous();
  if (bias.has_value()) a.bias = bias->contiguous();
  a.n_out = out_channels;
  a.n_in = input.size(1);
  return a;
}

std::string check_channel_index(const int32_t* idx, int64_t n, int64_t limit, const char* name) {
  for (int64_t i = 0; i < n; ++i) {
    if (idx[i] < 0 || idx[i] >= limit) {
      return std::string(name) + "[" + std::to_string(i) + "] = " + std::to_string(idx[i]) + " is outside [0, " +
             std::to_string(limit) + ")";
    }
    if (i > 0 && idx[i] <= idx[i - 1]) {
      return std::string(name) + " must be strictly increasing, but entry " + std::to_string(i) + " (" +
             std::to_string(idx[i]) + ") follows " + std::to_string(idx[i - 1]);
    }
  }
  return "";
}

}  // namespace pysparse
