// The CPU attention kernel on every path this machine runs (generic, AVX2) against a double-precision reference:
// head dims and sequence lengths that are and are not multiples of the vector and panel widths, kv_len != q_len,
// grouped-query heads, strided (transposed) q / k / v as transformers passes them, additive and boolean masks with
// broadcast strides, causal attention, rows that keep no key, empty sequences, NaN-poisoned outputs, 1..3 threads;
// the backward (dq, dk, dv from the forward's out and log-sum-exp) on the same cases, some query rows without a
// gradient (skipped).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "attention.h"
#include "check.h"

using namespace pysparse;

namespace {

struct Case {
  int64_t B, H, Hk, Sq, Skv, D, Dv;
  AttentionMask mask;
  bool causal;
  bool bshd;  // q / k / v laid out [B, S, H, D] (strided views), else [B, H, S, D] contiguous
  bool padding = false;  // the mask keeps a prefix of the keys per batch entry (a padded batch), not random keys
};

struct Data {
  AttentionProblem p;
  std::vector<float> q, k, v, fmask;
  std::vector<uint8_t> bmask;
};

Data make(const Case& c, std::mt19937& rng) {
  Data d;
  AttentionProblem& p = d.p;
  p.batch = c.B, p.heads = c.H, p.kv_heads = c.Hk, p.q_len = c.Sq, p.kv_len = c.Skv, p.head_dim = c.D,
  p.v_dim = c.Dv, p.causal = c.causal;
  p.scale = c.D > 0 ? 1.0f / std::sqrt(static_cast<float>(c.D)) : 1.0f;
  std::normal_distribution<float> normal(0.0f, 1.5f);
  auto fill = [&](std::vector<float>& x, int64_t n) {
    x.resize(static_cast<size_t>(n));
    for (float& e : x) e = normal(rng);
  };
  fill(d.q, c.B * c.H * c.Sq * c.D);
  fill(d.k, c.B * c.Hk * c.Skv * c.D);
  fill(d.v, c.B * c.Hk * c.Skv * c.Dv);
  if (c.bshd) {
    p.q_sb = c.Sq * c.H * c.D, p.q_sh = c.D, p.q_ss = c.H * c.D;
    p.k_sb = c.Skv * c.Hk * c.D, p.k_sh = c.D, p.k_ss = c.Hk * c.D;
    p.v_sb = c.Skv * c.Hk * c.Dv, p.v_sh = c.Dv, p.v_ss = c.Hk * c.Dv;
  } else {
    p.q_sb = c.H * c.Sq * c.D, p.q_sh = c.Sq * c.D, p.q_ss = c.D;
    p.k_sb = c.Hk * c.Skv * c.D, p.k_sh = c.Skv * c.D, p.k_ss = c.D;
    p.v_sb = c.Hk * c.Skv * c.Dv, p.v_sh = c.Skv * c.Dv, p.v_ss = c.Dv;
  }
  // Masks are [B, 1, Sq, Skv] broadcast over heads (as transformers builds them); row 1 of batch 0 keeps no key.
  p.mask_kind = c.mask;
  p.m_sb = c.Sq * c.Skv, p.m_sh = 0, p.m_sq = c.Skv, p.m_sk = 1;
  std::uniform_real_distribution<float> u01(0.0f, 1.0f);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if (c.mask == AttentionMask::kAdditive) {
    d.fmask.resize(static_cast<size_t>(c.B * c.Sq * c.Skv));
    for (float& e : d.fmask) e = u01(rng) < 0.2f ? neg_inf : normal(rng);
    if (c.Sq > 1)
      for (int64_t j = 0; j < c.Skv; ++j) d.fmask[static_cast<size_t>(c.Skv + j)] = neg_inf;
    p.mask = d.fmask.data();
  } else if (c.mask == AttentionMask::kKeep) {
    d.bmask.resize(static_cast<size_t>(c.B * c.Sq * c.Skv));
    for (uint8_t& e : d.bmask) e = u01(rng) < 0.8f ? 1 : 0;
    if (c.padding) {  // batch entry b keeps keys [0, len_b), len_b from 0 to Skv
      for (int64_t b = 0; b < c.B; ++b) {
        const int64_t len = c.B > 1 ? b * c.Skv / (c.B - 1) : c.Skv / 2;
        for (int64_t i = 0; i < c.Sq; ++i)
          for (int64_t j = 0; j < c.Skv; ++j) d.bmask[static_cast<size_t>((b * c.Sq + i) * c.Skv + j)] = j < len;
      }
    }
    if (c.Sq > 1 && !c.padding)
      for (int64_t j = 0; j < c.Skv; ++j) d.bmask[static_cast<size_t>(c.Skv + j)] = 0;
    p.mask = d.bmask.data();
  }
  return d;
}

// out [B, Sq, H, Dv] in double.
std::vector<double> reference(const Data& d) {
  const AttentionProblem& p = d.p;
  std::vector<double> out(static_cast<size_t>(p.batch * p.q_len * p.heads * p.v_dim), 0.0);
  const int64_t group = p.heads / p.kv_heads;
  std::vector<double> s(static_cast<size_t>(p.kv_len));
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.heads; ++h)
      for (int64_t i = 0; i < p.q_len; ++i) {
        const int64_t hk = h / group;
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < p.kv_len; ++j) {
          double acc = 0.0;
          for (int64_t t = 0; t < p.head_dim; ++t)
            acc += double(d.q[b * p.q_sb + h * p.q_sh + i * p.q_ss + t]) * d.k[b * p.k_sb + hk * p.k_sh + j * p.k_ss + t];
          acc *= p.scale;
          const int64_t m = b * p.m_sb + h * p.m_sh + i * p.m_sq + j * p.m_sk;
          if (p.mask_kind == AttentionMask::kAdditive) acc += d.fmask[m];
          if (p.mask_kind == AttentionMask::kKeep && !d.bmask[m]) acc = -std::numeric_limits<double>::infinity();
          if (p.causal && j > i) acc = -std::numeric_limits<double>::infinity();
          s[j] = acc;
          mx = std::max(mx, acc);
        }
        double* o = &out[((b * p.q_len + i) * p.heads + h) * p.v_dim];
        if (mx == -std::numeric_limits<double>::infinity()) continue;  // keeps no key: zeros
        double sum = 0.0;
        for (int64_t j = 0; j < p.kv_len; ++j) sum += (s[j] = std::exp(s[j] - mx));
        for (int64_t j = 0; j < p.kv_len; ++j)
          for (int64_t t = 0; t < p.v_dim; ++t) o[t] += s[j] / sum * d.v[b * p.v_sb + hk * p.v_sh + j * p.v_ss + t];
      }
  return out;
}

