// CUDA implementation of pysparse::channel_sparse_linear and pysparse::channel_sparse_conv2d.
//
// linear: one fused kernel computes y[:, out_index] = x[:, in_index] @ values^T + bias[out_index]. A CTA owns a
// 64-token x 64-kept-output tile; its K loop gathers 16 kept input columns of x straight from global memory into
// shared memory (the gather costs no extra pass) next to the matching 64x16 slice of values, then every thread
// accumulates a 4x4 register tile in float32. The epilogue adds the bias and scatters each kept output to its
// column of y. A preceding fill writes bias (or 0) into every output, so dropped columns are defined too.
// conv2d: a gather kernel copies the kept input planes, a dense convolution (cuDNN) runs on the compacted operands,
// and a scatter kernel writes every output plane (kept: product + bias; dropped: bias or 0).
// Kernels skip index entries outside their range (no out-of-bounds access, whatever the caller passes);
// the Python wrapper validates indices by default and reports them properly. Launches on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "channel_sparse_args.h"

namespace pysparse {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256;

template <typename T>
__global__ void fill_bias_kernel(T* __restrict__ y, const T* __restrict__ bias, int64_t rows, int64_t n) {
  const int64_t total = rows * n;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    y[i] = bias ? bias[i % n] : T(0.0f);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    channel_sparse_linear_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ values,
                                 const int32_t* __restrict__ out_index, const int32_t* __restrict__ in_index,
                                 const T* __restrict__ bias, T* __restrict__ y, int64_t M, int64_t N, int64_t K,
                                 int64_t no, int64_t ki) {
  __shared__ float As[kBK][kBM + 4];
  __shared__ float Bs[kBK][kBN + 4];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * kBN;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < ki; k0 += kBK) {
#pragma unroll
    for (int i = 0; i < kBM * kBK / kThreads; ++i) {
      const int linear = tid + i * kThreads, r = linear / kBK, c = linear % kBK;
      const int64_t m = m0 + r, k = k0 + c;
      float v = 0.0f;
      if (m < M && k < ki) {
        const int32_t col = in_index[k];
        if (col >= 0 && col < K) v = static_cast<float>(x[m * ldx + col]);
      }
      As[c][r] = v;
    }
#pragma unroll
    for (int i = 0; i < kBN * kBK / kThreads; ++i) {
      const int linear = tid + i * kThreads, r = linear / kBK, c = linear % kBK;
      const int64_t j = n0 + r, k = k0 + c;
      Bs[c][r] = (j < no && k < ki) ? static_cast<float>(values[j * ki + k]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t jj = n0 + tx * 4 + j;
    if (jj >= no) continue;
    const int32_t o = out_index[jj];
    if (o < 0 || o >= N) continue;
    const float bv = bias ? static_cast<float>(bias[o]) : 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t m = m0 + ty * 4 + i;
      if (m < M) y[m * N + o] = T(acc[i][j] + bv);
    }
  }
}

int blocks_for(int64_t total) { return int(std::min<int64_t>((total + 255) / 256, 65535 * 8)); }

at::Tensor channel_sparse_linear_cuda(const at::Tensor& input, const at::Tensor& values, const at::Tensor& out_index,
                                      const at::Tensor& in_index, const std::optional<at::Tensor>& bias,
                                      int64_t out_features) {
  ChannelSparseArgs a = prepare_channel_sparse_linear(input, values, out_index, in_index, bias, out_features);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t M = a.x.size(0), N = a.n_out, K = a.n_in, no = a.out_index.numel(), ki = a.in_index.numel();
  at::Tensor y = at::empty({M, N}, input.options());
  if (M == 0 || N == 0) return y.view(a.out_shape);
  TORCH_CHECK_VALUE((M + kBM - 1) / kBM <= 65535, "channel_sparse_linear: too many rows for one launch: ", M);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t ldx = M > 1 ? a.x.stride(0) : K;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "channel_sparse_linear_cuda", [&] {
    const scalar_t* b = a.bias ? a.bias->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    fill_bias_kernel<scalar_t><<<blocks_for(M * N), 256, 0, stream>>>(out, b, M, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (no > 0) {
      const dim3 grid(unsigned((no + kBN - 1) / kBN), unsigned((M + kBM - 1) / kBM));
      channel_sparse_linear_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          a.x.const_data_ptr<scalar_t>(), ldx, a.values.const_data_ptr<scalar_t>(),
          a.out_index.const_data_ptr<int32_t>(), a.in_index.const_data_ptr<int32_t>(), b, out, M, N, K, no, ki);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return y.view(a.out_shape);
}

template <typename T>
__global__ void gather_planes_kernel(const T* __restrict__ x, const int32_t* __restrict__ in_index, T* __restrict__ xg,
                                     int64_t batch, int64_t c, int64_t ki, int64_t plane) {
  const int64_t total = batch * ki * plane;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = i % plane, j = (i / plane) % ki, b = i / (plane * ki);
    const int32_t ch = in_index[j];
    xg[i] = (ch >= 0 && ch < c) ? x[(b * c + ch) * plane + p] : T(0.0f);
  }
}

__global__ void position_kernel(const int32_t* __restrict__ out_index, int32_t* __restrict__ pos, int64_t no,
                                int64_t n) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j < no) {
    const int32_t o = out_index[j];
    if (o >= 0 && o < n) pos[o] = int32_t(j);
  }
}

