// Device helpers shared by the CUDA kernels: dtype load/store in fp32 and block reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace kernels {

__device__ __forceinline__ float load_f32(const float* p, int64_t j) { return p[j]; }
__device__ __forceinline__ float load_f32(const __nv_bfloat16* p, int64_t j) { return __bfloat162float(p[j]); }
__device__ __forceinline__ float load_f32(const __half* p, int64_t j) { return __half2float(p[j]); }
__device__ __forceinline__ void store_f32(float* p, int64_t j, float v) { p[j] = v; }
__device__ __forceinline__ void store_f32(__nv_bfloat16* p, int64_t j, float v) { p[j] = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_f32(__half* p, int64_t j, float v) { p[j] = __float2half_rn(v); }

// Block-wide reductions (blockDim.x a multiple of 32, <= 1024). Every thread gets the result.
// `smem` needs 32 floats; the leading __syncthreads makes back-to-back calls safe.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? smem[threadIdx.x] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float block_max(float v, float* smem) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? smem[threadIdx.x] : -INFINITY;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

inline void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

}  // namespace kernels
