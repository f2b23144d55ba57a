// Few-row products with int8 or bfloat16 weights widened in registers (declared in native.h).
//
// Why a kernel of our own: at one row the product is bound by reading W, and int8 reads a quarter
// of float32's bytes, but only if W is never written out as float32 on the way (torch's
// dequantize-then-GEMM path streams 3-7 GB/s of int8 on the CPU box, float32 GEMV 19-32 GB/s;
// benchmarks/RESULTS.md, "int8 weight-only linear (CPU)"). Here each thread takes a contiguous
// range of output channels and streams their rows of W (row-major [N, K]: contiguous along K per
// output), widening 8 or 16 weights at a time to float32 in a register, and keeps the sums in
// registers over all of K.
//
// The body (gemv_body.inc) is compiled once per instruction set: portable C++ (any CPU), AVX2+FMA
// and AVX-512 (x86-64 with GCC or Clang, as function-level targets), picked at run time from what
// the CPU reports. Threads come from OpenMP: on Linux torch's own libgomp, loaded first under the
// same soname, so these products share torch's thread pool instead of competing with a second one.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "native.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define MMGEN_X86_VECTOR 1
#include <immintrin.h>
#else
#define MMGEN_X86_VECTOR 0
#endif

namespace mmgen {
namespace {

namespace scalar {
struct Isa {
  using V = float;
  static constexpr int kWidth = 1;
  static constexpr int kRows = 4;
  static constexpr bool kMasked = false;
  static V zero() { return 0.0f; }
  static V set1(float f) { return f; }
  static V loadx(const float* p) { return *p; }
  static V loadw(const int8_t* p) { return static_cast<float>(*p); }
  static V loadw(const uint16_t* p) {
    const uint32_t bits = static_cast<uint32_t>(*p) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V mul(V a, V b) { return a * b; }
  static V add(V a, V b) { return a + b; }
  static float hsum(V v) { return v; }
  static void prefetch(const void*) {}
  static void prefetch_far(const void*) {}
};
#include "gemv_body.inc"
}  // namespace scalar

#if MMGEN_X86_VECTOR
// Every function defined between push and pop is compiled for the named ISA (and only called
// after the CPU said it has it).
#if defined(__clang__)
#define MMGEN_TARGET_PUSH(isa) _Pragma("clang attribute push(__attribute__((target(" #isa "))), apply_to = function)")
#define MMGEN_TARGET_POP _Pragma("clang attribute pop")
#else
#define MMGEN_TARGET_PUSH(isa) _Pragma("GCC push_options") _Pragma(MMGEN_STR(GCC target(isa)))
#define MMGEN_TARGET_POP _Pragma("GCC pop_options")
#define MMGEN_STR(x) #x
#endif

MMGEN_TARGET_PUSH("avx2,fma")
namespace avx2 {
struct Isa {
  using V = __m256;
  static constexpr int kWidth = 8;
  static constexpr int kRows = 2;  // 2 x 4 accumulators + 4 weights + x + scales in 16 registers
  static constexpr bool kMasked = false;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float f) { return _mm256_set1_ps(f); }
  static V loadx(const float* p) { return _mm256_loadu_ps(p); }
  static V loadw(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static V loadw(const uint16_t* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static void prefetch_far(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
  static float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
#include "gemv_body.inc"
}  // namespace avx2
MMGEN_TARGET_POP

MMGEN_TARGET_PUSH("avx512f,avx512bw,avx512vl,avx2,fma")
namespace avx512 {
struct Isa {
  using V = __m512;
  static constexpr int kWidth = 16;
  static constexpr int kRows = 4;  // 4 x 4 accumulators + 4 weights + 4 scales + x in 32 registers
  static constexpr bool kMasked = true;
  static __mmask16 first(int m) { return static_cast<__mmask16>((1u << m) - 1); }
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float f) { return _mm512_set1_ps(f); }
  static V loadx(const float* p) { return _mm512_loadu_ps(p); }
  static V loadx(const float* p, int m) { return _mm512_maskz_loadu_ps(first(m), p); }
  static V widen8(__m128i q) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)); }
  static V widen16(__m256i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)); }
  static V loadw(const int8_t* p) { return widen8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static V loadw(const int8_t* p, int m) { return widen8(_mm_maskz_loadu_epi8(first(m), p)); }
  static V loadw(const uint16_t* p) { return widen16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static V loadw(const uint16_t* p, int m) { return widen16(_mm256_maskz_loadu_epi16(first(m), p)); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static void prefetch_far(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
  static float hsum(V v) { return _mm512_reduce_add_ps(v); }
};
#include "gemv_body.inc"
}  // namespace avx512
MMGEN_TARGET_POP
#endif  // MMGEN_X86_VECTOR

using ColumnsFn = void (*)(const GemvParams&, GemvWeight, int64_t, int64_t);

ColumnsFn columns_for(CpuIsa isa) {
  switch (isa) {
#if MMGEN_X86_VECTOR
    case CpuIsa::kAvx2: return &avx2::run_columns;
    case CpuIsa::kAvx512: return &avx512::run_columns;
#endif
    default: return &scalar::run_columns;
  }
}

// Below this many weight bytes per thread a thread's share is shorter than waking it (a few µs).
constexpr int64_t kMinBytesPerThread = 64 << 10;

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("gemv: " + what);
}

}  // namespace

std::vector<CpuIsa> cpu_isas() {
  std::vector<CpuIsa> isas{CpuIsa::kScalar};
#if MMGEN_X86_VECTOR
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    isas.push_back(CpuIsa::kAvx2);
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
      isas.push_back(CpuIsa::kAvx512);
  }
#endif
  return isas;
}

bool cpu_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

void gemv(const GemvParams& p, GemvWeight weight, int threads, CpuIsa isa) {
  require(p.x && p.w && p.y, "null pointer");
  require(p.rows >= 1 && p.rows <= kGemvMaxRows, "rows must be 1.." + std::to_string(kGemvMaxRows) +
                                                     ", got " + std::to_string(p.rows));
  require(p.n >= 1 && p.k >= 1, "empty weight");
  require(p.ldx >= p.k && p.ldy >= p.n, "row strides shorter than a row");
  require(weight == GemvWeight::kInt8 || weight == GemvWeight::kBfloat16, "unknown weight type");
  if (weight == GemvWeight::kInt8) require(p.scale && p.group_size >= 1, "int8 weight without scales");
  require(threads >= 1, "threads must be >= 1");
  const std::vector<CpuIsa> isas = cpu_isas();
  require(std::find(isas.begin(), isas.end(), isa) != isas.end(),
          "instruction set " + std::to_string(static_cast<int>(isa)) + " is not available on this CPU");
  const ColumnsFn run = columns_for(isa);

  // Threads split the outputs into contiguous ranges of whole column tiles.
  const int64_t tiles = (p.n + 3) / 4;
  const int64_t bytes = p.n * p.k * (weight == GemvWeight::kInt8 ? 1 : 2);
  const int64_t t_max = std::min<int64_t>({threads, tiles, std::max<int64_t>(1, bytes / kMinBytesPerThread)});
  auto share = [&](int64_t t, int64_t count) {
    const int64_t begin = tiles * t / count * 4, end = std::min(p.n, tiles * (t + 1) / count * 4);
    if (begin < end) run(p, weight, begin, end);
  };
#ifdef _OPENMP
  if (t_max > 1) {
#pragma omp parallel num_threads(static_cast<int>(t_max))
    share(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  share(0, 1);
}

}  // namespace mmgen
