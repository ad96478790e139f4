// One output row of a weight-only quantized GEMV (CPU): sums[m] = dot(W[n, :], x[m, :]) for M rows of x,
// with W NF4 or int8 (layout: kernels/reference.py). Shared by quant_linear.cpp (the layer's GEMV) and
// decode_step.cpp (the fused decode step), so the two give the same bits for the same row.
//
// Memory-bound, so the codes are expanded in registers and never stored. x is prepared once per call in the
// layout its kind reads (quant_x):
//  - NF4: x fp32, each 32-chunk de-interleaved (even then odd elements) so the high/low nibbles of a byte line
//    up with contiguous lanes of x. AVX-512 looks each code up in the 16-entry table with one vpermps; the
//    block's absmax is applied once per 64 products. fp32 accumulation.
//  - int8: x rounded to int16 per 64-element block (scale = the block's max |x| / 32767, error at most half a
//    step, ~2^-16 of that max: finer than bf16's own rounding of x), de-interleaved per block like NF4. The
//    products are then exact integer dot products, 32 per vpdpwssd (AVX-512 VNNI), with no int8 -> fp32
//    conversion of W: that conversion, not DRAM, bounded the fp32 path (~19 Gweights/s per Zen 4 core, ~1.5x
//    bf16 decode at best). Each block's int32 sum (< 2^24 per lane, so exact in fp32) is scaled into fp32 accumulators.
//    kernels.reference.int16_blocks is this rounding, for tests.
// Portable loops otherwise (same roundings).
#pragma once

#include <algorithm>
#include <cmath>
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

constexpr int64_t kXBlock = 64;  // int8: x elements per int16 scale

// int8 layout of one row of x: x_blocks(K) blocks of 64 int16 (32 floats' room each), then one fp32 scale per
// block; element j of a block sits at x_slot(j) (even elements, then odd).
inline int64_t x_blocks(int64_t K) { return (K + kXBlock - 1) / kXBlock; }
inline int64_t x_slot(int64_t j) { return (j % 2) * (kXBlock / 2) + j / 2; }
template <typename F>  // float or const float
inline F* x_scales(F* row, int64_t K) { return row + x_blocks(K) * (kXBlock / 2); }

// Floats one row of x takes in quant_x's layout for `kind` (the row stride the row kernels read).
inline int64_t x_stride(int kind, int64_t K) { return kind == kNF4 ? K : x_blocks(K) * (kXBlock / 2 + 1); }

