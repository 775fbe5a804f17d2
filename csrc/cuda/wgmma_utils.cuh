// Thin wrappers over the sm90a warpgroup MMA (wgmma) PTX: shared-memory matrix descriptors, the async MMA
// for m64 x {32, 64} x k16 tiles with fp32 accumulators (bf16 or fp16 operands, both K-major), and its
// fence / commit / wait. Only meaningful in code compiled for sm_90a (guarded by the caller).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace pysparse::wgmma {

// Descriptor of a K-major tile whose rows are 128 bytes with the 128-byte swizzle (16-byte chunk c of row r
// stored at chunk c ^ (r % 8)), 8-row groups 1024 bytes apart, starting 1024-byte aligned (or advanced by a
// multiple of 32 bytes inside the row, to select a k16 slice).
__device__ __forceinline__ uint64_t desc_k_major_sw128(uint32_t smem_byte_addr) {
  uint64_t d = uint64_t((smem_byte_addr & 0x3FFFF) >> 4);  // start address, 16-byte units
  d |= uint64_t(1) << 16;                                  // leading byte offset: unused with this swizzle
  d |= uint64_t(1024 >> 4) << 32;                          // stride byte offset: next 8-row group
  d |= uint64_t(1) << 62;                                  // swizzle mode: 128 bytes
  return d;
}

__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Shared memory written through the generic proxy (cp.async, st.shared) and read next by wgmma (the async
// proxy) needs this fence in each writing thread before the barrier that publishes it.
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Keeps the compiler from moving accumulator registers while an async MMA that writes them is in flight.
template <int NT>
__device__ __forceinline__ void pin(float (&d)[NT][4]) {
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) asm volatile("" : "+f"(d[j][r])::"memory");
}

// D(64 x N) += A(64 x 16, descriptor) * B(N x 16, descriptor)^T; D in the mma.sync fragment layout per warp:
// d[j][r] is row 16 * (warp % 4) + lane / 4 + 8 * (r / 2), column 8j + 2 * (lane % 4) + r % 2.
#define PYSPARSE_WGMMA_M64N32K16(TY)                                         \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"                  \
               "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY " {"  \
               "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15"       \
               "}, %16, %17, p, 1, 1, 0, 0;\n}\n"                            \
               : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), \
                 "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), \
                 "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), \
                 "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3])  \
               : "l"(desc_a), "l"(desc_b), "r"(1))

#define PYSPARSE_WGMMA_M64N64K16(TY)                                             \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                      \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {"      \
               "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"          \
               "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31" \
               "}, %32, %33, p, 1, 1, 0, 0;\n}\n"                                \
               : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),     \
                 "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),     \
                 "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),     \
                 "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),     \
                 "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),     \
                 "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),     \
                 "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),     \
                 "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])      \
               : "l"(desc_a), "l"(desc_b), "r"(1))

template <typename T, int N>
__device__ __forceinline__ void mma_m64k16(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b) {
  static_assert(N == 32 || N == 64, "wgmma tiles of 32 or 64 outputs");
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  if constexpr (N == 64 && kBf16) {
    PYSPARSE_WGMMA_M64N64K16("bf16");
  } else if constexpr (N == 64) {
    PYSPARSE_WGMMA_M64N64K16("f16");
  } else if constexpr (kBf16) {
    PYSPARSE_WGMMA_M64N32K16("bf16");
  } else {
    PYSPARSE_WGMMA_M64N32K16("f16");
  }
}
#undef PYSPARSE_WGMMA_M64N32K16
#undef PYSPARSE_WGMMA_M64N64K16

}  // namespace pysparse::wgmma
