// The bsr_linear backward kernels' entry points: the column index of the blocks, its check, and the dispatch to the
// instruction-set path chosen at load (dispatch.cpp: active_cpu_isa_id, forced lower by PYSPARSE_CPU_ISA).
#include <algorithm>
#include <string>
#include <vector>

#include "bsr_backward_isa.h"

namespace pysparse {

void build_bsr_column_index(const int32_t* crow, const int32_t* col, const BsrProblem& p, int32_t* col_ptr,
                            int32_t* entries) {
  // Counting sort by block column; walking the block rows in order keeps each column's entries sorted by row.
  std::fill(col_ptr, col_ptr + p.n_block_cols + 1, 0);
  for (int64_t b = 0; b < p.nnz; ++b) ++col_ptr[col[b] + 1];
  for (int64_t c = 0; c < p.n_block_cols; ++c) col_ptr[c + 1] += col_ptr[c];
  std::vector<int32_t> next(col_ptr, col_ptr + p.n_block_cols);
  for (int64_t r = 0; r < p.n_block_rows; ++r) {
    for (int32_t b = crow[r]; b < crow[r + 1]; ++b) {
      const int32_t e = next[col[b]]++;
      entries[2 * e] = int32_t(r);
      entries[2 * e + 1] = b;
    }
  }
}

std::string check_bsr_column_index(const int32_t* col_ptr, const int32_t* entries, const BsrProblem& p) {
  if (col_ptr[0] != 0) return "col_ptr[0] must be 0, got " + std::to_string(col_ptr[0]);
  for (int64_t c = 0; c < p.n_block_cols; ++c) {
    if (col_ptr[c + 1] < col_ptr[c]) return "col_ptr must be non-decreasing (at " + std::to_string(c + 1) + ")";
  }
  if (col_ptr[p.n_block_cols] != p.nnz) {
    return "col_ptr[-1] must equal the number of blocks " + std::to_string(p.nnz) + ", got " +
           std::to_string(col_ptr[p.n_block_cols]);
  }
  for (int64_t e = 0; e < p.nnz; ++e) {
    const int32_t r = entries[2 * e], b = entries[2 * e + 1];
    if (r < 0 || r >= p.n_block_rows) {
      return "entry " + std::to_string(e) + " has block row " + std::to_string(r) + ", outside [0, " +
             std::to_string(p.n_block_rows) + ")";
    }
    if (b < 0 || b >= p.nnz) {
      return "entry " + std::to_string(e) + " has block id " + std::to_string(b) + ", outside [0, " +
             std::to_string(p.nnz) + ")";
    }
  }
  return "";
}

void bsr_grad_input_cpu_isa(CpuIsa isa, const float* grad_y, const float* values, bool transposed,
                            const int32_t* col_ptr, const int32_t* entries, float* grad_x, const BsrProblem& p,
                            int num_threads) {
  if (num_threads < 1) num_threads = 1;
  switch (isa) {
#if PYSPARSE_X86
    case CpuIsa::kAvx2:
      return avx2::bsr_grad_input(grad_y, values, transposed, col_ptr, entries, grad_x, p, num_threads);
    case CpuIsa::kAvx512:
    case CpuIsa::kAvx512Bf16:
    case CpuIsa::kAvx512Amx:
      return avx512::bsr_grad_input(grad_y, values, transposed, col_ptr, entries, grad_x, p, num_threads);
#endif
    default: return generic::bsr_grad_input(grad_y, values, transposed, col_ptr, entries, grad_x, p, num_threads);
  }
}

void bsr_grad_values_cpu_isa(CpuIsa isa, const float* grad_y, const float* x, const int32_t* crow, const int32_t* col,
                             bool transposed, float* grad_values, const BsrProblem& p, int num_threads,
                             float* grad_bias) {
  if (num_threads < 1) num_threads = 1;
  switch (isa) {
#if PYSPARSE_X86
    case CpuIsa::kAvx2:
      return avx2::bsr_grad_values(grad_y, x, crow, col, transposed, grad_values, p, num_threads, grad_bias);
    case CpuIsa::kAvx512:
    case CpuIsa::kAvx512Bf16:
    case CpuIsa::kAvx512Amx:
      return avx512::bsr_grad_values(grad_y, x, crow, col, transposed, grad_values, p, num_threads, grad_bias);
#endif
    default: return generic::bsr_grad_values(grad_y, x, crow, col, transposed, grad_values, p, num_threads, grad_bias);
  }
}

bool bsr_backward_bf16_native(CpuIsa isa, const BsrProblem& p) {
#if PYSPARSE_X86
  return isa == CpuIsa::kAvx512Amx && amx::backward_applies(p);
#else
  (void)isa, (void)p;
  return false;
#endif
}

bool bsr_backward_bf16_native(const BsrProblem& p) { return bsr_backward_bf16_native(active_cpu_isa_id(), p); }

void bsr_grad_input_cpu(const bfloat16_t* grad_y, const bfloat16_t* values, bool transposed, const int32_t* col_ptr,
                        const int32_t* entries, bfloat16_t* grad_x, const BsrProblem& p, int num_threads) {
#if PYSPARSE_X86
  amx::bsr_grad_input(grad_y, values, transposed, col_ptr, entries, grad_x, p, std::max(num_threads, 1));
#else
  (void)grad_y, (void)values, (void)transposed, (void)col_ptr, (void)entries, (void)grad_x, (void)p, (void)num_threads;
#endif
}

void bsr_grad_values_cpu(const bfloat16_t* grad_y, const bfloat16_t* x, const int32_t* crow, const int32_t* col,
                         bool transposed, bfloat16_t* grad_values, const BsrProblem& p, int num_threads) {
#if PYSPARSE_X86
  amx::bsr_grad_values(grad_y, x, crow, col, transposed, grad_values, p, std::max(num_threads, 1));
#else
  (void)grad_y, (void)x, (void)crow, (void)col, (void)transposed, (void)grad_values, (void)p, (void)num_threads;
#endif
}

void bsr_grad_input_cpu(const float* grad_y, const float* values, bool transposed, const int32_t* col_ptr,
                        const int32_t* entries, float* grad_x, const BsrProblem& p, int num_threads) {
  bsr_grad_input_cpu_isa(active_cpu_isa_id(), grad_y, values, transposed, col_ptr, entries, grad_x, p, num_threads);
}

void bsr_grad_values_cpu(const float* grad_y, const float* x, const int32_t* crow, const int32_t* col,
                         bool transposed, float* grad_values, const BsrProblem& p, int num_threads,
                         float* grad_bias) {
  bsr_grad_values_cpu_isa(active_cpu_isa_id(), grad_y, x, crow, col, transposed, grad_values, p, num_threads,
                          grad_bias);
}

}  // namespace pysparse
