// float <-> bfloat16 / float16 conversions of the kernel core, checked exhaustively over all 16-bit patterns:
// exact widening, round trip of every finite value, round-to-nearest-even at every midpoint (subnormals and the
// overflow threshold included), inf and NaN. Widening of float16 is checked against an independent formula, and
// narrowing against the compiler's own _Float16 conversion where it has one.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>

#include "check.h"
#include "dtypes.h"

using pysparse::bfloat16_t;
using pysparse::float16_t;
using pysparse::from_float;
using pysparse::to_float;

namespace {

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t narrow_bits(bfloat16_t v) { return v.bits; }
uint16_t narrow_bits(float16_t v) { return v.bits; }

template <typename H>
float widen(uint16_t bits) {
  return to_float(H{bits});
}

template <typename H>
uint16_t narrow(float f) {
  return narrow_bits(from_float<H>(f));
}

// Value of a float16 bit pattern from the IEEE definition, computed in double.
double half_value(uint16_t h) {
  const int sign = (h >> 15) ? -1 : 1;
  const int exp = (h >> 10) & 0x1f;
  const int mant = h & 0x3ff;
  if (exp == 0) return sign * std::ldexp(double(mant), -24);
  if (exp == 0x1f) return mant ? std::numeric_limits<double>::quiet_NaN() : sign * HUGE_VAL;
  return sign * std::ldexp(double(1024 + mant), exp - 25);
}

// All checks that hold for both 16-bit formats. max_finite / inf are positive bit patterns of the format.
template <typename H>
void check_narrowing(const char* name, uint16_t max_finite, uint16_t inf) {
  // Round trip: every finite value (both signs, subnormals included) converts back to itself.
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    if ((h & 0x7fff) > max_finite) continue;
    const uint16_t back = narrow<H>(widen<H>(uint16_t(h)));
    CHECK(back == h, name << ": round trip of 0x" << std::hex << h << " gave 0x" << back);
  }
  // Between consecutive non-negative values a < b (b = inf for the last one, standing for the next power of two):
  // the midpoint goes to the one with the even last bit, anything off the midpoint to the nearer one.
  for (uint32_t a = 0; a <= max_finite; ++a) {
    const uint16_t b = uint16_t(a + 1);
    const double lo = widen<H>(uint16_t(a));
    const double hi = b == inf ? 2.0 * lo - widen<H>(uint16_t(a - 1)) : double(widen<H>(b));
    const float mid = float((lo + hi) / 2);  // exact: both formats have far fewer mantissa bits than float
    CHECK(double(mid) == (lo + hi) / 2, name << ": midpoint not exact at 0x" << std::hex << a);
    const uint16_t even = (a & 1u) ? b : uint16_t(a);
    for (int sign : {1, -1}) {
      const uint16_t s = sign > 0 ? 0 : 0x8000;
      const float m = float(sign) * mid;
      const uint16_t got_mid = narrow<H>(m);
      CHECK(got_mid == (even | s), name << ": midpoint " << m << " gave 0x" << std::hex << got_mid
                                        << ", expected 0x" << (even | s));
      const float below = std::nextafter(std::fabs(m), 0.0f), above = std::nextafter(std::fabs(m), HUGE_VALF);
      const uint16_t got_below = narrow<H>(float(sign) * below), got_above = narrow<H>(float(sign) * above);
      CHECK(got_below == (a | s), name << ": just below midpoint " << sign * below << " gave 0x" << std::hex
                                       << got_below << ", expected 0x" << (a | s));
      CHECK(got_above == (b | s), name << ": just above midpoint " << sign * above << " gave 0x" << std::hex
                                       << got_above << ", expected 0x" << (b | s));
    }
  }
  const float finf = std::numeric_limits<float>::infinity();
  CHECK(narrow<H>(finf) == inf, name << ": +inf");
  CHECK(narrow<H>(-finf) == (inf | 0x8000), name << ": -inf");
  CHECK(narrow<H>(std::numeric_limits<float>::max()) == inf, name << ": FLT_MAX must overflow to inf");
  CHECK(narrow<H>(0.0f) == 0 && narrow<H>(-0.0f) == 0x8000, name << ": signed zeros");
  // NaNs stay NaN, including those whose payload sits only in the bits that narrowing drops (a truncating
  // conversion would turn them into inf).
  for (uint32_t nan_bits : {0x7fc00000u, 0x7f800001u, 0xff800001u, 0x7fffffffu, 0x7f802000u}) {
    const uint16_t h = narrow<H>(float_of(nan_bits));
    CHECK((h & 0x7fff) > inf, name << ": NaN 0x" << std::hex << nan_bits << " became 0x" << h);
    CHECK((h & 0x8000) == ((nan_bits >> 16) & 0x8000), name << ": NaN sign lost for 0x" << std::hex << nan_bits);
    CHECK(std::isnan(widen<H>(h)), name << ": narrowed NaN does not widen to NaN");
  }
}