template <typename T>
__global__ void scatter_planes_kernel(const T* __restrict__ yc, const int32_t* __restrict__ pos,
                                      const T* __restrict__ bias, T* __restrict__ y, int64_t batch, int64_t n,
                                      int64_t no, int64_t plane) {
  const int64_t total = batch * n * plane;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = i % plane, ch = (i / plane) % n, b = i / (plane * n);
    const int32_t j = pos[ch];
    const float v = j >= 0 ? static_cast<float>(yc[(b * no + j) * plane + p]) : 0.0f;
    y[i] = T(v + (bias ? static_cast<float>(bias[ch]) : 0.0f));
  }
}

at::Tensor channel_sparse_conv2d_cuda(const at::Tensor& input, const at::Tensor& values, const at::Tensor& out_index,
                                      const at::Tensor& in_index, const std::optional<at::Tensor>& bias,
                                      int64_t out_channels, at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef dilation) {
  ChannelSparseArgs a = prepare_channel_sparse_conv2d(input, values, out_index, in_index, bias, out_channels);
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "channel_sparse_conv2d: stride, padding and dilation must have 2 entries");
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t B = a.x.size(0), C = a.n_in, N = a.n_out, no = a.out_index.numel(), ki = a.in_index.numel();
  const int64_t H = a.x.size(2), W = a.x.size(3);
  const int64_t ho = (H + 2 * padding[0] - dilation[0] * (a.values.size(2) - 1) - 1) / stride[0] + 1;
  const int64_t wo = (W + 2 * padding[1] - dilation[1] * (a.values.size(3) - 1) - 1) / stride[1] + 1;
  TORCH_CHECK_VALUE(ho > 0 && wo > 0, "channel_sparse_conv2d: the kernel ", a.values.sizes().slice(2),
                    " does not fit the padded input ", a.x.sizes().slice(2));
  at::Tensor y = at::empty({B, N, ho, wo}, input.options());
  if (y.numel() == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor pos = at::empty({N}, input.options().dtype(at::kInt));
  C10_CUDA_CHECK(cudaMemsetAsync(pos.mutable_data_ptr<int32_t>(), 0xff, N * sizeof(int32_t), stream));  // -1
  if (no > 0) {
    position_kernel<<<unsigned((no + 255) / 256), 256, 0, stream>>>(a.out_index.const_data_ptr<int32_t>(),
                                                                    pos.mutable_data_ptr<int32_t>(), no, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "channel_sparse_conv2d_cuda", [&] {
    at::Tensor yc;
    if (no == 0 || ki == 0) {
      yc = at::zeros({B, no, ho, wo}, input.options());
    } else {
      at::Tensor xg = a.x;
      if (ki != C) {
        xg = at::empty({B, ki, H, W}, input.options());
        gather_planes_kernel<scalar_t><<<blocks_for(xg.numel()), 256, 0, stream>>>(
            a.x.const_data_ptr<scalar_t>(), a.in_index.const_data_ptr<int32_t>(), xg.mutable_data_ptr<scalar_t>(),
            B, C, ki, H * W);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      yc = at::conv2d(xg, a.values, {}, stride, padding, dilation, 1).contiguous();
    }
    scatter_planes_kernel<scalar_t><<<blocks_for(y.numel()), 256, 0, stream>>>(
        yc.const_data_ptr<scalar_t>(), pos.const_data_ptr<int32_t>(),
        a.bias ? a.bias->const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>(), B, N, no, ho * wo);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CUDA, m) {
  m.impl("channel_sparse_linear", &channel_sparse_linear_cuda);
  m.impl("channel_sparse_conv2d", &channel_sparse_conv2d_cuda);
}

}  // namespace pysparse
