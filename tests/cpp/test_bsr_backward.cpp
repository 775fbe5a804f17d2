// The bsr_linear backward kernels (grad_input = grad_y @ W, grad_values on the kept blocks) on every CPU path this
// machine runs, both weight layouts (row-major and block-transposed blocks), against a double-precision reference:
// ragged shapes, block sizes that do not divide the matrix, empty block rows and columns, fully empty and fully
// dense weights, strided x, token counts across the chunk sizes, non-finite values in the weight's padding,
// NaN-poisoned outputs, 1..3 threads. Also the column index (build and check), and the bfloat16 kernels (AMX tiles)
// where the CPU has them.
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "bsr_backward.h"
#include "check.h"
#include "transposed_blocks.h"

using namespace pysparse;

namespace {

struct Case {
  int64_t M, K, N, bh, bw;
  double density;     // fraction of blocks kept; 0 = empty, 1 = dense
  int64_t x_pad = 0;  // extra elements per row of x (ldx = K + x_pad)
};

struct Bsr {
  BsrProblem p;
  std::vector<int32_t> crow, col;
  std::vector<float> values;  // [nnz][bh][bw]
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
    // Sparse weights leave every third block row and every second-to-last block column empty.
    const bool empty_row = c.density < 1.0 && r % 3 == 1;
    for (int64_t cb = 0; cb < p.n_block_cols; ++cb) {
      const bool empty_col = c.density < 1.0 && cb % 4 == 2;
      if (!empty_row && !empty_col && u01(rng) < c.density) w.col.push_back(int32_t(cb));
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
          // Padding must never reach grad_x: fill it with values that would poison any sum.
          w.values[size_t((b * p.bh + i) * p.bw + j)] = padding ? ((i + j) % 2 ? inf : std::nanf("")) : normal(rng);
        }
      }
    }
  }
  return w;
}

int64_t row_of(const Bsr& w, int64_t b) {
  int64_t r = 0;
  while (w.crow[r + 1] <= b) ++r;
  return r;
}

// |got - want| within float32 accumulation error of a sum whose absolute terms add up to `scale`.
bool close(float got, double want, double scale) {
  return std::isfinite(got) && std::abs(double(got) - want) <= 1e-5 * scale + 1e-6;
}

std::string describe(const Case& c, const char* isa, bool transposed, int threads) {
  return "M=" + std::to_string(c.M) + " K=" + std::to_string(c.K) + " N=" + std::to_string(c.N) + " block " +
         std::to_string(c.bh) + "x" + std::to_string(c.bw) + " density " + std::to_string(c.density) + " isa " + isa +
         (transposed ? " transposed" : " row-major") + " threads " + std::to_string(threads);
}

// Dense double references of grad_x and grad_values, with the scale (sum of absolute terms) of each for tolerances.
struct Reference {
  std::vector<double> gx, gx_scale, gv, gv_scale;
};

Reference reference(const Bsr& w, const std::vector<float>& gy, const std::vector<float>& x) {
  const BsrProblem& p = w.p;
  Reference ref{std::vector<double>(size_t(p.M * p.K), 0.0), std::vector<double>(size_t(p.M * p.K), 0.0),
                std::vector<double>(w.values.size(), 0.0), std::vector<double>(w.values.size(), 0.0)};
  for (int64_t b = 0; b < p.nnz; ++b) {
    const int64_t r = row_of(w, b), c0 = int64_t(w.col[b]) * p.bw;
    for (int64_t i = 0; i < p.bh && r * p.bh + i < p.N; ++i) {
      for (int64_t j = 0; j < p.bw && c0 + j < p.K; ++j) {
        const double wij = w.values[size_t((b * p.bh + i) * p.bw + j)];
        for (int64_t t = 0; t < p.M; ++t) {
          const double g = gy[size_t(t * p.N + r * p.bh + i)], xv = x[size_t(t * p.ldx + c0 + j)];
          ref.gx[size_t(t * p.K + c0 + j)] += g * wij;
          ref.gx_scale[size_t(t * p.K + c0 + j)] += std::abs(g * wij);
          ref.gv[size_t((b * p.bh + i) * p.bw + j)] += g * xv;
          ref.gv_scale[size_t((b * p.bh + i) * p.bw + j)] += std::abs(g * xv);
        }
      }
    }
  }
  return ref;
}

