// Every CPU kernel path this machine can run (generic, AVX2, AVX-512, AVX-512 with BF16; the SIMD paths with and
// without the broadcast kernel; on AVX2 machines also the AVX-512 path's tiles on emulated 16-lane vectors), every
// storage type, against a double-precision reference: ragged shapes, block sizes that do not divide the matrix, the
// shapes the SIMD kernels specialise (multiples of 8 / 16), empty rows, fully dense and fully empty weights, strided
// x, non-finite values in the padding, NaN-poisoned outputs, 1..3 threads and concurrent callers.
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "avx2_as_16_lanes.h"
#include "bsr_linear.h"
#include "check.h"
#include "transposed_blocks.h"

using namespace pysparse;

namespace {

struct Case {
  int64_t M, K, N, bh, bw;
  double density;  // fraction of blocks kept; 0 = empty, 1 = dense
  int64_t x_pad = 0;  // extra elements per row of x (ldx = K + x_pad)
};

struct Bsr {
  BsrProblem p;
  std::vector<int32_t> crow, col;
  std::vector<float> values;  // float32 master copy, [nnz][bh][bw]
};

Bsr make_bsr(const Case& c, std::mt19937& rng) {
  Bsr w;
  BsrProblem& p = w.p;
  p.M = c.M, p.K = c.K, p.N = c.N, p.bh = c.bh, p.bw = c.bw;
  p.n_block_rows = (c.N + c.bh - 1) / c.bh;
  p.n_block_cols = (c.K + c.bw - 1) / c.bw;
  p.ldx = c.K + c.x_pad;
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  w.crow.push_back(0);
  for (int64_t r = 0; r < p.n_block_rows; ++r) {
    // Every third row of a sparse weight is left empty: its outputs are the bias alone.
    const bool empty_row = c.density < 1.0 && r % 3 == 1;
    for (int64_t cb = 0; cb < p.n_block_cols; ++cb) {
      if (!empty_row && u01(rng) < c.density) w.col.push_back(int32_t(cb));
    }
    w.crow.push_back(int32_t(w.col.size()));
  }
  p.nnz = int64_t(w.col.size());
  w.values.resize(size_t(p.nnz * p.bh * p.bw));
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < p.n_block_rows; ++r) {
    for (int64_t b = w.crow[r]; b < w.crow[r + 1]; ++b) {
      for (int64_t i = 0; i < p.bh; ++i) {
        for (int64_t j = 0; j < p.bw; ++j) {
          const bool padding = r * p.bh + i >= p.N || w.col[b] * p.bw + j >= p.K;
          // Padding must be ignored by every kernel: fill it with values that would poison any sum.
          w.values[size_t((b * p.bh + i) * p.bw + j)] = padding ? ((i + j) % 2 ? inf : std::nanf("")) : normal(rng);
        }
      }
    }
  }
  return w;
}

template <typename T>
std::vector<T> cast(const std::vector<float>& v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = from_float<T>(v[i]);
  return out;
}

// y = x @ W^T + bias in double, from the values as stored in T.
template <typename T>
std::vector<double> reference(const Bsr& w, const std::vector<T>& x, const std::vector<T>& values,
                              const std::vector<T>& bias) {
  const BsrProblem& p = w.p;
  std::vector<double> y(size_t(p.M * p.N));
  for (int64_t t = 0; t < p.M; ++t)
    for (int64_t n = 0; n < p.N; ++n) y[size_t(t * p.N + n)] = bias.empty() ? 0.0 : to_float(bias[size_t(n)]);
  for (int64_t r = 0; r < p.n_block_rows; ++r) {
    for (int64_t b = w.crow[r]; b < w.crow[r + 1]; ++b) {
      for (int64_t i = 0; i < p.bh && r * p.bh + i < p.N; ++i) {
        for (int64_t j = 0; j < p.bw && w.col[b] * p.bw + j < p.K; ++j) {
          const double wv = to_float(values[size_t((b * p.bh + i) * p.bw + j)]);
          for (int64_t t = 0; t < p.M; ++t) {
            y[size_t(t * p.N + r * p.bh + i)] += wv * to_float(x[size_t(t * p.ldx + w.col[b] * p.bw + j)]);
          }
        }
      }
    }
  }
  return y;
}

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kGeneric: return "generic";
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx512Bf16: return "avx512_bf16";
    case CpuIsa::kAvx512Amx: return "avx512_amx";
  }
  return "?";
}

