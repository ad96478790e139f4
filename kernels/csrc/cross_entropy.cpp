// Fused cross-entropy forward + backward (CPU).
//
// What it fuses: softcap -> max -> sum(exp) -> loss -> gradient, row by row. F.cross_entropy
// reads/writes [N, V] roughly six times (log_softmax, saved output, nll, backward of both);
// here each logit is read from memory once (online softmax over L1-sized blocks) and each
// gradient written once; exp(z - max) is computed once per element and kept in a cache-resident
// fp32 row until the gradient pass.
//
// The gradient is produced in the forward pass already multiplied by `scale` (1/n_valid for
// reduction="mean"), so backward only has to scale by grad_output (usually exactly 1).
// All math is fp32; bf16/fp16 are only storage. In particular the true-class gradient
// p_t - (1 - eps) is formed in fp32 and rounded once (the bf16 precision bug in Liger #1329).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "ops.h"

namespace kernels {
namespace {

constexpr int64_t kBlock = 512;  // elements per block of the one-pass (online) softmax

// Where a faster one-pass version exists (bf16 with AVX512-BF16 below), g[0:n] =
// round(c * e[0:n] - shift) and true; otherwise false and the caller does it in two passes.
template <typename T>
inline bool store_scaled_row(T*, const float*, int64_t, float, float) { return false; }

// max(z[0:n]) (-inf when n = 0); NaN entries are skipped here and propagate through the sum.
template <typename Src>
inline float block_max(const Src* z, int64_t n) {
  float bm = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : bm)
  for (int64_t j = 0; j < n; ++j) {
    float zj = to_f32(z[j]);
    bm = zj > bm ? zj : bm;
  }
  return bm;
}

// e[j] = exp(z[j] - m) for j < n (stored only when e is non-null); s += sum(e), sd += sum(z - m).
// This is where the kernel spends its time: one exp per logit.
template <typename Src>
inline void exp_block(const Src* z, int64_t n, float m, float* e, float& s, float& sd, bool) {
  if (e) {
#pragma omp simd reduction(+ : s, sd)
    for (int64_t j = 0; j < n; ++j) {
      float d = to_f32(z[j]) - m;
      float ej = vexp(d);
      e[j] = ej;
      s += ej;
      sd += d;
    }
  } else {
#pragma omp simd reduction(+ : s, sd)
    for (int64_t j = 0; j < n; ++j) {
      float d = to_f32(z[j]) - m;
      s += vexp(d);
      sd += d;
    }
  }
}

#if KERNELS_AVX512
// exp(d) for d = z - max <= 0 (or NaN), for 16-bit logits: 2^t with t = d * log2(e), split by
// vreduceps into t - floor(t) in [0, 1) (a degree-5 minimax polynomial for 2^f, 1.7e-7 relative)
// and floor(t), which vscalefps applies. 9 instructions against vexp16's 17: no Cody-Waite
// split of ln 2 (t's rounding costs up to ~1e-6 relative where p > 1e-6, invisible after
// rounding to bf16/fp16), no upper clamp (d <= 0), and the lower clamp at t = -170 makes
// 2^t underflow to exactly 0 (so -inf logits give p = 0) with no mask. NaN propagates.
inline __m512 exp2_nonpositive16(__m512 d) {
  const __m512 t = _mm512_max_ps(_mm512_set1_ps(-170.0f),  // max returns t when t is NaN
                                 _mm512_mul_ps(d, _mm512_set1_ps(1.44269504088896341f)));
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);  // t - floor(t)
  __m512 p = _mm512_set1_ps(0.0018762329127639532f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.00899258442223072f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05582360550761223f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24015453457832336f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931529641151428f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999999403953552f));
  return _mm512_scalef_ps(p, t);  // p * 2^floor(t)
}
inline __m512 exp_of_shifted(__m512 d, const float*) { return vexp16(d); }
inline __m512 exp_of_shifted(__m512 d, const bf16*) { return exp2_nonpositive16(d); }

