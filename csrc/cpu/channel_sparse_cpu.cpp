// CPU implementation of pysparse::channel_sparse_linear and pysparse::channel_sparse_conv2d.
//
// linear: one pass gathers the kept input columns into a packed [M, Ki] panel (parallel over rows); one dense
// GEMM multiplies the compacted operands (torch's BLAS, the fastest dense GEMM on the machine: the product of
// kept channels is dense, so a hand-written kernel has nothing to skip); one epilogue pass writes every output
// row whole: bias (or 0) for dropped outputs, product + bias for kept ones. x and y are each touched once.
// conv2d: the same around a dense convolution (oneDNN) of the kept input planes, scattering output planes.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "channel_sparse_args.h"
#include "cpu/output_pool.h"

namespace pysparse {
namespace {

void check_indices(const ChannelSparseArgs& a, const char* op) {
  std::string bad = check_channel_index(a.out_index.const_data_ptr<int32_t>(), a.out_index.numel(), a.n_out,
                                        "out_index");
  TORCH_CHECK_VALUE(bad.empty(), op, ": ", bad);
  bad = check_channel_index(a.in_index.const_data_ptr<int32_t>(), a.in_index.numel(), a.n_in, "in_index");
  TORCH_CHECK_VALUE(bad.empty(), op, ": ", bad);
}

template <typename T>
void gather_columns(const T* x, int64_t ldx, const int32_t* idx, int64_t ki, T* out, int64_t m_rows) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(ki, 1));
  at::parallel_for(0, m_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* src = x + m * ldx;
      T* dst = out + m * ki;
      for (int64_t k = 0; k < ki; ++k) dst[k] = src[idx[k]];
    }
  });
}

// y[m, :] = bias (or 0); y[m, out_idx[j]] = yc[m, j] + bias[out_idx[j]]
template <typename T>
void scatter_rows(const T* yc, int64_t no, const int32_t* out_idx, const T* bias, T* y, int64_t n, int64_t m_rows) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  at::parallel_for(0, m_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      T* row = y + m * n;
      if (bias) {
        std::copy(bias, bias + n, row);
      } else {
        std::fill(row, row + n, T(0.0f));
      }
      const T* src = yc + m * no;
      for (int64_t j = 0; j < no; ++j) {
        const int32_t o = out_idx[j];
        row[o] = T(static_cast<float>(src[j]) + (bias ? static_cast<float>(bias[o]) : 0.0f));
      }
    }
  });
}

at::Tensor channel_sparse_linear_cpu(const at::Tensor& input, const at::Tensor& values, const at::Tensor& out_index,
                                     const at::Tensor& in_index, const std::optional<at::Tensor>& bias,
                                     int64_t out_features) {
  ChannelSparseArgs a = prepare_channel_sparse_linear(input, values, out_index, in_index, bias, out_features);
  check_indices(a, "channel_sparse_linear");
  const int64_t M = a.x.size(0), K = a.n_in, N = a.n_out, no = a.out_index.numel(), ki = a.in_index.numel();
  at::Tensor y = empty_output({M, N}, input.options());
  if (M == 0 || N == 0) return y.view(a.out_shape);
  // Strictly increasing in [0, K) with K entries is the identity: no gather needed.
  at::Tensor xg = ki == K ? a.x : at::empty({M, ki}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "channel_sparse_linear_cpu", [&] {
    const int64_t ldx = M > 1 ? a.x.stride(0) : K;
    if (ki != K) {
      gather_columns<scalar_t>(a.x.const_data_ptr<scalar_t>(), ldx, a.in_index.const_data_ptr<int32_t>(), ki,
                               xg.mutable_data_ptr<scalar_t>(), M);
    }
    const at::Tensor yc = (no == 0 || ki == 0) ? at::zeros({M, no}, input.options())
                                               : at::mm(xg, a.values.t()).contiguous();
    scatter_rows<scalar_t>(yc.const_data_ptr<scalar_t>(), no, a.out_index.const_data_ptr<int32_t>(),
                           a.bias ? a.bias->const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>(), N, M);
  });
  return y.view(a.out_shape);
}

int64_t conv_out_size(int64_t in, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
  return (in + 2 * pad - dil * (k - 1) - 1) / stride + 1;
}

at::Tensor channel_sparse_conv2d_cpu(const at::Tensor& input, const at::Tensor& values, const at::Tensor& out_index,
                                     const at::Tensor& in_index, const std::optional<at::Tensor>& bias,
                                     int64_t out_channels, at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation) {
  ChannelSparseArgs a = prepare_channel_sparse_conv2d(input, values, out_index, in_index, bias, out_channels);
  check_indices(a, "channel_sparse_conv2d");
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "channel_sparse_conv2d: stride, padding and dilation must have 2 entries");
  const int64_t B = a.x.size(0), C = a.n_in, N = a.n_out, no = a.out_index.numel(), ki = a.in_index.numel();
  const int64_t ho = conv_out_size(a.x.size(2), a.values.size(2), stride[0], padding[0], dilation[0]);
  const int64_t wo = conv_out_size(a.x.size(3), a.values.size(3), stride[1], padding[1], dilation[1]);
  TORCH_CHECK_VALUE(ho > 0 && wo > 0, "channel_sparse_conv2d: the kernel ", a.values.sizes().slice(2),
                    " does not fit the padded input ", a.x.sizes().slice(2));
  at::Tensor y = empty_output({B, N, ho, wo}, input.options());
  if (y.numel() == 0) return y;
  const at::Tensor xg = ki == C ? a.x : a.x.index_select(1, a.in_index);
  const at::Tensor yc = (no == 0 || ki == 0)
                            ? at::zeros({B, no, ho, wo}, input.options())
                            : at::conv2d(xg, a.values, {}, stride, padding, dilation, 1).contiguous();
  std::vector<int64_t> pos(N, -1);  // output channel -> its plane in yc, or -1 when dropped
  const int32_t* oi = a.out_index.const_data_ptr<int32_t>();
  for (int64_t j = 0; j < no; ++j) pos[oi[j]] = j;
  const int64_t plane = ho * wo;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "channel_sparse_conv2d_cpu", [&] {
    const scalar_t* src = yc.const_data_ptr<scalar_t>();
    const scalar_t* b = a.bias ? a.bias->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dst = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * N, std::max<int64_t>(1, 16384 / plane), [&](int64_t begin, int64_t end) {
      for (int64_t bn = begin; bn < end; ++bn) {
        const int64_t n = bn % N;
        scalar_t* out = dst + bn * plane;
        const float bv = b ? static_cast<float>(b[n]) : 0.0f;
        if (pos[n] < 0) {
          std::fill(out, out + plane, scalar_t(bv));
        } else {
          const scalar_t* in = src + ((bn / N) * no + pos[n]) * plane;
          for (int64_t p = 0; p < plane; ++p) out[p] = scalar_t(static_cast<float>(in[p]) + bv);
        }
      }
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) {
  m.impl("channel_sparse_linear", &channel_sparse_linear_cpu);
  m.impl("channel_sparse_conv2d", &channel_sparse_conv2d_cpu);
}

}  // namespace pysparse
