// Torch-free backward kernels of the block-sparse linear y[M, N] = x[M, K] @ W^T (+ bias), W [N, K] in BSR form.
//
//  * grad_x[M, K] = grad_y[M, N] @ W, read from the same packed weight: each kept block scatters into grad_x's
//    columns, so the work is split by block column through a column-major index of the blocks (built once per
//    weight layout, bsr_column_index); no two threads write the same grad_x column, no atomics.
//  * grad_values on the kept blocks only (an SDDMM): grad_values[b] = grad_y[:, rows(b)]^T @ x[:, cols(b)] over the
//    M tokens, split by block row (each block belongs to one thread), no atomics.
//
// The weight is float32 in one of the two layouts SparseLinear holds: row-major blocks values[nnz][bh][bw] or
// block-transposed values[nnz][bw][bh] (each block column-major; see BsrProblem::transposed_values). grad_values is
// written in the same layout. Padding (the last block row past N, the last block column past K) is never read from
// grad_y or x and never written to grad_x; its entries of grad_values are 0.
#pragma once
#include <cstdint>
#include <string>

#include "bsr_linear.h"

namespace pysparse {

// The blocks of a BSR weight listed by block column: for block column c, entries
// [col_ptr[c], col_ptr[c + 1]) of `entries` ([nnz][2] int32: block row, block id), in increasing block row.
// col_ptr has n_block_cols + 1 entries. O(nnz + n_block_cols). crow / col must be valid (check_bsr_indices).
void build_bsr_column_index(const int32_t* crow, const int32_t* col, const BsrProblem& p, int32_t* col_ptr,
                            int32_t* entries);

// "" when a column index is well formed for p (safe to read: every entry inside the weight), else what is wrong.
// O(n_block_cols + nnz).
std::string check_bsr_column_index(const int32_t* col_ptr, const int32_t* entries, const BsrProblem& p);

// grad_x [M, K] (row-major, fully written) = grad_y [M, N] (row-major) @ W. `transposed`: values are stored
// block-transposed. p.ldx is not used. Runs on this machine's CPU path (active_cpu_isa_id).
void bsr_grad_input_cpu(const float* grad_y, const float* values, bool transposed, const int32_t* col_ptr,
                        const int32_t* entries, float* grad_x, const BsrProblem& p, int num_threads);

// grad_values [nnz] blocks in values' layout (`transposed` as above), fully written; x has row stride p.ldx,
// grad_y is [M, N] row-major. grad_bias (optional, [N]): the bias gradient, grad_y's column sums, fully written; the
// kernel sums the columns of the grad_y rows it copies anyway (float32, in chunks of tokens), and reads the rest.
void bsr_grad_values_cpu(const float* grad_y, const float* x, const int32_t* crow, const int32_t* col,
                         bool transposed, float* grad_values, const BsrProblem& p, int num_threads,
                         float* grad_bias = nullptr);

// bfloat16 gradients natively (AMX tiles, float32 accumulation, one rounding): where bsr_backward_bf16_native holds
// for the path (default: the current one) and p. Elsewhere the caller widens to float32 and runs the kernels above.
bool bsr_backward_bf16_native(const BsrProblem& p);
bool bsr_backward_bf16_native(CpuIsa isa, const BsrProblem& p);
void bsr_grad_input_cpu(const bfloat16_t* grad_y, const bfloat16_t* values, bool transposed, const int32_t* col_ptr,
                        const int32_t* entries, bfloat16_t* grad_x, const BsrProblem& p, int num_threads);
void bsr_grad_values_cpu(const bfloat16_t* grad_y, const bfloat16_t* x, const int32_t* crow, const int32_t* col,
                         bool transposed, bfloat16_t* grad_values, const BsrProblem& p, int num_threads);

// The same on a given path (tests force every path the machine runs); `isa` must be supported.
void bsr_grad_input_cpu_isa(CpuIsa isa, const float* grad_y, const float* values, bool transposed,
                            const int32_t* col_ptr, const int32_t* entries, float* grad_x, const BsrProblem& p,
                            int num_threads);
void bsr_grad_values_cpu_isa(CpuIsa isa, const float* grad_y, const float* x, const int32_t* crow, const int32_t* col,
                             bool transposed, float* grad_values, const BsrProblem& p, int num_threads,
                             float* grad_bias = nullptr);

}  // namespace pysparse
