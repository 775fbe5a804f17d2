// Torch-free unstructured sparse linear kernels: y[M, N] = x[M, K] @ W^T + bias, float32, W [N, K] with any
// pattern of zeros (block size 1x1), stored the way the kernels walk it.
//
// Format ("row groups"): output rows are taken kUnstructuredGroupRows (4) at a time. Group g covers rows 4g..4g+3
// (rows >= N are absent) and owns the steps [group_ptr[g], group_ptr[g + 1]). Step s holds one slot per row of the
// group: slot 4s + r is row 4g + r's next nonzero, values[4s + r] at column columns[4s + r]. A row's nonzeros come
// in increasing column order; a row that has run out (and an absent row) fills its slots with padding: column K,
// value 0. The kernels pack x with an extra zero column K, so padding adds 0 * 0 and never reads out of range, and
// a non-finite x never meets a dropped weight.
//
// Why this layout: the kernels vectorise over tokens. x is packed K-major for a tile of W tokens ([K + 1][W]), and
// one step of a group is, for each of its 4 rows, a broadcast of the value and W / L multiply-adds with
// xT[column, 0:W]: 4 rows x W / L independent accumulators in registers (enough to hide the multiply-add latency),
// the value and column read once per tile in the order they sit in memory. Rows of one group hold nearly equal
// counts for random masks, so padding costs a few percent (4.5 extra steps in 38 at 90% of K = 384). At M < 4 the
// same slots feed gathers of x instead (one token at a time; the weights are streamed once per token).
#pragma once
#include <cstdint>
#include <string>

#include "bsr_linear.h"  // CpuIsa, active_cpu_isa_id

namespace pysparse {

constexpr int64_t kUnstructuredGroupRows = 4;

struct UnstructuredProblem {
  int64_t M = 0;         // tokens (rows of x and y)
  int64_t K = 0;         // in_features; column K is the padding column
  int64_t N = 0;         // out_features
  int64_t ldx = 0;       // row stride of x, in elements (>= K)
  int64_t n_groups = 0;  // ceil(N / 4)
  int64_t steps = 0;     // group_ptr[n_groups]: values and columns hold 4 * steps slots
};

// "" when group_ptr [n_groups + 1] and columns [4 * steps] are well formed for p (group_ptr starts at 0, never
// decreases and ends at p.steps; every column lies in [0, K]; within a row, real columns strictly increase and
// padding comes last), else a message naming what is wrong. O(n_groups + slots); the kernels rely on it (or on a
// format that ran it) for memory safety.
std::string check_unstructured_indices(const int32_t* group_ptr, const int32_t* columns, const UnstructuredProblem& p);

// Runs the kernel of this machine's CPU path (active_cpu_isa_id) with `num_threads` OpenMP threads. bias may be null.
// y is [M, N] row-major. Thread-safe: concurrent calls share nothing.
void unstructured_linear_cpu(const float* x, const float* values, const int32_t* columns, const int32_t* group_ptr,
                             const float* bias, float* y, const UnstructuredProblem& p, int num_threads);

// Same, on a given path (tests force every path the machine can run); `isa` must be supported.
void unstructured_linear_cpu_isa(CpuIsa isa, const float* x, const float* values, const int32_t* columns,
                                 const int32_t* group_ptr, const float* bias, float* y, const UnstructuredProblem& p,
                                 int num_threads);

}  // namespace pysparse
