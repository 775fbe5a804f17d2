// CUDA implementation of pysparse::bsr_linear: metadata checks (no host sync), then the fastest kernel
// that handles the dtype and block size. Launches on the current stream; allocates only the output.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bsr_linear_args.h"
#include "cuda/bsr_linear_generic.cuh"
#include "cuda/bsr_linear_tc_large.cuh"
#include "cuda/bsr_linear_tc_small.cuh"

namespace pysparse {
namespace {

bool aligned(const void* ptr, int bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// Tensor-core paths for bf16 / fp16 (CudaT is the CUDA type with the layout of the ATen type AtT).
// Returns false when the shape or alignment is not one they handle; the caller then runs the generic kernel.
template <typename AtT, typename CudaT>
bool launch_tensor_core(const BsrLinearArgs& a, at::Tensor& y, cudaStream_t stream) {
  const BsrProblem& p = a.problem;
  const auto* x = reinterpret_cast<const CudaT*>(a.x.const_data_ptr<AtT>());
  const auto* values = reinterpret_cast<const CudaT*>(a.values.const_data_ptr<AtT>());
  const auto* bias = a.bias ? reinterpret_cast<const CudaT*>(a.bias->const_data_ptr<AtT>()) : nullptr;
  auto* out = reinterpret_cast<CudaT*>(y.mutable_data_ptr<AtT>());
  const int32_t* crow = a.crow.const_data_ptr<int32_t>();
  const int32_t* col = a.col.const_data_ptr<int32_t>();
  const bool operands_ok = p.bw % 16 == 0 && p.K % 8 == 0 && p.ldx % 8 == 0 && aligned(x, 16) && aligned(values, 16);
  if (!operands_ok) return false;
  if (p.M <= 16 && p.bh % 8 == 0) {
    launch_bsr_linear_tc_small<CudaT>(x, values, crow, col, bias, out, p, stream);
    return true;
  }
  if (p.bw > 64) return false;
  switch (p.bh) {
    case 16: launch_bsr_linear_tc_large<CudaT, 16>(x, values, crow, col, bias, out, p, stream); return true;
    case 32: launch_bsr_linear_tc_large<CudaT, 32>(x, values, crow, col, bias, out, p, stream); return true;
    case 64: launch_bsr_linear_tc_large<CudaT, 64>(x, values, crow, col, bias, out, p, stream); return true;
    default: return false;
  }
}

template <typename T>
void launch_generic(const BsrLinearArgs& a, at::Tensor& y, cudaStream_t stream) {
  const T* bias = a.bias ? a.bias->const_data_ptr<T>() : nullptr;
  launch_bsr_linear_generic<T>(a.x.const_data_ptr<T>(), a.values.const_data_ptr<T>(),
                               a.crow.const_data_ptr<int32_t>(), a.col.const_data_ptr<int32_t>(), bias,
                               y.mutable_data_ptr<T>(), a.problem, stream);
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
    case at::kFloat: launch_generic<float>(a, y, stream); break;
    case at::kBFloat16:
      if (!launch_tensor_core<at::BFloat16, __nv_bfloat16>(a, y, stream)) launch_generic<at::BFloat16>(a, y, stream);
      break;
    case at::kHalf:
      if (!launch_tensor_core<at::Half, __half>(a, y, stream)) launch_generic<at::Half>(a, y, stream);
      break;
    default: TORCH_CHECK_TYPE(false, "bsr_linear: unsupported dtype ", input.scalar_type());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y.view(a.out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CUDA, m) { m.impl("bsr_linear", &bsr_linear_cuda_impl); }

}  // namespace pysparse
