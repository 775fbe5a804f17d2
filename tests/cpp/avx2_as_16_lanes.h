// The kernel templates of csrc/cpu/kernels/simd_kernels.inc with the AVX-512 path's 16-lane vectors and tile shapes,
// each vector emulated by a pair of AVX2 registers (avx2_as_16_lanes.cpp). Test-only: on a machine without AVX-512
// it checks the AVX-512 path's tiling logic (tile sizes, tails, layouts), though not its intrinsics.
#pragma once
#include "isa_kernels.h"

namespace pysparse {
namespace avx2_as_16_lanes {

// As bsr_linear_cpu_isa for this path. Defined on x86-64 builds only; call it where the CPU runs the AVX2 path.
template <typename T>
void bsr_linear(const T* x, const T* values, const int32_t* crow, const int32_t* col, const T* bias, T* y,
                const BsrProblem& p, int num_threads, bool bcast);

}  // namespace avx2_as_16_lanes
}  // namespace pysparse
