// Unstructured sparse linear (float32) on every CPU path this machine runs, against a double-precision dense
// reference: ragged shapes (M, N and K around the tile widths, the transposes' 8 / 16, the column block of 128 and
// the gather threshold), empty rows, fully dense and all-zero weights, strided x, infinite x in a column no row keeps
// (it must not reach an output), NaN-poisoned outputs, 1..3 threads; and the index check on malformed indices. The
// backward too: grad_values, and grad_x as the forward on W^T from unstructured_transpose (whose indices must pass the
// index check and list each segment's columns increasing).
#include <algorithm>
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

constexpr int64_t B = kUnstructuredBlockCols;

struct Packed {
  UnstructuredProblem p;
  std::vector<int32_t> segment_ptr, columns;
  std::vector<float> values;
};

// The format of unstructured_linear.h from a dense [N, K] weight (zeros dropped), column blocks `width` wide.
Packed pack(const std::vector<float>& w, int64_t N, int64_t K, int64_t width) {
  Packed out;
  out.p.N = N, out.p.K = K, out.p.block_cols = width, out.p.n_blocks = (K + width - 1) / width;
  out.segment_ptr.push_back(0);
  for (int64_t b = 0; b < out.p.n_blocks; ++b) {
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = b * width; k < std::min(K, (b + 1) * width); ++k) {
        if (w[size_t(n * K + k)] != 0.0f) {
          out.columns.push_back(int32_t(k));
          out.values.push_back(w[size_t(n * K + k)]);
        }
      }
      out.segment_ptr.push_back(int32_t(out.columns.size()));
    }
  }
  out.p.nnz = int64_t(out.columns.size());
  return out;
}

struct Case {
  int64_t M, K, N;
  double density;     // fraction of entries kept; 0 = all zero, 1 = dense
  int64_t x_pad = 0;  // extra elements per row of x (ldx = K + x_pad)
  int64_t width = B;  // the column-block width
};

std::vector<CpuIsa> paths() {
  std::vector<CpuIsa> out{CpuIsa::kGeneric};
  for (CpuIsa isa : {CpuIsa::kAvx2, CpuIsa::kAvx512}) {
    if (cpu_isa_supported(isa)) out.push_back(isa);
  }
  return out;
}

const char* name(CpuIsa isa) { return isa == CpuIsa::kGeneric ? "generic" : isa == CpuIsa::kAvx2 ? "avx2" : "avx512"; }

void run_backward(const Case& c, const std::vector<float>& w, const Packed& pk, const std::vector<float>& x,
                  std::mt19937& rng);

void run_case(const Case& c, std::mt19937& rng) {
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> w(size_t(c.N * c.K), 0.0f);
  for (int64_t n = 0; n < c.N; ++n) {
    const bool empty_row = c.density < 1.0 && n % 5 == 2;  // outputs that are the bias alone
    // Every third row of a sparse weight keeps a quarter as many: the kernel walks rows in pairs, and a pair's
    // segments then differ in length, the longer one first or second.
    const double density = c.density < 1.0 && n % 3 == 1 ? c.density / 4 : c.density;
    for (int64_t k = 0; k < c.K; ++k) {
      // Column K / 2 is dropped by every row of a sparse weight: x is infinite there.
      const bool dropped_column = c.density < 1.0 && k == c.K / 2;
      if (!empty_row && !dropped_column && u01(rng) < density) w[size_t(n * c.K + k)] = normal(rng);
    }
  }
  Packed pk = pack(w, c.N, c.K, c.width);
  pk.p.M = c.M, pk.p.ldx = c.K + c.x_pad;
  CHECK(check_unstructured_indices(pk.segment_ptr.data(), pk.columns.data(), pk.p).empty(),
        check_unstructured_indices(pk.segment_ptr.data(), pk.columns.data(), pk.p));
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
        CHECK(unstructured_linear_cpu_isa(isa, x.data(), pk.values.data(), pk.columns.data(), pk.segment_ptr.data(),
                                          with_bias ? bias.data() : nullptr, y.data(), pk.p, threads),
              "a good weight reported as bad");
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
    // The fused epilogue: activation(y + bias + residual), in registers on the SIMD paths.
    std::vector<float> res(size_t(c.M * c.N));
    for (auto& v : res) v = normal(rng);
    for (Activation act : {Activation::kRelu, Activation::kGelu, Activation::kNone}) {
      UnstructuredProblem pe = pk.p;
      pe.act = act;
      pe.residual = res.data();
      std::vector<float> y(size_t(c.M * c.N), std::nanf(""));
      CHECK(unstructured_linear_cpu_isa(isa, x.data(), pk.values.data(), pk.columns.data(), pk.segment_ptr.data(),
                                        bias.data(), y.data(), pe, 2),
            "a good weight reported as bad (epilogue)");
      int bad = 0;
      for (int64_t i = 0; i < c.M * c.N && bad < 3; ++i) {
        const double v = ref[size_t(i)] + res[size_t(i)];
        const double want = act == Activation::kRelu   ? std::max(v, 0.0)
                            : act == Activation::kGelu ? 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)))
                                                       : v;
        if (!(std::fabs(y[size_t(i)] - want) <= 1e-4 * (1.0 + std::sqrt(double(c.K))))) {
          ++bad;
          CHECK(false, name(isa) << " epilogue " << int(act) << " M=" << c.M << " K=" << c.K << " N=" << c.N
                                 << ": y[" << i / c.N << ", " << i % c.N << "]=" << y[size_t(i)] << " want " << want);
        }
      }
    }
  }
  run_backward(c, w, pk, x, rng);
}

