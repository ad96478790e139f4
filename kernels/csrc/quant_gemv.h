// One output row of a weight-only quantized GEMV (CPU): sums[m] = dot(W[n, :], x[m, :]) for M rows of x,
// with W NF4 or int8 (layout: kernels/reference.py). Shared by quant_linear.cpp (the layer's GEMV) and
// decode_step.cpp (the fused decode step), so the two give the same bits for the same row.
//
// Memory-bound, so the codes are expanded in registers and never stored: AVX-512 looks each 4-bit code up in
// the 16-entry NF4 table with one vpermps and multiplies by x; the block's absmax is applied once per 64
// products. x is fp32, and for NF4 de-interleaved up front (quant_x: even then odd elements per 32) so the
// high/low nibbles of a byte line up with contiguous lanes of x. fp32 accumulation. Portable loops otherwise.
#pragma once

#include <cstdint>

#include "common.h"
#include "ops.h"

namespace kernels {
namespace qgemv {

constexpr int64_t kBlock = 64;         // NF4 elements per absmax
constexpr int64_t kAbsmaxBlock = 256;  // absmaxes per second-level scale
constexpr int kMaxRows = 8;            // x rows per row call (the templates are instantiated up to this)

// Block b's absmax, exactly as the reference: one fp32 product, then one fp32 sum (no FMA contraction,
// which -ffp-contract=fast would otherwise allow and which would change the last bit).
__attribute__((optimize("fp-contract=off"))) inline float nf4_scale(const QuantWeight& w, int64_t b) {
  const float prod = w.code2[w.qabsmax[b]] * w.absmax2[b / kAbsmaxBlock];
  return prod + w.offset;
}

// out[0:K] = x[0:K] as fp32 in the layout the row kernels read for `kind` (NF4: each 32-chunk
// [x0 x2 .. x30 | x1 x3 .. x31]; K % 32 == 0 for NF4, which the callers check).
template <typename T>
inline void quant_x(const T* x, int64_t K, int kind, float* out) {
  for (int64_t k = 0; k < K; ++k) {
    const int64_t dst = kind == kNF4 ? (k / 32) * 32 + (k % 2) * 16 + (k % 32) / 2 : k;
    out[dst] = to_f32(x[k]);
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// Independent FMA chains per row of x: one chain is bound by the FMA latency (4 cycles per 16 weights, ~12
// Gweights/s per core on Zen 4, half of what DRAM delivers to a core), so few rows of x get several.
template <int M>
constexpr int kChains = M == 1 ? 4 : (M == 2 ? 2 : 1);

// One NF4 block's 32 code bytes (64 weights) times x: sum over the block of code value * x, in fp32.
// The 4 products (high/low nibbles of each 16 bytes) accumulate in separate registers (no chain).
inline __m512 nf4_block_dot(const uint8_t* codes, const float* x, __m512 table, __m512i mask) {
  const __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  const __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16)));
  const __m512 e0 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v0, 4), table), _mm512_loadu_ps(x));
  const __m512 o0 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v0, mask), table), _mm512_loadu_ps(x + 16));
  const __m512 e1 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v1, 4), table), _mm512_loadu_ps(x + 32));
  const __m512 o1 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(v1, mask), table), _mm512_loadu_ps(x + 48));
  return _mm512_add_ps(_mm512_add_ps(e0, o0), _mm512_add_ps(e1, o1));
}

template <int M>
inline void nf4_row(const QuantWeight& w, int64_t n, const float* xd, float* sums) {
  const int64_t K = w.k, nb = K / kBlock;
  const __m512 table = _mm512_loadu_ps(w.nf4);
  const __m512i mask = _mm512_set1_epi32(15);
  constexpr int C = M == 1 ? 2 : 1;  // block sums scaled into alternate accumulators (the scale FMA's chain)
  __m512 acc[M][C];
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < C; ++c) acc[m][c] = _mm512_setzero_ps();
  const uint8_t* codes = w.codes + n * K / 2;
  for (int64_t bb = 0; bb < nb; ++bb) {
    const __m512 s = _mm512_set1_ps(nf4_scale(w, n * nb + bb));
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m512 part = nf4_block_dot(codes + bb * 32, xd + m * K + bb * kBlock, table, mask);
      acc[m][bb % C] = _mm512_fmadd_ps(part, s, acc[m][bb % C]);
    }
  }
  for (int m = 0; m < M; ++m) {
    __m512 t = acc[m][0];
    for (int c = 1; c < C; ++c) t = _mm512_add_ps(t, acc[m][c]);
    sums[m] = _mm512_reduce_add_ps(t);
  }
}

