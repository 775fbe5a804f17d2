// CPU implementation of pysparse::unstructured_linear and of its backward's ops (unstructured_transpose,
// unstructured_linear_grad_values): argument checks, the index check, then the torch-free kernel core
// (csrc/cpu/kernels/unstructured_linear.h, which describes the format).
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <sstream>

#include "bsr_linear_args.h"  // parse_activation, prepare_residual
#include "cpu/kernels/unstructured_linear.h"
#include "cpu/output_pool.h"

namespace pysparse {
namespace {

// The problem of a weight [N, K] in the format (columns, segment_ptr) with `nnz` values, after every check that
// memory safety needs: the ops are public, so malformed indices must raise, never read out of bounds. `columns_too`
// false leaves the columns to the forward kernel, which checks them where it first reads them (a weight streamed from
// memory is then read once, not twice).
UnstructuredProblem checked_problem(const char* op, const at::Tensor& columns, const at::Tensor& segment_ptr,
                                    int64_t nnz, int64_t K, int64_t N, const at::Device& device,
                                    bool columns_too = true) {
  TORCH_CHECK_TYPE(columns.scalar_type() == at::kInt && segment_ptr.scalar_type() == at::kInt, op,
                   ": columns and segment_ptr must be int32, got ", columns.scalar_type(), " and ",
                   segment_ptr.scalar_type());
  TORCH_CHECK_VALUE(columns.dim() == 1 && segment_ptr.dim() == 1, op, ": columns and segment_ptr must be 1-D, got "
                    "shapes ", columns.sizes(), " and ", segment_ptr.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"columns", &columns},
                                {"segment_ptr", &segment_ptr}}) {
    TORCH_CHECK_VALUE(t->device() == device, op, ": ", name, " must be on the input's device ", device, ", got ",
                      t->device());
  }
  UnstructuredProblem p;
  p.K = K;
  p.N = N;
  p.nnz = nnz;
  TORCH_CHECK_VALUE(columns.numel() == nnz, op, ": columns must have one entry per value (", nnz, "), got ",
                    columns.numel());
  TORCH_CHECK_VALUE(nnz <= INT32_MAX && K <= INT32_MAX, op, ": at most 2^31-1 values and in_features are supported, "
                    "got ", nnz, " and ", K);
  // segment_ptr's length fixes the column-block width (unstructured_block_cols).
  const int64_t entries = segment_ptr.numel();
  if (N > 0 && entries >= 1 && (entries - 1) % N == 0) {
    p.n_blocks = (entries - 1) / N;
    p.block_cols = unstructured_block_cols(K, p.n_blocks);
  } else {
    p.n_blocks = (K + kUnstructuredBlockCols - 1) / kUnstructuredBlockCols;
  }
  if (p.block_cols == 0 || entries != p.n_blocks * N + 1) {
    std::ostringstream counts;  // the length each width gives, "a, b or c"
    for (int64_t w = kUnstructuredBlockCols; w <= kUnstructuredBlockColsWidest; w *= 2) {
      counts << (w == kUnstructuredBlockCols ? "" : w == kUnstructuredBlockColsWidest ? " or " : ", ")
             << (K + w - 1) / w * N + 1;
    }
    TORCH_CHECK_VALUE(false, op, ": segment_ptr must have ceil(in_features / w) * out_features + 1 entries for a "
                      "column-block width w of 128, 256 or 512 (", counts.str(), " for in_features=", K,
                      ", out_features=", N, "), got ", entries);
  }
  const int32_t* ptr = segment_ptr.const_data_ptr<int32_t>();
  const std::string bad = columns_too ? check_unstructured_indices(ptr, columns.const_data_ptr<int32_t>(), p)
                                      : check_unstructured_pointers(ptr, p);
  TORCH_CHECK_VALUE(bad.empty(), op, ": ", bad);
  return p;
}

// [M, cols] view of t [..., cols] with unit column stride and a row stride >= cols (ld returned).
at::Tensor rows_of(const at::Tensor& t, int64_t M, int64_t cols, int64_t& ld) {
  at::Tensor x = t.dim() == 2 ? t : t.reshape({M, cols});
  if (cols > 1 && x.stride(1) != 1) x = x.contiguous();
  if (x.size(0) > 1 && x.stride(0) < cols) x = x.contiguous();  // broadcast (stride 0) rows
  ld = x.size(0) > 1 ? x.stride(0) : cols;
  return x;
}