// The case in words, for failure messages.
std::string describe(const Case& c, const char* isa_name, int threads) {
  return std::string(c.padding ? "padding " : "") + isa_name + " B" + std::to_string(c.B) + " H" +
         std::to_string(c.H) + "/" + std::to_string(c.Hk) + " Sq" + std::to_string(c.Sq) + " Skv" +
         std::to_string(c.Skv) + " D" + std::to_string(c.D) + "/" + std::to_string(c.Dv) + " mask" +
         std::to_string(int(c.mask)) + (c.causal ? " causal" : "") + (c.bshd ? " bshd" : "") + " threads " +
         std::to_string(threads);
}

void run(const Case& c, CpuIsa isa, const char* isa_name, int threads, std::mt19937& rng) {
  const Data d = make(c, rng);
  CHECK(check_attention_problem(d.p).empty(), check_attention_problem(d.p));
  const std::vector<double> ref = reference(d);
  std::vector<float> out(ref.size() + 1, std::numeric_limits<float>::quiet_NaN());  // poisoned, + a guard element
  attention_cpu_isa(isa, d.q.data(), d.k.data(), d.v.data(), out.data(), nullptr, d.p, threads);
  double max_err = 0.0, max_ref = 0.0;
  bool finite = true;
  for (size_t i = 0; i < ref.size(); ++i) {
    finite = finite && std::isfinite(out[i]);
    max_err = std::max(max_err, std::abs(out[i] - ref[i]));
    max_ref = std::max(max_ref, std::abs(ref[i]));
  }
  const std::string what = describe(c, isa_name, threads);
  CHECK(finite, what << ": non-finite output (a row left unwritten?)");
  CHECK(max_err <= 2e-6 * std::max(1.0, max_ref), what << ": max error " << max_err << " (max |ref| " << max_ref << ")");
  CHECK(std::isnan(out.back()), what << ": wrote past the output");
}

