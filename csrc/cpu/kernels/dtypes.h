// Torch-free 16-bit float storage types for the kernel core, bit-compatible with at::BFloat16 / at::Half.
#pragma once
#include <cstdint>
#include <cstring>

namespace pysparse {

struct bfloat16_t {
  uint16_t bits;
};
struct float16_t {
  uint16_t bits;
};

inline float to_float(float v) { return v; }

inline float to_float(bfloat16_t v) {
  uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float to_float(float16_t v) {
  const uint32_t h = v.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      u = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
T from_float(float f);

template <>
inline float from_float<float>(float f) { return f; }

template <>
inline bfloat16_t from_float<bfloat16_t>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bfloat16_t{uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bfloat16_t{uint16_t(u >> 16)};
}

template <>
inline float16_t from_float<float16_t>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return float16_t{uint16_t(sign | 0x7e00u)};  // NaN
  if (abs >= 0x477ff000u) return float16_t{uint16_t(sign | 0x7c00u)};  // overflow -> inf
  if (abs < 0x38800000u) {  // subnormal or zero in half precision
    if (abs < 0x33000000u) return float16_t{uint16_t(sign)};
    const uint32_t e = abs >> 23;
    uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // value / 2^-24 == mant24 >> (126 - e)
    const uint32_t halfway = 1u << (shift - 1);
    uint32_t r = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
    return float16_t{uint16_t(sign | r)};
  }
  uint32_t h = ((abs - 0x38000000u) >> 13);
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return float16_t{uint16_t(sign | h)};
}

}  // namespace pysparse
