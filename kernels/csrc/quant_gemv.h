// One output row of a weight-only quantized GEMV (CPU): sums[m] = dot(W[n, :], x[m, :]) for M rows of x,
// with W NF4 or int8 (layout: kernels/reference.py). Shared by quant_linear.cpp (the layer's GEMV) and
// decode_step.cpp (the fused decode step), so the two give the same bits for the same row.
//
// Memory-bound, so the codes are expanded in registers and never stored. x is prepared once per call in the
// layout its kind reads (quant_x):
//  - NF4: x fp32, each 64-block permuted to the order AVX-512 expands the block's codes in: its 32 code bytes
//    are read as 16 words (4 codes each) widened to 16 dword lanes, and one vpermps per nibble position
//    (shift 0, 4, 8, 12; vpermps reads only an index's low 4 bits, so no masking) looks the codes of that
//    position up in the 16-entry table: 1 widening + 3 shifts + 4 lookups per 64 codes, shared by all rows
//    of x. Slot j * 16 + i of a block holds element 4 i + (j ^ 1) (a byte's low nibble is the odd element).
//    The block's absmax is applied once per 64 products; fp32 accumulation. W is prefetched ahead like the
//    dense GEMV (gemv.h kPrefetch).
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
#include "gemv.h"
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

// NF4: the slot of element r (< 64) of a block in quant_x's layout (the header comment says why this order).
inline int64_t nf4_slot(int64_t r) { return ((r % 4) ^ 1) * 16 + r / 4; }

// out[0:x_stride(kind, K)] = x[0:K] in the layout the row kernels read for `kind` (NF4: fp32, each 64-block
// in nf4_slot order, K % 64 == 0, which the callers check; int8: per 64-block the int16 values
// [x0 x2 .. x62 | x1 x3 .. x63] zero-padded past K, then the blocks' scales).
template <typename T>
inline void quant_x(const T* x, int64_t K, int kind, float* out) {
  if (kind == kNF4) {
    for (int64_t k = 0; k < K; ++k) out[(k / kBlock) * kBlock + nf4_slot(k % kBlock)] = to_f32(x[k]);
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
// One NF4 block (32 code bytes, 64 weights) times M rows of x (nf4_slot order, ldx apart), scaled by the
// block's absmax s into acc[m]. The 4 table lookups are shared by the M rows; per row two product chains.
template <int M, bool PF>
inline void nf4_block(const uint8_t* codes, const float* x, int64_t ldx, __m512 table, __m512 s, __m512 (&acc)[M]) {
  gemv::prefetch_ahead<PF>(codes);  // one 64-byte line per two blocks; the second prefetch is a no-op
  const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes)));
  const __m512 w0 = _mm512_permutexvar_ps(v, table);
  const __m512 w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
  const __m512 w2 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 8), table);
  const __m512 w3 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 12), table);
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
    const float* xm = x + m * ldx;
    __m512 p = _mm512_mul_ps(w0, _mm512_loadu_ps(xm));
    __m512 q = _mm512_mul_ps(w1, _mm512_loadu_ps(xm + 16));
    p = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xm + 32), p);
    q = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xm + 48), q);
    acc[m] = _mm512_fmadd_ps(_mm512_add_ps(p, q), s, acc[m]);
  }
}

template <int M, bool PF>
inline void nf4_row(const QuantWeight& w, int64_t n, const float* xd, float* sums) {
  const int64_t K = w.k, nb = K / kBlock;
  const __m512 table = _mm512_loadu_ps(w.nf4);
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  const uint8_t* codes = w.codes + n * K / 2;
  for (int64_t bb = 0; bb < nb; ++bb)
    nf4_block<M, PF>(codes + bb * 32, xd + bb * kBlock, K, table, _mm512_set1_ps(nf4_scale(w, n * nb + bb)), acc);
  for (int m = 0; m < M; ++m) sums[m] = _mm512_reduce_add_ps(acc[m]);
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
template <int M, bool PF>
inline void int8_row(const QuantWeight& w, int64_t n, const float* x, float* sums) {
  const int64_t K = w.k, nb = x_blocks(K), S = x_stride(kInt8, K);
  const int8_t* q = reinterpret_cast<const int8_t*>(w.codes) + n * K;
  // Independent scale-FMA chains per row of x: one chain is bound by the FMA latency (4 cycles a block).
  constexpr int C = M == 1 ? 4 : (M == 2 ? 2 : 1);
  __m512 acc[M][C];
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < C; ++c) acc[m][c] = _mm512_setzero_ps();
  auto block = [&](int64_t bb, __m512i wv, int c) {
    gemv::prefetch_ahead<PF>(q + bb * kXBlock);  // one 64-byte line per block
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
#else  // portable rows (PF: no software prefetch on this path)
template <int M, bool PF>
inline void nf4_row(const QuantWeight& w, int64_t n, const float* xd, float* sums) {
  const int64_t K = w.k, nb = K / kBlock;
  const uint8_t* codes = w.codes + n * K / 2;
  for (int m = 0; m < M; ++m) sums[m] = 0.f;
  for (int64_t bb = 0; bb < nb; ++bb) {
    const float s = nf4_scale(w, n * nb + bb);
    for (int m = 0; m < M; ++m) {
      float part = 0.f;
      for (int64_t r = 0; r < kBlock; ++r) {
        const uint8_t byte = codes[bb * 32 + r / 2];
        part += w.nf4[r % 2 ? byte & 15 : byte >> 4] * xd[m * K + bb * kBlock + nf4_slot(r)];
      }
      sums[m] += part * s;
    }
  }
}

template <int M, bool PF>
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

template <int M, bool PF>
inline void row_with(const QuantWeight& w, int64_t n, const float* x, float* sums) {
  if (w.kind == kNF4) nf4_row<M, PF>(w, n, x, sums);
  else int8_row<M, PF>(w, n, x, sums);
}

// One weight row against M rows of x; W prefetched ahead where gemv::kPrefetch says so.
template <int M>
inline void row(const QuantWeight& w, int64_t n, const float* x, float* sums) {
  if (gemv::kPrefetch) row_with<M, true>(w, n, x, sums);
  else row_with<M, false>(w, n, x, sums);
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
