// Fused multi-tensor AdamW step (CUDA), same contract as ../adamw.cpp.
//
// What it fuses: the global-norm clip coefficient (read from a device scalar, so no host sync),
// weight decay, both moments, bias correction, the update and the bf16 master-weight rounding,
// for up to kMaxTensors tensors per launch (their pointers travel in the kernel arguments, as in
// apex's multi_tensor_apply). grad_sumsq_cuda is the one extra read of the grads that clipping
// needs before any update can start.
#include <cmath>
#include <vector>

#include "../ops.h"
#include "common.cuh"

namespace kernels {
namespace {

constexpr int kMaxTensors = 32;   // keeps the argument struct well under the 4 KiB limit
constexpr int kThreads = 256;
constexpr int64_t kChunk = 16384;  // elements per block

struct TensorList {
  void* params[kMaxTensors];
  const void* grads[kMaxTensors];
  float* exp_avgs[kMaxTensors];
  float* exp_avg_sqs[kMaxTensors];
  float* masters[kMaxTensors];
  const float* steps[kMaxTensors];
  int64_t sizes[kMaxTensors];
  int dtypes[kMaxTensors];
  int block_start[kMaxTensors + 1];  // prefix sum of blocks per tensor
  int n;
};

struct Hyper { float lr, beta1, beta2, eps, weight_decay, max_grad_norm; const float* sumsq; };

__device__ int tensor_of_block(const TensorList& tl) {
  int k = 0;
  while (k + 1 < tl.n && (int)blockIdx.x >= tl.block_start[k + 1]) ++k;
  return k;
}

template <typename T>
__device__ void adamw_chunk(const TensorList& tl, int k, int64_t begin, int64_t end, float clip,
                            const Hyper& h) {
  T* p = static_cast<T*>(tl.params[k]);
  const T* g = static_cast<const T*>(tl.grads[k]);
  float *m = tl.exp_avgs[k], *v = tl.exp_avg_sqs[k], *master = tl.masters[k];
  const double step = *tl.steps[k];
  const float step_size = float(h.lr / (1.0 - pow(double(h.beta1), step)));
  const float bc2_sqrt = float(sqrt(1.0 - pow(double(h.beta2), step)));
  const float decay = 1.f - h.lr * h.weight_decay;
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    const float gj = load_f32(g, j) * clip;
    float pj = (master ? master[j] : load_f32(p, j)) * decay;
    const float mj = m[j] + (1.f - h.beta1) * (gj - m[j]);
    const float vj = h.beta2 * v[j] + (1.f - h.beta2) * gj * gj;
    pj -= step_size * mj / (sqrtf(vj) / bc2_sqrt + h.eps);
    m[j] = mj;
    v[j] = vj;
    if (master) master[j] = pj;
    store_f32(p, j, pj);
  }
}

__global__ void adamw_kernel(TensorList tl, Hyper h) {
  const int k = tensor_of_block(tl);
  const int64_t begin = int64_t(blockIdx.x - tl.block_start[k]) * kChunk;
  const int64_t end = min(begin + kChunk, tl.sizes[k]);
  float clip = 1.f;
  if (h.sumsq) clip = fminf(1.f, h.max_grad_norm / (sqrtf(*h.sumsq) + 1e-6f));
  switch (tl.dtypes[k]) {
    case kF32: adamw_chunk<float>(tl, k, begin, end, clip, h); break;
    case kBF16: adamw_chunk<__nv_bfloat16>(tl, k, begin, end, clip, h); break;
    case kF16: adamw_chunk<__half>(tl, k, begin, end, clip, h); break;
  }
}

template <typename T>
__device__ float chunk_sumsq(const void* ptr, int64_t begin, int64_t end) {
  const T* g = static_cast<const T*>(ptr);
  float s = 0.f;
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    const float v = load_f32(g, j);
    s += v * v;
  }
  return s;
}

__global__ void sumsq_kernel(TensorList tl, float* out) {
  __shared__ float smem[32];
  const int k = tensor_of_block(tl);
  const int64_t begin = int64_t(blockIdx.x - tl.block_start[k]) * kChunk;
  const int64_t end = min(begin + kChunk, tl.sizes[k]);
  float s = 0.f;
  switch (tl.dtypes[k]) {
    case kF32: s = chunk_sumsq<float>(tl.grads[k], begin, end); break;
    case kBF16: s = chunk_sumsq<__nv_bfloat16>(tl.grads[k], begin, end); break;
    case kF16: s = chunk_sumsq<__half>(tl.grads[k], begin, end); break;
  }
  s = block_sum(s, smem);
  if (threadIdx.x == 0) atomicAdd(out, s);
}

