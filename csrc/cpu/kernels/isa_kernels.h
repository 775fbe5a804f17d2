// Internal: the per-instruction-set entry points behind bsr_linear_cpu (see dispatch.cpp).
// Each SIMD path lives in its own translation unit compiled with function-level target attributes, so the
// library builds with plain flags and runs on any x86-64; only the dispatcher decides which path is called.
#pragma once
#include "bsr_linear.h"

#if defined(__x86_64__) || defined(_M_X64)
#define PYSPARSE_X86 1
#else
#define PYSPARSE_X86 0
#endif

namespace pysparse {

namespace generic {
template <typename T>
void bsr_linear(const T* x, const T* values, const int32_t* crow, const int32_t* col, const T* bias, T* y,
                const BsrProblem& p, int num_threads);
}  // namespace generic

#if PYSPARSE_X86
// bcast: whether the broadcast kernel may run (cpu_bcast_enabled).
namespace avx2 {
template <typename T>
void bsr_linear(const T* x, const T* values, const int32_t* crow, const int32_t* col, const T* bias, T* y,
                const BsrProblem& p, int num_threads, bool bcast);
void bsr_conv2d(const float* x, const float* values, const int32_t* crow, const int32_t* col, const float* bias,
                float* y, const BsrProblem& p, const ConvGeometry& c, int num_threads);
// Whether bsr_linear<T> with bcast reads BsrProblem::transposed_values for p where given (reads_transposed_values).
template <typename T>
bool reads_transposed(const BsrProblem& p);
}  // namespace avx2

namespace avx512 {
// native_bf16: use vdpbf16ps for bfloat16 (needs AVX512-BF16); otherwise bfloat16 is widened to float32.
template <typename T>
void bsr_linear(const T* x, const T* values, const int32_t* crow, const int32_t* col, const T* bias, T* y,
                const BsrProblem& p, int num_threads, bool native_bf16, bool bcast);
// As avx2::reads_transposed; native_bf16 as for bsr_linear.
template <typename T>
bool reads_transposed(const BsrProblem& p, bool native_bf16);
}  // namespace avx512

namespace amx {
// Whether the CPU has AMX-TILE and AMX-BF16 and the OS granted this process the tile state (requested here).
bool usable();
// Whether bsr_linear takes p: bh and bw multiples of 16, bw dividing K (x is read in place, never past K).
bool applies(const BsrProblem& p);
// bfloat16 only; W's blocks row-major (values), accumulated in float32.
void bsr_linear(const bfloat16_t* x, const bfloat16_t* values, const int32_t* crow, const int32_t* col,
                const bfloat16_t* bias, bfloat16_t* y, const BsrProblem& p, int num_threads);
}  // namespace amx
#endif

}  // namespace pysparse
