// CPU implementation of pysparse::nonzero_rows (the rows of grad_output a sparse layer's backward must compute) and
// pysparse::rows_to_full (its grad_input put back at those rows, zeros elsewhere).
// The rows of padding tokens (a loss over the real positions gives them no gradient) are exactly zero and add nothing
// to grad_input or grad_values, so the kernels run on the other rows only (pysparse/ops/gradient_rows.py). A zero
// gradient times inf or NaN is NaN in a dense product, so a zero row is still kept where its row of input holds one,
// and every row is kept where the weight's values do: the skipped rows change no result.
//
// Parallel strategy: rows split statically over the threads; a row is read in blocks of 64 elements (bit tests
// the compiler vectorises), and left at the first block that decides it: a row with a gradient usually costs one.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

#include "cpu/output_pool.h"

namespace pysparse {
namespace {

// Bit masks of one floating-point format: the magnitude (all but the sign) and the exponent (all ones: inf / NaN).
template <typename Bits>
struct Format {
  Bits magnitude, exponent;
};

constexpr int64_t kBlock = 64;

template <typename Bits>
bool any_nonzero(const Bits* x, int64_t n, Format<Bits> f) {
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    Bits any = 0;
    for (int64_t j = j0; j < std::min(n, j0 + kBlock); ++j) any |= x[j] & f.magnitude;
    if (any != 0) return true;
  }
  return false;
}

template <typename Bits>
bool any_non_finite(const Bits* x, int64_t n, Format<Bits> f) {
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    bool any = false;
    for (int64_t j = j0; j < std::min(n, j0 + kBlock); ++j) any |= (x[j] & f.exponent) == f.exponent;
    if (any) return true;
  }
  return false;
}

template <typename Bits>
void mark_rows(const at::Tensor& grad, const at::Tensor* input, const at::Tensor* values, Format<Bits> f,
               bool* keep) {
  const int64_t m = grad.size(0);
  if (values && any_non_finite(static_cast<const Bits*>(values->const_data_ptr()), values->numel(), f)) {
    std::fill(keep, keep + m, true);
    return;
  }
  const Bits* g = static_cast<const Bits*>(grad.const_data_ptr());
  const Bits* x = input ? static_cast<const Bits*>(input->const_data_ptr()) : nullptr;
  const int64_t n = grad.size(1), k = input ? input->size(1) : 0;
  at::parallel_for(0, m, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) keep[r] = any_nonzero(g + r * n, n, f) || (x && any_non_finite(x + r * k, k, f));
  });
}

void check(const char* name, const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "nonzero_rows: ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "nonzero_rows: ", name, " must have grad's dtype ", dtype, ", got ",
                   t.scalar_type());
}

at::Tensor nonzero_rows_cpu_op(const at::Tensor& grad, const std::optional<at::Tensor>& input,
                               const std::optional<at::Tensor>& values) {
  TORCH_CHECK_VALUE(grad.dim() == 2, "nonzero_rows: grad must be 2-D, got ", grad.dim(), "-D");
  check("grad", grad, grad.scalar_type());
  const at::Tensor g = grad.contiguous();
  at::Tensor x, w;
  if (input) {
    check("input", *input, g.scalar_type());
    TORCH_CHECK_VALUE(input->dim() == 2 && input->size(0) == g.size(0), "nonzero_rows: input must be 2-D with grad's ",
                      g.size(0), " rows, got shape ", input->sizes());
    x = input->contiguous();
  }
  if (values) {
    check("values", *values, g.scalar_type());
    w = values->contiguous();
  }
  at::Tensor keep = at::empty({g.size(0)}, g.options().dtype(at::kBool));
  bool* flags = keep.mutable_data_ptr<bool>();
  const at::Tensor* xp = input ? &x : nullptr;
  const at::Tensor* wp = values ? &w : nullptr;
  switch (g.scalar_type()) {
    case at::kFloat: mark_rows<uint32_t>(g, xp, wp, {0x7fffffffu, 0x7f800000u}, flags); break;
    case at::kDouble:
      mark_rows<uint64_t>(g, xp, wp, {0x7fffffffffffffffull, 0x7ff0000000000000ull}, flags);
      break;
    case at::kBFloat16: mark_rows<uint16_t>(g, xp, wp, {0x7fff, 0x7f80}, flags); break;
    case at::kHalf: mark_rows<uint16_t>(g, xp, wp, {0x7fff, 0x7c00}, flags); break;
    default:
      TORCH_CHECK_TYPE(false, "nonzero_rows: grad must be float32, float64, bfloat16 or float16, got ",
                       g.scalar_type());
  }
  return keep;
}

// out[rows[i]] = part[i], zeros in the other rows of [m, K]: one pass writing each row once, into a pooled buffer
// (a fresh zeroed tensor of MiniLM's grad_input size paid its page faults on every call). Rows split over threads.
at::Tensor rows_to_full_cpu_op(const at::Tensor& part, const at::Tensor& rows, int64_t m) {
  TORCH_CHECK_VALUE(part.dim() == 2 && part.device().is_cpu(), "rows_to_full: part must be a 2-D CPU tensor, got ",
                    part.dim(), "-D on ", part.device());
  TORCH_CHECK_TYPE(rows.scalar_type() == at::kLong, "rows_to_full: rows must be int64, got ", rows.scalar_type());
  TORCH_CHECK_VALUE(rows.dim() == 1 && rows.size(0) == part.size(0), "rows_to_full: rows must be 1-D with part's ",
                    part.size(0), " rows, got shape ", rows.sizes());
  TORCH_CHECK_VALUE(m >= part.size(0), "rows_to_full: m must be at least part's rows ", part.size(0), ", got ", m);
  const at::Tensor src = part.contiguous(), idx = rows.contiguous();
  const int64_t* r = idx.const_data_ptr<int64_t>();
  const int64_t n = idx.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(r[i] >= 0 && r[i] < m && (i == 0 || r[i] > r[i - 1]),
                      "rows_to_full: rows must be increasing indices in [0, ", m, "), got ", r[i], " at ", i);
  }
  at::Tensor out = empty_output({m, src.size(1)}, src.options());
  const size_t row_bytes = static_cast<size_t>(src.size(1)) * src.element_size();
  const char* from = static_cast<const char*>(src.const_data_ptr());
  char* to = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, m, 256, [&](int64_t r0, int64_t r1) {
    int64_t i = std::lower_bound(r, r + n, r0) - r;  // the first listed row at or after r0
    for (int64_t row = r0; row < r1; ++row) {
      if (i < n && r[i] == row) {
        std::memcpy(to + row * row_bytes, from + i * row_bytes, row_bytes);
        ++i;
      } else {
        std::memset(to + row * row_bytes, 0, row_bytes);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) {
  m.impl("nonzero_rows", &nonzero_rows_cpu_op);
  m.impl("rows_to_full", &rows_to_full_cpu_op);
}

}  // namespace pysparse