// A kernel path under test: an instruction set, whether the broadcast kernel may run, and whether it runs
// as the AVX-512 path's tiles emulated on AVX2 (avx2_as_16_lanes.h) instead of through the dispatcher.
struct Path {
  CpuIsa isa;
  bool bcast;
  bool emulated_16_lanes = false;
  std::string name() const {
    return std::string(emulated_16_lanes ? "avx2_as_16_lanes" : isa_name(isa)) + (bcast ? "+bcast" : "");
  }
};

template <typename T>
void run_path(const Path& path, const T* x, const T* values, const int32_t* crow, const int32_t* col, const T* bias,
              T* y, const BsrProblem& p, int threads) {
#if PYSPARSE_X86
  if (path.emulated_16_lanes) {
    return avx2_as_16_lanes::bsr_linear<T>(x, values, crow, col, bias, y, p, threads, path.bcast);
  }
#endif
  bsr_linear_cpu_isa<T>(path.isa, path.bcast, x, values, crow, col, bias, y, p, threads);
}

const char* act_name(Activation a) {
  switch (a) {
    case Activation::kRelu: return "relu";
    case Activation::kRelu6: return "relu6";
    case Activation::kGelu: return "gelu";
    case Activation::kNone: break;
  }
  return "none";
}

double activate_ref(double v, Activation a) {
  if (a == Activation::kRelu) return v > 0.0 ? v : 0.0;
  if (a == Activation::kRelu6) return v > 6.0 ? 6.0 : v > 0.0 ? v : 0.0;
  if (a == Activation::kGelu) return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
  return v;
}

template <typename T>
void run_case(const Path& path, const Case& c, int threads, bool with_bias, std::mt19937& rng, const char* dtype,
              double tol, Activation act = Activation::kNone, bool with_residual = false) {
  Bsr w = make_bsr(c, rng);
  w.p.act = act;
  const BsrProblem& p = w.p;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> xf(size_t(p.M * p.ldx)), bf;
  for (int64_t t = 0; t < p.M; ++t)
    for (int64_t k = 0; k < p.ldx; ++k) xf[size_t(t * p.ldx + k)] = k < p.K ? normal(rng) : std::nanf("");
  if (with_bias) {
    bf.resize(size_t(p.N));
    for (auto& v : bf) v = normal(rng);
  }
  const std::vector<T> x = cast<T>(xf), values = cast<T>(w.values), bias = cast<T>(bf);
  std::vector<double> ref = reference(w, x, values, bias);
  std::vector<float> rf;
  if (with_residual) {
    rf.resize(size_t(p.M * p.N));
    for (auto& v : rf) v = normal(rng);
  }
  const std::vector<T> residual = cast<T>(rf);
  if (with_residual) {
    for (size_t i = 0; i < ref.size(); ++i) ref[i] += to_float(residual[i]);
    w.p.residual = residual.data();
  }
  for (double& v : ref) v = activate_ref(v, act);
  // Each case runs twice: on row-major blocks (float32: the broadcast kernel transposes them itself), then on the
  // layout SparseLinear stores (BsrProblem::transposed_values: the broadcast kernel and, float32, the outer-product
  // kernel read it; the dot kernel and the generic path take the row-major blocks).
  const std::vector<T> transposed = transposed_blocks(values, p.bh, p.bw);
  for (int pass = 0; pass < (transposed.empty() ? 1 : 2); ++pass) {
    w.p.transposed_values = pass == 1 ? transposed.data() : nullptr;
    std::vector<T> y = cast<T>(std::vector<float>(size_t(p.M * p.N), std::nanf("")));  // poisoned
    run_path<T>(path, x.data(), values.data(), w.crow.data(), w.col.data(), with_bias ? bias.data() : nullptr,
                y.data(), p, threads);
    double max_err = 0.0, max_ref = 0.0;
    bool finite = true;
    for (size_t i = 0; i < ref.size(); ++i) {
      const double got = to_float(y[i]);
      finite = finite && std::isfinite(got);
      max_err = std::max(max_err, std::fabs(got - ref[i]));
      max_ref = std::max(max_ref, std::fabs(ref[i]));
    }
    const double rel = max_err / std::max(max_ref, 1e-30);
    CHECK(finite && rel < tol, path.name() << " " << dtype << " M=" << c.M << " K=" << c.K << " N=" << c.N
                                             << " block=" << c.bh << "x" << c.bw << " density=" << c.density
                                             << " threads=" << threads << " bias=" << with_bias
                                             << " activation=" << act_name(act) << " residual=" << with_residual
                                             << " pre-transposed=" << pass << ": rel err " << rel
                                             << (finite ? "" : " (non-finite output)"));
  }
}

