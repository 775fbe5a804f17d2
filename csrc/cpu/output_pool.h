// CPU output tensors of the pysparse ops, with their memory recycled.
//
// Why: glibc serves large blocks with fresh mmap()s and hands them back to the OS on free, so every call of a
// large layer wrote its output into never-touched pages and paid a page fault per 4 KB (ResNet-50, batch 8,
// sparse: ~23k faults and ~90 ms of system CPU time per forward). Buffers of at least kMinPooledBytes return
// here when their tensor's storage dies and serve the next output of the same byte size, pages already mapped.
// The pool holds at most PYSPARSE_CPU_OUTPUT_CACHE_MB megabytes (default 256; 0 turns it off); beyond that a
// freed buffer goes back to torch's allocator.
#pragma once
#include <ATen/ATen.h>

namespace pysparse {

// at::empty(sizes, options) for a CPU output, memory from the pool when the size is worth it.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace pysparse
