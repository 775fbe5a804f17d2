// Index check and instruction-set dispatch of the unstructured kernels (the path is dispatch.cpp's choice).
#include <algorithm>
#include <sstream>
#include <vector>

#include "unstructured_linear_isa.h"

namespace pysparse {
namespace {

// The smallest and largest of columns[0, n), from lo and hi. The op runs it over every column on every call: cloned
// for AVX-512 and AVX2 (chosen when the library loads, by the CPU), where plain x86-64's SSE2 has no 32-bit min / max
// and took ~1 ns an entry.
#if PYSPARSE_X86 && (defined(__GNUC__) || defined(__clang__))
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void column_range(const int32_t* columns, int64_t n, int32_t& lo, int32_t& hi) {
  int32_t l = lo, h = hi;
  for (int64_t i = 0; i < n; ++i) {
    l = std::min(l, columns[i]);
    h = std::max(h, columns[i]);
  }
  lo = l, hi = h;
}

}  // namespace

int64_t unstructured_block_cols(int64_t K, int64_t n_blocks) {
  for (int64_t w = kUnstructuredBlockCols; w <= kUnstructuredBlockColsWidest; w *= 2) {
    if ((K + w - 1) / w == n_blocks) return w;
  }
  return 0;
}

std::string check_unstructured_pointers(const int32_t* segment_ptr, const UnstructuredProblem& p) {
  std::ostringstream err;
  const int64_t w = p.block_cols;
  if (w < kUnstructuredBlockCols || w > kUnstructuredBlockColsWidest || (w & (w - 1)) != 0) {
    err << "the column-block width must be 128, 256 or 512, got " << w;
    return err.str();
  }
  if (p.n_blocks != (p.K + w - 1) / w) {
    err << "expected ceil(in_features / " << w << ") = " << (p.K + w - 1) / w << " column blocks, got " << p.n_blocks;
    return err.str();
  }
  const int64_t segments = p.n_blocks * p.N;
  if (segment_ptr[0] != 0) {
    err << "segment_ptr[0] must be 0, got " << segment_ptr[0];
    return err.str();
  }
  for (int64_t s = 0; s < segments; ++s) {
    if (segment_ptr[s + 1] < segment_ptr[s]) {
      err << "segment_ptr must be non-decreasing, got segment_ptr[" << s << "]=" << segment_ptr[s]
          << " > segment_ptr[" << s + 1 << "]=" << segment_ptr[s + 1];
      return err.str();
    }
  }
  if (segment_ptr[segments] != p.nnz) {
    err << "segment_ptr[-1] must equal the number of values " << p.nnz << ", got " << segment_ptr[segments];
    return err.str();
  }
  return "";
}

// A column block's entries are contiguous (block-major segments), so are a run of its rows': one min / max
// (column_range).
bool unstructured_block_columns_ok(const int32_t* columns, const int32_t* segment_ptr, const UnstructuredProblem& p,
                                   int64_t b, int64_t r0, int64_t r1) {
  const int64_t begin = segment_ptr[b * p.N + r0], end = segment_ptr[b * p.N + r1];
  const ColumnSpan span = unstructured_block_span(p, b);
  int32_t lo = span.first, hi = span.first;
  column_range(columns + begin, end - begin, lo, hi);
  return lo >= span.first && hi <= span.last;
}

std::string check_unstructured_indices(const int32_t* segment_ptr, const int32_t* columns,
                                       const UnstructuredProblem& p) {
  std::string bad = check_unstructured_pointers(segment_ptr, p);
  if (!bad.empty()) return bad;
  // The offending entry is looked for only in a block that fails.
  for (int64_t b = 0; b < p.n_blocks; ++b) {
    if (unstructured_block_columns_ok(columns, segment_ptr, p, b, 0, p.N)) continue;
    const ColumnSpan span = unstructured_block_span(p, b);
    for (int64_t i = segment_ptr[b * p.N]; i < segment_ptr[(b + 1) * p.N]; ++i) {
      if (columns[i] < span.first || columns[i] > span.last) {
        std::ostringstream err;
        err << "columns[" << i << "]=" << columns[i] << " is outside its column block " << b << " ([" << span.first
            << ", " << span.last << "])";
        return err.str();
      }
    }
  }
  return "";
}

std::vector<int64_t> unstructured_row_chunks(const int32_t* segment_ptr, const UnstructuredProblem& p,
                                             int64_t n_chunks) {
  constexpr int64_t kRowCost = 8;
  std::vector<int64_t> prefix(size_t(p.N + 1), kRowCost);
  prefix[0] = 0;
  // Block by block, in memory order: row by row across the blocks read n_blocks interleaved streams, which cost more
  // than a batch-1 product once segment_ptr had to come from memory.
  for (int64_t b = 0; b < p.n_blocks; ++b) {
    const int32_t* ptr = segment_ptr + b * p.N;
    for (int64_t n = 0; n < p.N; ++n) prefix[size_t(n + 1)] += ptr[n + 1] - ptr[n];
  }
  for (int64_t n = 0; n < p.N; ++n) prefix[size_t(n + 1)] += prefix[size_t(n)];
  std::vector<int64_t> bounds{0};
  const int64_t total = prefix[size_t(p.N)];
  // Cuts at multiples of 16 rows where N allows: a chunk's runs of 16 outputs then start on a cache line (whole-line
  // and streaming stores).
  const int64_t step = p.N >= 16 * n_chunks ? 16 : 1;
  for (int64_t n = step; n < p.N; n += step) {
    // Cut before row n once the work before it reaches the next chunk's share.
    if (prefix[size_t(n)] * n_chunks >= int64_t(bounds.size()) * total) bounds.push_back(n);
  }
  if (p.N > 0) bounds.push_back(p.N);
  return bounds;
}

bool unstructured_linear_cpu_isa(CpuIsa isa, const float* x, const float* values, const int32_t* columns,
                                 const int32_t* segment_ptr, const float* bias, float* y, const UnstructuredProblem& p,
                                 int num_threads) {
  if (num_threads < 1) num_threads = 1;
  switch (isa) {
#if PYSPARSE_X86
    case CpuIsa::kAvx2: return avx2::unstructured_linear(x, values, columns, segment_ptr, bias, y, p, num_threads);
    case CpuIsa::kAvx512:
    case CpuIsa::kAvx512Bf16:
    case CpuIsa::kAvx512Amx:
      if (p.M < kUnstructuredGatherTokens) {  // the 8-lane gathers (see kUnstructuredGatherTokens)
        return avx2::unstructured_linear_gathers(x, values, columns, segment_ptr, bias, y, p, num_threads);
      }
      return avx512::unstructured_linear(x, values, columns, segment_ptr, bias, y, p, num_threads);
#endif
    default: return generic::unstructured_linear(x, values, columns, segment_ptr, bias, y, p, num_threads);
  }
}

void unstructured_linear_grad_values_cpu_isa(CpuIsa isa, const float* grad_y, const float* x, const int32_t* columns,
                                             const int32_t* segment_ptr, float* grad_values,
                                             const UnstructuredProblem& p, int num_threads) {
  if (num_threads < 1) num_threads = 1;
  switch (isa) {
#if PYSPARSE_X86
    case CpuIsa::kAvx2:
      avx2::unstructured_linear_grad_values(grad_y, x, columns, segment_ptr, grad_values, p, num_threads);
      return;
    case CpuIsa::kAvx512:
    case CpuIsa::kAvx512Bf16:
    case CpuIsa::kAvx512Amx:
      avx512::unstructured_linear_grad_values(grad_y, x, columns, segment_ptr, grad_values, p, num_threads);
      return;
#endif
    default: generic::unstructured_linear_grad_values(grad_y, x, columns, segment_ptr, grad_values, p, num_threads);
  }
}

void unstructured_linear_grad_values_cpu(const float* grad_y, const float* x, const int32_t* columns,
                                         const int32_t* segment_ptr, float* grad_values, const UnstructuredProblem& p,
                                         int num_threads) {
  unstructured_linear_grad_values_cpu_isa(active_cpu_isa_id(), grad_y, x, columns, segment_ptr, grad_values, p,
                                          num_threads);
}

void unstructured_transpose(const int32_t* columns, const int32_t* segment_ptr, const UnstructuredProblem& p,
                            int32_t* columns_t, int32_t* segment_ptr_t, int32_t* perm) {
  const int64_t segments_t = (p.N + kUnstructuredBlockCols - 1) / kUnstructuredBlockCols * p.K;
  std::vector<int64_t> cursor(size_t(segments_t + 1), 0);
  auto segment_t = [&](int64_t n, int32_t column) { return n / kUnstructuredBlockCols * p.K + column; };
  for (int64_t b = 0; b < p.n_blocks; ++b) {
    for (int64_t n = 0; n < p.N; ++n) {
      for (int64_t s = segment_ptr[b * p.N + n]; s < segment_ptr[b * p.N + n + 1]; ++s) {
        ++cursor[size_t(segment_t(n, columns[s]) + 1)];
      }
    }
  }
  for (int64_t i = 0; i < segments_t; ++i) cursor[size_t(i + 1)] += cursor[size_t(i)];
  for (int64_t i = 0; i <= segments_t; ++i) segment_ptr_t[i] = int32_t(cursor[size_t(i)]);
  // Rows in increasing order: each segment of W^T lists its columns (W's rows) increasing, as the format wants.
  for (int64_t n = 0; n < p.N; ++n) {
    for (int64_t b = 0; b < p.n_blocks; ++b) {
      for (int64_t s = segment_ptr[b * p.N + n]; s < segment_ptr[b * p.N + n + 1]; ++s) {
        const int64_t i = cursor[size_t(segment_t(n, columns[s]))]++;
        columns_t[i] = int32_t(n);
        perm[i] = int32_t(s);
      }
    }
  }
}

bool unstructured_linear_cpu(const float* x, const float* values, const int32_t* columns, const int32_t* segment_ptr,
                             const float* bias, float* y, const UnstructuredProblem& p, int num_threads) {
  return unstructured_linear_cpu_isa(active_cpu_isa_id(), x, values, columns, segment_ptr, bias, y, p, num_threads);
}

}  // namespace pysparse
