// Internal: the per-instruction-set entry points behind bsr_backward.h (see bsr_backward.cpp), one translation unit
// per path, as for the forward (isa_kernels.h).
#pragma once
#include "bsr_backward.h"
#include "isa_kernels.h"

namespace pysparse {

#define PYSPARSE_BSR_BACKWARD_DECLARE                                                                             \
  void bsr_grad_input(const float* grad_y, const float* values, bool transposed, const int32_t* col_ptr,          \
                      const int32_t* entries, float* grad_x, const BsrProblem& p, int num_threads);               \
  void bsr_grad_values(const float* grad_y, const float* x, const int32_t* crow, const int32_t* col,              \
                       bool transposed, float* grad_values, const BsrProblem& p, int num_threads,                 \
                       float* grad_bias);

namespace generic {
PYSPARSE_BSR_BACKWARD_DECLARE
}  // namespace generic

#if PYSPARSE_X86
namespace avx2 {
PYSPARSE_BSR_BACKWARD_DECLARE
}  // namespace avx2
namespace avx512 {
PYSPARSE_BSR_BACKWARD_DECLARE
}  // namespace avx512
// bfloat16 on AMX tiles (bsr_backward_amx.cpp).
namespace amx {
// The backward kernels (bsr_backward_amx.cpp) take p where bh and bw are multiples of 16 and divide N and K.
bool backward_applies(const BsrProblem& p);
void bsr_grad_input(const bfloat16_t* grad_y, const bfloat16_t* values, bool transposed, const int32_t* col_ptr,
                    const int32_t* entries, bfloat16_t* grad_x, const BsrProblem& p, int num_threads);
void bsr_grad_values(const bfloat16_t* grad_y, const bfloat16_t* x, const int32_t* crow, const int32_t* col,
                     bool transposed, bfloat16_t* grad_values, const BsrProblem& p, int num_threads);
}  // namespace amx
#endif

#undef PYSPARSE_BSR_BACKWARD_DECLARE

}  // namespace pysparse