// Every grad_x and grad_values element (float or bfloat16, grad_values in its layout) against the reference:
// near(got as float, want, scale).
template <typename G, typename Near>
void compare(const Bsr& w, const Reference& ref, const std::vector<G>& gx, const std::vector<G>& gv, bool transposed,
             const std::string& what, Near near) {
  const BsrProblem& p = w.p;
  for (size_t i = 0; i < gx.size(); ++i) {
    CHECK(near(to_float(gx[i]), ref.gx[i], ref.gx_scale[i]),
          what << ": grad_x[" << i / size_t(p.K) << "][" << i % size_t(p.K) << "] = " << to_float(gx[i]) << ", want "
               << ref.gx[i]);
  }
  for (int64_t b = 0; b < p.nnz; ++b) {
    for (int64_t i = 0; i < p.bh; ++i) {
      for (int64_t j = 0; j < p.bw; ++j) {
        const size_t at = size_t((b * p.bh + i) * p.bw + j);
        const size_t got = transposed ? size_t((b * p.bw + j) * p.bh + i) : at;
        CHECK(near(to_float(gv[got]), ref.gv[at], ref.gv_scale[at]),
              what << ": grad_values[" << b << "][" << i << "][" << j << "] = " << to_float(gv[got]) << ", want "
                   << ref.gv[at]);
      }
    }
  }
}

void run_case(const Case& c, std::mt19937& rng) {
  const Bsr w = make_bsr(c, rng);
  const BsrProblem& p = w.p;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> gy(size_t(p.M * p.N)), x(size_t(p.M * p.ldx));
  for (float& v : gy) v = normal(rng);
  for (float& v : x) v = normal(rng);
  for (int64_t t = 0; t < p.M; ++t) {  // x's row padding is never read: poison it
    for (int64_t k = p.K; k < p.ldx; ++k) x[size_t(t * p.ldx + k)] = std::nanf("");
  }

  const Reference ref = reference(w, gy, x);

  // Column index, checked against the BSR structure.
  std::vector<int32_t> col_ptr(size_t(p.n_block_cols + 1)), entries(size_t(2 * p.nnz));
  build_bsr_column_index(w.crow.data(), w.col.data(), p, col_ptr.data(), entries.data());
  CHECK(check_bsr_column_index(col_ptr.data(), entries.data(), p).empty(),
        check_bsr_column_index(col_ptr.data(), entries.data(), p));
  for (int64_t cb = 0; cb < p.n_block_cols; ++cb) {
    for (int32_t e = col_ptr[cb]; e < col_ptr[cb + 1]; ++e) {
      const int32_t r = entries[2 * e], b = entries[2 * e + 1];
      CHECK(w.col[b] == cb && row_of(w, b) == r, "column index entry " << e << " of column " << cb);
      if (e > col_ptr[cb]) CHECK(entries[2 * (e - 1)] < r, "column " << cb << " not sorted by row");
    }
  }

  const std::vector<float> values_t = transposed_blocks(w.values, p.bh, p.bw);
  const float nan = std::nanf("");
  struct Path {
    CpuIsa isa;
    const char* name;
  };
  for (const Path& path : {Path{CpuIsa::kGeneric, "generic"}, Path{CpuIsa::kAvx2, "avx2"},
                           Path{CpuIsa::kAvx512, "avx512"}}) {
    if (!cpu_isa_supported(path.isa)) continue;
    for (const bool transposed : {false, true}) {
      for (int threads = 1; threads <= 3; ++threads) {
        const std::string what = describe(c, path.name, transposed, threads);
        const std::vector<float>& vals = transposed ? values_t : w.values;
        std::vector<float> gx(size_t(p.M * p.K), nan), gv(w.values.size(), nan), gb(size_t(p.N), nan);
        bsr_grad_input_cpu_isa(path.isa, gy.data(), vals.data(), transposed, col_ptr.data(), entries.data(),
                               gx.data(), p, threads);
        // Every other run also asks for the bias gradient (grad_y's column sums), which must not change grad_values.
        const bool with_bias = threads != 2;
        bsr_grad_values_cpu_isa(path.isa, gy.data(), x.data(), w.crow.data(), w.col.data(), transposed, gv.data(), p,
                                threads, with_bias ? gb.data() : nullptr);
        compare(w, ref, gx, gv, transposed, what, close);
        for (int64_t n = 0; with_bias && n < p.N; ++n) {
          double want = 0.0, scale = 1e-30;
          for (int64_t t = 0; t < p.M; ++t) {
            want += gy[size_t(t * p.N + n)];
            scale += std::fabs(gy[size_t(t * p.N + n)]);
          }
          if (!(std::fabs(gb[size_t(n)] - want) <= 1e-5 * scale)) {
            CHECK(false, what << ": grad_bias[" << n << "] = " << gb[size_t(n)] << ", want " << want);
            break;
          }
        }
      }
    }
  }
}

