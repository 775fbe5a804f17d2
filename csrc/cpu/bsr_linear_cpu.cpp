// CPU implementation of pysparse::bsr_linear: checks, then the torch-free kernel core.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "bsr_linear_args.h"
#include "cpu/kernels/bsr_linear.h"
#include "cpu/output_pool.h"

namespace pysparse {
namespace {

template <typename T, typename AtT>
void run(BsrLinearArgs& a, at::Tensor& y) {
  auto ptr = [](const at::Tensor& t) { return reinterpret_cast<const T*>(t.const_data_ptr<AtT>()); };
  const T* values = nullptr;
  const CpuPath path = current_cpu_path();  // once: the layout decision and the kernel must agree
  // A block-transposed weight is read in place by the broadcast kernel, which then never reads `values`.
  if (a.values_t.defined() && bsr_linear_reads_transposed<T>(path, a.problem)) {
    a.problem.transposed_values = a.values_t.const_data_ptr();
  }
  if (a.problem.transposed_values == nullptr) values = ptr(row_major_values(a));
  bsr_linear_cpu_isa<T>(path.isa, path.bcast, ptr(a.x), values, a.crow.const_data_ptr<int32_t>(),
                        a.col.const_data_ptr<int32_t>(), a.bias ? ptr(*a.bias) : nullptr,
                        reinterpret_cast<T*>(y.mutable_data_ptr<AtT>()), a.problem, at::get_num_threads());
}

at::Tensor bsr_linear_act_cpu_impl(const at::Tensor& input, const at::Tensor& values, const at::Tensor& crow_indices,
                                   const at::Tensor& col_indices, const std::optional<at::Tensor>& bias,
                                   int64_t out_features, Activation act,
                                   const std::optional<at::Tensor>& residual = std::nullopt) {
  BsrLinearArgs a = prepare_bsr_linear(input, values, crow_indices, col_indices, bias, out_features,
                                       /*keep_block_transposed=*/true);
  a.problem.act = act;
  at::Tensor res;
  if (residual) {
    res = prepare_residual("bsr_linear_act", *residual, input, a.out_shape);
    a.problem.residual = res.const_data_ptr();
  }
  // The op is public: malformed indices must raise, never read out of bounds. O(blocks), cheap next to the product.
  const std::string bad = check_bsr_indices(a.crow.const_data_ptr<int32_t>(), a.col.const_data_ptr<int32_t>(),
                                            a.problem);
  TORCH_CHECK_VALUE(bad.empty(), "bsr_linear: ", bad);
  at::Tensor y = empty_output(a.out_shape, input.options());  // [M, N] row-major memory, the output's own shape
  switch (input.scalar_type()) {
    case at::kFloat: run<float, float>(a, y); break;
    case at::kBFloat16: run<bfloat16_t, at::BFloat16>(a, y); break;
    case at::kHalf: run<float16_t, at::Half>(a, y); break;
    default: TORCH_CHECK_TYPE(false, "bsr_linear: unsupported dtype ", input.scalar_type());
  }
  return y;
}

at::Tensor bsr_linear_cpu_impl(const at::Tensor& input, const at::Tensor& values, const at::Tensor& crow_indices,
                               const at::Tensor& col_indices, const std::optional<at::Tensor>& bias,
                               int64_t out_features) {
  return bsr_linear_act_cpu_impl(input, values, crow_indices, col_indices, bias, out_features, Activation::kNone);
}

// activation(bsr_linear + residual), both applied by the kernels to each result before it is stored.
at::Tensor bsr_linear_act_cpu(const at::Tensor& input, const at::Tensor& values, const at::Tensor& crow_indices,
                              const at::Tensor& col_indices, const std::optional<at::Tensor>& bias,
                              int64_t out_features, std::optional<c10::string_view> activation,
                              const std::optional<at::Tensor>& residual) {
  return bsr_linear_act_cpu_impl(input, values, crow_indices, col_indices, bias, out_features,
                                 parse_activation("bsr_linear_act", activation), residual);
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) {
  m.impl("bsr_linear", &bsr_linear_cpu_impl);
  m.impl("bsr_linear_act", &bsr_linear_act_cpu);
}

}  // namespace pysparse
