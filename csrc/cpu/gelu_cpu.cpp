// CPU implementation of pysparse::gelu and pysparse::gelu_backward: argument checks, then the torch-free kernels
// (csrc/cpu/kernels/gelu.h) on contiguous float32 data.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/kernels/gelu.h"
#include "cpu/output_pool.h"

namespace pysparse {
namespace {

void check_float_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
}

at::Tensor gelu_cpu_op(const at::Tensor& input) {
  check_float_cpu("gelu", "input", input);
  const at::Tensor z = input.contiguous();
  at::Tensor y = empty_output(z.sizes(), z.options());
  gelu_cpu(z.const_data_ptr<float>(), y.mutable_data_ptr<float>(), z.numel(), at::get_num_threads());
  return y;
}

at::Tensor gelu_backward_cpu_op(const at::Tensor& grad_output, const at::Tensor& input) {
  check_float_cpu("gelu_backward", "grad_output", grad_output);
  check_float_cpu("gelu_backward", "input", input);
  TORCH_CHECK_VALUE(grad_output.sizes() == input.sizes(), "gelu_backward: grad_output must have the input's shape ",
                    input.sizes(), ", got ", grad_output.sizes());
  const at::Tensor dy = grad_output.contiguous(), z = input.contiguous();
  at::Tensor dz = empty_output(z.sizes(), z.options());
  gelu_backward_cpu(dy.const_data_ptr<float>(), z.const_data_ptr<float>(), dz.mutable_data_ptr<float>(), z.numel(),
                    at::get_num_threads());
  return dz;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) {
  m.impl("gelu", &gelu_cpu_op);
  m.impl("gelu_backward", &gelu_backward_cpu_op);
}

}  // namespace pysparse
