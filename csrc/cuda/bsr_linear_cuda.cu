// CUDA implementation of pysparse::bsr_linear: metadata checks (no host sync), then the fastest kernel
// that handles the dtype and block size. Launches on the current stream; allocates only the output.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bsr_linear_args.h"
#include "cuda/bsr_linear_generic.cuh"
#include "cuda/bsr_linear_tc_large.cuh"
#include "cuda/bsr_linear_tc_small.cuh"
#include "cuda/bsr_linear_wgmma.cuh"

#include <cstdlib>
#include <cstring>

namespace pysparse {
namespace {

bool aligned(const void* ptr, int bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// Large-M kernels: mma.sync with 64 or 128 tokens per CTA (sm80+), wgmma with 128 or 256 (sm_90a builds on
// compute-capability 9.0 devices, blocks 32 or 64 rows tall).
enum class LargeTile { kMma64, kMma128, kWgmma128, kWgmma256 };

bool wgmma_available(const BsrProblem& p, const cudaDeviceProp& prop) {
#ifdef PYSPARSE_SM90A
  return prop.major == 9 && prop.minor == 0 && (p.bh == 32 || p.bh == 64);
#else
  (void)p, (void)prop;
  return false;
#endif
}

// The choice follows the H200 measurements in benchmarks/NOTES_cuda.md (v4, bf16, M = 256 and 4096, blocks 32
// and 64, 50-95% sparse): wgmma with 256 tokens where block rows are long (>= 16 stages of 64 kept columns:
// the weight re-read per token tile is halved and L2 -> SM traffic bounds these), wgmma with 128 tokens for
// 64-row blocks when the grid is only a few waves (M of a few hundred), mma.sync with 128 tokens otherwise
// (three CTAs per SM hide the fill of short rows best), 64 tokens when 128 leaves SMs idle.
// PYSPARSE_CUDA_TILE_M = 64 / 128 / wg128 / wg256 forces one where it applies: a knob for
// comparing the variants (benchmarks/bench_cuda_bsr_linear.py --tile-variants).
LargeTile choose_large_tile(const BsrProblem& p) {
  const cudaDeviceProp& prop = *at::cuda::getCurrentDeviceProperties();
  const bool wgmma = wgmma_available(p, prop);
  if (const char* env = std::getenv("PYSPARSE_CUDA_TILE_M")) {
    if (!std::strcmp(env, "64")) return LargeTile::kMma64;
    if (!std::strcmp(env, "128")) return LargeTile::kMma128;
    if (wgmma && !std::strcmp(env, "wg128")) return LargeTile::kWgmma128;
    if (wgmma && !std::strcmp(env, "wg256")) return LargeTile::kWgmma256;
  }
  const auto ctas = [&](int64_t tile) { return p.n_block_rows * ((p.M + tile - 1) / tile); };
  const int64_t sms = prop.multiProcessorCount;
  const double stages_per_row = double(p.nnz) * double(p.bw) / (double(p.n_block_rows) * 64.0);
  if (wgmma && p.bh == 64) {
    if (stages_per_row >= 16 && ctas(256) >= sms) return LargeTile::kWgmma256;
    if (ctas(128) < 8 * sms) return LargeTile::kWgmma128;
  }
  return ctas(128) >= sms ? LargeTile::kMma128 : LargeTile::kMma64;
}

template <typename T, int WM>
bool launch_mma(const T* x, const T* values, const int32_t* crow, const int32_t* col, const T* bias, T* y,
                const BsrProblem& p, cudaStream_t stream) {
  switch (p.bh) {
    case 16: launch_bsr_linear_tc_large<T, 16, WM>(x, values, crow, col, bias, y, p, stream); return true;
    case 32: launch_bsr_linear_tc_large<T, 32, WM>(x, values, crow, col, bias, y, p, stream); return true;
    default: launch_bsr_linear_tc_large<T, 64, WM>(x, values, crow, col, bias, y, p, stream); return true;
  }
}

template <typename T, int H>
bool launch_wgmma(const T* x, const T* values, const int32_t* crow, const int32_t* col, const T* bias, T* y,
                  const BsrProblem& p, cudaStream_t stream) {
  const cudaDeviceProp& prop = *at::cuda::getCurrentDeviceProperties();
  if (p.bh == 32) {
    launch_bsr_linear_wgmma<T, 32, H>(x, values, crow, col, bias, y, p, prop, stream);
  } else {
    launch_bsr_linear_wgmma<T, 64, H>(x, values, crow, col, bias, y, p, prop, stream);
  }
  return true;
}

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
  if (p.bw != 16 && p.bw != 32 && p.bw != 64) return false;
  if (p.bh != 16 && p.bh != 32 && p.bh != 64) return false;
  switch (choose_large_tile(p)) {
    case LargeTile::kWgmma256: return launch_wgmma<CudaT, 2>(x, values, crow, col, bias, out, p, stream);
    case LargeTile::kWgmma128: return launch_wgmma<CudaT, 1>(x, values, crow, col, bias, out, p, stream);
    case LargeTile::kMma128: return launch_mma<CudaT, 4>(x, values, crow, col, bias, out, p, stream);
    case LargeTile::kMma64: return launch_mma<CudaT, 2>(x, values, crow, col, bias, out, p, stream);
  }
  return false;
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