// The gradients in double: dq [B, Sq, H, D], dk [B, Skv, Hk, D], dv [B, Skv, Hk, Dv] for the output gradient g
// ([B, Sq, H, Dv]).
struct Grads {
  std::vector<double> dq, dk, dv;
};

Grads reference_grads(const Data& d, const std::vector<float>& g) {
  const AttentionProblem& p = d.p;
  Grads r;
  r.dq.assign(static_cast<size_t>(p.batch * p.q_len * p.heads * p.head_dim), 0.0);
  r.dk.assign(static_cast<size_t>(p.batch * p.kv_len * p.kv_heads * p.head_dim), 0.0);
  r.dv.assign(static_cast<size_t>(p.batch * p.kv_len * p.kv_heads * p.v_dim), 0.0);
  const int64_t group = p.heads / p.kv_heads;
  const double neg_inf = -std::numeric_limits<double>::infinity();
  std::vector<double> s(static_cast<size_t>(p.kv_len)), dp(static_cast<size_t>(p.kv_len));
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.heads; ++h)
      for (int64_t i = 0; i < p.q_len; ++i) {
        const int64_t hk = h / group;
        const float* q = &d.q[b * p.q_sb + h * p.q_sh + i * p.q_ss];
        const float* gi = &g[((b * p.q_len + i) * p.heads + h) * p.v_dim];
        double mx = neg_inf;
        for (int64_t j = 0; j < p.kv_len; ++j) {
          const float* k = &d.k[b * p.k_sb + hk * p.k_sh + j * p.k_ss];
          const float* v = &d.v[b * p.v_sb + hk * p.v_sh + j * p.v_ss];
          double acc = 0.0, gv = 0.0;
          for (int64_t t = 0; t < p.head_dim; ++t) acc += double(q[t]) * k[t];
          for (int64_t t = 0; t < p.v_dim; ++t) gv += double(gi[t]) * v[t];
          acc *= p.scale;
          const int64_t m = b * p.m_sb + h * p.m_sh + i * p.m_sq + j * p.m_sk;
          if (p.mask_kind == AttentionMask::kAdditive) acc += d.fmask[m];
          if (p.mask_kind == AttentionMask::kKeep && !d.bmask[m]) acc = neg_inf;
          if (p.causal && j > i) acc = neg_inf;
          s[j] = acc, dp[j] = gv;
          mx = std::max(mx, acc);
        }
        if (mx == neg_inf) continue;  // keeps no key: a constant zero output, no gradient
        double sum = 0.0, dot = 0.0;
        for (int64_t j = 0; j < p.kv_len; ++j) sum += (s[j] = std::exp(s[j] - mx));
        for (int64_t j = 0; j < p.kv_len; ++j) dot += (s[j] /= sum) * dp[j];
        for (int64_t j = 0; j < p.kv_len; ++j) {
          const double ds = s[j] * (dp[j] - dot) * p.scale;
          const float* k = &d.k[b * p.k_sb + hk * p.k_sh + j * p.k_ss];
          double* dq = &r.dq[((b * p.q_len + i) * p.heads + h) * p.head_dim];
          double* dk = &r.dk[((b * p.kv_len + j) * p.kv_heads + hk) * p.head_dim];
          double* dv = &r.dv[((b * p.kv_len + j) * p.kv_heads + hk) * p.v_dim];
          for (int64_t t = 0; t < p.head_dim; ++t) dq[t] += ds * k[t], dk[t] += ds * q[t];
          for (int64_t t = 0; t < p.v_dim; ++t) dv[t] += s[j] * gi[t];
        }
      }
  return r;
}

// Within tolerance of ref, finite, and the guard element past the end still NaN.
void check_grad(const std::vector<float>& got, const std::vector<double>& ref, const std::string& what) {
  double max_err = 0.0, max_ref = 0.0;
  bool finite = true;
  for (size_t i = 0; i < ref.size(); ++i) {
    finite = finite && std::isfinite(got[i]);
    max_err = std::max(max_err, std::abs(got[i] - ref[i]));
    max_ref = std::max(max_ref, std::abs(ref[i]));
  }
  CHECK(finite, what << ": non-finite gradient (an element left unwritten?)");
  CHECK(max_err <= 4e-6 * std::max(1.0, max_ref),
        what << ": max error " << max_err << " (max |ref| " << max_ref << ")");
  CHECK(std::isnan(got.back()), what << ": wrote past the gradient");
}