void check_bfloat16() {
  // Widening is exact: bfloat16 is the upper half of a float32.
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    const float f = widen<bfloat16_t>(uint16_t(h));
    CHECK(bits_of(f) == h << 16, "bfloat16 0x" << std::hex << h << " widened to 0x" << bits_of(f));
  }
  check_narrowing<bfloat16_t>("bfloat16", 0x7f7f, 0x7f80);
}

void check_float16() {
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    const float f = widen<float16_t>(uint16_t(h));
    const double want = half_value(uint16_t(h));
    if (std::isnan(want)) {
      CHECK(std::isnan(f), "float16 NaN 0x" << std::hex << h << " widened to " << f);
    } else {
      CHECK(double(f) == want && std::signbit(f) == bool(h & 0x8000),
            "float16 0x" << std::hex << h << " widened to " << f << ", expected " << want);
    }
  }
  check_narrowing<float16_t>("float16", 0x7bff, 0x7c00);
  // Edges named explicitly (the sweep covers them; these make a failure obvious).
  CHECK(narrow<float16_t>(65504.0f) == 0x7bff, "65504 is the largest float16");
  CHECK(narrow<float16_t>(65519.99f) == 0x7bff, "below the overflow midpoint stays finite");
  CHECK(narrow<float16_t>(65520.0f) == 0x7c00, "the overflow midpoint rounds to even, i.e. to inf");
  CHECK(narrow<float16_t>(std::ldexp(1.0f, -24)) == 0x0001, "2^-24 is the smallest float16 subnormal");
  CHECK(narrow<float16_t>(std::ldexp(1.0f, -25)) == 0x0000, "2^-25 is a tie and rounds to even zero");
  CHECK(narrow<float16_t>(std::nextafter(std::ldexp(1.0f, -25), 1.0f)) == 0x0001, "just above 2^-25 rounds up");
  CHECK(narrow<float16_t>(std::ldexp(1.0f, -14)) == 0x0400, "2^-14 is the smallest float16 normal");
  CHECK(narrow<float16_t>(1e-30f) == 0x0000 && narrow<float16_t>(-1e-30f) == 0x8000, "underflow keeps the sign");

#ifdef __FLT16_MANT_DIG__
  // The compiler's float -> _Float16 conversion is correctly rounded: compare on random floats of every exponent.
  std::mt19937 rng(12345);
  for (int i = 0; i < 2000000; ++i) {
    const float f = float_of(uint32_t(rng()));
    if (std::isnan(f)) continue;
    const _Float16 ref = static_cast<_Float16>(f);
    uint16_t ref_bits;
    std::memcpy(&ref_bits, &ref, 2);
    const uint16_t got = narrow<float16_t>(f);
    CHECK(got == ref_bits, "float16 narrowing of " << f << " (0x" << std::hex << bits_of(f) << ") gave 0x" << got
                                                   << ", _Float16 gives 0x" << ref_bits);
  }
#endif
}

}  // namespace

int main() {
  check_bfloat16();
  check_float16();
  return check::report("test_dtypes");
}
