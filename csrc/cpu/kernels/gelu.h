// Exact GELU and its derivative over float32 arrays: training through a layer whose activation is GELU needs the
// pre-activation z for the backward, so the layer's kernel stores z and these apply the activation and its gradient
// (one vectorised pass each, in place of torch's F.gelu and gelu_backward).
#pragma once
#include <cstdint>

namespace pysparse {

// y[i] = z[i] * Phi(z[i]) for i < n, Phi the standard normal CDF; `num_threads` OpenMP threads. y may be z.
void gelu_cpu(const float* z, float* y, int64_t n, int num_threads);

// dz[i] = dy[i] * GELU'(z[i]), GELU'(z) = Phi(z) + z * phi(z) (phi the standard normal density). dz may be dy.
void gelu_backward_cpu(const float* dy, const float* z, float* dz, int64_t n, int num_threads);

}  // namespace pysparse
