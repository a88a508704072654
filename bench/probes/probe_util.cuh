// Shared by the standalone probes in this folder (each is compiled on its own with nvcc).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#define CHECK(x)                                                                          \
  do {                                                                                    \
    cudaError_t e = (x);                                                                  \
    if (e != cudaSuccess) {                                                               \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__); \
      return 1;                                                                           \
    }                                                                                     \
  } while (0)

// Median ms per call of launch(i): CUDA events around 20 calls (i = 0..19) after 3 warm-up calls, the
// median of 5 repetitions.
template <typename Launch>
float time_ms(Launch launch, cudaEvent_t a, cudaEvent_t b) {
  for (int i = 0; i < 3; ++i) launch(i);
  std::vector<float> reps;
  for (int r = 0; r < 5; ++r) {
    cudaEventRecord(a);
    for (int i = 0; i < 20; ++i) launch(i);
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    reps.push_back(ms / 20);
  }
  std::sort(reps.begin(), reps.end());
  return reps[reps.size() / 2];
}

// The benches' "copy bandwidth": cudaMemcpy device to device over 1 GB, read + write bytes over the
// time_ms median, in GB/s; 0 when the buffers cannot be allocated (the caller reports it).
inline double copy_bandwidth_gbs(cudaEvent_t a, cudaEvent_t b) {
  const size_t bytes = size_t{1} << 30;
  char *src = nullptr, *dst = nullptr;
  if (cudaMalloc(&src, bytes) != cudaSuccess || cudaMalloc(&dst, bytes) != cudaSuccess ||
      cudaMemset(src, 0x5a, bytes) != cudaSuccess) {
    cudaFree(src);
    return 0.0;
  }
  const float ms = time_ms([&](int) { cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice); }, a, b);
  cudaFree(src);
  cudaFree(dst);
  return 2.0 * bytes / (ms * 1e6);
}

// Shared-memory address of p, for the mbarrier and bulk-copy instructions.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Waits until the barrier's phase `parity` completed (try_wait in a loop; the labels are local to
// the braces, so the asm may be inlined more than once).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_AGAIN:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_AGAIN;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
