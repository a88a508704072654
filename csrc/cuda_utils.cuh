// Device-side helpers shared by the .cu files: the one dtype dispatch, 16-byte vector types and
// warp reductions. No torch headers here (nvcc time).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.h"

// Runs __VA_ARGS__ with `scalar_t` bound to the element type of `dtype`.
#define DOTS1_DISPATCH_FLOAT_TYPES(dtype, scalar_t, ...)       \
  switch (dtype) {                                             \
    case ::dots1::DType::kFloat32: {                           \
      using scalar_t = float;                                  \
      __VA_ARGS__;                                             \
      break;                                                   \
    }                                                          \
    case ::dots1::DType::kFloat16: {                           \
      using scalar_t = __half;                                 \
      __VA_ARGS__;                                             \
      break;                                                   \
    }                                                          \
    case ::dots1::DType::kBFloat16: {                          \
      using scalar_t = __nv_bfloat16;                          \
      __VA_ARGS__;                                             \
      break;                                                   \
    }                                                          \
  }

// Runs __VA_ARGS__ with `scalar_t` bound to half or bfloat16 (the tensor-core dtypes).
#define DOTS1_DISPATCH_HALF_TYPES(dtype, scalar_t, ...)        \
  switch (dtype) {                                             \
    case ::dots1::DType::kFloat16: {                           \
      using scalar_t = __half;                                 \
      __VA_ARGS__;                                             \
      break;                                                   \
    }                                                          \
    case ::dots1::DType::kBFloat16: {                          \
      using scalar_t = __nv_bfloat16;                          \
      __VA_ARGS__;                                             \
      break;                                                   \
    }                                                          \
    default:                                                   \
      return cudaErrorInvalidValue;                            \
  }

namespace dots1 {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 16 bytes of T: the unit of every vectorised load/store.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kElems = 16 / sizeof(T);
  T v[kElems];
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

inline unsigned int ceil_div(int64_t a, int64_t b) { return static_cast<unsigned int>((a + b - 1) / b); }

}  // namespace dots1
