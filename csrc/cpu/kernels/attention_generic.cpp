// Portable path of the CPU attention kernel: the same algorithm as the AVX2 path over a plain 8-float vector whose
// loops the compiler vectorises for whatever the build targets (NEON on aarch64, SSE2 on baseline x86-64).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "attention.h"

namespace pysparse {
namespace generic {
namespace {

struct Vec8 {
  float x[8];
};

struct Isa {
  using V = Vec8;
  static constexpr int L = 8;
  static V zero() { return set1(0.0f); }
  static V set1(float a) {
    V r;
    for (float& e : r.x) e = a;
    return r;
  }
  static V load(const float* p) {
    V r;
    for (int i = 0; i < L; ++i) r.x[i] = p[i];
    return r;
  }
  static void store(float* p, const V& v) {
    for (int i = 0; i < L; ++i) p[i] = v.x[i];
  }
  template <typename F>
  static V map2(const V& a, const V& b, F f) {
    V r;
    for (int i = 0; i < L; ++i) r.x[i] = f(a.x[i], b.x[i]);
    return r;
  }
  static V fma(const V& a, const V& b, const V& c) {
    V r;
    for (int i = 0; i < L; ++i) r.x[i] = a.x[i] * b.x[i] + c.x[i];
    return r;
  }
  static V mul(const V& a, const V& b) { return map2(a, b, [](float u, float w) { return u * w; }); }
  static V add(const V& a, const V& b) { return map2(a, b, [](float u, float w) { return u + w; }); }
  static V sub(const V& a, const V& b) { return map2(a, b, [](float u, float w) { return u - w; }); }
  static V max(const V& a, const V& b) { return map2(a, b, [](float u, float w) { return std::max(u, w); }); }
  static float hmax(const V& v) { return *std::max_element(v.x, v.x + L); }
  static float hsum(const V& v) {
    float s = 0.0f;
    for (float e : v.x) s += e;
    return s;
  }
  static void transpose8(V* rows) {
    for (int a = 0; a < L; ++a)
      for (int b = a + 1; b < L; ++b) std::swap(rows[a].x[b], rows[b].x[a]);
  }
  static V exp(const V& v) {
    V r;
    for (int i = 0; i < L; ++i) r.x[i] = std::exp(v.x[i]);
    return r;
  }
};

#include "attention_kernels.inc"

}  // namespace

void attention(const float* q, const float* k, const float* v, float* out, float* lse, const AttentionProblem& p,
               int num_threads) {
  attention_impl(q, k, v, out, lse, p, num_threads);
}

void attention_backward(const float* q, const float* k, const float* v, const float* out, const float* grad_out,
                        const float* lse, float* dq, float* dk, float* dv, const AttentionProblem& p, int num_threads) {
  attention_backward_impl(q, k, v, out, grad_out, lse, dq, dk, dv, p, num_threads);
}

}  // namespace generic
}  // namespace pysparse