// out[0:x_stride(kind, K)] = x[0:K] in the layout the row kernels read for `kind` (NF4: fp32, each 32-chunk
// [x0 x2 .. x30 | x1 x3 .. x31], K % 32 == 0, which the callers check; int8: per 64-block the int16 values
// [x0 x2 .. x62 | x1 x3 .. x63] zero-padded past K, then the blocks' scales).
template <typename T>
inline void quant_x(const T* x, int64_t K, int kind, float* out) {
  if (kind == kNF4) {
    for (int64_t k = 0; k < K; ++k) out[(k / 32) * 32 + (k % 2) * 16 + (k % 32) / 2] = to_f32(x[k]);
    return;
  }
  int16_t* xi = reinterpret_cast<int16_t*>(out);
  float* scales = x_scales(out, K);
  for (int64_t b = 0; b < x_blocks(K); ++b) {
    const int64_t k0 = b * kXBlock, len = std::min<int64_t>(kXBlock, K - k0);
    float v[kXBlock] = {}, top = 0.f;
    for (int64_t j = 0; j < len; ++j) v[j] = to_f32(x[k0 + j]), top = std::max(top, std::fabs(v[j]));
    // scale = top / 32767 and q = nearbyint(x * (32767 / top)): |q| <= 32767. A non-finite top gives a
    // non-finite scale, so a NaN/inf in x still reaches the output as one.
    const float inv = top > 0.f ? 32767.f / top : 0.f;
    scales[b] = top / 32767.f;
    for (int64_t j = 0; j < kXBlock; ++j) {
      const float r = std::nearbyint(v[j] * inv);
      xi[k0 + x_slot(j)] = int16_t(r == r ? std::max(-32767.f, std::min(32767.f, r)) : 0.f);
    }
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
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

// Pairs of int16 products summed into int32 lanes: one vpdpwssd with VNNI, madd + add without.
inline __m512i dot_i16(__m512i acc, __m512i a, __m512i b) {
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(acc, a, b);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

// x rows in quant_x's int8 layout: per 64-block 64 int16 (even elements, then odd), the scales after them.
// Each 64 bytes of W split into its even and odd bytes, sign-extended to int16 by shifts (no shuffle port),
// so both halves meet x's halves lane for lane. Per lane a block sums 4 products of |127 * 32767|, < 2^24:
// its int32 -> fp32 conversion is exact.
template <int M>
inline void int8_row(const QuantWeight& w, int64_t n, const float* x, float* sums) {
  const int64_t K = w.k, nb = x_blocks(K), S = x_stride(kInt8, K);
  const int8_t* q = reinterpret_cast<const int8_t*>(w.codes) + n * K;
  // Independent scale-FMA chains per row of x: one chain is bound by the FMA latency (4 cycles a block).
  constexpr int C = M == 1 ? 4 : (M == 2 ? 2 : 1);
  __m512 acc[M][C];
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < C; ++c) acc[m][c] = _mm512_setzero_ps();
  auto block = [&](int64_t bb, __m512i wv, int c) {
    const __m512i even = _mm512_srai_epi16(_mm512_slli_epi16(wv, 8), 8), odd = _mm512_srai_epi16(wv, 8);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const int16_t* xi = reinterpret_cast<const int16_t*>(x + m * S) + bb * kXBlock;
      __m512i d = dot_i16(_mm512_setzero_si512(), even, _mm512_loadu_si512(xi));
      d = dot_i16(d, odd, _mm512_loadu_si512(xi + kXBlock / 2));
      const __m512 s = _mm512_set1_ps(x_scales(x + m * S, K)[bb]);
      acc[m][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[m][c]);
    }
  };
  const int64_t full = K / kXBlock;
  int64_t bb = 0;
  for (; bb + C <= full; bb += C) {
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) block(bb + c, _mm512_loadu_si512(q + (bb + c) * kXBlock), c);
  }
  for (; bb < full; ++bb) block(bb, _mm512_loadu_si512(q + bb * kXBlock), 0);
  if (full < nb) {  // masked tail: bytes past K load as 0 and cannot fault (x is zero-padded there too)
    const __mmask64 t = (~0ull) >> (kXBlock - (K - full * kXBlock));
    block(full, _mm512_maskz_loadu_epi8(t, q + full * kXBlock), 0);
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
  const int64_t K = w.k, nb = x_blocks(K), S = x_stride(kInt8, K);
  const int8_t* q = reinterpret_cast<const int8_t*>(w.codes) + n * K;
  for (int m = 0; m < M; ++m) {
    const int16_t* xi = reinterpret_cast<const int16_t*>(x + m * S);
    const float* scales = x_scales(x + m * S, K);
    float s = 0.f;
    for (int64_t bb = 0; bb < nb; ++bb) {
      const int8_t* qb = q + bb * kXBlock;
      const int16_t* xb = xi + bb * kXBlock;
      int32_t d = 0;
      if ((bb + 1) * kXBlock <= K) {  // a whole block: even/odd pairs, as the AVX-512 path (vectorizes)
#pragma omp simd reduction(+ : d)
        for (int j = 0; j < kXBlock / 2; ++j)
          d += int32_t(qb[2 * j]) * xb[j] + int32_t(qb[2 * j + 1]) * xb[kXBlock / 2 + j];
      } else {
        for (int64_t j = 0; bb * kXBlock + j < K; ++j) d += int32_t(qb[j]) * xb[x_slot(j)];
      }
      s += float(d) * scales[bb];
    }
    sums[m] = s * w.scale[n];
  }
}
#endif

template <int M>
inline void row(const QuantWeight& w, int64_t n, const float* x, float* sums) {
  if (w.kind == kNF4) nf4_row<M>(w, n, x, sums);
  else int8_row<M>(w, n, x, sums);
}

// sums[0:m] for any m >= 1 (m rows of x in quant_x's layout, x_stride apart): kMaxRows rows of x per pass
// over W's row.
inline void rows(const QuantWeight& w, int64_t n, const float* x, int64_t m, float* sums) {
  for (int64_t m0 = 0; m0 < m; m0 += kMaxRows) {
    const float* xs = x + m0 * x_stride(w.kind, w.k);
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
