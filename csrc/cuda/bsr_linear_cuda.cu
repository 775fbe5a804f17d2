// CUDA implementation of pysparse::bsr_linear: metadata checks (no host sync), then the fastest kernel
// that handles the dtype and block size. Launches on the current stream; allocates only the output.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bsr_linear_args.h"
#include "cuda/bsr_linear_generic.cuh"

namespace pysparse {
namespace {

template <typename T>
void dispatch(const BsrLinearArgs& a, at::Tensor& y, cudaStream_t stream) {
  const T* bias = a.bias ? a.bias->const_data_ptr<T>() : nullptr;
  launch_bsr_linear_generic<T>(a.x.const_data_ptr<T>(), a.values.const_data_ptr<T>(),
                               a.crow.const_data_ptr<int32_t>(), a.col.const_data_ptr<int32_t>(), bias,
                               y.mutable_data_ptr<T>(), a.problem, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor bsr_linear_cuda_impl(const at::Tensor& input, const at::Tensor& values, const at::Tensor& crow_indices,
                                const at::Tensor& col_indices, const std::optional<at::Tensor>& bias,
                                int64_t out_features) {
  BsrLinearArgs a = prepare_bsr_linear(input, values, crow_indices, col_indices, bias, out_features);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor y = at::empty({a.problem.M, a.problem.N}, input.options());
  if (a.problem.M == 0 || a.problem.N == 0) return y.view(a.out_shape);
  TORCH_CHECK_VALUE(a.problem.n_block_rows <= INT32_MAX && (a.problem.M + 31) / 32 <= 65535,
                    "bsr_linear: too many rows for one launch: ", a.problem.M);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (input.scalar_type()) {
    case at::kFloat: dispatch<float>(a, y, stream); break;
    case at::kBFloat16: dispatch<at::BFloat16>(a, y, stream); break;
    case at::kHalf: dispatch<at::Half>(a, y, stream); break;
    default: TORCH_CHECK_TYPE(false, "bsr_linear: unsupported dtype ", input.scalar_type());
  }
  return y.view(a.out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CUDA, m) { m.impl("bsr_linear", &bsr_linear_cuda_impl); }

}  // namespace pysparse
