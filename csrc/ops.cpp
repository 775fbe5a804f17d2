// Every pysparse op schema, in one place. Device implementations live in csrc/cpu and csrc/cuda.
#include <Python.h>
#include <torch/library.h>

#include "cpu/kernels/bsr_linear.h"

TORCH_LIBRARY(pysparse, m) {
  // y = F.linear(input, W, bias) with W [out_features, in_features] block-sparse in BSR form:
  // values [nnz_blocks, bh, bw], crow_indices [ceil(out_features / bh) + 1] and col_indices [nnz_blocks], int32.
  m.def("bsr_linear(Tensor input, Tensor values, Tensor crow_indices, Tensor col_indices, Tensor? bias, "
        "int out_features) -> Tensor");
  // activation(bsr_linear(...) + residual): activation None, "relu", "relu6" or "gelu" (exact, erf form), residual
  // None or a tensor of the output's shape; both fused into the kernels' epilogue. CPU only; inference only (no
  // autograd: pysparse.nn layers use it when no gradient is wanted).
  m.def("bsr_linear_act(Tensor input, Tensor values, Tensor crow_indices, Tensor col_indices, Tensor? bias, "
        "int out_features, str? activation, Tensor? residual=None) -> Tensor");
  // Backward of bsr_linear on the CPU, float32 / bfloat16 / float16, all of one dtype (csrc/cpu/bsr_backward_cpu.cpp).
  // bsr_column_index lists the blocks by block column, once per weight layout: col_ptr [n_block_cols + 1] and entries
  // [nnz_blocks, 2] (block row, block id), int32. bsr_linear_grad_input: grad_output [..., N] @ W -> [...,
  // in_features], reading the packed values (row-major or block-transposed) through that index.
  // bsr_linear_grad_values: grad_output^T @ input on the kept blocks only -> [nnz_blocks, bh, bw] in values' layout
  // and dtype (values is read for its shape and layout only).
  m.def("bsr_column_index(Tensor crow_indices, Tensor col_indices, int n_block_cols) -> (Tensor, Tensor)");
  m.def("bsr_linear_grad_input(Tensor grad_output, Tensor values, Tensor col_ptr, Tensor col_entries, "
        "int in_features) -> Tensor");
  m.def("bsr_linear_grad_values(Tensor grad_output, Tensor input, Tensor values, Tensor crow_indices, "
        "Tensor col_indices) -> Tensor");
  // The same and the bias gradient [out_features] (grad_output's column sums, in grad_output's dtype), the float32
  // kernels summing the grad_output rows they read anyway: (grad_values, grad_bias).
  m.def("bsr_linear_grad_values_bias(Tensor grad_output, Tensor input, Tensor values, Tensor crow_indices, "
        "Tensor col_indices) -> (Tensor, Tensor)");
  // y = F.linear(input, W, bias) with W [out_features, in_features] zero outside the kept rows out_index and
  // kept columns in_index (int32, strictly increasing); values [len(out_index), len(in_index)] holds the kept part.
  // bias covers all out_features: dropped outputs equal their bias (or 0).
  m.def("channel_sparse_linear(Tensor input, Tensor values, Tensor out_index, Tensor in_index, Tensor? bias, "
        "int out_features) -> Tensor");
  // y = F.conv2d(input, W, bias, stride, padding, dilation) with W [out_channels, in_channels, kh, kw] zero
  // outside the kept output channels out_index and input channels in_index; values [len(out), len(in), kh, kw].
  m.def("channel_sparse_conv2d(Tensor input, Tensor values, Tensor out_index, Tensor in_index, Tensor? bias, "
        "int out_channels, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  // y [B, Ho, Wo, out_channels] = F.conv2d of a zero-padded NHWC input [B, Hp, Wp, C] (no further padding) with
  // W [out_channels, kh*kw*C] block-sparse in BSR form, tap-major columns ((tap_h * kw + tap_w) * C + channel):
  // an implicit im2col, nothing copied. CPU only, float32; see bsr_conv2d_unsupported for what it needs.
  // activation and residual ([B, Ho, Wo, out_channels]): fused as in bsr_linear_act.
  m.def("bsr_conv2d_nhwc(Tensor input, Tensor values, Tensor crow_indices, Tensor col_indices, Tensor? bias, "
        "int out_channels, int[2] kernel_size, int[2] stride, int[2] dilation, str? activation=None, "
        "Tensor? residual=None) -> Tensor");
  // y = F.linear(input, W, bias) with W [out_features, in_features] unstructured-sparse, float32, in column-blocked
  // CSR (csrc/cpu/kernels/unstructured_linear.h): segment_ptr [ceil(in_features / 128) * out_features + 1] int32,
  // values [nnz] float32 and columns [nnz] int32. CPU only.
  m.def("unstructured_linear(Tensor input, Tensor values, Tensor columns, Tensor segment_ptr, Tensor? bias, "
        "int out_features) -> Tensor");
  // activation(unstructured_linear + residual) with both fused into the kernel's stores, as bsr_linear_act (no
  // autograd: layers call it when no gradient is wanted).
  m.def("unstructured_linear_act(Tensor input, Tensor values, Tensor columns, Tensor segment_ptr, Tensor? bias, "
        "int out_features, str? activation=None, Tensor? residual=None) -> Tensor");
  // Its backward on the CPU, float32. unstructured_transpose: W^T [in_features, out_features] in the same format,
  // (columns_t, segment_ptr_t, perm) with values_t = values[perm] (grad_input is unstructured_linear on it);
  // grad_values = grad_output^T @ input at the kept entries -> [nnz] in the order of columns.
  m.def("unstructured_transpose(Tensor columns, Tensor segment_ptr, int in_features, int out_features) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("unstructured_linear_grad_values(Tensor grad_output, Tensor input, Tensor columns, Tensor segment_ptr) "
        "-> Tensor");
  // Scaled-dot-product attention of query [B, H, Sq, D] with key [B, Hk, Skv, D] and value [B, Hk, Skv, Dv] (H a
  // multiple of Hk: grouped-query heads), returned as [B, Sq, H, Dv] (heads next to the features: the layout the
  // output projection reads). attn_mask broadcasts to [B, H, Sq, Skv]: bool (True = attend) or float (added to the
  // scores); is_causal lets query i see keys j <= i (together with a mask, both apply); scale defaults to
  // 1 / sqrt(D). A query row that sees no key gives zeros, as torch's. CPU, float32, inference (no autograd).
  m.def("attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, bool is_causal=False, "
        "float? scale=None) -> Tensor");
  // Training: the same output and the log-sum-exp of each query row's scores, [B, H, Sq] (+inf for a row that sees
  // no key), from which attention_backward recomputes the weights; its autograd formula is registered from Python
  // (pysparse/ops/attention.py). attention_backward returns the gradients of query, key and value as
  // [B, Sq, H, D], [B, Skv, Hk, D] and [B, Skv, Hk, Dv] (transposed views give the inputs' shapes).
  m.def("attention_forward(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, bool is_causal=False, "
        "float? scale=None) -> (Tensor, Tensor)");
  m.def("attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, Tensor logsumexp, "
        "Tensor? attn_mask=None, bool is_causal=False, float? scale=None) -> (Tensor, Tensor, Tensor)");
  // Exact GELU (as F.gelu) and its gradient from the pre-activation (as aten::gelu_backward), float32 on the CPU: the
  // activation of a sparse layer in training, whose kernel stores the pre-activation (pysparse.ops.gelu).
  m.def("gelu(Tensor input) -> Tensor");
  // Bool [rows]: the rows of grad ([M, N], floating point) the backward of a sparse layer computes: those holding
  // anything but +-0 (NaN and inf count), those whose row of input ([M, K]) holds inf or NaN, and all of them when
  // values does; the other rows (padding tokens) are skipped (pysparse/ops/gradient_rows.py).
  m.def("nonzero_rows(Tensor grad, Tensor? input=None, Tensor? values=None) -> Tensor");
  // [m, K]: part's rows at the increasing indices rows, zeros elsewhere (grad_input of the skipped rows).
  m.def("rows_to_full(Tensor part, Tensor rows, int m) -> Tensor");
  m.def("gelu_backward(Tensor grad_output, Tensor input) -> Tensor");
}

namespace {

PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(pysparse::active_cpu_isa()); }

PyObject* implicit_conv2d(PyObject*, PyObject*) { return PyBool_FromLong(pysparse::bsr_conv2d_available()); }

// cpu_reads_transposed(bh, bw, dtype): whether this machine's CPU path reads (bh, bw) blocks of dtype ("float32",
// "bfloat16" or "float16") transposed at every batch size (the broadcast kernel): then SparseLinear stores its values
// block-transposed.
PyObject* cpu_reads_transposed(PyObject*, PyObject* args) {
  long long bh = 0, bw = 0;
  const char* dtype = nullptr;
  if (!PyArg_ParseTuple(args, "LLs", &bh, &bw, &dtype)) return nullptr;
  pysparse::BsrProblem p;
  p.M = 1, p.bh = bh, p.bw = bw;
  if (bh < 1 || bw < 1) Py_RETURN_FALSE;
  const std::string name(dtype);
  if (name == "float32") return PyBool_FromLong(pysparse::bsr_linear_reads_transposed<float>(p));
  if (name == "bfloat16") return PyBool_FromLong(pysparse::bsr_linear_reads_transposed<pysparse::bfloat16_t>(p));
  if (name == "float16") return PyBool_FromLong(pysparse::bsr_linear_reads_transposed<pysparse::float16_t>(p));
  PyErr_Format(PyExc_ValueError, "dtype must be float32, bfloat16 or float16, got %s", dtype);
  return nullptr;
}

// force_cpu_path(isa, bcast): pysparse::force_cpu_path (CpuIsa value or -1; broadcast kernel 0 / 1 / -1 default).
PyObject* force_cpu_path(PyObject*, PyObject* args) {
  int isa = -1, bcast = -1;
  if (!PyArg_ParseTuple(args, "ii", &isa, &bcast)) return nullptr;
  return PyBool_FromLong(pysparse::force_cpu_path(isa, bcast));
}

// cpu_path(): (CpuIsa value, broadcast kernel on) of the path the next call runs.
PyObject* cpu_path(PyObject*, PyObject*) {
  const pysparse::CpuPath path = pysparse::current_cpu_path();
  return Py_BuildValue("(iO)", static_cast<int>(path.isa), path.bcast ? Py_True : Py_False);
}

// cpu_path_request(): force_cpu_path's current request, (isa, bcast), -1 where none.
PyObject* cpu_path_request(PyObject*, PyObject*) {
  const pysparse::CpuPathRequest request = pysparse::forced_cpu_path();
  return Py_BuildValue("(ii)", request.isa, request.bcast);
}

// cpu_isa_supported(isa): whether this CPU runs the CpuIsa value isa.
PyObject* cpu_isa_supported(PyObject*, PyObject* args) {
  int isa = 0;
  if (!PyArg_ParseTuple(args, "i", &isa)) return nullptr;
  if (isa < 0 || isa > pysparse::kLastCpuIsa) Py_RETURN_FALSE;
  return PyBool_FromLong(pysparse::cpu_isa_supported(static_cast<pysparse::CpuIsa>(isa)));
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "Name of the CPU kernel path chosen at load: avx512, avx2 or generic."},
    {"implicit_conv2d", implicit_conv2d, METH_NOARGS, "Whether torch.ops.pysparse.bsr_conv2d_nhwc runs on this CPU."},
    {"cpu_reads_transposed", cpu_reads_transposed, METH_VARARGS,
     "Whether the CPU kernels read (bh, bw) blocks of dtype transposed at every batch size (SparseLinear's layout)."},
    {"force_cpu_path", force_cpu_path, METH_VARARGS,
     "Test hook: run the CPU kernels on (isa, bcast) from the next call on (-1: the choice at load); "
     "False if refused."},
    {"cpu_path", cpu_path, METH_NOARGS, "(isa id, broadcast kernel on) of the CPU path the next call runs."},
    {"cpu_path_request", cpu_path_request, METH_NOARGS, "force_cpu_path's current request (-1: none)."},
    {"cpu_isa_supported", cpu_isa_supported, METH_VARARGS, "Whether this CPU runs the CPU path with this isa id."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

// pysparse._C is imported for its side effect: loading the library registers the ops above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "pysparse kernels (torch.ops.pysparse)", -1,
                                          methods};
  return PyModule_Create(&module_def);
}