// activation(input @ W^T + bias + residual); act none and no residual for the plain op.
at::Tensor unstructured_linear_forward(const char* op, const at::Tensor& input, const at::Tensor& values,
                                       const at::Tensor& columns, const at::Tensor& segment_ptr,
                                       const std::optional<at::Tensor>& bias, int64_t out_features, Activation act,
                                       const std::optional<at::Tensor>& residual) {
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat, op, ": input must be float32, got ", input.scalar_type());
  TORCH_CHECK_TYPE(values.scalar_type() == at::kFloat, op, ": values must be float32, got ", values.scalar_type());
  TORCH_CHECK_VALUE(input.dim() >= 1, op, ": input must have at least 1 dimension [..., in_features], got a 0-d "
                    "tensor");
  TORCH_CHECK_VALUE(values.dim() == 1, op, ": values must be 1-D, got shape ", values.sizes());
  TORCH_CHECK_VALUE(values.device() == input.device(), op, ": values must be on the input's device ", input.device(),
                    ", got ", values.device());
  TORCH_CHECK_VALUE(out_features >= 0, op, ": out_features must be >= 0, got ", out_features);
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == at::kFloat, op, ": bias must be float32, got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out_features, op, ": bias must have shape [",
                      out_features, "], got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->device() == input.device(), op, ": bias must be on the input's device ", input.device(),
                      ", got ", bias->device());
  }
  const at::Tensor vals = values.contiguous(), cols = columns.contiguous(), ptr = segment_ptr.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  UnstructuredProblem p = checked_problem(op, cols, ptr, values.numel(), input.size(-1), out_features,
                                          input.device(), /*columns_too=*/false);
  // M from the leading dims, not reshape(-1, K): with K == 0 the -1 would be ambiguous.
  p.M = c10::multiply_integers(input.sizes().begin(), input.sizes().end() - 1);
  const at::Tensor x = rows_of(input, p.M, p.K, p.ldx);
  std::vector<int64_t> out_shape = input.sizes().vec();
  out_shape.back() = out_features;
  p.act = act;
  at::Tensor res;
  if (residual.has_value()) {
    res = prepare_residual(op, *residual, input, out_shape);
    p.residual = res.const_data_ptr<float>();
  }
  at::Tensor y = empty_output(out_shape, input.options());
  const bool columns_ok = unstructured_linear_cpu(
      x.const_data_ptr<float>(), vals.const_data_ptr<float>(), cols.const_data_ptr<int32_t>(),
      ptr.const_data_ptr<int32_t>(), b.defined() ? b.const_data_ptr<float>() : nullptr, y.mutable_data_ptr<float>(), p,
      at::get_num_threads());
  if (!columns_ok) {  // a column outside its block, left out by the kernel: name it
    TORCH_CHECK_VALUE(false, op, ": ",
                      check_unstructured_indices(ptr.const_data_ptr<int32_t>(), cols.const_data_ptr<int32_t>(), p));
  }
  return y;
}

at::Tensor unstructured_linear_cpu_impl(const at::Tensor& input, const at::Tensor& values, const at::Tensor& columns,
                                        const at::Tensor& segment_ptr, const std::optional<at::Tensor>& bias,
                                        int64_t out_features) {
  return unstructured_linear_forward("unstructured_linear", input, values, columns, segment_ptr, bias, out_features,
                                     Activation::kNone, std::nullopt);
}

at::Tensor unstructured_linear_act_cpu_impl(const at::Tensor& input, const at::Tensor& values,
                                            const at::Tensor& columns, const at::Tensor& segment_ptr,
                                            const std::optional<at::Tensor>& bias, int64_t out_features,
                                            std::optional<c10::string_view> activation,
                                            const std::optional<at::Tensor>& residual) {
  constexpr const char* op = "unstructured_linear_act";
  return unstructured_linear_forward(op, input, values, columns, segment_ptr, bias, out_features,
                                     parse_activation(op, activation), residual);
}

