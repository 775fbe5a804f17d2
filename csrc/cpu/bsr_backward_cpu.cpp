// CPU implementations of the bsr_linear backward ops (schemas in csrc/ops.cpp): argument checks, then the torch-free
// kernels of csrc/cpu/kernels/bsr_backward.h. float32, bfloat16 and float16 (all tensors of one dtype): bfloat16 runs
// natively where bsr_backward_bf16_native (AMX tiles); 16-bit types otherwise run the float32 kernels on widened
// copies (O(M (N + K)) conversions against the products' density x M N K multiply-adds), rounded back once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/kernels/bsr_backward.h"
#include "cpu/output_pool.h"

namespace pysparse {
namespace {

void check_index_tensor(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
}

// float32, bfloat16 or float16, on the CPU, and of dtype `want` (grad_output's; ScalarType::Undefined when checking
// grad_output itself).
void check_floating(const char* op, const char* name, const at::Tensor& t, at::ScalarType want) {
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, op, ": ", name,
                   " must be float32, bfloat16 or float16, got ", s);
  TORCH_CHECK_TYPE(want == at::ScalarType::Undefined || s == want, op, ": ", name, " must have grad_output's dtype ",
                   want, ", got ", s);
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
}

void check_values(const char* op, const at::Tensor& values, at::ScalarType want) {
  check_floating(op, "values", values, want);
  TORCH_CHECK_VALUE(values.dim() == 3 && values.size(1) >= 1 && values.size(2) >= 1, op,
                    ": values must be [nnz_blocks, bh, bw] with bh, bw >= 1, got shape ", values.sizes());
  TORCH_CHECK_VALUE(values.size(0) <= INT32_MAX, op, ": at most 2^31-1 blocks are supported, got ", values.size(0));
}

// Each block stored column-major, blocks one after another (SparseLinear's layout where the forward's broadcast
// kernel reads it): values.transpose(1, 2) is contiguous and values is not.
bool is_block_transposed(const at::Tensor& values) {
  const int64_t bh = values.size(1), bw = values.size(2);
  return values.size(0) > 0 && bh > 1 && bw > 1 && !values.is_contiguous() && values.stride(0) == bh * bw &&
         values.stride(1) == 1 && values.stride(2) == bh;
}

// [M, cols] row-major view of t [..., cols].
at::Tensor as_rows(const at::Tensor& t, int64_t cols) {
  const int64_t m = c10::multiply_integers(t.sizes().begin(), t.sizes().end() - 1);
  return t.reshape({m, cols}).contiguous();
}

// t as float32 with its strides kept (a block-transposed values stays block-transposed).
at::Tensor widened(const at::Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

const bfloat16_t* bf16(const at::Tensor& t) {
  return reinterpret_cast<const bfloat16_t*>(t.const_data_ptr<at::BFloat16>());
}
bfloat16_t* bf16_out(at::Tensor& t) { return reinterpret_cast<bfloat16_t*>(t.mutable_data_ptr<at::BFloat16>()); }

BsrProblem problem_for(const at::Tensor& values, int64_t M, int64_t K, int64_t N) {
  BsrProblem p;
  p.M = M, p.K = K, p.N = N;
  p.bh = values.size(1), p.bw = values.size(2);
  p.n_block_rows = (N + p.bh - 1) / p.bh;
  p.n_block_cols = (K + p.bw - 1) / p.bw;
  p.nnz = values.size(0);
  p.ldx = K;
  return p;
}

void check_bsr(const char* op, const at::Tensor& crow, const at::Tensor& col, const BsrProblem& p) {
  check_index_tensor(op, "crow_indices", crow, 1);
  check_index_tensor(op, "col_indices", col, 1);
  TORCH_CHECK_VALUE(crow.numel() == p.n_block_rows + 1, op, ": crow_indices must have ceil(out_features / bh) + 1 = ",
                    p.n_block_rows + 1, " entries, got ", crow.numel());
  TORCH_CHECK_VALUE(col.numel() == p.nnz, op, ": col_indices must have one entry per block (", p.nnz,
                    " blocks), got ", col.numel());
  const std::string bad = check_bsr_indices(crow.const_data_ptr<int32_t>(), col.const_data_ptr<int32_t>(), p);
  TORCH_CHECK_VALUE(bad.empty(), op, ": ", bad);
}

// (col_ptr [n_block_cols + 1], entries [nnz, 2]): the blocks listed by block column (build_bsr_column_index).
std::tuple<at::Tensor, at::Tensor> bsr_column_index_cpu(const at::Tensor& crow_indices,
                                                        const at::Tensor& col_indices, int64_t n_block_cols) {
  const char* op = "bsr_column_index";
  check_index_tensor(op, "crow_indices", crow_indices, 1);
  check_index_tensor(op, "col_indices", col_indices, 1);
  TORCH_CHECK_VALUE(n_block_cols >= 0, op, ": n_block_cols must be >= 0, got ", n_block_cols);
  TORCH_CHECK_VALUE(crow_indices.numel() >= 1, op, ": crow_indices must have at least 1 entry");
  BsrProblem p;
  p.n_block_rows = crow_indices.numel() - 1;
  p.n_block_cols = n_block_cols;
  p.nnz = col_indices.numel();
  const at::Tensor crow = crow_indices.contiguous(), col = col_indices.contiguous();
  const std::string bad = check_bsr_indices(crow.const_data_ptr<int32_t>(), col.const_data_ptr<int32_t>(), p);
  TORCH_CHECK_VALUE(bad.empty(), op, ": ", bad);
  at::Tensor col_ptr = at::empty({n_block_cols + 1}, crow.options());
  at::Tensor entries = at::empty({p.nnz, 2}, crow.options());
  build_bsr_column_index(crow.const_data_ptr<int32_t>(), col.const_data_ptr<int32_t>(), p,
                         col_ptr.mutable_data_ptr<int32_t>(), entries.mutable_data_ptr<int32_t>());
  return {col_ptr, entries};
}

// grad_input [..., in_features] = grad_output [..., N] @ W.
at::Tensor bsr_linear_grad_input_cpu(const at::Tensor& grad_output, const at::Tensor& values,
                                     const at::Tensor& col_ptr, const at::Tensor& col_entries, int64_t in_features) {
  const char* op = "bsr_linear_grad_input";
  check_floating(op, "grad_output", grad_output, at::ScalarType::Undefined);
  const at::ScalarType dtype = grad_output.scalar_type();
  check_values(op, values, dtype);
  check_index_tensor(op, "col_ptr", col_ptr, 1);
  check_index_tensor(op, "col_entries", col_entries, 2);
  TORCH_CHECK_VALUE(grad_output.dim() >= 1, op, ": grad_output must be [..., out_features], got a 0-d tensor");
  TORCH_CHECK_VALUE(in_features >= 0, op, ": in_features must be >= 0, got ", in_features);
  const int64_t N = grad_output.size(-1);
  const at::Tensor gy = as_rows(grad_output, N);
  BsrProblem p = problem_for(values, gy.size(0), in_features, N);
  TORCH_CHECK_VALUE(col_ptr.numel() == p.n_block_cols + 1, op, ": col_ptr must have ceil(in_features / bw) + 1 = ",
                    p.n_block_cols + 1, " entries, got ", col_ptr.numel());
  TORCH_CHECK_VALUE(col_entries.size(0) == p.nnz && col_entries.size(1) == 2, op,
                    ": col_entries must be [nnz_blocks, 2] = [", p.nnz, ", 2], got ", col_entries.sizes());
  const at::Tensor cp = col_ptr.contiguous(), ce = col_entries.contiguous();
  const std::string bad = check_bsr_column_index(cp.const_data_ptr<int32_t>(), ce.const_data_ptr<int32_t>(), p);
  TORCH_CHECK_VALUE(bad.empty(), op, ": ", bad);
  const bool transposed = is_block_transposed(values);
  const at::Tensor v = transposed ? values : values.contiguous();
  std::vector<int64_t> out_shape = grad_output.sizes().vec();
  out_shape.back() = in_features;
  if (dtype == at::kBFloat16 && bsr_backward_bf16_native(p)) {
    at::Tensor gx = empty_output(out_shape, grad_output.options());
    bsr_grad_input_cpu(bf16(gy), bf16(v), transposed, cp.const_data_ptr<int32_t>(), ce.const_data_ptr<int32_t>(),
                       bf16_out(gx), p, at::get_num_threads());
    return gx;
  }
  const at::Tensor gy32 = widened(gy), v32 = widened(v);
  at::Tensor gx = empty_output(out_shape, grad_output.options().dtype(at::kFloat));
  bsr_grad_input_cpu(gy32.const_data_ptr<float>(), v32.const_data_ptr<float>(), transposed,
                     cp.const_data_ptr<int32_t>(), ce.const_data_ptr<int32_t>(), gx.mutable_data_ptr<float>(), p,
                     at::get_num_threads());
  return dtype == at::kFloat ? gx : gx.to(dtype);
}

// grad_values [nnz, bh, bw], in values' layout and dtype: the gradient of the kept blocks only; with_bias: also the
// bias gradient [N] (grad_output's column sums; from the same pass over grad_output in float32, else torch's sum).
std::tuple<at::Tensor, at::Tensor> grad_values_impl(const char* op, const at::Tensor& grad_output,
                                                    const at::Tensor& input, const at::Tensor& values,
                                                    const at::Tensor& crow_indices, const at::Tensor& col_indices,
                                                    bool with_bias) {
  check_floating(op, "grad_output", grad_output, at::ScalarType::Undefined);
  const at::ScalarType dtype = grad_output.scalar_type();
  check_floating(op, "input", input, dtype);
  check_values(op, values, dtype);
  TORCH_CHECK_VALUE(grad_output.dim() >= 1 && input.dim() == grad_output.dim() &&
                        input.sizes().slice(0, input.dim() - 1) == grad_output.sizes().slice(0, input.dim() - 1),
                    op, ": grad_output [..., out_features] and input [..., in_features] must share their leading "
                    "dimensions, got shapes ", grad_output.sizes(), " and ", input.sizes());
  const int64_t N = grad_output.size(-1), K = input.size(-1);
  const at::Tensor gy = as_rows(grad_output, N), x = as_rows(input, K);
  const BsrProblem p = problem_for(values, gy.size(0), K, N);
  const at::Tensor crow = crow_indices.contiguous(), col = col_indices.contiguous();
  check_bsr(op, crow, col, p);
  const bool transposed = is_block_transposed(values);
  at::Tensor gv = transposed ? at::empty_like(values) : at::empty(values.sizes(), values.options());
  if (dtype == at::kBFloat16 && bsr_backward_bf16_native(p)) {
    bsr_grad_values_cpu(bf16(gy), bf16(x), crow.const_data_ptr<int32_t>(), col.const_data_ptr<int32_t>(), transposed,
                        bf16_out(gv), p, at::get_num_threads());
    return {gv, with_bias ? gy.sum(0) : at::Tensor()};
  }
  const at::Tensor gy32 = widened(gy), x32 = widened(x);
  at::Tensor gv32 = dtype == at::kFloat ? gv : at::empty_like(gv, gv.options().dtype(at::kFloat));
  at::Tensor gb32 = with_bias ? at::empty({N}, gy.options().dtype(at::kFloat)) : at::Tensor();
  bsr_grad_values_cpu(gy32.const_data_ptr<float>(), x32.const_data_ptr<float>(), crow.const_data_ptr<int32_t>(),
                      col.const_data_ptr<int32_t>(), transposed, gv32.mutable_data_ptr<float>(), p,
                      at::get_num_threads(), with_bias ? gb32.mutable_data_ptr<float>() : nullptr);
  if (dtype != at::kFloat) gv.copy_(gv32);
  return {gv, with_bias && dtype != at::kFloat ? gb32.to(dtype) : gb32};
}

at::Tensor bsr_linear_grad_values_cpu(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& values,
                                      const at::Tensor& crow_indices, const at::Tensor& col_indices) {
  return std::get<0>(grad_values_impl("bsr_linear_grad_values", grad_output, input, values, crow_indices, col_indices,
                                      false));
}

std::tuple<at::Tensor, at::Tensor> bsr_linear_grad_values_bias_cpu(const at::Tensor& grad_output,
                                                                   const at::Tensor& input, const at::Tensor& values,
                                                                   const at::Tensor& crow_indices,
                                                                   const at::Tensor& col_indices) {
  return grad_values_impl("bsr_linear_grad_values_bias", grad_output, input, values, crow_indices, col_indices, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) {
  m.impl("bsr_column_index", &bsr_column_index_cpu);
  m.impl("bsr_linear_grad_input", &bsr_linear_grad_input_cpu);
  m.impl("bsr_linear_grad_values", &bsr_linear_grad_values_cpu);
  m.impl("bsr_linear_grad_values_bias", &bsr_linear_grad_values_bias_cpu);
}

}  // namespace pysparse
