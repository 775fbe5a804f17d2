// bsr_linear_cpu<T> against a naive dense loop in double, on random data: several shapes, ragged block sizes,
// M = 0 / 1 / odd, empty and full patterns, with and without bias, x rows strided (ldx > K) with NaN in the gaps,
// the output pre-filled with NaN (every element must be written), 1 and 3 threads.
// Buffers are sized exactly, so a read past x's last row or a write past y shows up under ASan.
// Seed: random per run and printed; PYSPARSE_TEST_SEED=<n> reproduces a run.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "bsr_linear.h"
#include "check.h"

using namespace pysparse;

namespace {

struct Case {
  int64_t M, K, N, bh, bw;
  double density;  // fraction of the block grid kept: 0 = empty, 1 = full
  bool bias;
  int64_t ldx_pad;  // ldx = K + ldx_pad
};

template <typename T>
const char* type_name();
template <>
const char* type_name<float>() { return "float32"; }
template <>
const char* type_name<bfloat16_t>() { return "bfloat16"; }
template <>
const char* type_name<float16_t>() { return "float16"; }

template <typename T>
double tolerance() {
  return 1e-2;
}
template <>
double tolerance<float>() {
  return 1e-5;
}

template <typename T>
std::vector<T> random_values(size_t n, std::mt19937_64& rng) {
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<T> v(n);
  for (auto& e : v) e = from_float<T>(dist(rng));
  return v;
}

template <typename T>
void run_case(const Case& c, int threads, std::mt19937_64& rng) {
  BsrProblem p;
  p.M = c.M;
  p.K = c.K;
  p.N = c.N;
  p.bh = c.bh;
  p.bw = c.bw;
  p.n_block_rows = (c.N + c.bh - 1) / c.bh;
  p.n_block_cols = (c.K + c.bw - 1) / c.bw;
  p.ldx = c.K + c.ldx_pad;

  // Pattern: exactly round(density * grid) blocks, chosen at random; BSR order is row-major over the grid.
  const int64_t grid = p.n_block_rows * p.n_block_cols;
  const int64_t kept = std::llround(c.density * double(grid));
  std::vector<int64_t> order(size_t(grid), 0);
  std::iota(order.begin(), order.end(), int64_t(0));
  std::shuffle(order.begin(), order.end(), rng);
  order.resize(size_t(kept));
  std::sort(order.begin(), order.end());
  std::vector<int32_t> crow(size_t(p.n_block_rows + 1), 0), col;
  for (int64_t g : order) {
    ++crow[size_t(g / p.n_block_cols + 1)];
    col.push_back(int32_t(g % p.n_block_cols));
  }
  std::partial_sum(crow.begin(), crow.end(), crow.begin());
  p.nnz = kept;
  CHECK(check_bsr_indices(crow.data(), col.data(), p).empty(), "test built malformed indices");

  // Values of the overhanging part of edge blocks are finite garbage: a result that depends on them is wrong.
  std::vector<T> values = random_values<T>(size_t(kept * c.bh * c.bw), rng);
  // x: M rows of K values, ldx apart; the gap between rows holds NaN (a kernel reading past K would show it).
  const size_t x_size = c.M == 0 ? 0 : size_t((c.M - 1) * p.ldx + c.K);
  std::vector<T> x = random_values<T>(x_size, rng);
  for (int64_t m = 0; m + 1 < c.M; ++m)
    for (int64_t k = c.K; k < p.ldx; ++k) x[size_t(m * p.ldx + k)] = from_float<T>(std::nanf(""));
  std::vector<T> bias = c.bias ? random_values<T>(size_t(c.N), rng) : std::vector<T>();
  std::vector<T> y(size_t(c.M * c.N), from_float<T>(std::nanf("")));

  // Reference: densify W ([N, K], overhang cut off) and multiply in double from the same rounded inputs.
  std::vector<double> w(size_t(c.N * c.K), 0.0);
  for (int64_t r = 0; r < p.n_block_rows; ++r)
    for (int64_t b = crow[size_t(r)]; b < crow[size_t(r + 1)]; ++b)
      for (int64_t i = 0; i < c.bh; ++i)
        for (int64_t j = 0; j < c.bw; ++j) {
          const int64_t n = r * c.bh + i, k = int64_t(col[size_t(b)]) * c.bw + j;
          if (n < c.N && k < c.K) w[size_t(n * c.K + k)] = to_float(values[size_t((b * c.bh + i) * c.bw + j)]);
        }
  std::vector<double> ref(size_t(c.M * c.N));
  double ref_max = 0.0;
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t n = 0; n < c.N; ++n) {
      double acc = c.bias ? double(to_float(bias[size_t(n)])) : 0.0;
      for (int64_t k = 0; k < c.K; ++k) acc += double(to_float(x[size_t(m * p.ldx + k)])) * w[size_t(n * c.K + k)];
      ref[size_t(m * c.N + n)] = acc;
      ref_max = std::max(ref_max, std::fabs(acc));
    }

