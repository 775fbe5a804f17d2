// Problem checks and the instruction-set choice for the CPU attention kernel. AVX-512 machines run the AVX2 path:
// at BERT-size head dims (32-64) a 16-key panel already covers the work, and attention is a small share of a
// sparse model's time there.
#include "attention.h"

#include "isa_kernels.h"

namespace pysparse {

std::string check_attention_problem(const AttentionProblem& p) {
  if (p.batch < 0 || p.heads < 0 || p.q_len < 0 || p.kv_len < 0 || p.head_dim < 0 || p.v_dim < 0) {
    return "negative size";
  }
  if (p.kv_heads < 1 || p.heads % p.kv_heads != 0) return "heads must be a multiple of kv_heads (>= 1)";
  if (p.mask_kind != AttentionMask::kNone && p.mask == nullptr) return "mask kind set without a mask";
  if (p.q_sb < 0 || p.q_sh < 0 || p.q_ss < 0 || p.k_sb < 0 || p.k_sh < 0 || p.k_ss < 0 || p.v_sb < 0 ||
      p.v_sh < 0 || p.v_ss < 0 || p.m_sb < 0 || p.m_sh < 0 || p.m_sq < 0 || p.m_sk < 0) {
    return "negative stride";
  }
  return "";
}

void attention_cpu_isa(CpuIsa isa, const float* q, const float* k, const float* v, float* out, float* lse,
                       const AttentionProblem& p, int num_threads) {
  if (num_threads < 1) num_threads = 1;
#if PYSPARSE_X86
  if (isa != CpuIsa::kGeneric && cpu_isa_supported(CpuIsa::kAvx2)) {
    avx2::attention(q, k, v, out, lse, p, num_threads);
    return;
  }
#else
  (void)isa;
#endif
  generic::attention(q, k, v, out, lse, p, num_threads);
}

void attention_backward_cpu_isa(CpuIsa isa, const float* q, const float* k, const float* v, const float* out,
                                const float* grad_out, const float* lse, float* dq, float* dk, float* dv,
                                const AttentionProblem& p, int num_threads) {
  if (num_threads < 1) num_threads = 1;
#if PYSPARSE_X86
  if (isa != CpuIsa::kGeneric && cpu_isa_supported(CpuIsa::kAvx2)) {
    avx2::attention_backward(q, k, v, out, grad_out, lse, dq, dk, dv, p, num_threads);
    return;
  }
#else
  (void)isa;
#endif
  generic::attention_backward(q, k, v, out, grad_out, lse, dq, dk, dv, p, num_threads);
}

void attention_cpu(const float* q, const float* k, const float* v, float* out, float* lse, const AttentionProblem& p,
                   int num_threads) {
  attention_cpu_isa(active_cpu_isa_id(), q, k, v, out, lse, p, num_threads);
}

void attention_backward_cpu(const float* q, const float* k, const float* v, const float* out, const float* grad_out,
                            const float* lse, float* dq, float* dk, float* dv, const AttentionProblem& p,
                            int num_threads) {
  attention_backward_cpu_isa(active_cpu_isa_id(), q, k, v, out, grad_out, lse, dq, dk, dv, p, num_threads);
}

}  // namespace pysparse