// The same with intrinsics for fp32 and bf16 logits (fp16 keeps the generic loop); sd is only
// accumulated when want_sd (label smoothing).
template <typename Src>
inline void exp_block_avx512(const Src* z, int64_t n, float m, float* e, float& s, float& sd,
                             bool want_sd) {
  const __m512 mv = _mm512_set1_ps(m);
  __m512 vs = _mm512_setzero_ps(), vsd = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 d = _mm512_sub_ps(load16(z + j), mv);
    const __m512 ej = exp_of_shifted(d, z);
    if (e) _mm512_storeu_ps(e + j, ej);
    vs = _mm512_add_ps(vs, ej);
    if (want_sd) vsd = _mm512_add_ps(vsd, d);
  }
  if (j < n) {  // masked tail: lanes past n add nothing
    const __mmask16 k = __mmask16((1u << (n - j)) - 1u);
    const __m512 d = _mm512_maskz_sub_ps(k, load16(z + j, k), mv);
    const __m512 ej = _mm512_maskz_mov_ps(k, exp_of_shifted(d, z));
    if (e) _mm512_mask_storeu_ps(e + j, k, ej);
    vs = _mm512_add_ps(vs, ej);
    vsd = _mm512_add_ps(vsd, d);
  }
  s += _mm512_reduce_add_ps(vs);
  if (want_sd) sd += _mm512_reduce_add_ps(vsd);
}
#if defined(__AVX512BF16__)
// g[0:n] = bf16(c * e[0:n] - shift) in one pass (no fp32 round trip through e); true if done.
inline bool store_scaled_row(bf16* g, const float* e, int64_t n, float c, float shift) {
  const __m512 cv = _mm512_set1_ps(c), sv = _mm512_set1_ps(shift);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(g + j), reinterpret_cast<__m256i>(
        _mm512_cvtneps_pbh(_mm512_fmsub_ps(cv, _mm512_loadu_ps(e + j), sv))));
  for (; j < n; ++j) store(g + j, c * e[j] - shift);
  return true;
}
#endif

template <typename Src>
inline float block_max_avx512(const Src* z, int64_t n) {
  // vmaxps returns its second operand if either is NaN: like `zj > bm ? zj : bm`.
  __m512 bm = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) bm = _mm512_max_ps(load16(z + j), bm);
  if (j < n) bm = _mm512_mask_max_ps(bm, __mmask16((1u << (n - j)) - 1u), load16(z + j), bm);
  return _mm512_reduce_max_ps(bm);
}
template <>
inline float block_max<float>(const float* z, int64_t n) { return block_max_avx512(z, n); }
// bf16: 32 logits per 512-bit load. A bf16 is the top half of an fp32, so the odd ones become
// fp32 by masking off the low half and the even ones by a shift: no widening shuffle (the max
// does not care about the order).
template <>
inline float block_max<bf16>(const bf16* z, int64_t n) {
  __m512 bm = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512i high = _mm512_set1_epi32(int(0xFFFF0000u));
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512i v = _mm512_loadu_si512(z + j);
    bm = _mm512_max_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), bm);
    bm = _mm512_max_ps(_mm512_castsi512_ps(_mm512_and_si512(v, high)), bm);
  }
  const float head = _mm512_reduce_max_ps(bm), tail = block_max_avx512(z + j, n - j);
  return tail > head ? tail : head;
}
template <>
inline void exp_block<float>(const float* z, int64_t n, float m, float* e, float& s, float& sd,
                             bool want_sd) {
  exp_block_avx512(z, n, m, e, s, sd, want_sd);
}
template <>
inline void exp_block<bf16>(const bf16* z, int64_t n, float m, float* e, float& s, float& sd,
                            bool want_sd) {
  exp_block_avx512(z, n, m, e, s, sd, want_sd);
}
#endif

