#include "bsr_linear_args.h"
#include <c10/util/accumulate.h>

namespace pysparse {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

}  // namespace

void check_bsr_dtypes(const char* op, const at::Tensor& input, const at::Tensor& values,
                      const at::Tensor& crow_indices, const at::Tensor& col_indices) {
  TORCH_CHECK_TYPE(is_supported_float(input.scalar_type()),
                   op, ": input must be float32, bfloat16 or float16, got ", input.scalar_type());
  TORCH_CHECK_TYPE(values.scalar_type() == input.scalar_type(), op, ": values must have the input's dtype ",
                   input.scalar_type(), ", got ", values.scalar_type());
  TORCH_CHECK_TYPE(crow_indices.scalar_type() == at::kInt && col_indices.scalar_type() == at::kInt,
                   op, ": crow_indices and col_indices must be int32 (pysparse.ops.", op, " converts "
                   "int64), got ", crow_indices.scalar_type(), " and ", col_indices.scalar_type());
}

namespace {

// Each block stored column-major, blocks one after another: values.transpose(1, 2) is contiguous. Blocks with one
// row or column are row-major too (is_contiguous), and no blocks have no layout: both stay on the row-major path.
bool is_block_transposed(const at::Tensor& values) {
  const int64_t bh = values.size(1), bw = values.size(2);
  return values.size(0) > 0 && bh > 1 && bw > 1 && !values.is_contiguous() && values.stride(0) == bh * bw &&
         values.stride(1) == 1 && values.stride(2) == bh;
}

}  // namespace

BsrLinearArgs check_bsr_weight(const char* op, const at::Tensor& input, const at::Tensor& values,
                               const at::Tensor& crow_indices, const at::Tensor& col_indices,
                               const std::optional<at::Tensor>& bias, int64_t out_features, int64_t K,
                               bool keep_block_transposed) {
  TORCH_CHECK_VALUE(values.dim() == 3, op, ": values must be 3-D [nnz_blocks, bh, bw], got shape ",
                    values.sizes());
  TORCH_CHECK_VALUE(crow_indices.dim() == 1 && col_indices.dim() == 1,
                    op, ": crow_indices and col_indices must be 1-D, got shapes ", crow_indices.sizes(),
                    " and ", col_indices.sizes());
  TORCH_CHECK_VALUE(out_features >= 0, op, ": out_features must be >= 0, got ", out_features);
  const auto device = input.device();
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"values", &values},
                                {"crow_indices", &crow_indices},
                                {"col_indices", &col_indices}}) {
    TORCH_CHECK_VALUE(t->device() == device, op, ": ", name, " must be on the input's device ", device,
                      ", got ", t->device());
  }
  const int64_t bh = values.size(1), bw = values.size(2), nnz = values.size(0);
  TORCH_CHECK_VALUE(bh >= 1 && bw >= 1, op, ": block size must be at least 1x1, got ", bh, "x", bw);
  const int64_t n_block_rows = (out_features + bh - 1) / bh;
  const int64_t n_block_cols = (K + bw - 1) / bw;
  TORCH_CHECK_VALUE(crow_indices.numel() == n_block_rows + 1, op, ": crow_indices must have ceil(out_features / bh) + 1 = ",
                    n_block_rows + 1, " entries for out_features=", out_features, " and bh=", bh, ", got ",
                    crow_indices.numel());
  TORCH_CHECK_VALUE(col_indices.numel() == nnz, op, ": col_indices must have one entry per block (",
                    nnz, " blocks in values), got ", col_indices.numel());
  TORCH_CHECK_VALUE(nnz <= INT32_MAX, op, ": at most 2^31-1 blocks are supported, got ", nnz);

  BsrLinearArgs args;
  if (bias.has_value()) {
    const auto& b = *bias;
    TORCH_CHECK_TYPE(b.scalar_type() == input.scalar_type(), op, ": bias must have the input's dtype ",
                     input.scalar_type(), ", got ", b.scalar_type());
    TORCH_CHECK_VALUE(b.device() == device, op, ": bias must be on the input's device ", device, ", got ",
                      b.device());
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == out_features, op, ": bias must have shape [",
                      out_features, "], got ", b.sizes());
    args.bias = b.contiguous();
  }
  if (keep_block_transposed && is_block_transposed(values)) {
    args.values_t = values;  // no transposed view: the kernels take its data pointer only
  } else {
    args.values = values.contiguous();
  }
  args.crow = crow_indices.contiguous();
  args.col = col_indices.contiguous();
  args.problem.K = K;
  args.problem.N = out_features;
  args.problem.bh = bh;
  args.problem.bw = bw;
  args.problem.n_block_rows = n_block_rows;
  args.problem.n_block_cols = n_block_cols;
  args.problem.nnz = nnz;
  return args;
}

const at::Tensor& row_major_values(BsrLinearArgs& a) {
  if (!a.values.defined()) a.values = a.values_t.contiguous();
  return a.values;
}

BsrLinearArgs prepare_bsr_linear(const at::Tensor& input, const at::Tensor& values, const at::Tensor& crow_indices,
                                 const at::Tensor& col_indices, const std::optional<at::Tensor>& bias,
                                 int64_t out_features, bool keep_block_transposed) {
  check_bsr_dtypes("bsr_linear", input, values, crow_indices, col_indices);
  TORCH_CHECK_VALUE(input.dim() >= 1, "bsr_linear: input must have at least 1 dimension [..., in_features], got a "
                    "0-d tensor");
  const int64_t K = input.size(-1);
  BsrLinearArgs args = check_bsr_weight("bsr_linear", input, values, crow_indices, col_indices, bias, out_features, K,
                                        keep_block_transposed);
  // M from the leading dims, not reshape(-1, K): with K == 0 the -1 would be ambiguous and reshape throws.
  const int64_t M = c10::multiply_integers(input.sizes().begin(), input.sizes().end() - 1);
  // A 2-D input is its own [M, K] view: no view op per call (each costs a microsecond, at batch 1 a few percent).
  at::Tensor x = input.dim() == 2 ? input : input.reshape({M, K});
  if (K > 1 && x.stride(1) != 1) x = x.contiguous();
  if (x.size(0) > 1 && x.stride(0) < K) x = x.contiguous();  // broadcast (stride 0) rows
  args.x = x;
  args.problem.M = x.size(0);
  args.problem.ldx = x.size(0) > 1 ? x.stride(0) : K;
  args.out_shape = input.sizes().vec();
  args.out_shape.back() = out_features;
  return args;
}

Activation parse_activation(const char* op, const std::optional<c10::string_view>& activation) {
  if (!activation) return Activation::kNone;
  if (*activation == "relu") return Activation::kRelu;
  if (*activation == "relu6") return Activation::kRelu6;
  TORCH_CHECK_VALUE(*activation == "gelu", op, ": activation must be 'relu', 'relu6' or 'gelu', got '", *activation,
                    "'");
  return Activation::kGelu;
}

at::Tensor prepare_residual(const char* op, const at::Tensor& residual, const at::Tensor& input,
                            at::IntArrayRef out_shape) {
  TORCH_CHECK_VALUE(residual.sizes() == out_shape, op, ": residual must have the output's shape ", out_shape, ", got ",
                    residual.sizes());
  TORCH_CHECK_TYPE(residual.scalar_type() == input.scalar_type(), op, ": residual must have the input's dtype ",
                   input.scalar_type(), ", got ", residual.scalar_type());
  TORCH_CHECK_VALUE(residual.device() == input.device(), op, ": residual must be on the input's device ",
                    input.device(), ", got ", residual.device());
  return residual.contiguous();
}

}  // namespace pysparse