// The backward on every path: grad_values against sum_t grad_y[t, n] * x[t, k] (x's infinite column is kept by no
// row, so it never enters), and grad_x = grad_y @ W through the transposed format and the forward kernel.
void run_backward(const Case& c, const std::vector<float>& w, const Packed& pk, const std::vector<float>& x,
                  std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> gy(size_t(c.M * c.N));
  for (auto& v : gy) v = normal(rng);
  // Reference gradients in double: per entry (in the format's order) and grad_x [M, K].
  std::vector<double> want_gv(size_t(pk.p.nnz), 0.0), want_gx(size_t(c.M * c.K), 0.0);
  for (int64_t b = 0; b < pk.p.n_blocks; ++b) {
    for (int64_t n = 0; n < c.N; ++n) {
      for (int64_t s = pk.segment_ptr[size_t(b * c.N + n)]; s < pk.segment_ptr[size_t(b * c.N + n + 1)]; ++s) {
        const int64_t k = pk.columns[size_t(s)];
        for (int64_t t = 0; t < c.M; ++t) {
          want_gv[size_t(s)] += double(gy[size_t(t * c.N + n)]) * double(x[size_t(t * pk.p.ldx + k)]);
          want_gx[size_t(t * c.K + k)] += double(gy[size_t(t * c.N + n)]) * double(w[size_t(n * c.K + k)]);
        }
      }
    }
  }
  // W^T [K, N] in the same format, values permuted.
  std::vector<int32_t> columns_t(size_t(pk.p.nnz)), perm(size_t(pk.p.nnz));
  UnstructuredProblem pt;
  pt.M = c.M, pt.K = c.N, pt.N = c.K, pt.ldx = c.N, pt.n_blocks = (c.N + B - 1) / B, pt.nnz = pk.p.nnz;
  std::vector<int32_t> segment_ptr_t(size_t(pt.n_blocks * pt.N + 1), -1);
  unstructured_transpose(pk.columns.data(), pk.segment_ptr.data(), pk.p, columns_t.data(), segment_ptr_t.data(),
                         perm.data());
  const std::string bad_t = check_unstructured_indices(segment_ptr_t.data(), columns_t.data(), pt);
  CHECK(bad_t.empty(), "transpose M=" << c.M << " K=" << c.K << " N=" << c.N << ": " << bad_t);
  if (!bad_t.empty()) return;
  std::vector<float> values_t(size_t(pk.p.nnz));
  for (int64_t b = 0; b < pt.n_blocks; ++b) {
    for (int64_t k = 0; k < pt.N; ++k) {
      for (int64_t i = segment_ptr_t[size_t(b * pt.N + k)]; i < segment_ptr_t[size_t(b * pt.N + k + 1)]; ++i) {
        const int32_t n = columns_t[size_t(i)], s = perm[size_t(i)];
        CHECK(i == segment_ptr_t[size_t(b * pt.N + k)] || columns_t[size_t(i - 1)] < n, "transpose: columns_t not "
              "increasing in segment (" << b << ", " << k << ")");
        CHECK(s >= 0 && s < pk.p.nnz && pk.columns[size_t(s)] == k && w[size_t(n * c.K + k)] == pk.values[size_t(s)],
              "transpose: entry " << i << " is not W[" << n << ", " << k << "]");
        values_t[size_t(i)] = pk.values[size_t(std::clamp<int64_t>(s, 0, pk.p.nnz - 1))];
      }
    }
  }
  const double tol = 1e-4 * (1.0 + std::sqrt(double(c.M) + double(c.N)));
  for (CpuIsa isa : paths()) {
    for (int threads : {1, 2, 3}) {
      std::vector<float> gv(size_t(pk.p.nnz), std::nanf("")), gx(size_t(c.M * c.K), std::nanf(""));
      unstructured_linear_grad_values_cpu_isa(isa, gy.data(), x.data(), pk.columns.data(), pk.segment_ptr.data(),
                                              gv.data(), pk.p, threads);
      CHECK(unstructured_linear_cpu_isa(isa, gy.data(), values_t.data(), columns_t.data(), segment_ptr_t.data(),
                                        nullptr, gx.data(), pt, threads),
            "the transposed weight reported as bad");
      int bad = 0;
      for (int64_t s = 0; s < pk.p.nnz && bad < 3; ++s) {
        if (!(std::fabs(gv[size_t(s)] - want_gv[size_t(s)]) <= tol)) {
          ++bad;
          CHECK(false, name(isa) << " grad_values M=" << c.M << " K=" << c.K << " N=" << c.N << " threads="
                                 << threads << ": entry " << s << " = " << gv[size_t(s)] << " want "
                                 << want_gv[size_t(s)]);
        }
      }
      for (int64_t i = 0; i < c.M * c.K && bad < 3; ++i) {
        if (!(std::fabs(gx[size_t(i)] - want_gx[size_t(i)]) <= tol)) {
          ++bad;
          CHECK(false, name(isa) << " grad_x M=" << c.M << " K=" << c.K << " N=" << c.N << " threads=" << threads
                                 << ": [" << i / c.K << ", " << i % c.K << "] = " << gx[size_t(i)] << " want "
                                 << want_gx[size_t(i)]);
        }
      }
    }
  }
}

