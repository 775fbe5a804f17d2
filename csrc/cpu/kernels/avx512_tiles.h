// Register-tile shapes of the AVX-512 path (16 floats per vector, 32 vector registers). Shared with the test build
// that runs the same kernel templates on 16-lane vectors emulated with AVX2 register pairs
// (tests/cpp/avx2_as_16_lanes.cpp), so that build checks exactly the tiles the AVX-512 path runs.
#pragma once

namespace pysparse {

struct Avx512Tiles {
  static constexpr int L = 16;
  // 8 outputs x 3 vectors (48 tokens): 24 accumulators + 3 x vectors + 1 broadcast of the 32 registers.
  static constexpr int kVecs = 3;
  static constexpr int outer_rows(int) { return 8; }
  static constexpr int dot_rows(int) { return 8; }  // 8 x 3 accumulators at most
  // Broadcast kernel: T tokens x NVO vectors (T*NVO accumulators + NVO weights + 1 broadcast <= 32). Off unless
  // PYSPARSE_CPU_BCAST=1 until it is measured on an AVX-512 machine (dispatch.cpp).
  static constexpr int bcast_tokens(int nvo) { return nvo == 4 ? 4 : nvo == 2 ? 12 : 16; }
  // The broadcast kernel widens bfloat16 weights one vector at a time (the AVX2 path's split loads are not measured
  // on AVX-512).
  static constexpr bool kBf16Split = false;
};

}  // namespace pysparse
