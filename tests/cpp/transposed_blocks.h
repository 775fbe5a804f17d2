// The broadcast kernel's weight layout, built the plain way for tests: out[b][j][i] = values[b][i][j].
#pragma once
#include <cstdint>
#include <vector>

template <typename E>
std::vector<E> transposed_blocks(const std::vector<E>& values, int64_t bh, int64_t bw) {
  std::vector<E> out(values.size());
  const int64_t elems = bh * bw, nnz = elems ? int64_t(values.size()) / elems : 0;
  for (int64_t b = 0; b < nnz; ++b)
    for (int64_t i = 0; i < bh; ++i)
      for (int64_t j = 0; j < bw; ++j) out[size_t(b * elems + j * bh + i)] = values[size_t(b * elems + i * bw + j)];
  return out;
}
