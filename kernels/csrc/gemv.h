// The decoding GEMV's inner loops, shared by linear.cpp (kernels.linear) and decode_step.cpp (the
// fused decode step): dot products of one weight row with a few rows of x, W read once, in order.
// See linear.cpp for why they are shaped this way (one sequential stream per thread, kTokens rows
// of x per load of W, vdpbf16ps for bf16).
//
// The ISA is chosen at compile time (-march; kernels/CMakeLists.txt's ENGINE_KERNELS_MARCH): AVX-512
// (+ AVX512-BF16's vdpbf16ps when present), else AVX2 + FMA, else a portable loop the compiler
// vectorizes. `path()` says which one this build has; tests/kernels/test_gemv_isa.py compiles this
// header for AVX2 explicitly and ties each path to a float64 reference.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define KERNELS_GEMV_AVX512 1
#if defined(__AVX512BF16__)
#define KERNELS_GEMV_DPBF16 1
#endif
#endif

namespace kernels {
namespace gemv {

constexpr int kTokens = 4;  // x rows per tile: each load of W feeds kTokens FMAs
constexpr int64_t kSlice = 512;  // K elements per slice when a row is walked more than once
// Below this many multiply-adds a single thread beats waking the OpenMP team (~ a few us).
constexpr int64_t kMinParallelMacs = 1 << 16;

// Software prefetch of W, this many bytes ahead of the loads (AVX-512 tiles; one prefetch per
// 64-byte line). Why: on the Intel Xeon (Sapphire Rapids class, 2 cores of a VM) the hardware
// prefetchers alone leave the bf16 GEMV at ~70% of a plain read loop's bandwidth, from DRAM and
// from L3 alike; prefetching 4 KB ahead brought it to 90-99% (bench/bench_generate.py, README).
// On the AMD EPYC (Zen 4) the decode rows were already at 76-79% of their limit without it and
// were not re-measured with it, so it is on by default on Intel CPUs only;
// ENGINE_GEMV_PREFETCH=1 / =0 forces it on / off.
constexpr int64_t kPrefetchBytes = 4096;

inline bool prefetch_default() {
  if (const char* v = std::getenv("ENGINE_GEMV_PREFETCH")) return v[0] != '\0' && v[0] != '0';
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_is("intel");
#else
  return false;
#endif
}
inline const bool kPrefetch = prefetch_default();  // read once, when the extension loads


#if KERNELS_GEMV_AVX512
// The U accumulators of each of T x rows, cleared, then folded into sums[t] at the end of a tile.
template <int T, int U>
inline void zero(__m512 (&acc)[T][U]) {
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) acc[t][u] = _mm512_setzero_ps();
}

template <int T, int U>
inline void add_into(__m512 (&acc)[T][U], float sums[T]) {
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) {
#pragma GCC unroll 16
    for (int u = 1; u < U; ++u) acc[t][0] = _mm512_add_ps(acc[t][0], acc[t][u]);
    sums[t] += _mm512_reduce_add_ps(acc[t][0]);
  }
}

// One prefetch of the W line kPrefetchBytes past p (never faults, even past the end of W).
template <bool PF>
inline void prefetch_ahead(const void* p) {
  if constexpr (PF) _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
}

// sums[t] += dot(w[0:K], x[t * ldx : t * ldx + K]) for one weight row and T rows of x; U
// independent accumulators per x row hide the FMA latency. PF: prefetch W ahead (kPrefetch).
template <int T, bool PF = false, typename W>
inline void tile(const W* w, const float* x, int64_t ldx, int64_t K, float sums[T]) {
  constexpr int U = T == 1 ? 4 : 2;
  constexpr int64_t kLine = 64 / int64_t(sizeof(W));  // elements per 64-byte line of W
  __m512 acc[T][U];
  zero(acc);
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U) {
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) {
      if ((16 * u) % kLine == 0) prefetch_ahead<PF>(w + k + 16 * u);
      const __m512 wv = load16(w + k + 16 * u);
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t)
        acc[t][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + t * ldx + k + 16 * u), acc[t][u]);
    }
  }
  for (; k + 16 <= K; k += 16) {
    const __m512 wv = load16(w + k);
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t)
      acc[t][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + t * ldx + k), acc[t][0]);
  }
  if (k < K) {  // masked tail: lanes past K load as 0 and cannot fault
    const __mmask16 m = __mmask16((1u << (K - k)) - 1u);
    const __m512 wv = load16(w + k, m);
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t)
      acc[t][0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + t * ldx + k), acc[t][0]);
  }
  add_into(acc, sums);
}
#endif

#if KERNELS_GEMV_DPBF16
// bf16 weights and bf16 x with AVX512-BF16: one vdpbf16ps multiplies 32 bf16 pairs and adds
// them into 16 fp32 lanes, so x stays bf16 (no widening; half the loads of x per weight) and
// it takes half the instructions of the widening path, which matters when several x rows
// share each weight load. The products of two bf16 are exact in fp32, and the accumulation
// rounds to nearest even like an FMA; the instruction treats denormals (|v| < 1.2e-38) as 0.
template <int T, bool PF = false>
inline void tile(const bf16* w, const bf16* x, int64_t ldx, int64_t K, float sums[T]) {
  constexpr int U = T == 1 ? 4 : 2;
  __m512 acc[T][U];
  zero(acc);
  auto pairs = [](const bf16* p) { return (__m512bh)_mm512_loadu_si512(p); };
  int64_t k = 0;
  for (; k + 32 * U <= K; k += 32 * U) {
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) {
      prefetch_ahead<PF>(w + k + 32 * u);  // one 64-byte line per u
      const __m512bh wv = pairs(w + k + 32 * u);
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t)
        acc[t][u] = _mm512_dpbf16_ps(acc[t][u], wv, pairs(x + t * ldx + k + 32 * u));
    }
  }
  for (; k + 32 <= K; k += 32) {
    const __m512bh wv = pairs(w + k);
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) acc[t][0] = _mm512_dpbf16_ps(acc[t][0], wv, pairs(x + t * ldx + k));
  }
  if (k < K) {  // masked tail: lanes past K load as 0 and cannot fault
    const __mmask32 m = __mmask32((1u << (K - k)) - 1u);
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, w + k);
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t)
      acc[t][0] = _mm512_dpbf16_ps(acc[t][0], wv, (__m512bh)_mm512_maskz_loadu_epi16(m, x + t * ldx + k));
  }
  add_into(acc, sums);
}
#endif

