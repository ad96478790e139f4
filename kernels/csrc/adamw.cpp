// Fused multi-tensor AdamW step (CPU).
//
// What it fuses: gradient clipping (the global-norm coefficient), decoupled weight decay, both
// moment updates, bias correction, the parameter update and (for bf16 params) the fp32 master
// weight update plus rounding back to bf16 -- one pass over each element, for all tensors in
// one parallel loop. clip_grad_norm_ + torch AdamW instead reads the grads three times (norm,
// scale, step) and writes them once. The global norm itself needs one read of every grad
// before any update can start (grad_sumsq_cpu); that is the only extra pass.
// The math follows torch.optim.AdamW exactly (same order of operations, fp32 arithmetic),
// so states are interchangeable with torch's.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "ops.h"

namespace kernels {
namespace {

// Work is split into equal chunks across all tensors so both threads stay busy even when
// one tensor (e.g. the embedding) is much larger than the rest.
constexpr int64_t kChunk = 1 << 15;

struct Chunk { int tensor; int64_t begin, end; };

std::vector<Chunk> make_chunks(const std::vector<int64_t>& sizes) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < sizes.size(); ++t)
    for (int64_t b = 0; b < sizes[t]; b += kChunk)
      chunks.push_back({int(t), b, std::min(sizes[t], b + kChunk)});
  return chunks;
}

template <typename T>
double sumsq(const T* g, int64_t n) {
  float s = 0.f;  // a chunk is short enough for fp32; chunks are summed in double
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    float v = to_f32(g[j]);
    s += v * v;
  }
  return s;
}

// 1 - beta is formed in double like torch does, then used as fp32.
struct Step { float decay, b2, w1, w2, step_size, inv_bc2_sqrt, eps, clip; };

template <typename T>
void update(T* p, const T* g, float* m, float* v, float* master, int64_t n, const Step& s) {
  if (master) {
    // bf16 param with fp32 master weights: update the master, round it into the param.
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      float gj = to_f32(g[j]) * s.clip;
      float pj = master[j] * s.decay;
      float mj = m[j] + s.w1 * (gj - m[j]);
      float vj = s.b2 * v[j] + s.w2 * gj * gj;
      float denom = std::sqrt(vj) * s.inv_bc2_sqrt + s.eps;  // one division less than torch
      pj = pj - s.step_size * mj / denom;
      m[j] = mj; v[j] = vj; master[j] = pj;
      store(p + j, pj);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      float gj = to_f32(g[j]) * s.clip;
      float pj = to_f32(p[j]) * s.decay;
      float mj = m[j] + s.w1 * (gj - m[j]);
      float vj = s.b2 * v[j] + s.w2 * gj * gj;
      float denom = std::sqrt(vj) * s.inv_bc2_sqrt + s.eps;  // one division less than torch
      pj = pj - s.step_size * mj / denom;
      m[j] = mj; v[j] = vj;
      store(p + j, pj);
    }
  }
}

template <typename T> T* ptr(int64_t addr) { return reinterpret_cast<T*>(addr); }

}  // namespace

double grad_sumsq_cpu(const std::vector<int64_t>& grads, const std::vector<int64_t>& sizes,
                      const std::vector<int>& dtypes, int n_threads) {
  const std::vector<Chunk> chunks = make_chunks(sizes);
  double total = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : total) num_threads(n_threads)
  for (int64_t c = 0; c < int64_t(chunks.size()); ++c) {
    const Chunk& k = chunks[c];
    const int64_t addr = grads[k.tensor], n = k.end - k.begin;
    switch (dtypes[k.tensor]) {
      case kF32: total += sumsq(ptr<float>(addr) + k.begin, n); break;
      case kBF16: total += sumsq(ptr<bf16>(addr) + k.begin, n); break;
      case kF16: total += sumsq(ptr<f16>(addr) + k.begin, n); break;
    }
  }
  return total;
}

void adamw_cpu(const AdamWArgs& a) {
  const size_t nt = a.params.size();
  // Per-tensor step sizes: tensors may have taken different numbers of steps (a param that had
  // no grad on some step is skipped, exactly as torch does). Bias corrections in double, as torch.
  std::vector<Step> steps(nt);
  for (size_t t = 0; t < nt; ++t) {
    const double step = *ptr<float>(a.steps[t]);
    const double bc1 = 1.0 - std::pow(a.beta1, step), bc2 = 1.0 - std::pow(a.beta2, step);
    steps[t] = {float(1.0 - a.lr * a.weight_decay), float(a.beta2), float(1.0 - a.beta1),
                float(1.0 - a.beta2),
                float(a.lr / bc1), float(1.0 / std::sqrt(bc2)), float(a.eps), a.clip_coef};
  }
  const std::vector<Chunk> chunks = make_chunks(a.sizes);
#pragma omp parallel for schedule(static) num_threads(a.n_threads)
  for (int64_t c = 0; c < int64_t(chunks.size()); ++c) {
    const Chunk& k = chunks[c];
    const int t = k.tensor;
    const int64_t b = k.begin, n = k.end - k.begin;
    float* m = ptr<float>(a.exp_avgs[t]) + b;
    float* v = ptr<float>(a.exp_avg_sqs[t]) + b;
    float* master = a.masters[t] ? ptr<float>(a.masters[t]) + b : nullptr;
    switch (a.dtypes[t]) {
      case kF32:
        update(ptr<float>(a.params[t]) + b, ptr<float>(a.grads[t]) + b, m, v, master, n, steps[t]);
        break;
      case kBF16:
        update(ptr<bf16>(a.params[t]) + b, ptr<bf16>(a.grads[t]) + b, m, v, master, n, steps[t]);
        break;
      case kF16:
        update(ptr<f16>(a.params[t]) + b, ptr<f16>(a.grads[t]) + b, m, v, master, n, steps[t]);
        break;
    }
  }
}

}  // namespace kernels
