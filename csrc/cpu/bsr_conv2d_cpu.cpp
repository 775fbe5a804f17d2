// CPU implementation of pysparse::bsr_conv2d_nhwc: checks, then the implicit-im2col broadcast kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/kernels/bsr_linear.h"

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
                                    at::IntArrayRef dilation) {
  TORCH_CHECK_VALUE(input.dim() == 4, "bsr_conv2d_nhwc: input must be [B, Hp, Wp, C], got ", input.sizes());
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat, "bsr_conv2d_nhwc: input must be float32, got ",
                   input.scalar_type());
  TORCH_CHECK_VALUE(values.dim() == 3, "bsr_conv2d_nhwc: values must be [nnz, bh, bw], got ", values.sizes());
  TORCH_CHECK_TYPE(values.scalar_type() == at::kFloat, "bsr_conv2d_nhwc: values must be float32, got ",
                   values.scalar_type());
  TORCH_CHECK_TYPE(crow_indices.scalar_type() == at::kInt && col_indices.scalar_type() == at::kInt,
                   "bsr_conv2d_nhwc: crow_indices and col_indices must be int32, got ", crow_indices.scalar_type(),
                   " and ", col_indices.scalar_type());
  TORCH_CHECK_VALUE(crow_indices.dim() == 1 && col_indices.dim() == 1,
                    "bsr_conv2d_nhwc: crow_indices and col_indices must be 1-D");
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
  BsrProblem p;
  p.M = c.batch * c.ho * c.wo, p.K = kh * kw * c.c, p.N = out_channels;
  p.bh = values.size(1), p.bw = values.size(2);
  TORCH_CHECK_VALUE(p.bh >= 1 && p.bw >= 1, "bsr_conv2d_nhwc: blocks must be at least 1x1, got ", values.sizes());
  p.n_block_rows = (p.N + p.bh - 1) / p.bh, p.n_block_cols = (p.K + p.bw - 1) / p.bw;
  p.nnz = values.size(0), p.ldx = p.K;
  TORCH_CHECK_VALUE(crow_indices.numel() == p.n_block_rows + 1, "bsr_conv2d_nhwc: crow_indices must have ",
                    p.n_block_rows + 1, " entries (ceil(out_channels / bh) + 1), got ", crow_indices.numel());
  TORCH_CHECK_VALUE(col_indices.numel() == p.nnz, "bsr_conv2d_nhwc: col_indices must have one entry per block (",
                    p.nnz, "), got ", col_indices.numel());
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == p.N && bias->scalar_type() == at::kFloat,
                      "bsr_conv2d_nhwc: bias must be float32 [", p.N, "], got ", bias->scalar_type(), " ",
                      bias->sizes());
  }
  const at::Tensor crow = crow_indices.contiguous(), col = col_indices.contiguous();
  const std::string bad = check_bsr_indices(crow.const_data_ptr<int32_t>(), col.const_data_ptr<int32_t>(), p);
  TORCH_CHECK_VALUE(bad.empty(), "bsr_conv2d_nhwc: ", bad);
  const std::string unsupported = bsr_conv2d_unsupported(p, c);
  TORCH_CHECK_VALUE(unsupported.empty(), "bsr_conv2d_nhwc: ", unsupported);
  const at::Tensor x = input.contiguous(), w = values.contiguous();
  const std::optional<at::Tensor> b = bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  at::Tensor y = at::empty({c.batch, c.ho, c.wo, p.N}, input.options());
  bsr_conv2d_nhwc_cpu(x.const_data_ptr<float>(), w.const_data_ptr<float>(), crow.const_data_ptr<int32_t>(),
                      col.const_data_ptr<int32_t>(), b ? b->const_data_ptr<float>() : nullptr,
                      y.mutable_data_ptr<float>(), p, c, at::get_num_threads());
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) { m.impl("bsr_conv2d_nhwc", &bsr_conv2d_nhwc_cpu_impl); }

}  // namespace pysparse