template <int M>
inline void int8_row(const QuantWeight& w, int64_t n, const float* x, float* sums) {
  const int64_t K = w.k;
  const int8_t* q = reinterpret_cast<const int8_t*>(w.codes) + n * K;
  constexpr int C = kChains<M>;
  __m512 acc[M][C];
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < C; ++c) acc[m][c] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 * C <= K; k += 16 * C) {
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      const __m512 wv = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k + 16 * c))));
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[m][c] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k + 16 * c), acc[m][c]);
    }
  }
  for (; k + 16 <= K; k += 16) {
    const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k))));
    for (int m = 0; m < M; ++m) acc[m][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k), acc[m][0]);
  }
  if (k < K) {  // masked tail: lanes past K load as 0 and cannot fault
    const __mmask16 t = __mmask16((1u << (K - k)) - 1u);
    const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(t, q + k)));
    for (int m = 0; m < M; ++m) acc[m][0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(t, x + m * K + k), acc[m][0]);
  }
  for (int m = 0; m < M; ++m) {
    __m512 t = acc[m][0];
    for (int c = 1; c < C; ++c) t = _mm512_add_ps(t, acc[m][c]);
    sums[m] = _mm512_reduce_add_ps(t) * w.scale[n];
  }
}
#else
template <int M>
inline void nf4_row(const QuantWeight& w, int64_t n, const float* xd, float* sums) {
  const int64_t K = w.k, nb = K / kBlock;
  const uint8_t* codes = w.codes + n * K / 2;
  for (int m = 0; m < M; ++m) sums[m] = 0.f;
  for (int64_t bb = 0; bb < nb; ++bb) {
    const float s = nf4_scale(w, n * nb + bb);
    for (int m = 0; m < M; ++m) {
      float part = 0.f;
      for (int h = 0; h < 2; ++h)
        for (int j = 0; j < 16; ++j) {
          const uint8_t byte = codes[bb * 32 + h * 16 + j];
          const int64_t k = bb * kBlock + h * 32;
          part += w.nf4[byte >> 4] * xd[m * K + k + j] + w.nf4[byte & 15] * xd[m * K + k + 16 + j];
        }
      sums[m] += part * s;
    }
  }
}

template <int M>
inline void int8_row(const QuantWeight& w, int64_t n, const float* x, float* sums) {
  const int64_t K = w.k;
  const int8_t* q = reinterpret_cast<const int8_t*>(w.codes) + n * K;
  for (int m = 0; m < M; ++m) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < K; ++k) s += float(q[k]) * x[m * K + k];
    sums[m] = s * w.scale[n];
  }
}
#endif

template <int M>
inline void row(const QuantWeight& w, int64_t n, const float* x, float* sums) {
  if (w.kind == kNF4) nf4_row<M>(w, n, x, sums);
  else int8_row<M>(w, n, x, sums);
}

// sums[0:m] for any m >= 1 (x rows [m, K], in quant_x's layout): kMaxRows rows of x per pass over W's row.
inline void rows(const QuantWeight& w, int64_t n, const float* x, int64_t m, float* sums) {
  for (int64_t m0 = 0; m0 < m; m0 += kMaxRows) {
    const float* xs = x + m0 * w.k;
    float* out = sums + m0;
    switch (m - m0) {
      case 1: row<1>(w, n, xs, out); break;
      case 2: row<2>(w, n, xs, out); break;
      case 3: row<3>(w, n, xs, out); break;
      case 4: row<4>(w, n, xs, out); break;
      case 5: row<5>(w, n, xs, out); break;
      case 6: row<6>(w, n, xs, out); break;
      case 7: row<7>(w, n, xs, out); break;
      default: row<kMaxRows>(w, n, xs, out); break;
    }
  }
}

}  // namespace qgemv
}  // namespace kernels