void check_rejects(const char* what, const std::vector<int32_t>& segment_ptr, const std::vector<int32_t>& columns,
                   const UnstructuredProblem& p, const char* expect) {
  const std::string msg = check_unstructured_indices(segment_ptr.data(), columns.data(), p);
  CHECK(msg.find(expect) != std::string::npos, what << ": expected a message containing '" << expect << "', got '"
                                                    << msg << "'");
}

void test_index_check() {
  // N = 2, K = 130: two column blocks ([0, 127] and [128, 129]); segments (block, row) = (0,0) (0,1) (1,0) (1,1).
  UnstructuredProblem p;
  p.N = 2, p.K = 130, p.n_blocks = 2, p.nnz = 5;
  const std::vector<int32_t> ptr{0, 2, 3, 4, 5};
  const std::vector<int32_t> cols{3, 100, 127, 129, 128};
  CHECK(check_unstructured_indices(ptr.data(), cols.data(), p).empty(),
        check_unstructured_indices(ptr.data(), cols.data(), p));
  auto bad = cols;
  bad[3] = 130;
  check_rejects("column past K", ptr, bad, p, "outside its column block 1");
  bad = cols;
  bad[1] = 128;
  check_rejects("column of the next block", ptr, bad, p, "outside its column block 0");
  bad = cols;
  bad[0] = -1;
  check_rejects("negative column", ptr, bad, p, "columns[0]=-1");
  bad = cols;
  bad[4] = 5;
  check_rejects("column of an earlier block", ptr, bad, p, "columns[4]=5");
  check_rejects("first pointer", {1, 2, 3, 4, 5}, cols, p, "segment_ptr[0]");
  check_rejects("decreasing", {0, 3, 2, 4, 5}, cols, p, "non-decreasing");
  check_rejects("short end", {0, 2, 3, 4, 4}, cols, p, "segment_ptr[-1]");
  check_rejects("past the values", {0, 2, 3, 4, 6}, cols, p, "segment_ptr[-1]");
  UnstructuredProblem wrong_blocks = p;
  wrong_blocks.n_blocks = 1;
  check_rejects("block count", {0, 2, 3}, cols, wrong_blocks, "column blocks");

  // Blocks of 256 at K = 300: [0, 255] and [256, 299].
  UnstructuredProblem wide = p;
  wide.K = 300, wide.block_cols = 256;
  const std::vector<int32_t> wide_cols{3, 200, 255, 299, 256};
  CHECK(check_unstructured_indices(ptr.data(), wide_cols.data(), wide).empty(),
        check_unstructured_indices(ptr.data(), wide_cols.data(), wide));
  bad = wide_cols;
  bad[2] = 256;
  check_rejects("wide block: column of the next block", ptr, bad, wide, "outside its column block 0");
  bad = wide_cols;
  bad[4] = 255;
  check_rejects("wide block: column of an earlier block", ptr, bad, wide, "outside its column block 1");
  UnstructuredProblem odd_width = wide;
  odd_width.block_cols = 384;
  check_rejects("width not of the format", ptr, wide_cols, odd_width, "width must be 128, 256 or 512");
  odd_width.block_cols = 0;
  check_rejects("zero width", ptr, wide_cols, odd_width, "width must be 128, 256 or 512");
  UnstructuredProblem wide_count = wide;
  wide_count.K = 600;  // ceil(600 / 256) = 3 blocks, not 2
  check_rejects("block count of the width", ptr, wide_cols, wide_count, "ceil(in_features / 256) = 3");
  CHECK(unstructured_block_cols(300, 3) == 128 && unstructured_block_cols(300, 2) == 256 &&
            unstructured_block_cols(300, 1) == 512 && unstructured_block_cols(100, 1) == 128 &&
            unstructured_block_cols(1100, 3) == 512 && unstructured_block_cols(1100, 4) == 0 &&
            unstructured_block_cols(0, 0) == 128,
        "unstructured_block_cols");
}

