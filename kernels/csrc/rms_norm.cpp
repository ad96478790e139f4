// Fused RMSNorm forward + backward (CPU).
//
// What it fuses: torch's RMSNorm is ~6 elementwise ops (pow, mean, rsqrt, mul, cast, mul) in
// forward and ~10 in backward, each a pass over [N, C] through memory; under autocast the
// output is then cast to bf16 once per consuming Linear. Forward here reads x once, keeps
// 1/rms per row (saved for backward) and writes y directly in the dtype its consumer wants.
// Backward reads dy and x once and produces dx and the weight gradient in the same pass
// (per-thread fp32 partial sums of dw, added at the end).
//
// Semantics (kernels/reference.py rms_norm), all math in fp32:
//   offset == 0 (Llama): n = round_x(x * r), y = round_out(w * n)   -- cast, then scale
//   offset != 0 (Gemma): y = round_out(x * r * (offset + w))       -- scale in fp32, then cast
// where r = 1 / sqrt(mean(x^2) + eps) and round_x rounds to x's dtype (a no-op for fp32).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "ops.h"

namespace kernels {
namespace {

template <typename T>
inline float round_as(float v) {  // v rounded to T and back (identity for fp32)
  T t;
  store(&t, v);
  return to_f32(t);
}

template <typename X, typename W, typename Y>
void forward(const RMSNormArgs& a) {
  const X* x = static_cast<const X*>(a.x);
  const W* w = static_cast<const W*>(a.weight);
  Y* y = static_cast<Y*>(a.out);
  const int64_t C = a.dim;
  const float offset = a.weight_offset;
#pragma omp parallel for num_threads(a.n_threads) schedule(static)
  for (int64_t i = 0; i < a.n_rows; ++i) {
    const X* xi = x + i * a.x_row_stride;
    Y* yi = y + i * C;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < C; ++j) {
      const float v = to_f32(xi[j]);
      ss += v * v;
    }
    const float r = 1.f / std::sqrt(ss / float(C) + a.eps);
    a.rstd[i] = r;
    if (offset != 0.f) {
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) store(yi + j, to_f32(xi[j]) * r * (offset + to_f32(w[j])));
    } else {
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) store(yi + j, to_f32(w[j]) * round_as<X>(to_f32(xi[j]) * r));
    }
  }
}

// n = x * r, e = w + offset, dn = dy * e:
//   dx = r * (dn - n * mean(dn * n)),   dw += dy * n (n rounded to x's dtype when offset == 0,
//   as the Llama forward multiplies w by the rounded n).
template <typename X, typename W, typename G>
void backward(const RMSNormBackwardArgs& a) {
  const X* x = static_cast<const X*>(a.x);
  const W* w = static_cast<const W*>(a.weight);
  const G* gy = static_cast<const G*>(a.grad_out);
  X* gx = static_cast<X*>(a.grad_x);
  const int64_t C = a.dim;
  const float offset = a.weight_offset;
  const int nt = std::max(1, a.n_threads);
  std::vector<float> partial(a.grad_weight ? size_t(nt) * C : 0, 0.f);
#pragma omp parallel num_threads(nt)
  {
    float* dw = a.grad_weight ? partial.data() + size_t(omp_get_thread_num()) * C : nullptr;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < a.n_rows; ++i) {
      const X* xi = x + i * a.x_row_stride;
      const G* gi = gy + i * C;
      const float r = a.rstd[i];
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < C; ++j)
        dot += to_f32(gi[j]) * (offset + to_f32(w[j])) * (to_f32(xi[j]) * r);
      const float mean = dot / float(C);
      if (a.grad_x) {
        X* gxi = gx + i * C;
#pragma omp simd
        for (int64_t j = 0; j < C; ++j) {
          const float n = to_f32(xi[j]) * r;
          store(gxi + j, r * (to_f32(gi[j]) * (offset + to_f32(w[j])) - n * mean));
        }
      }
      if (dw) {
        if (offset != 0.f) {
#pragma omp simd
          for (int64_t j = 0; j < C; ++j) dw[j] += to_f32(gi[j]) * (to_f32(xi[j]) * r);
        } else {
#pragma omp simd
          for (int64_t j = 0; j < C; ++j) dw[j] += to_f32(gi[j]) * round_as<X>(to_f32(xi[j]) * r);
        }
      }
    }
  }
  if (a.grad_weight) {
    for (int64_t j = 0; j < C; ++j) {
      float s = 0.f;
      for (int t = 0; t < nt; ++t) s += partial[size_t(t) * C + j];
      a.grad_weight[j] = s;
    }
  }
}

}  // namespace

// Dispatch on the (x, weight, out / grad) dtypes: fp32 or bf16 each (Python checks).
void rms_norm_cpu(const RMSNormArgs& a) {
  with_f32_or_bf16(a.x_dtype, [&](auto x) {
    with_f32_or_bf16(a.w_dtype, [&](auto w) {
      with_f32_or_bf16(a.out_dtype, [&](auto o) { forward<decltype(x), decltype(w), decltype(o)>(a); });
    });
  });
}

void rms_norm_backward_cpu(const RMSNormBackwardArgs& a) {
  with_f32_or_bf16(a.x_dtype, [&](auto x) {
    with_f32_or_bf16(a.w_dtype, [&](auto w) {
      with_f32_or_bf16(a.g_dtype, [&](auto g) { backward<decltype(x), decltype(w), decltype(g)>(a); });
    });
  });
}

}  // namespace kernels
