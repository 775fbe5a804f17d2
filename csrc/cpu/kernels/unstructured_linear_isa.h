// Internal: the per-instruction-set entry points behind unstructured_linear_cpu (see unstructured_linear.cpp).
// Each SIMD path is its own translation unit with function-level target attributes, as the bsr_linear paths.
#pragma once
#include <algorithm>
#include <vector>

#include "isa_kernels.h"  // PYSPARSE_X86
#include "unstructured_linear.h"

namespace pysparse {

#define PYSPARSE_UNSTRUCTURED_ENTRY                                                                              \
  bool unstructured_linear(const float* x, const float* values, const int32_t* columns,                          \
                           const int32_t* segment_ptr, const float* bias, float* y, const UnstructuredProblem& p, \
                           int num_threads);                                                                     \
  void unstructured_linear_grad_values(const float* grad_y, const float* x, const int32_t* columns,               \
                                       const int32_t* segment_ptr, float* grad_values,                            \
                                       const UnstructuredProblem& p, int num_threads);

namespace generic {
PYSPARSE_UNSTRUCTURED_ENTRY
}
#if PYSPARSE_X86
namespace avx2 {
PYSPARSE_UNSTRUCTURED_ENTRY
// The forward with the gathers below kUnstructuredGatherTokens tokens (AVX-512 CPUs' batch 1-3).
bool unstructured_linear_gathers(const float* x, const float* values, const int32_t* columns,
                                 const int32_t* segment_ptr, const float* bias, float* y, const UnstructuredProblem& p,
                                 int num_threads);
}
namespace avx512 {
PYSPARSE_UNSTRUCTURED_ENTRY
}
#endif
#undef PYSPARSE_UNSTRUCTURED_ENTRY

// The columns column block b spans: [first, last].
struct ColumnSpan {
  int32_t first, last;
};
inline ColumnSpan unstructured_block_span(const UnstructuredProblem& p, int64_t b) {
  return {int32_t(b * p.block_cols), int32_t(std::min(p.K, (b + 1) * p.block_cols) - 1)};
}

// Whether the columns of rows [r0, r1) in column block b all lie inside that block (and below K).
bool unstructured_block_columns_ok(const int32_t* columns, const int32_t* segment_ptr, const UnstructuredProblem& p,
                                   int64_t b, int64_t r0, int64_t r1);

// Contiguous runs of rows with about equal work (nonzeros + 8 per row: a row's fixed cost), at most n_chunks of them,
// cut at multiples of 16 rows where N >= 16 n_chunks:
// chunk c is rows [bounds[c], bounds[c + 1]). Threads take chunks dynamically.
std::vector<int64_t> unstructured_row_chunks(const int32_t* segment_ptr, const UnstructuredProblem& p,
                                             int64_t n_chunks);

}  // namespace pysparse
