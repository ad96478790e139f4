// Decoding GEMV (CPU): out[m, n] = dot(W[n, :], x[m, :]) (+ b[n]) for a handful of rows m.
//
// What it fuses and why: at batch 1, KV-cache decoding runs every linear layer as a
// matrix-vector product. Each weight is read from memory once and used for one multiply-add
// per token, so the op is bound by memory bandwidth, not arithmetic. F.linear sends it to
// MKL's sgemv over the row-major [N, K] nn.Linear layout (~10 GB/s here) or to a slower bf16
// path, while 2 cores can stream ~50 GB/s. This kernel reads W exactly once, strictly in order:
// each thread takes one contiguous block of rows and walks it row after row. Interleaving
// several rows (to share the loads of x) was measured 2x slower from DRAM; the hardware
// prefetcher wants one sequential stream. Per row: 16-wide FMAs into several fp32
// accumulators, a masked load for the K tail, one horizontal sum. bf16 uses vdpbf16ps on bf16
// pairs of W and x (exact products, fp32 accumulation); otherwise bf16 is widened to fp32.
//
// Up to kTokens rows of x share each load of W. With more rows, the row is walked once per
// group of kTokens, in K slices small enough that the slice of x and W stays in L1, so memory
// still sees each weight once.
#include <omp.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.h"
#include "ops.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define KERNELS_GEMV_AVX512 1
#if defined(__AVX512BF16__)
#define KERNELS_GEMV_DPBF16 1
#endif
#endif

namespace kernels {
namespace {

constexpr int kTokens = 4;  // x rows per tile: each load of W feeds kTokens FMAs
constexpr int64_t kSlice = 512;  // K elements per slice when a row is walked more than once
// Below this many multiply-adds a single thread beats waking the OpenMP team (~ a few us).
constexpr int64_t kMinParallelMacs = 1 << 16;

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

// sums[t] += dot(w[0:K], x[t * ldx : t * ldx + K]) for one weight row and T rows of x; U
// independent accumulators per x row hide the FMA latency.
template <int T, typename W>
inline void tile(const W* w, const float* x, int64_t ldx, int64_t K, float sums[T]) {
  constexpr int U = T == 1 ? 4 : 2;
  __m512 acc[T][U];
  zero(acc);
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U) {
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) {
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
template <int T>
inline void tile(const bf16* w, const bf16* x, int64_t ldx, int64_t K, float sums[T]) {
  constexpr int U = T == 1 ? 4 : 2;
  __m512 acc[T][U];
  zero(acc);
  auto pairs = [](const bf16* p) { return (__m512bh)_mm512_loadu_si512(p); };
  int64_t k = 0;
  for (; k + 32 * U <= K; k += 32 * U) {
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) {
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

#if !KERNELS_GEMV_AVX512
// Portable version of the same tile (AVX2/NEON builds): GCC vectorizes each dot product.
template <int T, typename W>
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

// out[:, n] for weight row n, using acc[0:M] as scratch. Each pass over the row serves kTokens
// rows of x. With more rows than that, K is walked in slices of kSlice, so that the slice of x
// (M x kSlice) and of the weight row stay in L1 across the passes.
template <typename W, typename X>
inline void row(const LinearArgs& a, const W* weight, const X* x, int64_t n, float* acc) {
  const int64_t M = a.m, K = a.k, slice = M <= kTokens ? std::max<int64_t>(K, 1) : kSlice;
  const W* w = weight + n * K;
  std::fill(acc, acc + M, 0.f);
  for (int64_t k0 = 0; k0 < K; k0 += slice) {
    const int64_t len = std::min(slice, K - k0);
    for (int64_t m0 = 0; m0 < M; m0 += kTokens) {
      const X* xs = x + m0 * K + k0;
      switch (std::min<int64_t>(kTokens, M - m0)) {
        case 1: tile<1>(w + k0, xs, K, len, acc + m0); break;
        case 2: tile<2>(w + k0, xs, K, len, acc + m0); break;
        case 3: tile<3>(w + k0, xs, K, len, acc + m0); break;
        default: tile<kTokens>(w + k0, xs, K, len, acc + m0); break;
      }
    }
  }
  const float b = a.bias ? to_f32(static_cast<const W*>(a.bias)[n]) : 0.f;
  W* out = static_cast<W*>(a.out);
  for (int64_t m = 0; m < M; ++m)  // bf16: rounded to nearest even, once
    store(out + m * a.n + n, a.bias ? acc[m] + b : acc[m]);
}

template <typename W>
void run(const LinearArgs& a) {
  const int64_t M = a.m, N = a.n, K = a.k;
  if (M <= 0 || N <= 0) return;
  const W* weight = static_cast<const W*>(a.weight);
  using X = typename XOf<W>::type;
  std::vector<float> x32;
  const X* x = nullptr;
  if constexpr (std::is_same<X, W>::value) {
    x = static_cast<const X*>(a.x);
  } else {  // widen x once: it is read again for every weight row
    x32.resize(size_t(M * K));
    const W* xs = static_cast<const W*>(a.x);
    for (int64_t j = 0; j < M * K; ++j) x32[j] = to_f32(xs[j]);
    x = x32.data();
  }
  const int64_t want = M * N * K < kMinParallelMacs ? 1 : std::min<int64_t>(a.n_threads, N);
  const int n_threads = int(std::max<int64_t>(1, want));
#pragma omp parallel num_threads(n_threads)
  {
    // One contiguous range of rows per thread: each core streams its own part of W in order.
    const int64_t tid = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t n_end = N * (tid + 1) / nt;
    std::vector<float> acc(static_cast<size_t>(M));
    for (int64_t n = N * tid / nt; n < n_end; ++n) row(a, weight, x, n, acc.data());
  }
}

}  // namespace

void linear_cpu(const LinearArgs& a) {
  switch (a.dtype) {
    case kF32: return run<float>(a);
    case kBF16: return run<bf16>(a);
  }
}

}  // namespace kernels