// (columns_t, segment_ptr_t, perm) of W^T (unstructured_transpose): the backward's grad_input runs the forward
// kernel on it, with values[perm].
std::tuple<at::Tensor, at::Tensor, at::Tensor> unstructured_transpose_cpu_impl(const at::Tensor& columns,
                                                                              const at::Tensor& segment_ptr,
                                                                              int64_t in_features,
                                                                              int64_t out_features) {
  constexpr const char* op = "unstructured_transpose";
  TORCH_CHECK_VALUE(in_features >= 0 && out_features >= 0, op, ": in_features and out_features must be >= 0, got ",
                    in_features, " and ", out_features);
  const at::Tensor cols = columns.contiguous(), ptr = segment_ptr.contiguous();
  const UnstructuredProblem p = checked_problem(op, cols, ptr, columns.numel(), in_features, out_features,
                                                columns.device());
  TORCH_CHECK_VALUE(out_features <= INT32_MAX, op, ": at most 2^31-1 out_features are supported, got ",
                    out_features);
  const int64_t segments_t = (out_features + kUnstructuredBlockCols - 1) / kUnstructuredBlockCols * in_features;
  const auto options = columns.options().dtype(at::kInt);
  at::Tensor columns_t = at::empty({p.nnz}, options), perm = at::empty({p.nnz}, options);
  at::Tensor segment_ptr_t = at::empty({segments_t + 1}, options);
  unstructured_transpose(cols.const_data_ptr<int32_t>(), ptr.const_data_ptr<int32_t>(), p,
                         columns_t.mutable_data_ptr<int32_t>(), segment_ptr_t.mutable_data_ptr<int32_t>(),
                         perm.mutable_data_ptr<int32_t>());
  return {columns_t, segment_ptr_t, perm};
}

// grad_output [..., N]^T @ input [..., K] at the kept entries -> [nnz], in the order of columns.
at::Tensor unstructured_linear_grad_values_cpu_impl(const at::Tensor& grad_output, const at::Tensor& input,
                                                    const at::Tensor& columns, const at::Tensor& segment_ptr) {
  constexpr const char* op = "unstructured_linear_grad_values";
  TORCH_CHECK_TYPE(grad_output.scalar_type() == at::kFloat && input.scalar_type() == at::kFloat, op,
                   ": grad_output and input must be float32, got ", grad_output.scalar_type(), " and ",
                   input.scalar_type());
  TORCH_CHECK_VALUE(grad_output.dim() >= 1 && input.dim() == grad_output.dim() &&
                        input.sizes().slice(0, input.dim() - 1) == grad_output.sizes().slice(0, grad_output.dim() - 1),
                    op, ": grad_output [..., out_features] and input [..., in_features] must share their leading "
                    "dimensions, got shapes ", grad_output.sizes(), " and ", input.sizes());
  TORCH_CHECK_VALUE(input.device() == grad_output.device(), op, ": input must be on grad_output's device ",
                    grad_output.device(), ", got ", input.device());
  const at::Tensor cols = columns.contiguous(), ptr = segment_ptr.contiguous();
  UnstructuredProblem p = checked_problem(op, cols, ptr, columns.numel(), input.size(-1), grad_output.size(-1),
                                          grad_output.device());
  p.M = c10::multiply_integers(grad_output.sizes().begin(), grad_output.sizes().end() - 1);
  const at::Tensor x = rows_of(input, p.M, p.K, p.ldx);
  const at::Tensor gy = grad_output.reshape({p.M, p.N}).contiguous();
  at::Tensor grad_values = at::empty({p.nnz}, grad_output.options());
  unstructured_linear_grad_values_cpu(gy.const_data_ptr<float>(), x.const_data_ptr<float>(),
                                      cols.const_data_ptr<int32_t>(), ptr.const_data_ptr<int32_t>(),
                                      grad_values.mutable_data_ptr<float>(), p, at::get_num_threads());
  return grad_values;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) {
  m.impl("unstructured_linear", &unstructured_linear_cpu_impl);
  m.impl("unstructured_linear_act", &unstructured_linear_act_cpu_impl);
  m.impl("unstructured_transpose", &unstructured_transpose_cpu_impl);
  m.impl("unstructured_linear_grad_values", &unstructured_linear_grad_values_cpu_impl);
}

}  // namespace pysparse
