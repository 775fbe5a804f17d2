// Torch-free block-sparse linear kernels: y[M, N] = x[M, K] @ W^T + bias, W [N, K] in BSR form.
//
// The problem (BsrProblem: shapes, BSR layout, fused epilogue) is described in common/bsr_problem.h, which the CUDA
// kernels share.
#pragma once
#include <cstdint>
#include <string>

#include "activation.h"
#include "common/bsr_problem.h"
#include "dtypes.h"

namespace pysparse {

// Returns "" when the BSR indices are well formed for the problem, else a message naming what is wrong.
// O(n_block_rows + nnz); every kernel relies on it (or on a format that ran it) for memory safety.
std::string check_bsr_indices(const int32_t* crow, const int32_t* col, const BsrProblem& p);

// Outputs larger than this are written with streaming stores by the kernels whose stores fill whole lines (the
// outer-product kernel's staged block rows, grad_input's grad_x, the unstructured kernel): they would not stay in
// the caches for the next op anyway, and a normal store first reads each line in.
constexpr int64_t kStreamStoreBytes = int64_t(4) << 20;

// Instruction-set paths of the CPU kernels. kAvx512Bf16 is kAvx512 plus vdpbf16ps for bfloat16 (AVX512-BF16);
// it is chosen where it is faster than widening bfloat16 to float32 (see dispatch.cpp). kAvx512Amx is kAvx512 plus
// AMX tiles for bfloat16 block products (bsr_linear_amx.cpp); every other kernel runs as on kAvx512.
enum class CpuIsa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAvx512Amx = 4 };
constexpr int kLastCpuIsa = static_cast<int>(CpuIsa::kAvx512Amx);

// Name of the instruction-set path the CPU kernels use on this machine ("avx512", "avx2" or "generic"). Chosen once,
// at load, from cpuid: the best path the CPU and OS support, unless the environment variable PYSPARSE_CPU_ISA
// (generic, avx2 or avx512) asks for a lower one (a request the CPU cannot run falls back to the best it can), or
// force_cpu_path replaces it at run time.
const char* active_cpu_isa();
CpuIsa active_cpu_isa_id();
// Whether this CPU (and this build: x86-64 only for the SIMD paths) can run `isa`.
bool cpu_isa_supported(CpuIsa isa);

// Whether the kernels on `isa`'s path may take the broadcast kernel (see simd_kernels.inc; bcast_applies bounds
// where it runs). On by default on both SIMD paths; PYSPARSE_CPU_BCAST=0|1 (read once, at load) or force_cpu_path
// turns it off or on (A/B runs). Generic: no. bsr_conv2d_nhwc_cpu (the implicit-im2col convolution) is built on it
// and ignores the switch.
bool cpu_bcast_enabled(CpuIsa isa);

// The path one call runs on, read once per call so that a switch by force_cpu_path never mixes two paths in it.
struct CpuPath {
  CpuIsa isa;
  bool bcast;
};
CpuPath current_cpu_path();

// Test and benchmark hook: from the next call on, run `isa` (a CpuIsa value; -1: the path chosen at load) with the
// broadcast kernel off (0), on (1) or at the path's default (-1). Process-wide. Returns false, changing nothing,
// for a value out of range or an isa this CPU cannot run.
bool force_cpu_path(int isa, int bcast);
// The request force_cpu_path holds now ({-1, -1}: none), to restore it after a temporary switch.
struct CpuPathRequest {
  int isa;
  int bcast;
};
CpuPathRequest forced_cpu_path();

// Whether bsr_linear_cpu<T> on `path` (default: the current one) runs `p` through the broadcast kernel when given the
// blocks transposed (BsrProblem::transposed_values), which it then reads.
template <typename T>
bool bsr_linear_reads_transposed(const BsrProblem& p);
template <typename T>
bool bsr_linear_reads_transposed(const CpuPath& path, const BsrProblem& p);

// Convolution for bsr_conv2d_nhwc_cpu: x is [batch, hp, wp, c] (already zero padded), y is [batch, ho, wo, N], and W
// is [N, kh*kw*c] tap-major: column (tap_h * kw + tap_w) * c + channel. The BsrProblem has M = batch*ho*wo and
// K = kh*kw*c (ldx is not used).
struct ConvGeometry {
  int64_t batch = 0, hp = 0, wp = 0, c = 0, ho = 0, wo = 0;
  int64_t kh = 1, kw = 1, sh = 1, sw = 1, dh = 1, dw = 1;
};

// "" when bsr_conv2d_nhwc_cpu runs this problem on this machine, else why not: the geometry must be consistent
// (every patch inside x), bw must divide c (a block never straddles two taps), bh must be a multiple of 8, and the
// CPU path must have the broadcast kernel (AVX2; not the forced generic path).
std::string bsr_conv2d_unsupported(const BsrProblem& p, const ConvGeometry& c);
// Whether this machine's CPU path has the implicit-im2col convolution at all.
bool bsr_conv2d_available();

// Implicit-im2col convolution through the broadcast kernel (float32): no patch is copied.
void bsr_conv2d_nhwc_cpu(const float* x, const float* values, const int32_t* crow, const int32_t* col,
                         const float* bias, float* y, const BsrProblem& p, const ConvGeometry& c, int num_threads);

// Runs the kernel with `num_threads` OpenMP threads. bias may be null. Accumulates in float32.
template <typename T>
void bsr_linear_cpu(const T* x, const T* values, const int32_t* crow, const int32_t* col, const T* bias, T* y,
                    const BsrProblem& p, int num_threads);

// Same, on a given path (tests force every path the machine can run); `isa` must be supported. bcast: whether
// the broadcast kernel may run (ignored where the path has none).
template <typename T>
void bsr_linear_cpu_isa(CpuIsa isa, bool bcast, const T* x, const T* values, const int32_t* crow, const int32_t* col,
                        const T* bias, T* y, const BsrProblem& p, int num_threads);

}  // namespace pysparse
