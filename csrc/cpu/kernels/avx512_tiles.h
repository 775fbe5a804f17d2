// Register-tile shapes of the AVX-512 path (16 floats per vector, 32 vector registers). Shared with the test build
// that runs the same kernel templates on 16-lane vectors emulated with AVX2 register pairs
// (tests/cpp/avx2_as_16_lanes.cpp), so that build checks exactly the tiles the AVX-512 path runs.
#pragma once

#include <cstdint>

namespace pysparse {

struct Avx512Tiles {
  static constexpr int L = 16;
  // 8 outputs x 3 vectors (48 tokens): 24 accumulators + 3 x vectors + 1 broadcast of the 32 registers.
  static constexpr int kVecs = 3;
  static constexpr int outer_rows(int) { return 8; }
  static constexpr int dot_rows(int) { return 8; }  // 8 x 3 accumulators at most
  // Broadcast kernel: T tokens x NVO vectors (T*NVO accumulators + NVO weights + 1 broadcast <= 32).
  static constexpr int bcast_tokens(int nvo) { return nvo == 4 ? 4 : nvo == 2 ? 12 : 16; }
  // It runs float32 up to 16 tokens, on the transposed blocks, which the outer-product kernel then reads at larger M
  // (Sapphire Rapids, 2 threads, 32x32 at 90%, 768->3072 and 576->2304: against the dot / outer-product kernels 1.1-1.2x
  // at M = 1, 1.6x at 4, 1.5-2.2x at 8, even at 16, 0.9x at 32, 0.7x at 64-128; BENCHMARKS.md). 16-bit weights keep
  // the other kernels (not measured on AVX-512).
  static constexpr int64_t kBcastMaxTokens = 16;
  static constexpr bool kBcast16Bit = false;
  // The broadcast kernel widens bfloat16 weights one vector at a time (the AVX2 path's split loads are not measured
  // on AVX-512).
  static constexpr bool kBf16Split = false;
};

}  // namespace pysparse
