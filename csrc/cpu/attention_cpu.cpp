// CPU implementation of pysparse::attention, attention_forward and attention_backward: argument checks (every size
// and stride the kernel reads is derived here from the tensors themselves), then the torch-free kernel core
// (csrc/cpu/kernels/attention.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "cpu/kernels/attention.h"
#include "cpu/output_pool.h"

namespace pysparse {
namespace {

// t, with a unit stride along its last dim (transformers' q / k / v views already have one: no copy).
at::Tensor unit_last_stride(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

void check_operand(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 4, "attention: ", name, " must be 4-D [batch, heads, seq, dim], got ", t.dim(),
                    "-D with shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "attention: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), "attention: ", name, " must be on the CPU, got ", t.device());
}

// The operands as the kernel reads them (q / k / v with a unit last stride, the mask expanded) and their problem.
struct Operands {
  at::Tensor q, k, v, mask;
  AttentionProblem p;
};

Operands attention_operands(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const std::optional<at::Tensor>& attn_mask, bool is_causal, std::optional<double> scale) {
  check_operand("query", query);
  check_operand("key", key);
  check_operand("value", value);
  const int64_t B = query.size(0), H = query.size(1), Sq = query.size(2), D = query.size(3);
  const int64_t Hk = key.size(1), Skv = key.size(2), Dv = value.size(3);
  TORCH_CHECK_VALUE(key.size(0) == B && value.size(0) == B, "attention: key and value must have the query's batch ",
                    B, ", got ", key.size(0), " and ", value.size(0));
  TORCH_CHECK_VALUE(value.size(1) == Hk && value.size(2) == Skv, "attention: value must have key's heads and length ",
                    "(", Hk, ", ", Skv, "), got (", value.size(1), ", ", value.size(2), ")");
  TORCH_CHECK_VALUE(key.size(3) == D, "attention: key's head dim must equal the query's ", D, ", got ", key.size(3));
  TORCH_CHECK_VALUE(Hk >= 1 && H % Hk == 0, "attention: the query's heads (", H,
                    ") must be a multiple of key/value's heads, got ", Hk);
  const at::Tensor q = unit_last_stride(query), k = unit_last_stride(key), v = unit_last_stride(value);

  AttentionProblem p;
  p.batch = B, p.heads = H, p.kv_heads = Hk, p.q_len = Sq, p.kv_len = Skv, p.head_dim = D, p.v_dim = Dv;
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_ss = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_ss = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_ss = v.stride(2);
  p.causal = is_causal;
  const double s = scale ? *scale : (D > 0 ? 1.0 / std::sqrt(static_cast<double>(D)) : 1.0);
  TORCH_CHECK_VALUE(std::isfinite(s), "attention: scale must be finite, got ", s);
  p.scale = static_cast<float>(s);

  at::Tensor mask;
  if (attn_mask) {
    const at::Tensor& m = *attn_mask;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool || m.scalar_type() == at::kFloat,
                     "attention: attn_mask must be bool (True = attend) or float32 (added to the scores), got ",
                     m.scalar_type());
    TORCH_CHECK_VALUE(m.device().is_cpu(), "attention: attn_mask must be on the CPU, got ", m.device());
    const std::vector<int64_t> full = {B, H, Sq, Skv};
    TORCH_CHECK_VALUE(m.dim() <= 4, "attention: attn_mask must broadcast to ", at::IntArrayRef(full), ", got shape ",
                      m.sizes());
    for (int64_t i = 0; i < m.dim(); ++i) {
      const int64_t want = full[4 - m.dim() + i];
      TORCH_CHECK_VALUE(m.size(i) == want || m.size(i) == 1, "attention: attn_mask must broadcast to ",
                        at::IntArrayRef(full), ", got shape ", m.sizes());
    }
    mask = m.expand(full);  // broadcast dims get stride 0; nothing is copied
    // An empty mask (no query rows, keys or batch) is never read and may have no storage at all.
    p.mask_kind = mask.numel() == 0 ? AttentionMask::kNone
                  : m.scalar_type() == at::kBool ? AttentionMask::kKeep : AttentionMask::kAdditive;
    p.mask = mask.const_data_ptr();
    p.m_sb = mask.stride(0), p.m_sh = mask.stride(1), p.m_sq = mask.stride(2), p.m_sk = mask.stride(3);
  }
  const std::string bad = check_attention_problem(p);
  TORCH_CHECK_VALUE(bad.empty(), "attention: ", bad);
  return {q, k, v, mask, p};
}

