// The implicit-im2col convolution (bsr_conv2d_nhwc_cpu) against a double-precision direct convolution: strides,
// dilations, non-square kernels, block rows overhanging N with NaN / inf in their padding rows, empty rows, empty
// and dense weights, 1-3 threads, NaN-poisoned outputs; and the geometry checks that keep every read inside x.
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "bsr_linear.h"
#include "check.h"
#include "transposed_blocks.h"

using namespace pysparse;

namespace {

struct ConvCase {
  int64_t batch, h, w, c, o, kh, kw, sh, sw, dh, dw, bh, bw;
  double density;
};

void run_case(const ConvCase& k, int threads, bool with_residual, bool pre_transposed, std::mt19937& rng) {
  ConvGeometry g;
  g.batch = k.batch, g.hp = k.h, g.wp = k.w, g.c = k.c, g.kh = k.kh, g.kw = k.kw;
  g.sh = k.sh, g.sw = k.sw, g.dh = k.dh, g.dw = k.dw;
  g.ho = (k.h - (k.kh - 1) * k.dh - 1) / k.sh + 1;
  g.wo = (k.w - (k.kw - 1) * k.dw - 1) / k.sw + 1;
  BsrProblem p;
  p.M = g.batch * g.ho * g.wo, p.K = k.kh * k.kw * k.c, p.N = k.o, p.bh = k.bh, p.bw = k.bw;
  p.n_block_rows = (p.N + p.bh - 1) / p.bh, p.n_block_cols = (p.K + p.bw - 1) / p.bw, p.ldx = p.K;
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<int32_t> crow{0}, col;
  for (int64_t r = 0; r < p.n_block_rows; ++r) {
    const bool empty_row = k.density < 1.0 && r % 3 == 1;
    for (int64_t cb = 0; cb < p.n_block_cols; ++cb) {
      if (!empty_row && u01(rng) < k.density) col.push_back(int32_t(cb));
    }
    crow.push_back(int32_t(col.size()));
  }
  p.nnz = int64_t(col.size());
  CHECK(check_bsr_indices(crow.data(), col.data(), p).empty(), "generated indices are valid");
  CHECK(bsr_conv2d_unsupported(p, g).empty(), bsr_conv2d_unsupported(p, g));
  const float nan = std::nanf(""), inf = std::numeric_limits<float>::infinity();
  std::vector<float> values(size_t(p.nnz * p.bh * p.bw));
  for (int64_t r = 0; r < p.n_block_rows; ++r)
    for (int64_t b = crow[r]; b < crow[r + 1]; ++b)
      for (int64_t i = 0; i < p.bh; ++i)
        for (int64_t j = 0; j < p.bw; ++j)
          values[size_t((b * p.bh + i) * p.bw + j)] = r * p.bh + i >= p.N ? ((i + j) % 2 ? inf : nan) : normal(rng);
  std::vector<float> x(size_t(g.batch * g.hp * g.wp * g.c)), bias(size_t(p.N));
  for (float& v : x) v = normal(rng);
  for (float& v : bias) v = normal(rng);
  std::vector<float> residual(with_residual ? size_t(p.M * p.N) : 0);  // [batch, ho, wo, N], like y
  for (float& v : residual) v = normal(rng);
  if (with_residual) p.residual = residual.data();
  // Half the cases read the blocks transposed once by the caller (BsrProblem::transposed_values).
  const std::vector<float> transposed = pre_transposed ? transposed_blocks(values, p.bh, p.bw) : std::vector<float>();
  if (pre_transposed) p.transposed_values = transposed.data();
  std::vector<float> y(size_t(p.M * p.N), nan);  // poisoned: every output must be written
  bsr_conv2d_nhwc_cpu(x.data(), values.data(), crow.data(), col.data(), bias.data(), y.data(), p, g, threads);

  // Dense W[n][k] from the blocks (padding rows dropped), then the direct convolution in double.
  std::vector<double> w(size_t(p.N * p.K), 0.0);
  for (int64_t r = 0; r < p.n_block_rows; ++r)
    for (int64_t b = crow[r]; b < crow[r + 1]; ++b)
      for (int64_t i = 0; i < p.bh && r * p.bh + i < p.N; ++i)
        for (int64_t j = 0; j < p.bw && col[b] * p.bw + j < p.K; ++j)
          w[size_t((r * p.bh + i) * p.K + col[b] * p.bw + j)] = values[size_t((b * p.bh + i) * p.bw + j)];
  double max_ref = 0.0, max_err = 0.0;
  bool finite = true;
  for (int64_t m = 0; m < p.M; ++m) {
    const int64_t ow = m % g.wo, oh = (m / g.wo) % g.ho, n = m / (g.wo * g.ho);
    for (int64_t o = 0; o < p.N; ++o) {
      double acc = bias[size_t(o)] + (with_residual ? residual[size_t(m * p.N + o)] : 0.0);
      for (int64_t th = 0; th < g.kh; ++th)
        for (int64_t tw = 0; tw < g.kw; ++tw)
          for (int64_t ch = 0; ch < g.c; ++ch) {
            const int64_t ih = oh * g.sh + th * g.dh, iw = ow * g.sw + tw * g.dw;
            acc += w[size_t(o * p.K + (th * g.kw + tw) * g.c + ch)] *
                   x[size_t(((n * g.hp + ih) * g.wp + iw) * g.c + ch)];
          }
      const double got = y[size_t(m * p.N + o)];
      finite = finite && std::isfinite(got);
      max_ref = std::max(max_ref, std::abs(acc));
      max_err = std::max(max_err, std::abs(got - acc));
    }
  }
  const double rel = max_ref > 0 ? max_err / max_ref : max_err;
  CHECK(finite && rel < 1e-5, "conv " << k.batch << "x" << k.h << "x" << k.w << "x" << k.c << " -> " << k.o
                                      << " kernel " << k.kh << "x" << k.kw << " stride " << k.sh << "," << k.sw
                                      << " dilation " << k.dh << "," << k.dw << " block " << k.bh << "x" << k.bw
                                      << " density " << k.density << " threads " << threads
                                      << " residual " << with_residual << " pre-transposed " << pre_transposed << ": rel err " << rel
                                      << (finite ? "" : " (non-finite output)"));
}

}  // namespace