#if !KERNELS_GEMV_AVX512 && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KERNELS_GEMV_AVX2 1
// The AVX2 build (-march=x86-64-v3, or a CPU without AVX-512): the same tile on 8 fp32 lanes. W is
// read once and in order; bf16 is widened by a zero-extend and a 16-bit shift (the bf16 bits are
// the top half of the fp32), no scalar conversion; the K tail (< 8) is scalar. U accumulators
// per x row hide the FMA latency (4 cycles, 2 ports: 8 FMAs in flight for one row).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <int T, bool PF = false, typename W>  // PF: no software prefetch on this path
inline void tile(const W* w, const float* x, int64_t ldx, int64_t K, float sums[T]) {
  constexpr int U = T == 1 ? 4 : 2;
  __m256 acc[T][U];
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) acc[t][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) {
      const __m256 wv = load8(w + k + 8 * u);
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t)
        acc[t][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * ldx + k + 8 * u), acc[t][u]);
    }
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 wv = load8(w + k);
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) acc[t][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * ldx + k), acc[t][0]);
  }
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) {
#pragma GCC unroll 16
    for (int u = 1; u < U; ++u) acc[t][0] = _mm256_add_ps(acc[t][0], acc[t][u]);
    float s = hsum8(acc[t][0]);
    for (int64_t j = k; j < K; ++j) s += to_f32(w[j]) * x[t * ldx + j];  // tail: < 8 elements
    sums[t] += s;
  }
}
#endif

#if !KERNELS_GEMV_AVX512 && !KERNELS_GEMV_AVX2
// Portable version of the same tile (NEON and other builds): GCC vectorizes each dot product.
template <int T, bool PF = false, typename W>
inline void tile(const W* w, const float* x, int64_t ldx, int64_t K, float sums[T]) {
  for (int t = 0; t < T; ++t) {
    const float* xt = x + t * ldx;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < K; ++k) s += to_f32(w[k]) * xt[k];
    sums[t] += s;
  }
}
#endif

// The type the tiles read x as: bf16 when vdpbf16ps takes it as is, else fp32.
template <typename W> struct XOf { using type = float; };
#if KERNELS_GEMV_DPBF16
template <> struct XOf<bf16> { using type = bf16; };
#endif

// acc[m] = dot(w[0:K], x[m * K : m * K + K]) for m < M: one weight row against M rows of x.
// Each pass over the row serves kTokens rows of x. With more rows than that, K is walked in
// slices of kSlice, so that the slice of x (M x kSlice) and of the weight row stay in L1.
template <bool PF, typename W, typename X>
inline void row_dots_with(const W* w, const X* x, int64_t M, int64_t K, float* acc) {
  const int64_t slice = M <= kTokens ? std::max<int64_t>(K, 1) : kSlice;
  std::fill(acc, acc + M, 0.f);
  for (int64_t k0 = 0; k0 < K; k0 += slice) {
    const int64_t len = std::min(slice, K - k0);
    for (int64_t m0 = 0; m0 < M; m0 += kTokens) {
      const X* xs = x + m0 * K + k0;
      // W is prefetched on the first pass over a slice only: later groups of x rows find it in L1
      const bool first = m0 == 0;
      switch (std::min<int64_t>(kTokens, M - m0)) {
        case 1: first ? tile<1, PF>(w + k0, xs, K, len, acc + m0) : tile<1>(w + k0, xs, K, len, acc + m0); break;
        case 2: first ? tile<2, PF>(w + k0, xs, K, len, acc + m0) : tile<2>(w + k0, xs, K, len, acc + m0); break;
        case 3: first ? tile<3, PF>(w + k0, xs, K, len, acc + m0) : tile<3>(w + k0, xs, K, len, acc + m0); break;
        default:
          first ? tile<kTokens, PF>(w + k0, xs, K, len, acc + m0) : tile<kTokens>(w + k0, xs, K, len, acc + m0);
          break;
      }
    }
  }
}

template <typename W, typename X>
inline void row_dots(const W* w, const X* x, int64_t M, int64_t K, float* acc) {
  if (kPrefetch) row_dots_with<true>(w, x, M, K, acc);
  else row_dots_with<false>(w, x, M, K, acc);
}

// The compiled tile's ISA, for logs and tests: "avx512-bf16", "avx512", "avx2" or "portable".
inline const char* path() {
#if KERNELS_GEMV_DPBF16
  return "avx512-bf16";
#elif KERNELS_GEMV_AVX512
  return "avx512";
#elif KERNELS_GEMV_AVX2
  return "avx2";
#else
  return "portable";
#endif
}

}  // namespace gemv
}  // namespace kernels
