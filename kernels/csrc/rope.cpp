// Fused rotary position embedding, rotate-half layout (CPU).
//
// What it fuses: `x * cos + rotate_half(x) * sin` is 5 passes in torch (neg, cat, mul, mul, add)
// plus, in the model, the (B, T, h, hd) -> (B, h, T, hd) transpose copy and, under autocast, the
// cast to bf16 before attention. Here each element is read once and written once, in the output
// layout and dtype, with fp32 math. Backward is the same kernel rotating the other way
// (the transpose of the rotation), reading (B, h, T, hd) and writing (B, T, h, hd).
//
// With H = hd / 2, for j < H (forward, sign = +1; backward, sign = -1 and the sin terms swap
// sides, see below):
//   out[j]     = x[j] * cos[j]         - x[j + H] * sin[j]
//   out[j + H] = x[j + H] * cos[j + H] + x[j] * sin[j + H]
// which is exactly x * cos + cat(-x2, x1) * sin for any cos/sin tables.
#include <omp.h>

#include "common.h"
#include "ops.h"

namespace kernels {
namespace {

template <typename X, typename Y>
void run(const RopeArgs& a) {
  const X* x = static_cast<const X*>(a.x);
  Y* out = static_cast<Y*>(a.out);
  const int64_t H = a.head_dim / 2, T = a.seq, D = a.head_dim;
#pragma omp parallel for collapse(2) num_threads(a.n_threads) schedule(static)
  for (int64_t b = 0; b < a.batch; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t cb = a.table_batch == 1 ? 0 : b;
      const float* c = a.cos + (cb * T + t) * D;
      const float* s = a.sin + (cb * T + t) * D;
      for (int64_t h = 0; h < a.heads; ++h) {
        const X* xi = x + b * a.in_stride[0] + t * a.in_stride[1] + h * a.in_stride[2];
        Y* yi = out + b * a.out_stride[0] + t * a.out_stride[1] + h * a.out_stride[2];
        if (a.inverse) {
          // dx = dy * cos + R^T(dy * sin), R^T(u) = cat(u2, -u1)
#pragma omp simd
          for (int64_t j = 0; j < H; ++j) {
            const float lo = to_f32(xi[j]), hi = to_f32(xi[j + H]);
            store(yi + j, lo * c[j] + hi * s[j + H]);
            store(yi + j + H, hi * c[j + H] - lo * s[j]);
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < H; ++j) {
            const float lo = to_f32(xi[j]), hi = to_f32(xi[j + H]);
            store(yi + j, lo * c[j] - hi * s[j]);
            store(yi + j + H, hi * c[j + H] + lo * s[j + H]);
          }
        }
      }
    }
  }
}

}  // namespace

void rope_cpu(const RopeArgs& a) {
  with_f32_or_bf16(a.x_dtype, [&](auto x) {
    with_f32_or_bf16(a.out_dtype, [&](auto o) { run<decltype(x), decltype(o)>(a); });
  });
}

}  // namespace kernels