// The lists a caller hands in must describe the same n tensors with known dtype codes
// (bindings.cpp builds them from checked tensors; this guards other callers of the library).
void check_lists(const char* what, size_t n, const std::vector<int64_t>& sizes,
                 const std::vector<int>& dtypes) {
  if (sizes.size() != n || dtypes.size() != n)
    throw std::invalid_argument(std::string(what) + ": pointer, size and dtype lists differ in length");
  for (size_t t = 0; t < n; ++t)
    if (sizes[t] < 0 || (dtypes[t] != kF32 && dtypes[t] != kBF16 && dtypes[t] != kF16))
      throw std::invalid_argument(std::string(what) + ": tensor " + std::to_string(t) +
                                  " has a negative size or an unknown dtype code");
}

// Calls launch(list, n_blocks) for consecutive batches of up to kMaxTensors tensors.
template <typename Fill, typename Launch>
void for_each_batch(size_t n, const std::vector<int64_t>& sizes, Fill fill, Launch launch) {
  for (size_t first = 0; first < n; first += kMaxTensors) {
    TensorList tl{};
    tl.n = int(std::min<size_t>(kMaxTensors, n - first));
    int blocks = 0;
    for (int k = 0; k < tl.n; ++k) {
      fill(tl, k, first + k);
      tl.sizes[k] = sizes[first + k];
      tl.block_start[k] = blocks;
      blocks += int((sizes[first + k] + kChunk - 1) / kChunk);
    }
    tl.block_start[tl.n] = blocks;
    if (blocks > 0) launch(tl, blocks);
  }
}

}  // namespace

void grad_sumsq_cuda(const std::vector<int64_t>& grads, const std::vector<int64_t>& sizes,
                     const std::vector<int>& dtypes, int64_t out, int64_t stream) {
  check_lists("grad_sumsq_cuda", grads.size(), sizes, dtypes);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  for_each_batch(grads.size(), sizes,
      [&](TensorList& tl, int k, size_t t) {
        tl.grads[k] = reinterpret_cast<const void*>(grads[t]);
        tl.dtypes[k] = dtypes[t];
      },
      [&](const TensorList& tl, int blocks) {
        sumsq_kernel<<<blocks, kThreads, 0, s>>>(tl, reinterpret_cast<float*>(out));
        check_launch("grad_sumsq_cuda");
      });
}

void adamw_cuda(const AdamWArgs& a) {
  const size_t n = a.params.size();
  check_lists("adamw_cuda", n, a.sizes, a.dtypes);
  for (const auto* v : {&a.grads, &a.exp_avgs, &a.exp_avg_sqs, &a.masters, &a.steps})
    if (v->size() != n) throw std::invalid_argument("adamw_cuda: pointer lists differ in length");
  auto s = reinterpret_cast<cudaStream_t>(a.stream);
  const Hyper h{float(a.lr), float(a.beta1), float(a.beta2), float(a.eps), float(a.weight_decay),
                float(a.max_grad_norm), reinterpret_cast<const float*>(a.clip_sumsq)};
  for_each_batch(a.params.size(), a.sizes,
      [&](TensorList& tl, int k, size_t t) {
        tl.params[k] = reinterpret_cast<void*>(a.params[t]);
        tl.grads[k] = reinterpret_cast<const void*>(a.grads[t]);
        tl.exp_avgs[k] = reinterpret_cast<float*>(a.exp_avgs[t]);
        tl.exp_avg_sqs[k] = reinterpret_cast<float*>(a.exp_avg_sqs[t]);
        tl.masters[k] = reinterpret_cast<float*>(a.masters[t]);
        tl.steps[k] = reinterpret_cast<const float*>(a.steps[t]);
        tl.dtypes[k] = a.dtypes[t];
      },
      [&](const TensorList& tl, int blocks) {
        adamw_kernel<<<blocks, kThreads, 0, s>>>(tl, h);
        check_launch("adamw_cuda");
      });
}

}  // namespace kernels
