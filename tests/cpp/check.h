// Tiny test helper for the torch-free kernel core: CHECK records a failure with file:line and a message,
// and a test's main() returns check::report(), non-zero when anything failed (ctest reads the exit code).
#pragma once
#include <cstdio>
#include <sstream>
#include <string>

namespace check {

inline int& failures() {
  static int n = 0;
  return n;
}

inline void fail(const char* file, int line, const char* expr, const std::string& msg) {
  // Cap the noise: the first failures say what is wrong, the count says how much.
  if (++failures() <= 20) std::fprintf(stderr, "%s:%d: CHECK(%s) failed: %s\n", file, line, expr, msg.c_str());
}

inline int report(const char* test_name) {
  if (failures() == 0) {
    std::printf("%s: all checks passed\n", test_name);
    return 0;
  }
  std::fprintf(stderr, "%s: %d check(s) failed\n", test_name, failures());
  return 1;
}

}  // namespace check

// CHECK(cond, stream-expression): e.g. CHECK(a == b, "a=" << a << " b=" << b). Evaluates the message only on failure.
#define CHECK(cond, msg)                                      \
  do {                                                        \
    if (!(cond)) {                                            \
      std::ostringstream check_msg_;                          \
      check_msg_ << msg;                                      \
      ::check::fail(__FILE__, __LINE__, #cond, check_msg_.str()); \
    }                                                         \
  } while (0)
