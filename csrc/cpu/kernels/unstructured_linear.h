// Torch-free unstructured sparse linear kernels: y[M, N] = x[M, K] @ W^T + bias, float32, W [N, K] with any
// pattern of zeros (block size 1x1), stored the way the kernels walk it.
//
// Format ("column-blocked CSR"): the columns are cut into blocks of 128, 256 or 512 (the width); segment
// (b, n) = b * N + n holds row n's nonzeros in column block b, at [segment_ptr[b * N + n], segment_ptr[b * N + n + 1])
// of values and columns (global column indices, increasing within a segment). segment_ptr has n_blocks * N + 1
// entries, n_blocks = ceil(K / width); block-major order means the kernels read values and columns front to back.
// The width is not stored: segment_ptr's length fixes it (unstructured_block_cols).
//
// Why this layout: the kernels vectorise over tokens. x is packed K-major for a tile of W tokens ([K][W], W = 64 on
// AVX-512), and each nonzero is one broadcast of its value and W / L multiply-adds with xT[column, 0:W]. The x loads
// are the bound (one vector per multiply-add, with no reuse between rows of an unstructured weight), so they must hit
// L1: one column block of the tile (128 x 64 floats = 32 KB) is walked by every row of a thread's chunk before the
// next block, the rows' partial sums living in a [rows][W] buffer between blocks. No padding is stored.
// At small M (kUnstructuredGatherTokens) the same segments feed gathers of x instead (one token at a time; the
// weights are streamed once per token).
// Why several widths: a segment costs a loop exit and a load and store of its row's partial sums, and at high
// sparsity a 128-column segment holds a dozen entries; wider blocks make fewer, longer segments, at the price of an
// x tile block that no longer fits L1 at low sparsity. The kernels run any of them; the layers choose
// (pysparse.ops.kernel_block_cols).
#pragma once
#include <cstdint>
#include <string>

#include "activation.h"  // Activation, activate (the fused epilogue)
#include "bsr_linear.h"  // CpuIsa, active_cpu_isa_id

