// Elementwise activations the kernels apply to their results in registers, just before storing them (a fused
// epilogue: the separate pass over y that F.relu / F.gelu would make afterwards costs a full memory round trip).
#pragma once
#include <cmath>

#include "common/bsr_problem.h"  // enum Activation (the CUDA kernels read it too)

namespace pysparse {

// Scalar form: the portable path and the SIMD paths' ragged tails. NaN propagates, as in torch.
inline float activate(float v, Activation a) {
  switch (a) {
    case Activation::kRelu: return v > 0.0f || std::isnan(v) ? v : 0.0f;
    case Activation::kRelu6: return std::isnan(v) ? v : v > 6.0f ? 6.0f : v > 0.0f ? v : 0.0f;
    case Activation::kGelu: return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
    case Activation::kNone: break;
  }
  return v;
}

}  // namespace pysparse
