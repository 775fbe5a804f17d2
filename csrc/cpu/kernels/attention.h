// Torch-free scaled-dot-product attention for the CPU, float32, forward and backward:
//   out[b, i, h, :] = sum_j softmax_j(scale * q[b, h, i, :] . k[b, hk, j, :] + mask[b, h, i, j]) * v[b, hk, j, :]
// with hk = h / (heads / kv_heads) (grouped-query attention when kv_heads < heads). Why pysparse has it: once the
// Linear layers of a transformer are 90% block-sparse, the unpruned attention is the largest cost left, and torch's
// CPU kernel runs short-sequence, small-head-dim attention (BERT-size models) at well under the cores' FMA rate.
//
// The output is [batch, q_len, heads, v_dim] contiguous: the layout the output projection reads, so nothing is
// transposed or copied after the call. q, k and v take any strides except a unit stride along the head dim.
#pragma once
#include <cstdint>
#include <string>

#include "bsr_linear.h"

namespace pysparse {

enum class AttentionMask : int { kNone = 0, kAdditive = 1, kKeep = 2 };  // float added to scores / bool keep flags

struct AttentionProblem {
  int64_t batch = 0, heads = 0, kv_heads = 0;
  int64_t q_len = 0, kv_len = 0;
  int64_t head_dim = 0;  // of q and k
  int64_t v_dim = 0;     // of v and the output
  // Element strides of q [batch, heads, q_len, head_dim], k / v [batch, kv_heads, kv_len, dim]; the last dim is
  // contiguous.
  int64_t q_sb = 0, q_sh = 0, q_ss = 0;
  int64_t k_sb = 0, k_sh = 0, k_ss = 0;
  int64_t v_sb = 0, v_sh = 0, v_ss = 0;
  // Optional mask viewed as [batch, heads, q_len, kv_len] through these strides (0 where it broadcasts): float32
  // added to the scaled scores, or bytes where non-zero keeps the key. A query row that keeps no key gives zeros.
  AttentionMask mask_kind = AttentionMask::kNone;
  const void* mask = nullptr;
  int64_t m_sb = 0, m_sh = 0, m_sq = 0, m_sk = 0;
  bool causal = false;  // query i sees keys j <= i (upper-left aligned, as torch's is_causal)
  float scale = 1.0f;
};

// "" when the problem's sizes and strides are consistent, else what is wrong.
std::string check_attention_problem(const AttentionProblem& p);

// out must hold batch * q_len * heads * v_dim floats and may not overlap the inputs. lse (training; may be null):
// batch * heads * q_len floats, lse[(b * heads + h) * q_len + i] = log sum_j exp(score_ij) after scale and mask,
// +inf for a row that sees no key: what the backward recomputes the weights from.
void attention_cpu(const float* q, const float* k, const float* v, float* out, float* lse, const AttentionProblem& p,
                   int num_threads);
// The gradients of q, k and v from grad_out (the output's gradient, laid out as out), the forward's out and lse:
// dq [batch, q_len, heads, head_dim], dk [batch, kv_len, kv_heads, head_dim], dv [batch, kv_len, kv_heads, v_dim],
// contiguous, every element written; a grouped-query head's dk / dv sum over the heads of its group.
void attention_backward_cpu(const float* q, const float* k, const float* v, const float* out, const float* grad_out,
                            const float* lse, float* dq, float* dk, float* dv, const AttentionProblem& p,
                            int num_threads);
// The same with an explicit instruction-set path (tests run every path the machine has).
void attention_cpu_isa(CpuIsa isa, const float* q, const float* k, const float* v, float* out, float* lse,
                       const AttentionProblem& p, int num_threads);
void attention_backward_cpu_isa(CpuIsa isa, const float* q, const float* k, const float* v, const float* out,
                                const float* grad_out, const float* lse, float* dq, float* dk, float* dv,
                                const AttentionProblem& p, int num_threads);

namespace generic {
void attention(const float* q, const float* k, const float* v, float* out, float* lse, const AttentionProblem& p,
               int num_threads);
void attention_backward(const float* q, const float* k, const float* v, const float* out, const float* grad_out,
                        const float* lse, float* dq, float* dk, float* dv, const AttentionProblem& p, int num_threads);
}
namespace avx2 {
void attention(const float* q, const float* k, const float* v, float* out, float* lse, const AttentionProblem& p,
               int num_threads);
void attention_backward(const float* q, const float* k, const float* v, const float* out, const float* grad_out,
                        const float* lse, float* dq, float* dk, float* dv, const AttentionProblem& p, int num_threads);
}

}  // namespace pysparse
