// Device-side helpers shared by the .cu files: the one dtype dispatch, 16-byte vector types and
// warp reductions. No torch headers here (nvcc time).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>

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

// How many clusters of `size` CTAs (1-D) of `kernel` can be resident at once on the current device;
// 0 when that size is not offered. Sizes above 8 first opt the kernel into non-portable cluster sizes.
// Host-only; a failed probe's own error is cleared (callers check that none was pending before).
template <typename Kernel>
int max_active_clusters(Kernel kernel, int size, int threads, int smem_bytes) {
  if (size > 8 && cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(size);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem_bytes;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = size;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  config.attrs = &attr;
  config.numAttrs = 1;
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return clusters;
}

// A host-side value computed once per device and cached (device attributes, kernel attributes):
// std::call_once per device makes the first fill safe when several host threads launch at once.
// Devices past kMaxDevices are computed on every call (uncached, still correct).
template <typename T>
class PerDeviceOnce {
 public:
  static constexpr int kMaxDevices = 64;
  template <typename F>
  T get(int device, F&& compute) {
    if (device < 0 || device >= kMaxDevices) return compute();
    std::call_once(flags_[device], [&] { values_[device] = compute(); });
    return values_[device];
  }

 private:
  std::once_flag flags_[kMaxDevices];
  T values_[kMaxDevices] = {};
};

// The SM count of the current device (cached per device). Returns the query's error, if any.
inline cudaError_t current_sm_count(int* sm_count) {
  struct Result {
    int sm_count;
    cudaError_t err;
  };
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  static PerDeviceOnce<Result> cache;
  const Result r = cache.get(device, [device] {
    Result out{0, cudaSuccess};
    out.err = cudaDeviceGetAttribute(&out.sm_count, cudaDevAttrMultiProcessorCount, device);
    return out;
  });
  *sm_count = r.sm_count;
  return r.err;
}

}  // namespace dots1
