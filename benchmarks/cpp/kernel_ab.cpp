// In-process A/B of two CPU kernel paths on one problem: calls alternate between the paths, so the load other
// programs put on the machine falls on both alike (separate processes on a shared VM differed by up to 1.7x).
// Each path gets the weight layout SparseLinear would keep for it: block-transposed with the broadcast kernel,
// row-major without. Built by CMake next to the C++ tests (target kernel_ab); gpu_check.sh runs it on AVX-512.
//
//   kernel_ab N K M block density threads rounds path_a path_b [f32|bf16|f16] [cold]
//   path: generic | avx2 | avx2+bcast | avx512 | avx512+bcast
//   cold: touch 96 MB between calls, so the weights come from memory as in a model larger than the caches
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "bsr_linear.h"
#include "dtypes.h"
#include "transposed_blocks.h"  // tests/cpp: the layout SparseLinear keeps, built the plain way

using namespace pysparse;

namespace {

struct Path {
  CpuIsa isa;
  bool bcast;
};

bool parse_path(const std::string& s, Path* out) {
  const bool bcast = s.size() > 6 && s.compare(s.size() - 6, 6, "+bcast") == 0;
  const std::string isa = bcast ? s.substr(0, s.size() - 6) : s;
  if (isa == "generic" && !bcast) *out = {CpuIsa::kGeneric, false};
  else if (isa == "avx2") *out = {CpuIsa::kAvx2, bcast};
  else if (isa == "avx512") *out = {CpuIsa::kAvx512, bcast};
  else return false;
  return cpu_isa_supported(out->isa);
}

template <typename T>
const char* dtype_name() {
  return std::is_same_v<T, float> ? "f32" : std::is_same_v<T, bfloat16_t> ? "bf16" : "f16";
}

template <typename T>
int run(int64_t N, int64_t K, int64_t M, int64_t bs, double density, int threads, int rounds, const Path (&paths)[2],
        const char* names[2], bool cold) {
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  BsrProblem p;
  p.M = M, p.K = K, p.N = N, p.bh = bs, p.bw = bs, p.ldx = K;
  p.n_block_rows = (N + bs - 1) / bs, p.n_block_cols = (K + bs - 1) / bs;
  std::vector<int32_t> crow{0}, col;
  for (int64_t r = 0; r < p.n_block_rows; ++r) {
    for (int64_t c = 0; c < p.n_block_cols; ++c)
      if (u(rng) * 0.5f + 0.5f < density) col.push_back(int32_t(c));
    crow.push_back(int32_t(col.size()));
  }
  p.nnz = int64_t(col.size());
  const int64_t elems = bs * bs;
  std::vector<T> values(size_t(p.nnz * elems)), x(size_t(M * K));
  for (auto& v : values) v = from_float<T>(u(rng));
  for (auto& v : x) v = from_float<T>(u(rng));
  const std::vector<T> transposed = transposed_blocks(values, bs, bs);  // [nnz][bw][bh]
  std::vector<T> y[2] = {std::vector<T>(size_t(M * N)), std::vector<T>(size_t(M * N))};
  std::vector<double> times[2];
  std::vector<char> flush(cold ? size_t(96) << 20 : 0);
  for (int r = 0; r < rounds + 1; ++r) {  // round 0 warms up
    for (int k = 0; k < 2; ++k) {
      BsrProblem q = p;
      q.transposed_values = paths[k].bcast ? transposed.data() : nullptr;
      for (size_t i = 0; i < flush.size(); i += 64) flush[i] = char(flush[i] + 1);
      const auto t0 = std::chrono::steady_clock::now();
      bsr_linear_cpu_isa<T>(paths[k].isa, paths[k].bcast, x.data(), values.data(), crow.data(), col.data(), nullptr,
                            y[k].data(), q, threads);
      const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
      if (r > 0) times[k].push_back(us);
    }
  }
  double diff = 0.0, scale = 1e-30;
  for (size_t i = 0; i < y[0].size(); ++i) {
    diff = std::max(diff, double(std::fabs(to_float(y[0][i]) - to_float(y[1][i]))));
    scale = std::max(scale, double(std::fabs(to_float(y[0][i]))));
  }
  const double flop = 2.0 * double(M) * double(p.nnz) * double(elems);
  double med[2], best[2];
  for (int k = 0; k < 2; ++k) {
    std::sort(times[k].begin(), times[k].end());
    med[k] = times[k][times[k].size() / 2], best[k] = times[k][0];
  }
  std::printf("%ldx%ld (N x K) M=%ld %ldx%ld density %.2f %s, %d threads, %d rounds%s | %s %.1f us (best %.1f, %.1f "
              "GFLOP/s) | %s %.1f us (best %.1f, %.1f GFLOP/s) | b vs a %.3fx (best %.3fx) | rel diff %.1e\n",
              long(N), long(K), long(M), long(bs), long(bs), density, dtype_name<T>(),
              threads, rounds, cold ? ", cold" : "", names[0], med[0], best[0], flop / med[0] / 1e3, names[1], med[1],
              best[1], flop / med[1] / 1e3, med[0] / med[1], best[0] / best[1], diff / scale);
  return diff / scale < (std::is_same_v<T, float> ? 1e-4 : 2e-2) ? 0 : 3;  // the paths must agree
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 10) {
    std::fprintf(stderr, "usage: %s N K M block density threads rounds path_a path_b [f32|bf16|f16] [cold]\n",
                 argv[0]);
    return 2;
  }
  Path paths[2];
  const char* names[2] = {argv[8], argv[9]};
  for (int k = 0; k < 2; ++k) {
    if (!parse_path(names[k], &paths[k])) {
      std::fprintf(stderr, "path '%s': unknown, or this CPU cannot run it\n", names[k]);
      return 2;
    }
  }
  const std::string dtype = argc > 10 ? argv[10] : "f32";
  if (dtype != "f32" && dtype != "bf16" && dtype != "f16") {
    std::fprintf(stderr, "dtype must be f32, bf16 or f16, got '%s'\n", dtype.c_str());
    return 2;
  }
  const bool cold = argc > 11 && std::strcmp(argv[11], "cold") == 0;
  const int64_t N = std::atol(argv[1]), K = std::atol(argv[2]), M = std::atol(argv[3]), bs = std::atol(argv[4]);
  const double density = std::atof(argv[5]);
  const int threads = std::atoi(argv[6]), rounds = std::max(1, std::atoi(argv[7]));
  if (N < 1 || K < 1 || M < 1 || bs < 1 || threads < 1) {
    std::fprintf(stderr, "N, K, M, block and threads must be positive\n");
    return 2;
  }
  if (dtype == "bf16") return run<bfloat16_t>(N, K, M, bs, density, threads, rounds, paths, names, cold);
  if (dtype == "f16") return run<float16_t>(N, K, M, bs, density, threads, rounds, paths, names, cold);
  return run<float>(N, K, M, bs, density, threads, rounds, paths, names, cold);
}
