// Probe builds only (setup.py: DOTS1_EXT_PHASE_STAMPS=1; bench/probes/moe_phase_stamps.py): what the
// kernels' phase stamps share. A kernel family keeps its own __device__ stamp array and exports its
// reader (an extern "C" function the probe calls through ctypes) built on copy_phase_stamps.
#pragma once

#ifdef DOTS1_EXT_PHASE_STAMPS
#include <cuda_runtime.h>

namespace dots1 {

// %globaltimer in ns (the same clock on every SM, so stamps of different kernels compare).
__device__ __forceinline__ unsigned long long globaltimer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)::"memory");
  return t;
}

// The stamp array `symbol` into host memory at dst; clear: zero it after the copy (0 then means: not
// written since). Returns a cudaError_t.
template <typename Symbol>
int copy_phase_stamps(const Symbol& symbol, void* dst, int clear) {
  cudaError_t err = cudaMemcpyFromSymbol(dst, symbol, sizeof(symbol));
  if (err == cudaSuccess && clear) {
    void* p = nullptr;
    err = cudaGetSymbolAddress(&p, symbol);
    if (err == cudaSuccess) err = cudaMemset(p, 0, sizeof(symbol));
    if (err == cudaSuccess) err = cudaDeviceSynchronize();
  }
  return static_cast<int>(err);
}

}  // namespace dots1
#endif