std::vector<Case> cases() {
  std::vector<Case> out;
  // Shapes the SIMD kernels specialise, with ragged M (register-tile and dot-product tails) and ragged K / N.
  const int64_t blocks[][2] = {{16, 16}, {32, 32}, {64, 64}, {8, 8}, {16, 32}, {32, 16}, {8, 24}, {48, 16}};
  const int64_t ms[] = {1, 2, 3, 4, 5, 8, 17, 50, 64, 97, 203};
  int i = 0;
  for (const auto& b : blocks) {
    for (int64_t m : ms) {
      const int64_t k = 3 * b[1] + (i % 2 ? 0 : b[1] / 2 + 1);  // every other case overhangs K
      const int64_t n = 4 * b[0] + (i % 3 ? 0 : 5);               // every third overhangs N
      out.push_back({m, k, n, b[0], b[1], i % 4 == 0 ? 1.0 : 0.45, i % 5 == 0 ? 3 : 0});
      ++i;
    }
  }
  // Block sizes no kernel specialises, odd widths (bf16 pairs with padding), 1x1, fully empty weights.
  const int64_t odd[][2] = {{3, 5}, {1, 1}, {7, 9}, {5, 16}, {16, 3}, {13, 1}};
  for (const auto& b : odd) {
    for (int64_t m : {int64_t(1), int64_t(4), int64_t(6), int64_t(33)}) {
      out.push_back({m, 5 * b[1] + 2, 3 * b[0] + 1, b[0], b[1], 0.6, m % 2});
    }
  }
  out.push_back({7, 64, 64, 16, 16, 0.0});
  out.push_back({2, 64, 64, 16, 16, 0.0});
  out.push_back({9, 0, 40, 8, 8, 0.0});  // K = 0: y is the bias
  out.push_back({130, 200, 300, 32, 32, 0.3});
  out.push_back({300, 130, 96, 8, 8, 0.5, 5});  // broadcast kernel with one-vector tiles and strided x
  return out;
}

template <typename T>
void run_all(const Path& path, const char* dtype, double tol) {
  std::mt19937 rng(1234);
  int i = 0;
  for (const Case& c : cases()) {
    // A quarter of the cases each fuse ReLU, GELU and ReLU6, and a third add a residual, so each kernel's
    // epilogue meets ragged tiles with every combination.
    run_case<T>(path, c, 1 + i % 3, i % 2 == 0, rng, dtype, tol, Activation((i / 2) % 4), i % 3 == 1);
    ++i;
  }
}

// Several caller threads at once (each call uses 2 OpenMP threads): per-call buffers must not be shared.
void concurrent(const Path& path) {
  std::vector<std::thread> callers;
  for (int c = 0; c < 4; ++c) {
    callers.emplace_back([&path, c] {
      std::mt19937 rng(77 + c);
      for (int rep = 0; rep < 3; ++rep) {
        run_case<float>(path, {int64_t(40 + 13 * c), 96 + 7 * c, 128, 32, 32, 0.5}, 2, true, rng, "float32", 1e-5);
        run_case<float>(path, {int64_t(1 + c), 96, 130, 16, 16, 0.5}, 2, true, rng, "float32", 1e-5);
      }
    });
  }
  for (auto& t : callers) t.join();
}

}  // namespace