// The output [B, Sq, H, Dv], and each query row's log-sum-exp into lse when it is given (training).
at::Tensor run_attention(const Operands& o, at::Tensor* lse) {
  at::Tensor out = empty_output({o.p.batch, o.p.q_len, o.p.heads, o.p.v_dim}, o.q.options());
  if (lse) *lse = at::empty({o.p.batch, o.p.heads, o.p.q_len}, o.q.options());
  attention_cpu(o.q.const_data_ptr<float>(), o.k.const_data_ptr<float>(), o.v.const_data_ptr<float>(),
                out.mutable_data_ptr<float>(), lse ? lse->mutable_data_ptr<float>() : nullptr, o.p,
                at::get_num_threads());
  return out;
}

at::Tensor attention_cpu_op(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const std::optional<at::Tensor>& attn_mask, bool is_causal, std::optional<double> scale) {
  return run_attention(attention_operands(query, key, value, attn_mask, is_causal, scale), nullptr);
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu_op(const at::Tensor& query, const at::Tensor& key,
                                                            const at::Tensor& value,
                                                            const std::optional<at::Tensor>& attn_mask,
                                                            bool is_causal, std::optional<double> scale) {
  at::Tensor lse;
  at::Tensor out = run_attention(attention_operands(query, key, value, attn_mask, is_causal, scale), &lse);
  return {out, lse};
}

// A saved or incoming tensor of the backward: float32 on the CPU with exactly this shape, made contiguous.
at::Tensor backward_operand(const char* name, const at::Tensor& t, at::IntArrayRef shape) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "attention_backward: ", name, " must be float32, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), "attention_backward: ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK_VALUE(t.sizes() == shape, "attention_backward: ", name, " must have shape ", shape, ", got ",
                    t.sizes());
  return t.contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu_op(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& logsumexp, const std::optional<at::Tensor>& attn_mask, bool is_causal,
    std::optional<double> scale) {
  const Operands o = attention_operands(query, key, value, attn_mask, is_causal, scale);
  const AttentionProblem& p = o.p;
  const std::vector<int64_t> out_shape = {p.batch, p.q_len, p.heads, p.v_dim};
  const at::Tensor g = backward_operand("grad_out", grad_out, out_shape);
  const at::Tensor y = backward_operand("out", out, out_shape);
  const at::Tensor lse = backward_operand("logsumexp", logsumexp, {p.batch, p.heads, p.q_len});
  at::Tensor dq = at::empty({p.batch, p.q_len, p.heads, p.head_dim}, o.q.options());
  at::Tensor dk = at::empty({p.batch, p.kv_len, p.kv_heads, p.head_dim}, o.q.options());
  at::Tensor dv = at::empty({p.batch, p.kv_len, p.kv_heads, p.v_dim}, o.q.options());
  attention_backward_cpu(o.q.const_data_ptr<float>(), o.k.const_data_ptr<float>(), o.v.const_data_ptr<float>(),
                         y.const_data_ptr<float>(), g.const_data_ptr<float>(), lse.const_data_ptr<float>(),
                         dq.mutable_data_ptr<float>(), dk.mutable_data_ptr<float>(), dv.mutable_data_ptr<float>(), p,
                         at::get_num_threads());
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) {
  m.impl("attention", &attention_cpu_op);
  m.impl("attention_forward", &attention_forward_cpu_op);
  m.impl("attention_backward", &attention_backward_cpu_op);
}

}  // namespace pysparse