namespace pysparse {

// The narrowest column-block width (the format's default) and the widest; the widths are 128 << i up to the widest.
constexpr int64_t kUnstructuredBlockCols = 128;
constexpr int64_t kUnstructuredBlockColsWidest = 512;

// The column-block width of a weight with in_features K cut into n_blocks blocks: the width w of the format with
// ceil(K / w) == n_blocks, 0 when there is none. Two widths giving one count give the same blocks (a count of 1 is a
// single block [0, K); from 2 on a count belongs to one width): the narrowest is returned.
int64_t unstructured_block_cols(int64_t K, int64_t n_blocks);
// Below this many tokens AVX-512 CPUs gather x at each entry's column, token by token (a tile of vector lanes would
// hold mostly padding tokens). The gathers are 8 lanes wide on every SIMD path: the AVX-512 path runs the AVX2
// path's (a segment holds 13-64 entries at 90-50% sparsity, and a 16-lane gather's masked tail wastes more of it;
// Sapphire Rapids, 2 threads, 4 shapes x 50/70/90% x M = 1-3: 0.98-1.18x, geomean 1.10x, over 16-lane gathers).
constexpr int64_t kUnstructuredGatherTokens = 4;
// CPUs whose widest path is AVX2 gather only at batch 1: there the 32-token tiles (mostly padding) beat the gathers
// from 2 tokens on (AMD Zen 3, 2 threads, the 4 FFN shapes at 90%, two of them at 50 and 70%, alternated in one
// process: M = 2 1.1-1.75x, M = 3 1.7-2.4x; M = 1 0.65-1.0x, where the gathers stay).
constexpr int64_t kUnstructuredGatherTokensAvx2 = 2;

struct UnstructuredProblem {
  int64_t M = 0;         // tokens (rows of x and y)
  int64_t K = 0;         // in_features
  int64_t N = 0;         // out_features
  int64_t ldx = 0;       // row stride of x, in elements (>= K)
  int64_t block_cols = kUnstructuredBlockCols;  // the column-block width
  int64_t n_blocks = 0;                           // ceil(K / block_cols)
  int64_t nnz = 0;       // values and columns hold nnz entries
  // The forward's fused epilogue: y = act(x @ W^T + bias + residual), residual [M, N] (row stride N) or null.
  Activation act = Activation::kNone;
  const float* residual = nullptr;
};

// "" when segment_ptr [n_blocks * N + 1] and columns [nnz] are safe to run for p (check_unstructured_pointers, and
// every column lies in its segment's column block and below K), else a message naming what is wrong.
// O(n_blocks * N + nnz). The backward's kernels rely on it (or on a format that ran it) for memory safety. The order
// within a segment (strictly increasing) is the format's convention, checked by
// pysparse.formats.UnstructuredSparseWeight.validate: the kernels compute the same sum in any order.
std::string check_unstructured_indices(const int32_t* segment_ptr, const int32_t* columns,
                                       const UnstructuredProblem& p);
// The pointer half of it: p.block_cols a width of the format and n_blocks = ceil(K / block_cols); segment_ptr starts
// at 0, never decreases and ends at nnz. O(n_blocks * N): what the forward needs checked before it runs (it checks the
// columns itself, where it reads them).
std::string check_unstructured_pointers(const int32_t* segment_ptr, const UnstructuredProblem& p);

// Runs the kernel of this machine's CPU path (active_cpu_isa_id) with `num_threads` OpenMP threads. bias may be null.
// y is [M, N] row-major. Thread-safe: concurrent calls share nothing. segment_ptr must have passed
// check_unstructured_pointers for p; the columns are checked here, where each path first reads them (so that a
// weight streamed from memory is read once, not once by a check and once by the product): the batch-1 gathers test
// each vector of columns as they load it and gather only the lanes inside their block, a few-token tile checks a
// chunk's columns block by block just before walking them, and many tiles check the whole weight first. Returns
// false, y unspecified, when a column lies outside its block (check_unstructured_indices then names it).
bool unstructured_linear_cpu(const float* x, const float* values, const int32_t* columns, const int32_t* segment_ptr,
                             const float* bias, float* y, const UnstructuredProblem& p, int num_threads);

// Same, on a given path (tests force every path the machine can run); `isa` must be supported.
bool unstructured_linear_cpu_isa(CpuIsa isa, const float* x, const float* values, const int32_t* columns,
                                 const int32_t* segment_ptr, const float* bias, float* y, const UnstructuredProblem& p,
                                 int num_threads);

// Backward of the weight, same paths and threads: grad_values [nnz], entry s at (row n, column k) gets the sum over
// tokens t of grad_y[t, n] * x[t, k]; grad_y is [M, N] row-major, p.ldx is x's row stride. Thread-safe like the
// forward. (grad_x = grad_y @ W is unstructured_linear_cpu on W^T, from unstructured_transpose.)
void unstructured_linear_grad_values_cpu(const float* grad_y, const float* x, const int32_t* columns,
                                         const int32_t* segment_ptr, float* grad_values, const UnstructuredProblem& p,
                                         int num_threads);
void unstructured_linear_grad_values_cpu_isa(CpuIsa isa, const float* grad_y, const float* x, const int32_t* columns,
                                             const int32_t* segment_ptr, float* grad_values,
                                             const UnstructuredProblem& p, int num_threads);

// The format of W^T [K, N] from W's indices (which must have passed check_unstructured_indices for p): its
// columns_t [nnz] and segment_ptr_t [ceil(N / 128) * K + 1] (the narrowest width, whatever W's), and perm [nnz]: entry
// i of W^T is entry perm[i] of W.
// A counting sort, O(nnz + segments), one thread; built once per weight layout (the Python side caches it).
void unstructured_transpose(const int32_t* columns, const int32_t* segment_ptr, const UnstructuredProblem& p,
                            int32_t* columns_t, int32_t* segment_ptr_t, int32_t* perm);

}  // namespace pysparse
