// Portable path of the unstructured kernels (CPUs without AVX2, non-x86 builds): the shared algorithm of
// unstructured_linear_kernels.inc on one-float "vectors" (the compiler may vectorise what it can).
#include <omp.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

#include "unstructured_linear_isa.h"

namespace pysparse {
namespace generic {
namespace {

struct Isa {
  using V = float;
  static constexpr int64_t L = 1;
  static constexpr int kMaxVecs = 8;  // tokens per tile
  static V zero() { return 0.0f; }
  static V set1(float f) { return f; }
  static V load(const float* p) { return *p; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V add(V a, V b) { return a + b; }

  static void store_rows(V r0, V r1, V r2, V r3, float* y, int64_t, int64_t, int64_t rows) {
    const float r[4] = {r0, r1, r2, r3};
    std::copy(r, r + rows, y);
  }

  static void pack_tile(const float* x, int64_t ldx, int64_t tokens, int64_t kn, float* dst, int64_t width) {
    for (int64_t k = 0; k < kn; ++k) {
      for (int64_t t = 0; t < width; ++t) dst[k * width + t] = t < tokens ? x[t * ldx + k] : 0.0f;
    }
  }

  static void gather_group(const float* xrow, const float* values, const int32_t* columns, int64_t s0, int64_t s1,
                           float out[4]) {
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t slot = s0 * 4; slot < s1 * 4; ++slot) acc[slot % 4] += values[slot] * xrow[columns[slot]];
    std::copy(acc, acc + 4, out);
  }
};

#include "unstructured_linear_kernels.inc"

}  // namespace

void unstructured_linear(const float* x, const float* values, const int32_t* columns, const int32_t* group_ptr,
                         const float* bias, float* y, const UnstructuredProblem& p, int num_threads) {
  linear_impl(x, values, columns, group_ptr, bias, y, p, num_threads);
}

}  // namespace generic
}  // namespace pysparse
