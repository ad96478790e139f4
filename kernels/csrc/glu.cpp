// Fused gated activation act(gate) * up (SwiGLU / GeGLU MLPs), forward + backward (CPU).
//
// What it fuses: torch runs act (a pass writing act(gate)) and a multiply in forward, keeping
// gate, up and act(gate) for backward; backward is two multiplies and act's backward, five passes
// over [N, F] in all. Here forward reads gate and up once and writes the product; backward reads
// gate, up and dy once, recomputes act(gate) and writes both gradients. act(gate) is never stored,
// so autograd keeps one [N, F] tensor less per layer.
//
// Semantics: torch's ops rounded where torch rounds them, math in fp32 (T = the storage dtype):
//   a = round_T(act(g)),  y = round_T(a * u)
//   du = round_T(dy * a),  dg = round_T(act'(g) * round_T(dy * u))
// act: silu(g) = g * sigmoid(g), or gelu_tanh(g) = g / 2 * (1 + tanh(sqrt(2 / pi) * (g + 0.044715 g^3))).
// exp and tanh are common.h's vectorizable vexp / vtanh (~1-2 ulp), not libm's, so the result
// is not bitwise torch's, within a bf16 rounding of it.
#include <omp.h>

#include <algorithm>

#include "common.h"
#include "ops.h"

namespace kernels {
namespace {

constexpr float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kKappa = 0.044715f;

template <typename T>
inline float round_as(float v) {  // v rounded to T and back (identity for fp32)
  T t;
  store(&t, v);
  return to_f32(t);
}

// act(x) and, when Grad, act'(x) (same formulas as torch's silu / gelu(approximate="tanh") kernels).
template <int Act, bool Grad>
inline float activation(float x, float* deriv) {
  if (Act == kGluSilu) {
    const float s = 1.f / (1.f + vexp(-x));
    if (Grad) *deriv = s * (1.f + x * (1.f - s));
    return x * s;
  }
  const float x2 = x * x;
  const float t = vtanh(kBeta * (x + kKappa * x2 * x));
  if (Grad) *deriv = 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * kBeta * (1.f + 3.f * kKappa * x2);
  return 0.5f * x * (1.f + t);
}

constexpr int64_t kBlock = 4096;  // elements per OpenMP work item (several per thread, cache-sized)

// body(i) for i in [0, n), in kBlock pieces shared by the thread team; body is inlined into a simd loop.
template <typename Body>
inline void for_blocks(int64_t n, int n_threads, Body&& body) {
#pragma omp parallel for num_threads(n_threads) schedule(static)
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t end = std::min(n, b + kBlock);
#pragma omp simd
    for (int64_t i = b; i < end; ++i) body(i);
  }
}

template <typename T, int Act>
void forward(const GluArgs& a) {
  const T* g = static_cast<const T*>(a.gate);
  const T* u = static_cast<const T*>(a.up);
  T* y = static_cast<T*>(a.out);
  for_blocks(a.n, a.n_threads, [=](int64_t i) {
    const float act = round_as<T>(activation<Act, false>(to_f32(g[i]), nullptr));
    store(y + i, act * to_f32(u[i]));
  });
}

template <typename T, int Act>
void backward(const GluArgs& a) {
  const T* g = static_cast<const T*>(a.gate);
  const T* u = static_cast<const T*>(a.up);
  const T* dy = static_cast<const T*>(a.grad_out);
  T* dg = static_cast<T*>(a.grad_gate);
  T* du = static_cast<T*>(a.grad_up);
  for_blocks(a.n, a.n_threads, [=](int64_t i) {
    float deriv;
    const float act = round_as<T>(activation<Act, true>(to_f32(g[i]), &deriv));
    const float d = to_f32(dy[i]);
    store(du + i, d * act);
    store(dg + i, deriv * round_as<T>(d * to_f32(u[i])));
  });
}

template <typename F>
void with_activation(int act, F&& f) {
  if (act == kGluSilu) f(std::integral_constant<int, kGluSilu>{});
  else f(std::integral_constant<int, kGluGeluTanh>{});
}

}  // namespace

void glu_cpu(const GluArgs& a) {
  with_f32_or_bf16(a.dtype, [&](auto t) {
    with_activation(a.activation, [&](auto act) { forward<decltype(t), decltype(act)::value>(a); });
  });
}

void glu_backward_cpu(const GluArgs& a) {
  with_f32_or_bf16(a.dtype, [&](auto t) {
    with_activation(a.activation, [&](auto act) { backward<decltype(t), decltype(act)::value>(a); });
  });
}

}  // namespace kernels
