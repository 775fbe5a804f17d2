// CPU implementation of pysparse::unstructured_linear: argument checks, the index check, then the torch-free kernel
// core (csrc/cpu/kernels/unstructured_linear.h, which describes the format).
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include "cpu/kernels/unstructured_linear.h"
#include "cpu/output_pool.h"

namespace pysparse {
namespace {

at::Tensor unstructured_linear_cpu_impl(const at::Tensor& input, const at::Tensor& values, const at::Tensor& columns,
                                        const at::Tensor& segment_ptr, const std::optional<at::Tensor>& bias,
                                        int64_t out_features) {
  constexpr const char* op = "unstructured_linear";
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat, op, ": input must be float32, got ", input.scalar_type());
  TORCH_CHECK_TYPE(values.scalar_type() == at::kFloat, op, ": values must be float32, got ", values.scalar_type());
  TORCH_CHECK_TYPE(columns.scalar_type() == at::kInt && segment_ptr.scalar_type() == at::kInt, op,
                   ": columns and segment_ptr must be int32, got ", columns.scalar_type(), " and ",
                   segment_ptr.scalar_type());
  TORCH_CHECK_VALUE(input.dim() >= 1, op, ": input must have at least 1 dimension [..., in_features], got a 0-d "
                    "tensor");
  TORCH_CHECK_VALUE(values.dim() == 1 && columns.dim() == 1 && segment_ptr.dim() == 1, op,
                    ": values, columns and segment_ptr must be 1-D, got shapes ", values.sizes(), ", ",
                    columns.sizes(), " and ", segment_ptr.sizes());
  TORCH_CHECK_VALUE(out_features >= 0, op, ": out_features must be >= 0, got ", out_features);
  UnstructuredProblem p;
  p.K = input.size(-1);
  p.N = out_features;
  p.n_blocks = (p.K + kUnstructuredBlockCols - 1) / kUnstructuredBlockCols;
  p.nnz = values.numel();
  TORCH_CHECK_VALUE(columns.numel() == p.nnz, op, ": columns must have one entry per value (", p.nnz, "), got ",
                    columns.numel());
  TORCH_CHECK_VALUE(p.nnz <= INT32_MAX && p.K <= INT32_MAX, op, ": at most 2^31-1 values and in_features are "
                    "supported, got ", p.nnz, " and ", p.K);
  TORCH_CHECK_VALUE(segment_ptr.numel() == p.n_blocks * p.N + 1, op, ": segment_ptr must have ceil(in_features / ",
                    kUnstructuredBlockCols, ") * out_features + 1 = ", p.n_blocks * p.N + 1, " entries for in_features=",
                    p.K, ", out_features=", p.N, ", got ", segment_ptr.numel());
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == at::kFloat, op, ": bias must be float32, got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out_features, op, ": bias must have shape [",
                      out_features, "], got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->device() == input.device(), op, ": bias must be on the input's device ", input.device(),
                      ", got ", bias->device());
  }
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"values", &values},
                                {"columns", &columns}, {"segment_ptr", &segment_ptr}}) {
    TORCH_CHECK_VALUE(t->device() == input.device(), op, ": ", name, " must be on the input's device ",
                      input.device(), ", got ", t->device());
  }
  const at::Tensor vals = values.contiguous(), cols = columns.contiguous(), ptr = segment_ptr.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  // The op is public: malformed indices must raise, never read out of bounds.
  const std::string bad = check_unstructured_indices(ptr.const_data_ptr<int32_t>(), cols.const_data_ptr<int32_t>(), p);
  TORCH_CHECK_VALUE(bad.empty(), op, ": ", bad);

  // M from the leading dims, not reshape(-1, K): with K == 0 the -1 would be ambiguous.
  p.M = c10::multiply_integers(input.sizes().begin(), input.sizes().end() - 1);
  at::Tensor x = input.dim() == 2 ? input : input.reshape({p.M, p.K});
  if (p.K > 1 && x.stride(1) != 1) x = x.contiguous();
  if (x.size(0) > 1 && x.stride(0) < p.K) x = x.contiguous();  // broadcast (stride 0) rows
  p.ldx = x.size(0) > 1 ? x.stride(0) : p.K;
  std::vector<int64_t> out_shape = input.sizes().vec();
  out_shape.back() = out_features;
  at::Tensor y = empty_output(out_shape, input.options());
  unstructured_linear_cpu(x.const_data_ptr<float>(), vals.const_data_ptr<float>(), cols.const_data_ptr<int32_t>(),
                          ptr.const_data_ptr<int32_t>(), b.defined() ? b.const_data_ptr<float>() : nullptr,
                          y.mutable_data_ptr<float>(), p, at::get_num_threads());
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) { m.impl("unstructured_linear", &unstructured_linear_cpu_impl); }

}  // namespace pysparse
