// Weight-only quantized linear layers (CUDA): the same two entries as kernels/csrc/quant_linear.cpp, on device
// pointers, on the caller's stream. Layout and semantics: kernels/reference.py.
//  - quant_dequant_cuda: rows [row0, row0 + rows) of W -> fp32/bf16 tile, one thread per element; bitwise the
//    reference (the block scale is one rounded product plus one rounded sum: __fmul_rn / __fadd_rn, never an FMA).
//  - quant_gemv_cuda: out [M <= 8, N] = x @ W^T (+ bias): one warp per weight row, each lane expanding its own
//    4-bit codes (or int8) in registers; fp32 accumulation, a warp shuffle reduction, bf16 rounded once.
#include <cstdint>
#include <stdexcept>

#include "../ops.h"
#include "common.cuh"

namespace kernels {
namespace {

constexpr int kBlock = 64, kAbsmaxBlock = 256, kMaxRows = 8, kWarpsPerBlock = 8;

// The kernels take ops.h's QuantWeight by value: a plain struct of device pointers and sizes.
using DevWeight = QuantWeight;

__device__ __forceinline__ float nf4_scale(const DevWeight& w, int64_t b) {
  return __fadd_rn(__fmul_rn(w.code2[w.qabsmax[b]], w.absmax2[b / kAbsmaxBlock]), w.offset);
}

__device__ __forceinline__ float weight_at(const DevWeight& w, int64_t i) {  // flat index into W
  if (w.kind == kNF4) {
    const uint8_t byte = w.codes[i >> 1];
    const int code = (i & 1) ? (byte & 15) : (byte >> 4);
    return __fmul_rn(w.nf4[code], nf4_scale(w, i / kBlock));
  }
  return __fmul_rn(float(reinterpret_cast<const int8_t*>(w.codes)[i]), w.scale[i / w.k]);
}

template <typename T>
__global__ void dequant_kernel(DevWeight w, int64_t start, int64_t count, T* out) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < count) store_f32(out, j, weight_at(w, start + j));
}

template <typename T, int M>
__global__ void gemv_kernel(DevWeight w, const T* x, const T* bias, T* out) {
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (n >= w.n) return;
  const int64_t K = w.k, base = n * K;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
  for (int64_t k = lane; k < K; k += 32) {
    // Codes are expanded where they are read; the NF4 scale repeats for 64 neighbours and stays cached.
    const float wv = weight_at(w, base + k);
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = fmaf(wv, load_f32(x, m * K + k), acc[m]);
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float v = acc[m];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) store_f32(out, m * w.n + n, v + (bias ? load_f32(bias, n) : 0.f));
  }
}

template <typename T, int M>
void launch_gemv(const QuantGemvArgs& a, cudaStream_t stream) {
  const unsigned blocks = unsigned((a.w.n + kWarpsPerBlock - 1) / kWarpsPerBlock);
  gemv_kernel<T, M><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(
      a.w, static_cast<const T*>(a.x), static_cast<const T*>(a.bias), static_cast<T*>(a.out));
}

template <typename T>
void gemv_rows(const QuantGemvArgs& a, cudaStream_t s) {
  switch (a.m) {
    case 1: return launch_gemv<T, 1>(a, s);
    case 2: return launch_gemv<T, 2>(a, s);
    case 3: return launch_gemv<T, 3>(a, s);
    case 4: return launch_gemv<T, 4>(a, s);
    case 5: return launch_gemv<T, 5>(a, s);
    case 6: return launch_gemv<T, 6>(a, s);
    case 7: return launch_gemv<T, 7>(a, s);
    default: return launch_gemv<T, kMaxRows>(a, s);
  }
}

}  // namespace

void quant_dequant_cuda(const QuantDequantArgs& a, int64_t stream) {
  const int64_t count = a.rows * a.w.k;
  if (count <= 0) return;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const unsigned blocks = unsigned((count + 255) / 256);
  if (a.out_dtype == kBF16)
    dequant_kernel<__nv_bfloat16><<<blocks, 256, 0, s>>>(a.w, a.row0 * a.w.k, count,
                                                         static_cast<__nv_bfloat16*>(a.out));
  else if (a.out_dtype == kF32)
    dequant_kernel<float><<<blocks, 256, 0, s>>>(a.w, a.row0 * a.w.k, count, static_cast<float*>(a.out));
  else
    throw std::invalid_argument("quant_dequant_cuda: out must be float32 or bfloat16");
  check_launch("quant_dequant_cuda");
}

void quant_gemv_cuda(const QuantGemvArgs& a, int64_t stream) {
  if (a.m <= 0 || a.w.n <= 0) return;
  if (a.m > kMaxRows) throw std::invalid_argument("quant_gemv_cuda: at most 8 rows of x");
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (a.dtype == kBF16) gemv_rows<__nv_bfloat16>(a, s);
  else if (a.dtype == kF32) gemv_rows<float>(a, s);
  else throw std::invalid_argument("quant_gemv_cuda: x must be float32 or bfloat16");
  check_launch("quant_gemv_cuda");
}

}  // namespace kernels
