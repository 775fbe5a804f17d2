// CPU implementation of pysparse::bsr_conv2d_nhwc: checks, then the implicit-im2col broadcast kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "bsr_linear_args.h"
#include "cpu/kernels/bsr_linear.h"
#include "cpu/output_pool.h"

namespace pysparse {
namespace {

std::pair<int64_t, int64_t> pair_arg(const char* name, at::IntArrayRef v) {
  TORCH_CHECK_VALUE(v.size() == 2 && v[0] >= 1 && v[1] >= 1, "bsr_conv2d_nhwc: ", name,
                    " must be two integers >= 1, got ", v);
  return {v[0], v[1]};
}

at::Tensor bsr_conv2d_nhwc_cpu_impl(const at::Tensor& input, const at::Tensor& values, const at::Tensor& crow_indices,
                                    const at::Tensor& col_indices, const std::optional<at::Tensor>& bias,
                                    int64_t out_channels, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                    at::IntArrayRef dilation, std::optional<c10::string_view> activation,
                                    const std::optional<at::Tensor>& residual) {
  TORCH_CHECK_VALUE(input.dim() == 4, "bsr_conv2d_nhwc: input must be [B, Hp, Wp, C], got ", input.sizes());
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat, "bsr_conv2d_nhwc: input must be float32, got ",
                   input.scalar_type());
  check_bsr_dtypes("bsr_conv2d_nhwc", input, values, crow_indices, col_indices);
  TORCH_CHECK_VALUE(out_channels >= 1, "bsr_conv2d_nhwc: out_channels must be >= 1, got ", out_channels);
  const auto [kh, kw] = pair_arg("kernel_size", kernel_size);
  const auto [sh, sw] = pair_arg("stride", stride);
  const auto [dh, dw] = pair_arg("dilation", dilation);
  ConvGeometry c;
  c.batch = input.size(0), c.hp = input.size(1), c.wp = input.size(2), c.c = input.size(3);
  c.kh = kh, c.kw = kw, c.sh = sh, c.sw = sw, c.dh = dh, c.dw = dw;
  TORCH_CHECK_VALUE(c.c >= 1 && c.hp >= (kh - 1) * dh + 1 && c.wp >= (kw - 1) * dw + 1,
                    "bsr_conv2d_nhwc: input ", input.sizes(), " is smaller than the dilated kernel");
  c.ho = (c.hp - (kh - 1) * dh - 1) / sh + 1;
  c.wo = (c.wp - (kw - 1) * dw - 1) / sw + 1;
  // The weight is [out_channels, kh*kw*C]: the same checks as bsr_linear's weight (devices, shapes, bias).
  BsrLinearArgs a = check_bsr_weight("bsr_conv2d_nhwc", input, values, crow_indices, col_indices, bias,
                                     out_channels, kh * kw * c.c, /*keep_block_transposed=*/true);
  BsrProblem& p = a.problem;
  p.M = c.batch * c.ho * c.wo, p.ldx = p.K;
  p.act = parse_activation("bsr_conv2d_nhwc", activation);
  const std::string bad = check_bsr_indices(a.crow.const_data_ptr<int32_t>(), a.col.const_data_ptr<int32_t>(), p);
  TORCH_CHECK_VALUE(bad.empty(), "bsr_conv2d_nhwc: ", bad);
  const std::string unsupported = bsr_conv2d_unsupported(p, c);
  TORCH_CHECK_VALUE(unsupported.empty(), "bsr_conv2d_nhwc: ", unsupported);
  const at::Tensor x = input.contiguous();
  at::Tensor res;
  if (residual) {
    res = prepare_residual("bsr_conv2d_nhwc", *residual, input, {c.batch, c.ho, c.wo, p.N});
    p.residual = res.const_data_ptr();
  }
  // The kernel is the broadcast kernel: it reads a block-transposed weight in place, and never reads `values` then.
  if (a.values_t.defined()) p.transposed_values = a.values_t.const_data_ptr<float>();
  at::Tensor y = empty_output({c.batch, c.ho, c.wo, p.N}, input.options());
  const float* values_ptr = a.values.defined() ? a.values.const_data_ptr<float>() : nullptr;
  bsr_conv2d_nhwc_cpu(x.const_data_ptr<float>(), values_ptr, a.crow.const_data_ptr<int32_t>(),
                      a.col.const_data_ptr<int32_t>(), a.bias ? a.bias->const_data_ptr<float>() : nullptr,
                      y.mutable_data_ptr<float>(), p, c, at::get_num_threads());
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) { m.impl("bsr_conv2d_nhwc", &bsr_conv2d_nhwc_cpu_impl); }

}  // namespace pysparse
