// gelu_cpu and gelu_backward_cpu against double-precision formulas on every CPU path this machine runs: sizes around
// the vector width and the threads' chunks, inputs in exact-size vectors (ASan sees a read or write past the end),
// outputs poisoned with NaN first, and in-place use (y = z, dz = dy) as the header allows.
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "bsr_linear.h"  // CpuIsa, cpu_isa_supported, force_cpu_path
#include "check.h"
#include "gelu.h"

namespace {

double gelu_ref(double z) { return 0.5 * z * (1.0 + std::erf(z / std::sqrt(2.0))); }
double gelu_grad_ref(double z) {
  return 0.5 * (1.0 + std::erf(z / std::sqrt(2.0))) + z * std::exp(-0.5 * z * z) / std::sqrt(2.0 * M_PI);
}

void run_path(const char* name, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 4.0f);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t n : {0, 1, 7, 8, 9, 31, 16384, 16385, 3 * 16384 + 5}) {
    std::vector<float> z(static_cast<size_t>(n)), dy(static_cast<size_t>(n));
    std::vector<float> y(static_cast<size_t>(n), nan), dz(static_cast<size_t>(n), nan);
    for (int64_t i = 0; i < n; ++i) z[size_t(i)] = normal(rng), dy[size_t(i)] = normal(rng);
    pysparse::gelu_cpu(z.data(), y.data(), n, 2);
    pysparse::gelu_backward_cpu(dy.data(), z.data(), dz.data(), n, 2);
    for (int64_t i = 0; i < n; ++i) {
      const double zi = z[size_t(i)];
      const double want_y = gelu_ref(zi), want_dz = dy[size_t(i)] * gelu_grad_ref(zi);
      CHECK(std::abs(y[size_t(i)] - want_y) <= 2e-6 + 1e-6 * std::abs(want_y),
            name << " gelu n=" << n << " i=" << i << " z=" << zi << ": " << y[size_t(i)] << " vs " << want_y);
      CHECK(std::abs(dz[size_t(i)] - want_dz) <= 4e-6 + 1e-6 * std::abs(want_dz),
            name << " backward n=" << n << " i=" << i << " z=" << zi << ": " << dz[size_t(i)] << " vs " << want_dz);
    }
    std::vector<float> in_place = z, grad = dy;
    pysparse::gelu_cpu(in_place.data(), in_place.data(), n, 2);
    pysparse::gelu_backward_cpu(grad.data(), z.data(), grad.data(), n, 2);
    for (int64_t i = 0; i < n; ++i) {
      CHECK(in_place[size_t(i)] == y[size_t(i)], name << " in-place gelu differs at " << i);
      CHECK(grad[size_t(i)] == dz[size_t(i)], name << " in-place backward differs at " << i);
    }
  }
}

}  // namespace

int main() {
  std::mt19937 rng(5);
  const struct {
    pysparse::CpuIsa isa;
    const char* name;
  } paths[] = {{pysparse::CpuIsa::kGeneric, "generic"},
               {pysparse::CpuIsa::kAvx2, "avx2"},
               {pysparse::CpuIsa::kAvx512, "avx512"}};
  for (const auto& path : paths) {
    if (!pysparse::cpu_isa_supported(path.isa)) continue;
    CHECK(pysparse::force_cpu_path(static_cast<int>(path.isa), -1), "could not force " << path.name);
    run_path(path.name, rng);
  }
  return check::report("test_gelu");
}
