// Weight-only quantized linear layers (CPU): NF4 (bitsandbytes' layout, double-quantized absmax) and int8
// (per output channel). The layout is documented in kernels/reference.py, the spec these match.
//
// What it fuses and why: a quantized base weight is read as 4 or 8 bits per element and turned back into
// floats only a tile at a time, never as a whole dense copy of the model.
//  - quant_dequant_cpu: rows [row0, row0 + rows) of W -> fp32/bf16 tile. The training path (many tokens) is
//    compute-bound, so kernels/ops/quant_linear.py multiplies each tile with torch's GEMM; the tile is
//    bitwise the reference's dequantization (same fp32 products, one rounding to bf16).
//  - quant_gemv_cpu: out [M, N] = x [M, K] @ W^T for a few rows (decoding), through quant_gemv.h's row
//    kernels (codes expanded in registers, never stored; the fused decode step uses the same rows). fp32
//    accumulation (int8: exact int32 sums per 64-block of x rounded to int16, see quant_gemv.h); bf16
//    output rounded once.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "ops.h"
#include "quant_gemv.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define KERNELS_QUANT_AVX512 1
#endif

namespace kernels {
namespace {

using qgemv::kBlock;
using qgemv::nf4_scale;

inline int nibble(const uint8_t* codes, int64_t i) {
  const uint8_t byte = codes[i >> 1];
  return (i & 1) ? (byte & 15) : (byte >> 4);
}

#if KERNELS_QUANT_AVX512
inline void store16(float* dst, __m512 v) { _mm512_storeu_ps(dst, v); }
inline void store16(bf16* dst, __m512 v) {
#if defined(__AVX512BF16__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
#else
  alignas(64) float t[16];
  _mm512_store_ps(t, v);
  store_row(dst, t, 16);
#endif
}

// The 64 values of one block into out: lut[code] for its 32 bytes, high nibble first, as nibble() reads them
// (the scalar path costs ~2 ns an element, more than the GEMM it feeds at training batch sizes). lut holds the
// reference's products code book * absmax, one vector multiply (the same fp32 roundings as 16 scalar ones,
// without the stall of reloading 16 scalar stores as a vector).
template <typename T>
inline void nf4_block_store(const uint8_t* codes, __m512 lut, T* out) {
  const __m512i shifts = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);  // lane 0: >> 4
  const __m512i low4 = _mm512_set1_epi32(15);
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + 8 * q));
    const __m512i each = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(bytes, bytes));  // b0 b0 b1 b1 ...
    const __m512i idx = _mm512_and_si512(_mm512_srlv_epi32(each, shifts), low4);
    store16(out + 16 * q, _mm512_permutexvar_ps(idx, lut));
  }
}
#endif

template <typename T>
void dequant_nf4(const QuantWeight& w, int64_t start, int64_t count, T* out, int n_threads) {
  const int64_t b0 = start / kBlock, b1 = (start + count + kBlock - 1) / kBlock;
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t b = b0; b < b1; ++b) {
    const float s = nf4_scale(w, b);
    const int64_t lo = std::max(start, b * kBlock), hi = std::min(start + count, (b + 1) * kBlock);
#if KERNELS_QUANT_AVX512
    if (lo == b * kBlock && hi == lo + kBlock) {  // a whole block: 16 codes per vpermps, rows rounded at once
      nf4_block_store(w.codes + lo / 2, _mm512_mul_ps(_mm512_loadu_ps(w.nf4), _mm512_set1_ps(s)), out + (lo - start));
      continue;
    }
#endif
    float lut[16];  // code * absmax: the reference's product, once per code
    for (int j = 0; j < 16; ++j) lut[j] = w.nf4[j] * s;
    for (int64_t i = lo; i < hi; ++i) store(out + (i - start), lut[nibble(w.codes, i)]);
  }
}

template <typename T>
void dequant_int8(const QuantWeight& w, int64_t row0, int64_t rows, T* out, int n_threads) {
  const int8_t* q = reinterpret_cast<const int8_t*>(w.codes);
  const int64_t K = w.k;
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float s = w.scale[row0 + r];
    const int8_t* src = q + (row0 + r) * K;
    T* dst = out + r * K;
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) store(dst + k, float(src[k]) * s);
  }
}

// ---- GEMV ----------------------------------------------------------------------------------------------
template <int M, typename T>
void gemv_rows(const QuantGemvArgs& a, const float* xs) {
  const QuantWeight& w = a.w;
  const int64_t N = w.n;
  T* out = static_cast<T*>(a.out);
  const T* bias = static_cast<const T*>(a.bias);
  const int n_threads = int(std::max<int64_t>(1, std::min<int64_t>(a.n_threads, N)));
#pragma omp parallel num_threads(n_threads)
  {
    // One contiguous range of weight rows per thread: each core streams its own part of W in order.
    const int64_t tid = omp_get_thread_num(), nt = omp_get_num_threads();
    float sums[M];
    for (int64_t n = N * tid / nt; n < N * (tid + 1) / nt; ++n) {
      qgemv::row<M>(w, n, xs, sums);
      const float b = bias ? to_f32(bias[n]) : 0.f;
      for (int m = 0; m < M; ++m) store(out + m * N + n, sums[m] + b);
    }
  }
}

template <typename T>
void gemv_all_rows(const QuantGemvArgs& a) {
  const int64_t M = a.m, K = a.w.k;
  if (M <= 0 || a.w.n <= 0) return;
  // x once in the layout the row kernels read (quant_gemv.h: NF4 fp32 in nf4_slot order, int8 int16 blocks).
  const int64_t S = qgemv::x_stride(a.w.kind, K);
  std::vector<float> xs(size_t(M * S));
  const T* x = static_cast<const T*>(a.x);
  for (int64_t m = 0; m < M; ++m) qgemv::quant_x(x + m * K, K, a.w.kind, xs.data() + m * S);
  switch (M) {
    case 1: return gemv_rows<1, T>(a, xs.data());
    case 2: return gemv_rows<2, T>(a, xs.data());
    case 3: return gemv_rows<3, T>(a, xs.data());
    case 4: return gemv_rows<4, T>(a, xs.data());
    case 5: return gemv_rows<5, T>(a, xs.data());
    case 6: return gemv_rows<6, T>(a, xs.data());
    case 7: return gemv_rows<7, T>(a, xs.data());
    default: return gemv_rows<qgemv::kMaxRows, T>(a, xs.data());
  }
}

}  // namespace

void quant_dequant_cpu(const QuantDequantArgs& a) {
  if (a.rows <= 0 || a.w.k <= 0) return;
  with_f32_or_bf16(a.out_dtype, [&](auto t) {
    using T = decltype(t);
    T* out = static_cast<T*>(a.out);
    if (a.w.kind == kNF4) dequant_nf4(a.w, a.row0 * a.w.k, a.rows * a.w.k, out, a.n_threads);
    else dequant_int8(a.w, a.row0, a.rows, out, a.n_threads);
  });
}

void quant_gemv_cpu(const QuantGemvArgs& a) {
  with_f32_or_bf16(a.dtype, [&](auto t) { gemv_all_rows<decltype(t)>(a); });
}

}  // namespace kernels