std::vector<bfloat16_t> to_bf16(const std::vector<float>& v) {
  std::vector<bfloat16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = from_float<bfloat16_t>(v[i]);
  return out;
}

// The bfloat16 kernels on the AMX path, against a double reference of the bfloat16-rounded operands: float32
// accumulation, one rounding of each output (relative 2^-8 of its sum's absolute terms, with margin).
void run_case_bf16(const Case& c, std::mt19937& rng) {
  Bsr w = make_bsr(c, rng);
  const BsrProblem& p = w.p;
  CHECK(bsr_backward_bf16_native(CpuIsa::kAvx512Amx, p), "the AMX backward refuses a case it should take");
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> gy(size_t(p.M * p.N)), x(size_t(p.M * p.ldx));
  for (float& v : gy) v = to_float(from_float<bfloat16_t>(normal(rng)));
  for (float& v : x) v = to_float(from_float<bfloat16_t>(normal(rng)));
  for (float& v : w.values) v = to_float(from_float<bfloat16_t>(v));
  const Reference ref = reference(w, gy, x);
  std::vector<int32_t> col_ptr(size_t(p.n_block_cols + 1)), entries(size_t(2 * p.nnz));
  build_bsr_column_index(w.crow.data(), w.col.data(), p, col_ptr.data(), entries.data());
  const std::vector<bfloat16_t> gy16 = to_bf16(gy), x16 = to_bf16(x), v16 = to_bf16(w.values);
  const std::vector<bfloat16_t> vt16 = to_bf16(transposed_blocks(w.values, p.bh, p.bw));
  auto near = [](float got, double want, double scale) {
    return std::isfinite(got) && std::abs(double(got) - want) <= 5e-3 * scale + 1e-6;
  };
  const bfloat16_t nan{0x7fc0};
  for (const bool transposed : {false, true}) {
    for (int threads = 1; threads <= 3; ++threads) {
      const std::string what = describe(c, "avx512_amx bfloat16", transposed, threads);
      std::vector<bfloat16_t> gx(size_t(p.M * p.K), nan), gv(w.values.size(), nan);
      bsr_grad_input_cpu(gy16.data(), transposed ? vt16.data() : v16.data(), transposed, col_ptr.data(),
                         entries.data(), gx.data(), p, threads);
      bsr_grad_values_cpu(gy16.data(), x16.data(), w.crow.data(), w.col.data(), transposed, gv.data(), p, threads);
      compare(w, ref, gx, gv, transposed, what, near);
    }
  }
}

