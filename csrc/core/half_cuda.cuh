/*
 * fp32 <-> T for the CUDA kernels (T: float, __half, __nv_bfloat16; round to
 * nearest-even), and Vec<T>, 16 bytes of T for vectorized loads and stores.
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace slothai_cuda {

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T> struct alignas(16) Vec { T v[16 / sizeof(T)]; };

} // namespace slothai_cuda
