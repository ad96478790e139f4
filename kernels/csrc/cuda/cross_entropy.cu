// Fused cross-entropy forward + backward (CUDA), same contract as ../cross_entropy.cpp.
//
// What it fuses: softcap, max, sum(exp), loss and gradient of one row in one block. The row is
// read three times (max, sum, gradient) but from L2 after the first, and the gradient is written
// once, already scaled -- instead of the separate log_softmax / nll / backward kernels of
// F.cross_entropy that each stream [N, V] through HBM. All math in fp32; the true-class
// gradient p_t - (1 - eps) is formed in fp32 before rounding to bf16 (Liger #1329).
#include <cmath>

#include "../ops.h"
#include "common.cuh"

namespace kernels {
namespace {

struct RowParams {
  const void* logits;
  int64_t vocab, row_stride;
  const int64_t* targets;
  int64_t ignore_index;
  float eps, z_loss, softcap;
  float* loss;
  void* grad;
  int64_t grad_row_stride;
  float scale;
  const float* row_scale;
};

template <typename T>
__global__ void cross_entropy_kernel(RowParams p) {
  __shared__ float smem[32];
  const int64_t i = blockIdx.x, V = p.vocab, t = p.targets[i];
  const T* x = static_cast<const T*>(p.logits) + i * p.row_stride;
  T* g = p.grad ? static_cast<T*>(p.grad) + i * p.grad_row_stride : nullptr;
  if (t == p.ignore_index || t < 0 || t >= V) {  // ignored row (or invalid target -> NaN row)
    const float fill = t == p.ignore_index ? 0.f : NAN;
    if (threadIdx.x == 0) p.loss[i] = fill;
    if (g)
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) store_f32(g, j, fill);
    return;
  }
  const bool cap = p.softcap > 0.f;
  const float inv_cap = cap ? 1.f / p.softcap : 0.f;
  auto z = [&](int64_t j) {
    float v = load_f32(x, j);
    return cap ? p.softcap * tanhf(v * inv_cap) : v;
  };
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    float zj = z(j);
    m = zj > m ? zj : m;
  }
  m = block_max(m, smem);
  float sum = 0.f, sum_d = 0.f;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    float d = z(j) - m;
    sum += __expf(d);
    sum_d += d;
  }
  // Read z_t before the barrier inside block_sum: with grad aliasing logits, another thread
  // may overwrite x[t] right after it.
  const float zt = z(t);
  sum = block_sum(sum, smem);
  if (p.eps > 0.f) sum_d = block_sum(sum_d, smem);
  const float log_sum = logf(sum), lse = m + log_sum;
  float loss = (1.f - p.eps) * ((m - zt) + log_sum);
  if (p.eps > 0.f) loss += p.eps * (log_sum - sum_d / float(V));
  if (p.z_loss > 0.f) loss += p.z_loss * lse * lse;
  if (threadIdx.x == 0) p.loss[i] = loss;
  if (!g) return;
  const float rs = p.scale * (p.row_scale ? p.row_scale[i] : 1.f);
  const float zl = 1.f + 2.f * p.z_loss * lse, inv_sum = 1.f / sum;
  const float shift = p.eps / float(V);
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float zj = z(j), prob = __expf(zj - m) * inv_sum;
    float gj = prob * zl - shift - (j == t ? 1.f - p.eps : 0.f);  // fp32 throughout
    if (cap) gj *= 1.f - (zj * inv_cap) * (zj * inv_cap);
    store_f32(g, j, rs * gj);
  }
}

}  // namespace

void cross_entropy_cuda(const CrossEntropyArgs& a) {
  if (a.n_rows < 0 || a.vocab < 0)
    throw std::invalid_argument("cross_entropy_cuda: negative n_rows or vocab");
  if (a.n_rows == 0) return;
  RowParams p{a.logits, a.vocab, a.row_stride, a.targets, a.ignore_index, a.label_smoothing,
              a.z_loss, a.softcap, a.loss, a.grad, a.grad_row_stride, a.scale, a.row_scale};
  const int threads = a.vocab >= 8192 ? 512 : 256;
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  switch (a.dtype) {
    case kF32: cross_entropy_kernel<float><<<a.n_rows, threads, 0, stream>>>(p); break;
    case kBF16: cross_entropy_kernel<__nv_bfloat16><<<a.n_rows, threads, 0, stream>>>(p); break;
    case kF16: cross_entropy_kernel<__half><<<a.n_rows, threads, 0, stream>>>(p); break;
    default: throw std::invalid_argument("cross_entropy_cuda: unknown dtype code");
  }
  check_launch("cross_entropy_cuda");
}

}  // namespace kernels
