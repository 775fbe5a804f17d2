// Unstructured sparse linear (float32) on every CPU path this machine runs, against a double-precision dense
// reference: ragged shapes (N not a multiple of 4, M around the tile widths and the gather threshold), empty rows,
// fully dense and all-zero weights, strided x, infinite x in a column no row keeps (the padding column must not turn
// it into NaN), NaN-poisoned outputs, 1..3 threads; and the index check on malformed indices.
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "unstructured_linear.h"

using namespace pysparse;

namespace {

constexpr int64_t G = kUnstructuredGroupRows;

struct Packed {
  UnstructuredProblem p;
  std::vector<int32_t> group_ptr, columns;
  std::vector<float> values;
};

// The format of unstructured_linear.h from a dense [N, K] weight (zeros dropped).
Packed pack(const std::vector<float>& w, int64_t N, int64_t K) {
  Packed out;
  out.p.N = N, out.p.K = K, out.p.n_groups = (N + G - 1) / G;
  out.group_ptr.push_back(0);
  for (int64_t g = 0; g < out.p.n_groups; ++g) {
    std::vector<std::vector<int64_t>> cols(G);
    size_t steps = 0;
    for (int64_t r = 0; r < G && g * G + r < N; ++r) {
      for (int64_t k = 0; k < K; ++k) {
        if (w[size_t((g * G + r) * K + k)] != 0.0f) cols[size_t(r)].push_back(k);
      }
      steps = std::max(steps, cols[size_t(r)].size());
    }
    for (size_t s = 0; s < steps; ++s) {
      for (int64_t r = 0; r < G; ++r) {
        const auto& c = cols[size_t(r)];
        out.columns.push_back(s < c.size() ? int32_t(c[s]) : int32_t(K));
        out.values.push_back(s < c.size() ? w[size_t((g * G + r) * K + c[s])] : 0.0f);
      }
    }
    out.group_ptr.push_back(out.group_ptr.back() + int32_t(steps));
  }
  out.p.steps = out.group_ptr.back();
  return out;
}

struct Case {
  int64_t M, K, N;
  double density;     // fraction of entries kept; 0 = all zero, 1 = dense
  int64_t x_pad = 0;  // extra elements per row of x (ldx = K + x_pad)
};

std::vector<CpuIsa> paths() {
  std::vector<CpuIsa> out{CpuIsa::kGeneric};
  for (CpuIsa isa : {CpuIsa::kAvx2, CpuIsa::kAvx512}) {
    if (cpu_isa_supported(isa)) out.push_back(isa);
  }
  return out;
}

const char* name(CpuIsa isa) { return isa == CpuIsa::kGeneric ? "generic" : isa == CpuIsa::kAvx2 ? "avx2" : "avx512"; }

void run_case(const Case& c, std::mt19937& rng) {
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> w(size_t(c.N * c.K), 0.0f);
  for (int64_t n = 0; n < c.N; ++n) {
    const bool empty_row = c.density < 1.0 && n % 5 == 2;  // outputs that are the bias alone
    for (int64_t k = 0; k < c.K; ++k) {
      // Column K / 2 is dropped by every row of a sparse weight: x is infinite there.
      const bool dropped_column = c.density < 1.0 && k == c.K / 2;
      if (!empty_row && !dropped_column && u01(rng) < c.density) w[size_t(n * c.K + k)] = normal(rng);
    }
  }
  Packed pk = pack(w, c.N, c.K);
  pk.p.M = c.M, pk.p.ldx = c.K + c.x_pad;
  CHECK(check_unstructured_indices(pk.group_ptr.data(), pk.columns.data(), pk.p).empty(),
        check_unstructured_indices(pk.group_ptr.data(), pk.columns.data(), pk.p));
  std::vector<float> x(size_t(c.M * pk.p.ldx)), bias(size_t(c.N));
  for (auto& v : x) v = normal(rng);
  for (auto& v : bias) v = normal(rng);
  const float inf = std::numeric_limits<float>::infinity();
  if (c.density < 1.0 && c.K > 0) {
    for (int64_t t = 0; t < c.M; ++t) x[size_t(t * pk.p.ldx + c.K / 2)] = (t % 2) ? inf : -inf;
  }
  std::vector<double> ref(size_t(c.M * c.N));
  for (int64_t t = 0; t < c.M; ++t) {
    for (int64_t n = 0; n < c.N; ++n) {
      double s = bias[size_t(n)];
      for (int64_t k = 0; k < c.K; ++k) {
        const float wv = w[size_t(n * c.K + k)];
        if (wv != 0.0f) s += double(wv) * double(x[size_t(t * pk.p.ldx + k)]);
      }
      ref[size_t(t * c.N + n)] = s;
    }
  }
  for (CpuIsa isa : paths()) {
    for (int threads : {1, 2, 3}) {
      for (bool with_bias : {true, false}) {
        std::vector<float> y(size_t(c.M * c.N), std::nanf(""));  // poisoned: every output must be written
        unstructured_linear_cpu_isa(isa, x.data(), pk.values.data(), pk.columns.data(), pk.group_ptr.data(),
                                    with_bias ? bias.data() : nullptr, y.data(), pk.p, threads);
        int bad = 0;
        for (int64_t i = 0; i < c.M * c.N && bad < 3; ++i) {
          const double want = ref[size_t(i)] - (with_bias ? 0.0 : bias[size_t(i % c.N)]);
          const double tol = 1e-4 * (1.0 + std::sqrt(double(c.K)));
          if (!(std::fabs(y[size_t(i)] - want) <= tol)) {
            ++bad;
            CHECK(false, name(isa) << " M=" << c.M << " K=" << c.K << " N=" << c.N << " density=" << c.density
                                   << " threads=" << threads << " bias=" << with_bias << ": y[" << i / c.N << ", "
                                   << i % c.N << "]=" << y[size_t(i)] << " want " << want);
          }
        }
      }
    }
  }
}

void check_rejects(const char* what, const std::vector<int32_t>& group_ptr, const std::vector<int32_t>& columns,
                   const UnstructuredProblem& p, const char* expect) {
  const std::string msg = check_unstructured_indices(group_ptr.data(), columns.data(), p);
  CHECK(msg.find(expect) != std::string::npos, what << ": expected a message containing '" << expect << "', got '"
                                                    << msg << "'");
}

void test_index_check() {
  // N = 6, K = 5: two groups; rows 6 and 7 are absent (padding only).
  UnstructuredProblem p;
  p.N = 6, p.K = 5, p.n_groups = 2, p.steps = 3;
  const std::vector<int32_t> ptr{0, 2, 3};
  const std::vector<int32_t> cols{0, 1, 5, 2, 3, 4, 5, 4, 1, 2, 5, 5};
  CHECK(check_unstructured_indices(ptr.data(), cols.data(), p).empty(), check_unstructured_indices(ptr.data(),
                                                                                                  cols.data(), p));
  auto bad_cols = cols;
  bad_cols[3] = 6;
  check_rejects("column past K", ptr, bad_cols, p, "out of range");
  bad_cols = cols;
  bad_cols[1] = -1;
  check_rejects("negative column", ptr, bad_cols, p, "out of range");
  bad_cols = cols;
  bad_cols[0] = 3, bad_cols[4] = 3;  // row 0: 3 twice
  check_rejects("repeated column", ptr, bad_cols, p, "strictly increase");
  bad_cols = cols;
  bad_cols[2] = 5, bad_cols[6] = 1;  // row 2: padding, then a real column
  check_rejects("real after padding", ptr, bad_cols, p, "strictly increase");
  bad_cols = cols;
  bad_cols[10] = 0;  // row 6 is past N
  check_rejects("row past N", ptr, bad_cols, p, "past out_features");
  check_rejects("first pointer", {1, 2, 3}, cols, p, "group_ptr[0]");
  check_rejects("decreasing", {0, 2, 1}, cols, p, "non-decreasing");
  check_rejects("past steps", {0, 4, 4}, cols, p, "exceeds");
  check_rejects("short end", {0, 2, 2}, cols, p, "group_ptr[-1]");
  UnstructuredProblem wrong_groups = p;
  wrong_groups.n_groups = 1;
  check_rejects("group count", {0, 2}, cols, wrong_groups, "row groups");
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  test_index_check();
  const Case cases[] = {
      {1, 384, 1536, 0.1},  {2, 37, 19, 0.3},   {3, 100, 13, 0.5},   {4, 33, 9, 0.2},     {5, 17, 6, 0.5, 3},
      {16, 64, 64, 0.1},    {17, 31, 7, 0.3},   {31, 129, 33, 0.05}, {64, 16, 16, 1.0},   {65, 50, 21, 0.7, 5},
      {100, 96, 40, 0.1},   {130, 384, 70, 0.1}, {7, 9, 5, 0.0},     {40, 12, 11, 0.0},   {3, 20, 10, 1.0},
      {24, 1, 3, 1.0},      {9, 0, 5, 0.0},     {0, 8, 8, 0.5},      {8, 8, 0, 0.5},      {200, 23, 2, 0.4, 1},
  };
  for (const Case& c : cases) run_case(c, rng);
  for (CpuIsa isa : paths()) std::printf("tested path: %s\n", name(isa));
  return check::report("test_unstructured_linear");
}