void run_backward(const Case& c, CpuIsa isa, const char* isa_name, int threads, std::mt19937& rng) {
  const Data d = make(c, rng);
  const AttentionProblem& p = d.p;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> out(static_cast<size_t>(p.batch * p.q_len * p.heads * p.v_dim)), g(out.size());
  std::vector<float> lse(static_cast<size_t>(p.batch * p.heads * p.q_len) + 1, nan);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& e : g) e = normal(rng);
  // Batch entry 0's last third of the queries and every third row before carry no gradient (padding under a loss
  // over the real positions): the kernel skips them.
  for (int64_t i = 0; i < p.q_len && p.batch > 0; ++i) {
    if (3 * i < 2 * p.q_len && i % 3 != 2) continue;
    for (int64_t h = 0; h < p.heads; ++h)
      std::fill(g.begin() + (i * p.heads + h) * p.v_dim, g.begin() + (i * p.heads + h + 1) * p.v_dim, 0.0f);
  }
  attention_cpu_isa(isa, d.q.data(), d.k.data(), d.v.data(), out.data(), lse.data(), p, threads);
  CHECK(std::isnan(lse.back()), isa_name << ": wrote past the log-sum-exp");
  const Grads ref = reference_grads(d, g);
  std::vector<float> dq(ref.dq.size() + 1, nan), dk(ref.dk.size() + 1, nan), dv(ref.dv.size() + 1, nan);
  attention_backward_cpu_isa(isa, d.q.data(), d.k.data(), d.v.data(), out.data(), g.data(), lse.data(), dq.data(),
                             dk.data(), dv.data(), p, threads);
  const std::string what = "backward " + describe(c, isa_name, threads);
  check_grad(dq, ref.dq, what + " dq");
  check_grad(dk, ref.dk, what + " dk");
  check_grad(dv, ref.dv, what + " dv");
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  const AttentionMask kNone = AttentionMask::kNone, kAdd = AttentionMask::kAdditive, kKeep = AttentionMask::kKeep;
  const Case cases[] = {
      {2, 12, 12, 128, 128, 32, 32, kAdd, false, true},   // MiniLM-like, transformers' layout
      {1, 3, 3, 37, 53, 24, 40, kNone, false, false},     // nothing a multiple of the panel
      {2, 4, 2, 19, 19, 13, 7, kKeep, false, true},       // odd head dims, grouped-query heads
      {1, 2, 1, 33, 33, 64, 64, kNone, true, false},      // causal, square
      {2, 3, 3, 10, 25, 16, 16, kAdd, true, true},        // causal with kv_len > q_len
      {1, 1, 1, 1, 300, 8, 8, kKeep, false, false},       // one query, long keys
      {1, 2, 2, 7, 1, 5, 3, kNone, false, false},         // one key
      {3, 1, 1, 2, 17, 1, 1, kAdd, false, true},          // head dim 1
      {1, 2, 2, 5, 0, 8, 8, kNone, false, false},         // no keys: zeros
      {0, 2, 2, 5, 5, 8, 8, kNone, false, false},         // empty batch
      {2, 6, 3, 70, 45, 48, 16, kKeep, true, true},
      {4, 3, 3, 40, 40, 32, 32, kKeep, false, true, true},  // padded batch: keys past each length skipped
      {3, 2, 1, 21, 50, 16, 24, kKeep, true, false, true},  // ... with causal
  };
  struct Path {
    CpuIsa isa;
    const char* name;
  };
  std::vector<Path> paths = {{CpuIsa::kGeneric, "generic"}};
  if (cpu_isa_supported(CpuIsa::kAvx2)) paths.push_back({CpuIsa::kAvx2, "avx2"});
  for (const Path& path : paths)
    for (int threads : {1, 3})
      for (const Case& c : cases) {
        run(c, path.isa, path.name, threads, rng);
        run_backward(c, path.isa, path.name, threads, rng);
      }
  // Few (batch, head) pairs: the query rows are split into chunks across threads.
  for (const Path& path : paths) run({1, 1, 1, 200, 64, 32, 32, kAdd, false, false}, path.isa, path.name, 2, rng);

  AttentionProblem bad;
  bad.heads = 3, bad.kv_heads = 2;
  CHECK(!check_attention_problem(bad).empty(), "heads not a multiple of kv_heads accepted");
  return check::report("test_attention");
}