// The forward checks the columns itself (where each path first reads them): a column outside its block, in range of
// x or far past it, is reported on every path, batch size and thread count, and never read (ASan runs this too).
void test_forward_rejects_bad_columns(std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int64_t width : {int64_t(128), int64_t(512)}) {
    const int64_t N = 70, K = 1100;
    std::vector<float> w(size_t(N * K), 0.0f);
    for (size_t i = 0; i < w.size(); i += 7) w[i] = normal(rng);
    const Packed good = pack(w, N, K, width);
    // Entries of the first and of the last column block, and one in the middle of the weight.
    for (const int64_t at : {int64_t(0), good.p.nnz / 2, good.p.nnz - 1}) {
      for (const int32_t column : {int32_t(-5), int32_t(1) << 30, int32_t(K), int32_t(0)}) {
        Packed pk = good;
        const int32_t was = pk.columns[size_t(at)];
        pk.columns[size_t(at)] = column == 0 && was < width ? int32_t(K - 1) : column;  // 0: another block
        if (column == 0 && was >= width) pk.columns[size_t(at)] = 0;
        const std::string verdict = check_unstructured_indices(pk.segment_ptr.data(), pk.columns.data(), pk.p);
        CHECK(!verdict.empty(), "corrupted column not caught by check_unstructured_indices");
        for (CpuIsa isa : paths()) {
          for (const int64_t M : {int64_t(1), int64_t(2), int64_t(3), int64_t(17), int64_t(40), int64_t(200)}) {
            for (int threads : {1, 2, 3}) {
              pk.p.M = M, pk.p.ldx = K;
              std::vector<float> x(size_t(M * K), 1.0f), y(size_t(M * N), 0.0f);
              const bool ran = unstructured_linear_cpu_isa(isa, x.data(), pk.values.data(), pk.columns.data(),
                                                           pk.segment_ptr.data(), nullptr, y.data(), pk.p, threads);
              CHECK(!ran, name(isa) << " M=" << M << " threads=" << threads << " width=" << width << ": column "
                                    << pk.columns[size_t(at)] << " at entry " << at << " not reported");
            }
          }
        }
      }
    }
  }
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  test_index_check();
  test_forward_rejects_bad_columns(rng);
  const Case cases[] = {
      {1, 384, 1536, 0.1}, {2, 300, 33, 0.2},    {70, 257, 47, 0.3},  {129, 130, 18, 0.5}, {2, 37, 19, 0.3},
      {3, 100, 13, 0.5},   {4, 33, 9, 0.2},      {5, 17, 6, 0.5, 3},  {16, 64, 64, 0.1},   {17, 31, 7, 0.3},
      {31, 129, 33, 0.05}, {64, 16, 16, 1.0},    {65, 50, 21, 0.7, 5}, {100, 96, 40, 0.1}, {130, 384, 70, 0.1},
      {7, 9, 5, 0.0},      {40, 12, 11, 0.0},    {3, 20, 10, 1.0},    {24, 1, 3, 1.0},     {9, 0, 5, 0.0},
      {0, 8, 8, 0.5},      {8, 8, 0, 0.5},       {200, 23, 2, 0.4, 1}, {300, 70, 33, 0.3},
      // batch 1-3 over several row groups of the gather path (256 / M rows each), sparse enough for empty segments
      {3, 200, 300, 0.3},  {1, 1000, 700, 0.02}, {2, 129, 513, 0.6, 7},
      // outputs past 4 MiB (streaming stores where a run of 16 outputs starts on a cache line; N = 1030: rows
      // shifted off the lines, plain stores)
      {1100, 40, 1040, 0.2}, {1100, 37, 1030, 0.3, 1},
      // wider column blocks (256, 512): several blocks, a ragged last one, batch 1-3 (gathers), one tile, several
      {1, 600, 70, 0.1, 0, 256}, {2, 1100, 33, 0.05, 3, 512}, {3, 513, 40, 0.3, 0, 256}, {16, 1100, 45, 0.1, 0, 512},
      {70, 700, 31, 0.2, 1, 256}, {130, 1030, 29, 0.1, 0, 512}, {33, 300, 17, 1.0, 0, 256}, {5, 200, 9, 0.0, 0, 512},
  };
  for (const Case& c : cases) run_case(c, rng);
  for (CpuIsa isa : paths()) std::printf("tested path: %s\n", name(isa));
  return check::report("test_unstructured_linear");
}
