// Index check and instruction-set dispatch of the unstructured kernels (the path is dispatch.cpp's choice).
#include <sstream>
#include <vector>

#include "unstructured_linear_isa.h"

namespace pysparse {

std::string check_unstructured_indices(const int32_t* group_ptr, const int32_t* columns, const UnstructuredProblem& p) {
  std::ostringstream err;
  if (p.n_groups != (p.N + kUnstructuredGroupRows - 1) / kUnstructuredGroupRows) {
    err << "expected ceil(out_features / 4) = " << (p.N + 3) / 4 << " row groups, got " << p.n_groups;
    return err.str();
  }
  if (group_ptr[0] != 0) {
    err << "group_ptr[0] must be 0, got " << group_ptr[0];
    return err.str();
  }
  for (int64_t g = 0; g < p.n_groups; ++g) {
    const int64_t begin = group_ptr[g], end = group_ptr[g + 1];
    if (end < begin) {
      err << "group_ptr must be non-decreasing, got group_ptr[" << g << "]=" << begin << " > group_ptr[" << g + 1
          << "]=" << end;
      return err.str();
    }
    if (end > p.steps) {
      err << "group_ptr[" << g + 1 << "]=" << end << " exceeds the number of steps " << p.steps;
      return err.str();
    }
    for (int64_t r = 0; r < kUnstructuredGroupRows; ++r) {
      int64_t prev = -1;
      for (int64_t s = begin; s < end; ++s) {
        const int64_t slot = s * kUnstructuredGroupRows + r, c = columns[slot];
        if (c < 0 || c > p.K) {
          err << "columns[" << slot << "]=" << c << " is out of range [0, " << p.K << "] (" << p.K
              << " marks padding)";
          return err.str();
        }
        // Padding may follow anything (and repeat); a real column must exceed the one before (never padding).
        if (c < p.K && c <= prev) {
          err << "columns of row " << g * kUnstructuredGroupRows + r << " must strictly increase with padding ("
              << p.K << ") last, got " << prev << " then " << c << " at slot " << slot;
          return err.str();
        }
        if (c < p.K && g * kUnstructuredGroupRows + r >= p.N) {
          err << "columns[" << slot << "]=" << c << " belongs to row " << g * kUnstructuredGroupRows + r
              << " past out_features " << p.N << " (only padding may sit there)";
          return err.str();
        }
        prev = c;
      }
    }
  }
  if (group_ptr[p.n_groups] != p.steps) {
    err << "group_ptr[-1] must equal the number of steps " << p.steps << ", got " << group_ptr[p.n_groups];
    return err.str();
  }
  return "";
}

std::vector<int64_t> unstructured_group_chunks(const int32_t* group_ptr, int64_t n_groups, int64_t n_chunks) {
  std::vector<int64_t> bounds{0};
  const int64_t total = int64_t(group_ptr[n_groups]) + n_groups;
  for (int64_t g = 1; g < n_groups; ++g) {
    // Cut before group g once the work before it reaches the next chunk's share.
    if ((int64_t(group_ptr[g]) + g) * n_chunks >= int64_t(bounds.size()) * total) bounds.push_back(g);
  }
  if (n_groups > 0) bounds.push_back(n_groups);
  return bounds;
}

void unstructured_linear_cpu_isa(CpuIsa isa, const float* x, const float* values, const int32_t* columns,
                                 const int32_t* group_ptr, const float* bias, float* y, const UnstructuredProblem& p,
                                 int num_threads) {
  if (num_threads < 1) num_threads = 1;
  switch (isa) {
#if PYSPARSE_X86
    case CpuIsa::kAvx2: avx2::unstructured_linear(x, values, columns, group_ptr, bias, y, p, num_threads); return;
    case CpuIsa::kAvx512:
    case CpuIsa::kAvx512Bf16:
      avx512::unstructured_linear(x, values, columns, group_ptr, bias, y, p, num_threads);
      return;
#endif
    default: generic::unstructured_linear(x, values, columns, group_ptr, bias, y, p, num_threads); return;
  }
}

void unstructured_linear_cpu(const float* x, const float* values, const int32_t* columns, const int32_t* group_ptr,
                             const float* bias, float* y, const UnstructuredProblem& p, int num_threads) {
  unstructured_linear_cpu_isa(active_cpu_isa_id(), x, values, columns, group_ptr, bias, y, p, num_threads);
}

}  // namespace pysparse