int main() {
  if (!bsr_conv2d_available()) {
    std::printf("skip test_bsr_conv2d: this CPU path has no implicit convolution\n");
    return 0;
  }
  std::mt19937 rng(4321);
  const ConvCase cases[] = {
      {2, 11, 9, 16, 40, 3, 3, 1, 1, 1, 1, 16, 16, 0.5},  // overhanging block row, empty rows
      {1, 15, 8, 48, 24, 3, 3, 2, 2, 1, 1, 8, 24, 0.4},   // stride 2, one-vector tiles
      {3, 8, 8, 32, 64, 1, 1, 2, 2, 1, 1, 32, 32, 0.6},   // strided 1x1
      {2, 14, 12, 64, 72, 3, 3, 1, 1, 2, 2, 32, 32, 0.3}, // dilation 2
      {1, 10, 9, 32, 32, 3, 1, 1, 2, 1, 1, 16, 32, 1.0},  // 3x1 kernel, dense weight
      {2, 9, 9, 16, 16, 5, 5, 1, 1, 1, 1, 16, 8, 0.0},    // empty weight: y is the bias
      {1, 7, 7, 128, 136, 3, 3, 1, 1, 1, 1, 64, 64, 0.2},
  };
  int i = 0;
  for (const ConvCase& k : cases) {
    // Every other case adds a residual in the epilogue; cases 0, 1, 4, 5 read pre-transposed blocks.
    run_case(k, 1 + i % 3, i % 2 == 1, i % 4 < 2, rng);
    ++i;
  }

  // Geometry that would read outside x, or blocks straddling two taps, is refused before any kernel runs.
  BsrProblem p;
  ConvGeometry g;
  g.batch = 1, g.hp = 8, g.wp = 8, g.c = 16, g.kh = g.kw = 3, g.ho = 7, g.wo = 6;  // ho too large by one
  p.M = g.ho * g.wo, p.K = 9 * 16, p.N = 16, p.bh = 16, p.bw = 16;
  CHECK(!bsr_conv2d_unsupported(p, g).empty(), "an output row past the padded input must be refused");
  g.ho = 6, p.M = 36, p.bw = 12;
  CHECK(!bsr_conv2d_unsupported(p, g).empty(), "a block width that does not divide C must be refused");
  p.bw = 16, p.bh = 12;
  CHECK(!bsr_conv2d_unsupported(p, g).empty(), "a block height that is not a multiple of 8 must be refused");
  p.bh = 16, p.M = 35;
  CHECK(!bsr_conv2d_unsupported(p, g).empty(), "M that does not match the geometry must be refused");
  return check::report("test_bsr_conv2d");
}
