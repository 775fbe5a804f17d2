// Portable path of the unstructured kernels (CPUs without AVX2, non-x86 builds): the shared algorithm of
// unstructured_linear_kernels.inc on one-float "vectors" (the compiler may vectorise what it can).
#include <omp.h>

#include <algorithm>
#include <atomic>
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
  static constexpr int kMaxVecs = 16;  // tokens per tile
  static int64_t tile_vecs(const UnstructuredProblem&, int) { return kMaxVecs; }
  static constexpr int kGradValuesVecs = 16;
  static constexpr int kSumGroup = 4;
  static V zero() { return 0.0f; }
  static V set1(float f) { return f; }
  static V load(const float* p) { return *p; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V add(V a, V b) { return a + b; }

  static void store(float* p, V v) { *p = v; }
  static float hsum(V v) { return v; }
  static void add_sums(const V* acc, float* out, bool first) {
    for (int e = 0; e < kSumGroup; ++e) out[e] = first ? acc[e] : out[e] + acc[e];
  }
  static void fence() {}  // no streaming stores on this path (store_transposed ignores `stream`)
  static void store_transposed(const float* yT, int64_t, int64_t rows, int64_t tokens, float* y, int64_t,
                               const float* res, Activation act, bool) {
    if (rows > 0 && tokens > 0) *y = activate(*yT + (res != nullptr ? *res : 0.0f), act);
  }

  static void pack_tile(const float* x, int64_t ldx, int64_t tokens, int64_t kn, float* dst, int64_t width) {
    for (int64_t k = 0; k < kn; ++k) {
      for (int64_t t = 0; t < width; ++t) dst[k * width + t] = t < tokens ? x[t * ldx + k] : 0.0f;
    }
  }

};

#include "unstructured_linear_kernels.inc"

}  // namespace

bool unstructured_linear(const float* x, const float* values, const int32_t* columns, const int32_t* segment_ptr,
                         const float* bias, float* y, const UnstructuredProblem& p, int num_threads) {
  return linear_impl(x, values, columns, segment_ptr, bias, y, p, num_threads, 0);  // no gathers on this path
}

void unstructured_linear_grad_values(const float* grad_y, const float* x, const int32_t* columns,
                                     const int32_t* segment_ptr, float* grad_values, const UnstructuredProblem& p,
                                     int num_threads) {
  grad_values_impl(grad_y, x, columns, segment_ptr, grad_values, p, num_threads);
}

}  // namespace generic
}  // namespace pysparse