void test_column_index_check() {
  BsrProblem p;
  p.n_block_rows = 2, p.n_block_cols = 2, p.nnz = 2;
  std::vector<int32_t> col_ptr = {0, 1, 2}, entries = {0, 0, 1, 1};
  CHECK(check_bsr_column_index(col_ptr.data(), entries.data(), p).empty(), "a valid index is rejected");
  col_ptr = {0, 2, 1};
  CHECK(!check_bsr_column_index(col_ptr.data(), entries.data(), p).empty(), "decreasing col_ptr accepted");
  col_ptr = {0, 1, 3};
  CHECK(!check_bsr_column_index(col_ptr.data(), entries.data(), p).empty(), "col_ptr[-1] != nnz accepted");
  col_ptr = {1, 1, 2};
  CHECK(!check_bsr_column_index(col_ptr.data(), entries.data(), p).empty(), "col_ptr[0] != 0 accepted");
  col_ptr = {0, 1, 2}, entries = {0, 0, 2, 1};
  CHECK(!check_bsr_column_index(col_ptr.data(), entries.data(), p).empty(), "block row out of range accepted");
  entries = {0, 0, 1, 2};
  CHECK(!check_bsr_column_index(col_ptr.data(), entries.data(), p).empty(), "block id out of range accepted");
  entries = {0, -1, 1, 1};
  CHECK(!check_bsr_column_index(col_ptr.data(), entries.data(), p).empty(), "negative block id accepted");
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  test_column_index_check();
  const Case cases[] = {
      {1, 37, 45, 8, 8, 0.5},          // one token, ragged both ways
      {7, 64, 64, 32, 32, 0.6},        // SIMD-friendly blocks, a token tail
      {33, 70, 50, 16, 16, 0.5, 3},    // ragged with 16x16, strided x
      {29, 67, 41, 32, 32, 1.0},       // dense, overhanging on both edges
      {19, 67, 41, 32, 32, 0.0},       // empty weight: grad_x all zero, no grad_values
      {300, 96, 80, 32, 32, 0.5},      // more tokens than one chunk (both kernels)
      {13, 50, 23, 3, 5, 0.7},         // odd blocks, masked vectors only
      {5, 19, 17, 1, 1, 0.4},          // 1x1 blocks (unstructured)
      {17, 100, 40, 8, 48, 0.6, 1},    // wide blocks: several column groups, one partial
      {23, 40, 100, 48, 8, 0.6},       // tall blocks
      {260, 33, 66, 16, 24, 0.5, 2},   // chunk boundary, 1.5-vector groups
      {0, 32, 32, 16, 16, 0.5},        // no tokens: grad_values all zero
      {45, 40, 50, 16, 1, 0.3},        // column vectors (their own tiles): ragged last block row, token tails
      {300, 23, 70, 32, 1, 0.5, 1},    // column vectors of two vectors' rows, more tokens than one chunk, strided x
      {21, 37, 29, 5, 1, 0.6},         // column vectors shorter than a vector, ragged
      {9, 24, 48, 16, 1, 1.0},         // dense column vectors: more blocks per row than one tile
      {9, 24, 48, 16, 1, 0.0},         // no column vector kept
      {7, 40, 0, 16, 16, 0.5},         // no outputs: grad_x all zero
      {1100, 40, 30, 16, 16, 0.5},     // narrow grad_y: token chunks of 512, three of them
      {1100, 1003, 40, 32, 32, 0.5},   // grad_x over 4 MiB (streaming stores), rows not vector-aligned
  };
  for (const Case& c : cases) run_case(c, rng);
  if (cpu_isa_supported(CpuIsa::kAvx512Amx)) {
    // Shapes the AMX backward takes (bh, bw multiples of 16 dividing N, K): token tails of its 32-token groups,
    // 16- and 32-row k chunks, passes of 16, 32 and 48 columns, strided x, empty and dense weights, no tokens.
    const Case bf16_cases[] = {{64, 96, 64, 32, 32, 0.5},    {33, 128, 96, 16, 16, 0.6, 3}, {100, 192, 96, 48, 64, 0.5},
                               {257, 384, 512, 32, 32, 0.3}, {0, 64, 64, 16, 16, 0.5},      {31, 64, 64, 32, 16, 1.0},
                               {45, 96, 48, 16, 32, 0.0, 1}, {1, 32, 32, 32, 32, 1.0},
                               {650, 1024, 1024, 32, 32, 0.05},  // grad_values in two token chunks
                               {7, 32, 0, 16, 16, 0.5},         {5, 0, 32, 16, 16, 0.5}};  // no outputs, no inputs
    for (const Case& c : bf16_cases) run_case_bf16(c, rng);
  } else {
    std::printf("skip the bfloat16 (AMX) backward: not supported by this CPU\n");
  }
  return check::report("test_bsr_backward");
}