// z = logits after the optional softcap (a fp32 scratch row when capped, else the input row).
// Pass A, one sweep over z in blocks that fit L1: block max, then e = exp(z - m_run) stored
// and summed, where m_run is the running max (the running sum is rescaled when it grows).
// Reading each block twice from L1 instead of the row twice from memory makes the kernel
// overlap its one DRAM read with the exp math. Pass B turns e into the gradient, fixing each
// block's stale max with one scalar exp.
template <typename Src, typename T>
void row_loss_and_grad(const CrossEntropyArgs& a, int64_t i, const Src* z, const float* capped,
                       float* e, float* block_m, T* g) {
  const int64_t V = a.vocab, t = a.targets[i];
  const float ninf = -std::numeric_limits<float>::infinity();
  const float zt = to_f32(z[t]);  // before e (which may alias the row) overwrites it
  // sum_d = sum(z - m) feeds the label-smoothing term; kept relative to m for precision.
  float m = ninf, sum = 0.f, sum_d = 0.f;
  for (int64_t b0 = 0, blk = 0; b0 < V; b0 += kBlock, ++blk) {
    const int64_t n = std::min(kBlock, V - b0);
    const float bm = block_max(z + b0, n);
    if (bm > m) {  // the running max grows: rescale what was summed so far
      if (m != ninf) {
        sum *= vexp(m - bm);
        sum_d += float(b0) * (m - bm);
      }
      m = bm;
    }
    block_m[blk] = m;
    float s = 0.f, sd = 0.f;
    if (m == ninf) {  // all -inf so far: nothing to add (avoids -inf - -inf = NaN)
      if (g)
        for (int64_t j = b0; j < b0 + n; ++j) e[j] = 0.f;
      sd = ninf;
    } else {
      exp_block(z + b0, n, m, g ? e + b0 : nullptr, s, sd, a.label_smoothing > 0.f);
    }
    sum += s;
    sum_d += sd;
  }
  const float eps = a.label_smoothing, log_sum = std::log(sum), lse = m + log_sum;
  // lse - z_t computed as (m - z_t) + log(sum): exact-ish even for logits near 1e4.
  float loss = (1.f - eps) * ((m - zt) + log_sum);
  if (eps > 0.f) loss += eps * (log_sum - sum_d / float(V));  // lse - mean(z)
  if (a.z_loss > 0.f) loss += a.z_loss * lse * lse;
  a.loss[i] = loss;
  if (!g) return;

  const float rs = a.scale * (a.row_scale ? a.row_scale[i] : 1.f);
  const float zl = 1.f + 2.f * a.z_loss * lse;  // d(z_loss * lse^2)/dz = 2 z_loss lse p
  const float coef = rs * zl / sum, shift = rs * eps / float(V);
  const float inv_cap = a.softcap > 0.f ? 1.f / a.softcap : 0.f;
  for (int64_t b0 = 0, blk = 0; b0 < V; b0 += kBlock, ++blk) {
    const int64_t n = std::min(kBlock, V - b0);
    const float c = coef * vexp(block_m[blk] - m);  // e_j * c = p_j * rs * zl
    if (!std::is_same<T, float>::value) {
      // Low-precision grads: finish the block in the fp32 scratch, then round it in one go.
      float* eb = e + b0;
      const float* cb = capped ? capped + b0 : nullptr;
      if (cb) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          float u = cb[j] * inv_cap;
          eb[j] = (c * eb[j] - shift) * (1.f - u * u);
        }
      } else if (store_scaled_row(g + b0, eb, n, c, shift)) {
        continue;  // bf16: scaled and rounded in one pass
      } else {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) eb[j] = c * eb[j] - shift;
      }
      store_row(g + b0, eb, n);
    } else if (capped) {
#pragma omp simd
      for (int64_t j = b0; j < b0 + n; ++j) {
        float u = capped[j] * inv_cap;  // d(s tanh(x/s))/dx = 1 - tanh^2
        store(g + j, (c * e[j] - shift) * (1.f - u * u));
      }
    } else {
#pragma omp simd
      for (int64_t j = b0; j < b0 + n; ++j) store(g + j, c * e[j] - shift);
    }
  }
  // True class: p_t*zl - eps/V - (1 - eps) in fp32, rounded to T once. e[t] was overwritten
  // above only when e aliases g, so recompute p_t from z_t.
  const float pt = vexp(zt - m) / sum;
  float gt = rs * (pt * zl - eps / float(V) - (1.f - eps));
  if (capped) gt *= 1.f - (zt * inv_cap) * (zt * inv_cap);
  store(g + t, gt);
}

template <typename T>
void run(const CrossEntropyArgs& a) {
  const bool cap = a.softcap > 0.f;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // fp32 gradients without softcap can hold e = exp(z - m) themselves (no scratch row);
  // otherwise e needs fp32 scratch (a bf16 e would lose the precision of p_t - 1).
  const bool e_in_grad = std::is_same<T, float>::value && a.grad && !cap;
#pragma omp parallel num_threads(a.n_threads)
  {
    // Per-thread scratch, reused across rows.
    std::vector<float> e(a.grad && !e_in_grad ? a.vocab : 0), capped(cap ? a.vocab : 0);
    std::vector<float> block_m((a.vocab + kBlock - 1) / kBlock);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < a.n_rows; ++i) {
      const T* x = static_cast<const T*>(a.logits) + i * a.row_stride;
      T* g = a.grad ? static_cast<T*>(a.grad) + i * a.grad_row_stride : nullptr;
      const int64_t t = a.targets[i];
      if (t == a.ignore_index || t < 0 || t >= a.vocab) {
        // Ignored rows contribute nothing. Out-of-range targets are rejected in Python; if
        // one gets here anyway the row turns NaN instead of reading out of bounds.
        const bool bad = t != a.ignore_index;
        a.loss[i] = bad ? nan : 0.f;
        if (g)
          for (int64_t j = 0; j < a.vocab; ++j) store(g + j, bad ? nan : 0.f);
        continue;
      }
      float* ebuf = e_in_grad ? reinterpret_cast<float*>(g) : e.data();
      if (cap) {
        const float s = a.softcap, inv = 1.f / s;
        float* c = capped.data();
#pragma omp simd
        for (int64_t j = 0; j < a.vocab; ++j) c[j] = s * vtanh(to_f32(x[j]) * inv);
        row_loss_and_grad<float, T>(a, i, c, c, ebuf, block_m.data(), g);
      } else {
        row_loss_and_grad<T, T>(a, i, x, nullptr, ebuf, block_m.data(), g);
      }
    }
  }
}

}  // namespace

void cross_entropy_cpu(const CrossEntropyArgs& a) {
  switch (a.dtype) {
    case kF32: return run<float>(a);
    case kBF16: return run<bf16>(a);
    case kF16: return run<f16>(a);
  }
}

}  // namespace kernels
