// Portable path of the bsr_linear backward kernels (CPUs without AVX2, non-x86 builds): the same tiles on a plain
// 8-float "vector" the compiler vectorises with whatever the baseline target has.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "bsr_backward_isa.h"

namespace pysparse {
namespace generic {
namespace {

struct Isa {
  static constexpr int L = 8;
  struct V {
    float v[L];
  };
  static constexpr int kGiVecs = 2;
  static constexpr int gi_tokens(int) { return 4; }
  // grad_input of column vectors: 8 rows of grad_y (vectors over the tokens) in registers
  static constexpr int kGiColumnRows = 8;
  static constexpr int kGvVecs = 2;
  static constexpr int gv_rows(int) { return 4; }
  static V zero() { return V{}; }
  static V load(const float* p) { return load_n(p, L); }
  static V load_n(const float* p, int n) {
    V r{};
    for (int i = 0; i < std::min(n, L); ++i) r.v[i] = p[i];
    return r;
  }
  static void store(float* p, V a) { store_n(p, a, L); }
  static void stream(float* p, V a) { store_n(p, a, L); }
  static void fence() {}
  static void store_n(float* p, V a, int n) {
    for (int i = 0; i < std::min(n, L); ++i) p[i] = a.v[i];
  }
  static V bcast(const float* p) {
    V r;
    for (float& e : r.v) e = *p;
    return r;
  }
  static V fma(V a, V b, V c) {
    for (int i = 0; i < L; ++i) c.v[i] += a.v[i] * b.v[i];
    return c;
  }
  static V add(V a, V b) {
    for (int i = 0; i < L; ++i) a.v[i] += b.v[i];
    return a;
  }
  static void transpose(V* r) {  // r[i][j] -> r[j][i]
    for (int i = 0; i < L; ++i) {
      for (int j = i + 1; j < L; ++j) std::swap(r[i].v[j], r[j].v[i]);
    }
  }
};

#include "bsr_backward_tiles.h"

}  // namespace

void bsr_grad_input(const float* grad_y, const float* values, bool transposed, const int32_t* col_ptr,
                    const int32_t* entries, float* grad_x, const BsrProblem& p, int num_threads) {
  grad_input(grad_y, values, transposed, col_ptr, entries, grad_x, p, num_threads);
}

void bsr_grad_values(const float* grad_y, const float* x, const int32_t* crow, const int32_t* col, bool transposed,
                     float* grad_values_out, const BsrProblem& p, int num_threads, float* grad_bias) {
  grad_values(grad_y, x, crow, col, transposed, grad_values_out, p, num_threads, grad_bias);
}

}  // namespace generic
}  // namespace pysparse
