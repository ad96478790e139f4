// Shared helpers for the CPU kernels: dtype codes, bf16/fp16 <-> fp32 conversion and a
// branch-free exp that GCC/Clang auto-vectorize inside `#pragma omp simd` loops.
//
// Portable code first: every hot loop is written so the compiler can vectorize it for the -march
// chosen at build time (AVX-512, AVX2 or NEON from one source; no calls into libm, no
// data-dependent branches, selects instead of ifs). Intrinsics are used only where measured
// auto-vectorization falls short, each behind its ISA macro with the portable loop as the
// fallback: here load16/vexp16 (AVX-512) and store_row<bf16> (AVX512-BF16), and the AVX-512
// paths of cross_entropy.cpp and linear.cpp that build on them.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define KERNELS_AVX512 1
#elif defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "ops.h"

namespace kernels {

struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

// f(T{}) with T the storage type of an fp32-or-bf16 dtype code. Kernels with several tensors of
// independent dtypes (rms_norm, rope) nest one call per tensor to pick their template instance.
template <typename F>
inline void with_f32_or_bf16(int dtype, F&& f) {
  if (dtype == kBF16) f(bf16{});
  else f(float{});
}

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// Loading/storing any supported storage type as fp32. All math happens in fp32.
inline float to_f32(float x) { return x; }
inline float to_f32(bf16 x) { return bits_to_float(uint32_t(x.bits) << 16); }

inline void store(float* p, float v) { *p = v; }
inline void store(bf16* p, float v) {
  // Round to nearest even, like torch's .to(torch.bfloat16); NaN stays a (quiet) NaN.
  uint32_t u = float_to_bits(v);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  p->bits = uint16_t(nan ? ((u >> 16) | 0x40u) : rounded);
}

#if defined(__FLT16_MAX__)
// The compiler has _Float16 (GCC >= 12 on x86-64 and aarch64): conversions become F16C /
// AVX-512 FP16 / NEON instructions and vectorize.
inline float to_f32(f16 x) { _Float16 h; std::memcpy(&h, &x.bits, 2); return float(h); }
inline void store(f16* p, float v) { _Float16 h = _Float16(v); std::memcpy(&p->bits, &h, 2); }
#else
// Portable bit-level fp16 conversion for compilers without _Float16 (slower, still exact).
inline float to_f32(f16 x) {
  uint32_t h = x.bits, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  if (exp == 0x1F) return bits_to_float(sign | 0x7F800000u | (man << 13));
  if (exp == 0) return (sign ? -1.f : 1.f) * float(man) * (1.0f / 16777216.0f);
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}
inline void store(f16* p, float v) {
  uint32_t u = float_to_bits(v), sign = (u >> 16) & 0x8000u;
  float a = v < 0 ? -v : v;
  uint16_t out;
  if (!(a == a)) out = 0x7E00;
  else if (a >= 65520.f) out = 0x7C00;
  else if (a < 6.103515625e-05f) out = uint16_t(int(a * 16777216.0f + 0.5f));  // subnormal
  else {
    uint32_t b = float_to_bits(a);
    b += 0xFFFu + ((b >> 13) & 1u);
    out = uint16_t(((b >> 13) - (112u << 10)) & 0x7FFFu);
  }
  p->bits = uint16_t(out | sign);
}
#endif

// dst[0:n] = src[0:n] rounded to T. The generic loop auto-vectorizes; bf16 rounding by integer
// ops costs ~5 instructions per element, so with AVX512-BF16 one vcvtneps2bf16 does 16 at once
// (round-to-nearest-even as torch; it flushes bf16 denormals, < 1e-38, to zero).
template <typename T>
inline void store_row(T* dst, const float* src, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) store(dst + j, src[j]);
}
#if defined(__AVX512BF16__)
template <>
inline void store_row<bf16>(bf16* dst, const float* src, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j),
                        reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(src + j))));
  for (; j < n; ++j) store(dst + j, src[j]);
}
#endif

// exp(x) for fp32, ~1 ulp (Cephes expf polynomial), written to vectorize.
// exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln2 / 2.
// Inputs below -87 return exactly 0 (so -inf logits give p = 0); NaN propagates.
inline float vexp(float x) {
  const float lo = -87.0f, hi = 88.0f;  // hi keeps 2^n finite (n <= 127)
  float xc = x < lo ? lo : x;   // written as selects (not fmaxf) so NaN survives
  xc = xc > hi ? hi : xc;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to nearest
  float n = (xc * 1.44269504088896341f + magic) - magic;
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  int32_t e = int32_t(n) + 127;
  float scale = bits_to_float(uint32_t(e) << 23);
  float y = p * scale;
  return x < lo ? 0.0f : y;
}

#if KERNELS_AVX512
// 16 fp32 from memory (fp32 or bf16; a bf16 is the top half of an fp32), optionally masked:
// lanes outside the mask read as 0 and cannot fault.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 widen_bf16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const bf16* p) {
  return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16(const bf16* p, __mmask16 k) {
  return widen_bf16(_mm256_maskz_loadu_epi16(k, p));
}

// vexp on 16 lanes, same polynomial and the same special cases (below -87: exactly 0, so
// -inf gives 0; NaN propagates), ~2 ulp. GCC's vectorization of vexp rounds n with the
// magic-number trick and builds 2^n with integer converts and shifts; here vrndscaleps
// rounds and vscalefps applies 2^n in one instruction each: ~1.3x faster.
inline __m512 vexp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f), hi = _mm512_set1_ps(88.0f);
  // max/min return their second operand when either is NaN: x comes second so NaN survives.
  const __m512 xc = _mm512_min_ps(hi, _mm512_max_ps(lo, x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512 y = _mm512_scalef_ps(p, n);
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ), y);  // x < -87: 0
}
#endif

// tanh via exp of a non-positive argument, so it never overflows:
// tanh(y) = sign(y) * (1 - e) / (1 + e), e = exp(-2|y|).
inline float vtanh(float y) {
  float a = y < 0 ? -y : y;
  float e = vexp(-2.0f * a);
  float t = (1.0f - e) / (1.0f + e);
  return y < 0 ? -t : t;
}

}  // namespace kernels
