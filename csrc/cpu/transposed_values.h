// The broadcast kernel's weight layout, built once per weight instead of on every call.
//
// Why: the broadcast kernel (float32, large M) reads each block transposed ([bw][bh]). Built per call, that copy
// and its barrier cost 5-20% of a 90%-sparse layer and ~25% of a 50%-sparse one (benchmarks/NOTES_cpu.md v14).
// The copy is kept per values tensor while that tensor lives and is unchanged: an in-place update (an optimizer
// step bumps the version counter) or new storage makes the next call build it again. The cache holds at most
// PYSPARSE_CPU_TRANSPOSED_CACHE_MB megabytes (default 1024; 0 turns it off); a weight that does not fit is
// transposed per call as before. Inference tensors (made under torch.inference_mode) track no version, so they
// are never cached.
#pragma once
#include <ATen/ATen.h>

namespace pysparse {

// values ([nnz, bh, bw] float32, contiguous, on the CPU) with each block transposed, [nnz, bw, bh]: from the cache,
// or built now and cached. An undefined tensor when the cache is off, full or cannot tell when values changes.
at::Tensor cached_transposed_values(const at::Tensor& values);

// Bytes the cache holds now (tests).
size_t transposed_values_cache_bytes();

}  // namespace pysparse