int main() {
  std::vector<Path> paths;
  for (CpuIsa isa : {CpuIsa::kGeneric, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16, CpuIsa::kAvx512Amx}) {
    if (!cpu_isa_supported(isa)) {
      std::printf("skip %s: not supported by this CPU\n", isa_name(isa));
      continue;
    }
    paths.push_back({isa, false});
    if (isa != CpuIsa::kGeneric) paths.push_back({isa, true});
  }
  // Where AVX-512 is missing, its tiles still run here, on emulated 16-lane vectors.
  if (cpu_isa_supported(CpuIsa::kAvx2) && !cpu_isa_supported(CpuIsa::kAvx512)) {
    paths.push_back({CpuIsa::kAvx2, false, true});
    paths.push_back({CpuIsa::kAvx2, true, true});
  }
  for (const Path& path : paths) {
    run_all<float>(path, "float32", 1e-5);
    // Weights past the broadcast kernel's cache-resident size (~5.5 MB here) and x past one L2 panel: its
    // large-weight blocking (4 MiB panels, chunks of rows sized for L2), with ragged M, K and N.
    std::mt19937 rng(99);
    run_case<float>(path, {75, 1500, 1530, 32, 32, 0.9}, 2, true, rng, "float32", 1e-5, Activation::kRelu, true);
    // Past 8 token tiles with small weights (the outer product's tile-major order, ragged N: the last block row is
    // not staged), and outputs past 4 MiB (staged block rows written with streaming stores), blocks and vectors.
    run_case<float>(path, {500, 200, 300, 32, 32, 0.5, 3}, 2, true, rng, "float32", 1e-5, Activation::kRelu, true);
    run_case<float>(path, {1100, 96, 1024, 16, 16, 0.45}, 2, true, rng, "float32", 1e-5, Activation::kGelu, true);
    run_case<float>(path, {1100, 100, 1024, 16, 1, 0.3, 1}, 3, false, rng, "float32", 1e-5);
    run_case<bfloat16_t>(path, {500, 200, 300, 32, 32, 0.5}, 2, true, rng, "bfloat16", 1e-2, Activation::kRelu, true);
    run_all<bfloat16_t>(path, "bfloat16", 1e-2);
    run_all<float16_t>(path, "float16", 1e-2);
    // 16-bit weights past 1 MB at M <= 4: the dot kernel's weight prefetch (the first pass of M = 4 only) on
    // row-major blocks, the broadcast kernel on transposed ones.
    run_case<bfloat16_t>(path, {4, 1500, 1530, 32, 32, 0.9}, 2, true, rng, "bfloat16", 1e-2);
    run_case<float16_t>(path, {1, 1500, 1530, 32, 32, 0.9}, 2, false, rng, "float16", 1e-2, Activation::kGelu);
    // 16-bit x, widened in groups of panels of up to 4 MiB: seven panels in one group (1.2 MB of widened x), then
    // two groups (4.5 MB), then 16-bit weights past the kernel's cache-resident size (6.8 MB: large-weight blocking).
    run_case<bfloat16_t>(path, {203, 1500, 1530, 32, 32, 0.9}, 2, true, rng, "bfloat16", 1e-2, Activation::kRelu, true);
    run_case<bfloat16_t>(path, {700, 1600, 70, 32, 32, 0.8}, 2, true, rng, "bfloat16", 1e-2);
    run_case<float16_t>(path, {40, 2200, 1530, 32, 32, 1.0}, 3, true, rng, "float16", 1e-2);
    // Shapes the AMX tiles take (bh, bw multiples of 16, bw dividing K, from 32 tokens): full and ragged 32-token
    // groups, N past the last block row, 16- and 32-wide k chunks, passes of 16, 32 and 48 outputs.
    const Case amx_cases[] = {{32, 96, 70, 16, 16, 0.5},   {33, 128, 96, 32, 32, 0.3, 5}, {95, 192, 150, 48, 64, 0.5},
                              {257, 384, 130, 32, 32, 0.1, 3}, {64, 64, 40, 16, 32, 1.0}, {100, 96, 64, 64, 32, 0.0}};
    for (int i = 0; i < 6; ++i) {
      run_case<bfloat16_t>(path, amx_cases[i], 1 + i % 3, i % 2 == 0, rng, "bfloat16", 1e-2, Activation(i % 4),
                           i % 3 == 1);
    }
    concurrent(path);
    std::printf("%s: checked\n", path.name().c_str());
  }
  std::printf("active path: %s, broadcast kernel %s\n", active_cpu_isa(),
              cpu_bcast_enabled(active_cpu_isa_id()) ? "on" : "off");
  CHECK(!paths.empty(), "no kernel path ran");
  return check::report("test_bsr_linear_isa");
}
