// Chooses the CPU kernel path once, at load: the best instruction set that cpuid (and the OS's saved register
// state) allows, lowered by PYSPARSE_CPU_ISA=generic|avx2|avx512 so tests can force any path; and whether the
// broadcast kernel runs there (PYSPARSE_CPU_BCAST=0|1 overrides each path's default). force_cpu_path replaces both at
// run time (pysparse.ops.force_cpu_path: tests and benchmarks in one process).
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "isa_kernels.h"

namespace pysparse {
namespace {

bool supported(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kGeneric: return true;
#if PYSPARSE_X86 && (defined(__GNUC__) || defined(__clang__))
    // __builtin_cpu_supports also checks XCR0, i.e. that the OS saves the ymm / zmm registers.
    case CpuIsa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case CpuIsa::kAvx512:
      return supported(CpuIsa::kAvx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case CpuIsa::kAvx512Bf16: return supported(CpuIsa::kAvx512) && __builtin_cpu_supports("avx512bf16");
    case CpuIsa::kAvx512Amx: {
      static const bool amx = supported(CpuIsa::kAvx512Bf16) && amx::usable();  // one permission request
      return amx;
    }
#else
    default: return false;
#endif
  }
  return false;
}

// vdpbf16ps does two multiply-adds per lane. On AMD Zen 4 that doubles the float32 rate (oneDNN's bf16 GEMM runs
// at ~2x its fp32 GEMM there); on Intel Sapphire Rapids it issues on one port where float32 FMAs use two, and
// measured 1.3-1.7x slower than widening bf16 to float32 (benchmarks/NOTES_cpu.md), so Intel widens.
bool prefer_native_bf16() {
#if PYSPARSE_X86 && (defined(__GNUC__) || defined(__clang__))
  return __builtin_cpu_is("amd");
#else
  return false;
#endif
}

// The best AVX-512 variant: AMX tiles where they exist (Intel; a tdpbf16ps does 16x the products of an FMA), else
// vdpbf16ps where it beats widening.
CpuIsa best_avx512() {
  if (supported(CpuIsa::kAvx512Amx)) return CpuIsa::kAvx512Amx;
  if (supported(CpuIsa::kAvx512Bf16) && prefer_native_bf16()) return CpuIsa::kAvx512Bf16;
  return CpuIsa::kAvx512;
}

CpuIsa best_supported() {
  for (CpuIsa isa : {best_avx512(), CpuIsa::kAvx2}) {
    if (supported(isa)) return isa;
  }
  return CpuIsa::kGeneric;
}

CpuIsa choose_isa() {
  const CpuIsa best = best_supported();
  const char* env = std::getenv("PYSPARSE_CPU_ISA");
  if (env == nullptr || env[0] == '\0') return best;
  CpuIsa want;
  if (std::strcmp(env, "generic") == 0) {
    want = CpuIsa::kGeneric;
  } else if (std::strcmp(env, "avx2") == 0) {
    want = CpuIsa::kAvx2;
  } else if (std::strcmp(env, "avx512") == 0) {
    want = best_avx512();
  } else {
    std::fprintf(stderr, "pysparse: PYSPARSE_CPU_ISA must be generic, avx2 or avx512, got '%s'; using %s\n", env,
                 best == CpuIsa::kGeneric ? "generic" : best == CpuIsa::kAvx2 ? "avx2" : "avx512");
    return best;
  }
  if (!supported(want)) {
    std::fprintf(stderr, "pysparse: PYSPARSE_CPU_ISA=%s is not supported by this CPU; using the best it runs\n", env);
    return best;
  }
  return want;
}

// PYSPARSE_CPU_BCAST: -1 unset (each path's default), 0 off, 1 on.
int bcast_request() {
  const char* env = std::getenv("PYSPARSE_CPU_BCAST");
  if (env == nullptr || env[0] == '\0') return -1;
  if (std::strcmp(env, "0") == 0 || std::strcmp(env, "1") == 0) return env[0] - '0';
  std::fprintf(stderr, "pysparse: PYSPARSE_CPU_BCAST must be 0 or 1, got '%s'; using each path's default\n", env);
  return -1;
}

// The environment is read once per process; the statics below also run the choices when the library is loaded.
CpuIsa isa_at_load() {
  static const CpuIsa isa = choose_isa();
  return isa;
}
int bcast_at_load() {
  static const int request = bcast_request();
  return request;
}
const CpuIsa chosen_at_load = isa_at_load();
const int bcast_chosen_at_load = bcast_at_load();

// force_cpu_path's requests; -1: none (the choice at load). Relaxed atomics: each op reads the path once per call
// (current_cpu_path), so a switch applies from the next call on and never mixes two paths inside one.
std::atomic<int> forced_isa{-1};
std::atomic<int> forced_bcast{-1};

CpuIsa chosen_isa() {
  const int forced = forced_isa.load(std::memory_order_relaxed);
  return forced >= 0 ? static_cast<CpuIsa>(forced) : isa_at_load();
}
int chosen_bcast() {
  const int forced = forced_bcast.load(std::memory_order_relaxed);
  return forced >= 0 ? forced : bcast_at_load();
}

}  // namespace

bool force_cpu_path(int isa, int bcast) {
  if (isa < -1 || isa > kLastCpuIsa || bcast < -1 || bcast > 1) return false;
  if (isa >= 0 && !supported(static_cast<CpuIsa>(isa))) return false;
  forced_isa.store(isa, std::memory_order_relaxed);
  forced_bcast.store(bcast, std::memory_order_relaxed);
  return true;
}

CpuPathRequest forced_cpu_path() {
  return {forced_isa.load(std::memory_order_relaxed), forced_bcast.load(std::memory_order_relaxed)};
}

CpuPath current_cpu_path() {
  const CpuIsa isa = chosen_isa();
  return {isa, cpu_bcast_enabled(isa)};
}

bool cpu_isa_supported(CpuIsa isa) { return supported(isa); }

// On by default on both SIMD paths; bcast_applies bounds where it runs: AVX2 float32 up to 384 tokens, where it
// measured 1.0-2.2x faster than the outer-product and dot kernels, column vectors only up to 4 tokens; AVX-512 up to 16
// tokens, float32 only (Avx512Tiles).
bool cpu_bcast_enabled(CpuIsa isa) {
  if (isa == CpuIsa::kGeneric) return false;
  return chosen_bcast() != 0;  // -1: unset (the default, on), 0: off, 1: on
}

CpuIsa active_cpu_isa_id() { return chosen_isa(); }

const char* active_cpu_isa() {
  switch (chosen_isa()) {
    case CpuIsa::kGeneric: return "generic";
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kAvx512:
    case CpuIsa::kAvx512Bf16:
    case CpuIsa::kAvx512Amx: return "avx512";
  }
  return "generic";
}

// Up to this many tokens, float32 blocks narrower than a 16-float vector (bh not a multiple of 16: 4x4, 8x8) and
// column vectors (bw = 1) run the AVX2 path's kernels on AVX-512 CPUs: its 8-lane dot kernel takes bw = 8 blocks
// (AVX-512's needs bw % 16 = 0 and falls back to a 48-token outer-product tile), its 24-token tile pads less, and its
// broadcast kernel covers a 16-row column vector with two 8-lane vectors. Sapphire Rapids, 2 threads, 4 shapes x
// 70 / 90%, AVX2 over AVX-512 (geometric mean) at M = 1 / 2 / 4 / 6 / 8: 8x8 2.73 / 1.93 / 1.52 / 1.27 / 1.29x,
// 4x4 1.14 / 1.14 / 1.17 / 1.16 / 1.27x, 16x1 1.07 / 1.07 / 1.11 / 1.25 / 1.30x; at 12-16 AVX-512 wins (0.81-0.92x)
// (benchmarks/bench_path_choice.py). Both paths store these blocks alike (row-major; a column vector is its own
// transpose), so a weight needs no other layout.
constexpr int64_t kNarrowBlockAvx2MaxTokens = 8;

template <typename T>
bool narrow_blocks_run_avx2(const BsrProblem& p) {
  return std::is_same_v<T, float> && p.M <= kNarrowBlockAvx2MaxTokens && (p.bh % 16 != 0 || p.bw == 1);
}

// From this many tokens, bfloat16 blocks run on AMX tiles where the path has them: below it the per-call repack of
// the weights (as many bytes as they hold) and the 32-token groups' padding cost more than the tiles save. Sapphire
// Rapids, 2 threads, 4 FFN shapes x 32x32 / 16x16 x 50 / 70 / 90%, AMX over the AVX-512 kernels: M = 4 0.39-0.82x,
// M = 8 1.08-2.05x, M = 16 0.95-1.73x, M = 32 1.5-3.7x (benchmarks/bench_amx.py, this bound set to 1; BENCHMARKS.md).
#if PYSPARSE_X86
constexpr int64_t kAmxMinTokens = 8;

// Whether a bfloat16 call on `isa` runs on AMX tiles.
bool runs_amx(CpuIsa isa, const BsrProblem& p) {
  return isa == CpuIsa::kAvx512Amx && p.M >= kAmxMinTokens && amx::applies(p);
}
#endif

template <typename T>
void bsr_linear_cpu_isa(CpuIsa isa, bool bcast, const T* x, const T* values, const int32_t* crow, const int32_t* col,
                        const T* bias, T* y, const BsrProblem& p, int num_threads) {
  if (num_threads < 1) num_threads = 1;
  switch (isa) {
#if PYSPARSE_X86
    case CpuIsa::kAvx2: avx2::bsr_linear(x, values, crow, col, bias, y, p, num_threads, bcast); return;
    case CpuIsa::kAvx512:
    case CpuIsa::kAvx512Bf16:
    case CpuIsa::kAvx512Amx:
      if constexpr (std::is_same_v<T, bfloat16_t>) {
        if (runs_amx(isa, p)) return amx::bsr_linear(x, values, crow, col, bias, y, p, num_threads);
      }
      if (narrow_blocks_run_avx2<T>(p)) {
        avx2::bsr_linear(x, values, crow, col, bias, y, p, num_threads, bcast);
      } else {
        avx512::bsr_linear(x, values, crow, col, bias, y, p, num_threads, isa == CpuIsa::kAvx512Bf16, bcast);
      }
      return;
#endif
    default: generic::bsr_linear(x, values, crow, col, bias, y, p, num_threads); return;
  }
}

template <typename T>
void bsr_linear_cpu(const T* x, const T* values, const int32_t* crow, const int32_t* col, const T* bias, T* y,
                    const BsrProblem& p, int num_threads) {
  const CpuPath path = current_cpu_path();
  bsr_linear_cpu_isa(path.isa, path.bcast, x, values, crow, col, bias, y, p, num_threads);
}

template <typename T>
bool bsr_linear_reads_transposed(const CpuPath& path, const BsrProblem& p) {
  if (!path.bcast) return false;
#if PYSPARSE_X86
  if (path.isa == CpuIsa::kAvx2) return avx2::reads_transposed<T>(p);
  if (path.isa == CpuIsa::kAvx512 || path.isa == CpuIsa::kAvx512Bf16 || path.isa == CpuIsa::kAvx512Amx) {
    return avx512::reads_transposed<T>(p, path.isa == CpuIsa::kAvx512Bf16);
  }
#endif
  (void)p;
  return false;
}

template <typename T>
bool bsr_linear_reads_transposed(const BsrProblem& p) {
  return bsr_linear_reads_transposed<T>(current_cpu_path(), p);
}

std::string bsr_conv2d_unsupported(const BsrProblem& p, const ConvGeometry& c) {
  if (c.batch < 0 || c.c < 1 || c.kh < 1 || c.kw < 1 || c.sh < 1 || c.sw < 1 || c.dh < 1 || c.dw < 1) {
    return "convolution geometry has a non-positive size";
  }
  if (c.ho < 0 || c.wo < 0 || (c.ho > 0 && (c.ho - 1) * c.sh + (c.kh - 1) * c.dh >= c.hp) ||
      (c.wo > 0 && (c.wo - 1) * c.sw + (c.kw - 1) * c.dw >= c.wp)) {
    return "output size does not fit the padded input";
  }
  if (p.M != c.batch * c.ho * c.wo || p.K != c.kh * c.kw * c.c) return "problem size does not match the geometry";
  if (c.c % p.bw != 0) return "block width must divide the input channels";
  if (p.bh % 8 != 0) return "block height must be a multiple of 8";
  if (!bsr_conv2d_available()) return "needs the AVX2 path";
  return "";
}

bool bsr_conv2d_available() { return chosen_isa() != CpuIsa::kGeneric && supported(CpuIsa::kAvx2); }

void bsr_conv2d_nhwc_cpu(const float* x, const float* values, const int32_t* crow, const int32_t* col,
                         const float* bias, float* y, const BsrProblem& p, const ConvGeometry& c, int num_threads) {
#if PYSPARSE_X86
  avx2::bsr_conv2d(x, values, crow, col, bias, y, p, c, num_threads < 1 ? 1 : num_threads);
#else
  (void)x, (void)values, (void)crow, (void)col, (void)bias, (void)y, (void)p, (void)c, (void)num_threads;
#endif
}

#define PYSPARSE_INSTANTIATE(T)                                                                                  \
  template void bsr_linear_cpu<T>(const T*, const T*, const int32_t*, const int32_t*, const T*, T*,              \
                                  const BsrProblem&, int);                                                       \
  template void bsr_linear_cpu_isa<T>(CpuIsa, bool, const T*, const T*, const int32_t*, const int32_t*, const T*,  \
                                      T*, const BsrProblem&, int);                                                \
  template bool bsr_linear_reads_transposed<T>(const BsrProblem&);                                            \
  template bool bsr_linear_reads_transposed<T>(const CpuPath&, const BsrProblem&);
PYSPARSE_INSTANTIATE(float)
PYSPARSE_INSTANTIATE(bfloat16_t)
PYSPARSE_INSTANTIATE(float16_t)
#undef PYSPARSE_INSTANTIATE

}  // namespace pysparse