  bsr_linear_cpu<T>(x.data(), values.data(), crow.data(), col.data(), c.bias ? bias.data() : nullptr, y.data(), p,
                    threads);

  // Max error relative to the largest reference output (elementwise relative error is meaningless near zero);
  // an all-zero reference (empty pattern, no bias) must come out exactly zero.
  double err = 0.0;
  int64_t unwritten = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    const double got = to_float(y[i]);
    if (!std::isfinite(got)) {
      ++unwritten;
      continue;
    }
    err = std::max(err, std::fabs(got - ref[i]));
  }
  const double rel = ref_max > 0 ? err / ref_max : err;
  const std::string what = std::string(type_name<T>()) + " M=" + std::to_string(c.M) + " K=" + std::to_string(c.K) +
                           " N=" + std::to_string(c.N) + " block=" + std::to_string(c.bh) + "x" +
                           std::to_string(c.bw) + " blocks=" + std::to_string(kept) + "/" + std::to_string(grid) +
                           (c.bias ? " bias" : "") + " ldx=" + std::to_string(p.ldx) +
                           " threads=" + std::to_string(threads);
  CHECK(unwritten == 0, what << ": " << unwritten << " outputs NaN/inf (left unwritten or polluted)");
  CHECK(rel <= tolerance<T>(), what << ": relative error " << rel << " > " << tolerance<T>());
}

template <typename T>
void run_all(std::mt19937_64& rng) {
  const std::pair<int64_t, int64_t> blocks[] = {{1, 1}, {4, 8}, {16, 16}, {32, 32}, {64, 64}, {5, 7}, {3, 16}};
  const double densities[] = {0.0, 0.3, 0.7, 1.0};
  const int64_t Ms[] = {0, 1, 2, 7, 31, 32, 33, 45};
  int i = 0;
  for (const auto& [bh, bw] : blocks) {
    for (double d : densities) {
      // Shapes: a few block rows/columns, usually ragged (not a multiple of the block), sometimes exact.
      std::uniform_int_distribution<int64_t> extra_n(0, bh - 1), extra_k(0, bw - 1), count(1, 3);
      const bool exact = i % 5 == 0;
      const int64_t N = count(rng) * bh + (exact ? 0 : extra_n(rng));
      const int64_t K = count(rng) * bw + (exact ? 0 : extra_k(rng));
      const Case c{Ms[i % 8], K, N, bh, bw, d, i % 2 == 0, (i % 3 == 0) ? 0 : 1 + int64_t(i % 7)};
      run_case<T>(c, 1 + 2 * (i % 2), rng);
      ++i;
    }
  }
  // Narrow blocks at M <= 4: 4 wide (AVX2's half-vector dot tiles: two block rows per vector, tiles of 8 / 4 / 2
  // rows, the last one partly past N; the block overhanging K read column by column), and column vectors of 8 and
  // 24 rows (the broadcast kernel's one- and three-vector tiles).
  const std::pair<int64_t, int64_t> narrow[] = {{4, 4}, {8, 4}, {2, 4}, {6, 4}, {16, 4}, {8, 1}, {24, 1}};
  for (const auto& [bh, bw] : narrow) {
    for (int64_t m = 1; m <= 4; ++m) {
      for (double d : {0.0, 0.5, 1.0}) {
        std::uniform_int_distribution<int64_t> extra_n(0, bh - 1), extra_k(0, bw - 1), count(1, 4);
        const Case c{m, count(rng) * bw + extra_k(rng), count(rng) * bh + extra_n(rng), bh, bw, d, m % 2 == 1,
                     m == 3 ? 2 : 0};
        run_case<T>(c, 1 + int(m % 2), rng);
      }
    }
  }
  // Degenerate shapes: nothing to compute or nothing to read.
  run_case<T>({5, 9, 0, 4, 4, 1.0, false, 0}, 2, rng);  // N = 0
  run_case<T>({5, 0, 6, 4, 4, 0.0, true, 0}, 2, rng);   // K = 0: y = bias
  run_case<T>({0, 9, 6, 4, 4, 1.0, true, 3}, 2, rng);   // M = 0
  // More tokens than one tile and a long row of blocks: several work items per thread.
  run_case<T>({97, 150, 70, 16, 16, 0.5, true, 5}, 3, rng);
}

}  // namespace

int main() {
  const char* env = std::getenv("PYSPARSE_TEST_SEED");
  const uint64_t seed = env ? std::strtoull(env, nullptr, 10) : std::random_device{}();
  std::printf("test_bsr_linear: seed %llu (PYSPARSE_TEST_SEED=%llu reproduces this run)\n",
              static_cast<unsigned long long>(seed), static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  run_all<float>(rng);
  run_all<bfloat16_t>(rng);
  run_all<float16_t>(rng);
  return check::report("test_bsr_linear");
}
