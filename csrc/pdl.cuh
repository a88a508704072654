// Programmatic dependent launch (PDL, sm_90+): the decode step's kernels start while their predecessor
// in the stream drains, and stream their weights before they wait for its outputs.
//
// A kernel launched with programmatic stream serialization (launch_pdl below, use_pdl) may become
// resident once every CTA of the previous kernel of the stream has executed pdl_launch_dependents()
// or exited; pdl_wait() then blocks until that kernel has completed and its memory is visible. The
// rule every kernel that calls these helpers follows (the launchers rely on it, and so does the
// ordering of the whole step):
//
//   1. Before pdl_wait() a thread reads only memory that no kernel of the decode step writes: weights
//      (projection, expert, router and norm weights). Nothing else: not the activations, the KV cache,
//      the positions, the cos/sin rows they select, the routing ids, nor scratch buffers. It writes
//      no global memory (shared memory and registers are free). One exception, which the caller asks
//      for and guarantees (moe_decode_gate_up's hidden_settled, the decode attention ops' kv_settled):
//      an input written before the kernel right before this one. That kernel follows rule 3, so this one became resident only after that
//      kernel's wait returned, i.e. after the input's producer completed. (The rule against writes
//      stands: an output may reuse memory the kernel right before still reads.)
//   2. Every thread executes pdl_wait() before it exits, whether or not it has work (so a grid
//      completes only after its predecessor did, and ordering stays transitive along the stream).
//      A read after the wait must be one the compiler keeps after it: an ordinary C++ load (the wait is
//      a volatile asm with a memory clobber) or a volatile asm load (__ldg, weight_stream.cuh
//      load_act16). weight_stream.cuh load_weight16 is non-volatile asm without a memory clobber,
//      which the compiler may move above the wait: weights only.
//   3. Right after its pdl_wait() a kernel calls pdl_launch_dependents(): from then on the next kernel's
//      CTAs may be scheduled, as this grid's CTAs retire, and prefetch their weights while this one
//      streams. No deadlock: the next kernel is released only once every CTA of this grid got that far
//      (all resident or done), and it waits without holding anything this grid needs.
//
// Caller contract of a PDL launch (the .cpp wrappers): the pre-wait reads must not see a tensor
// written by the kernel right before in the stream. Weights of a loaded model are never written in a
// step; a weight the wrapper itself converts or copies per call (a fresh tensor written by the kernel
// just launched) is launched without PDL. DOTS1_EXT_PDL=0 (common.h pdl_enabled) launches every kernel
// without the attribute; the kernels are the same and compute the same bits, the wait and the trigger
// being no-ops without a programmatic dependency.
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "cuda_utils.cuh"

namespace dots1 {

// Waits until the previous kernel of the stream has completed and its memory is visible (rule 1:
// nothing it writes is read before this). Returns at once without a programmatic dependency.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Lets the next kernel of the stream be scheduled once every CTA of this grid has called it or exited
// (a hint: it orders nothing; the dependent's pdl_wait() still waits for this grid's completion).
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Whether the current device takes programmatic stream serialization (compute capability 9.0+),
// cached per device. A failed query answers false (the launch then reports any real error).
inline bool pdl_supported() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();  // the failed query's own error
    return false;
  }
  static PerDeviceOnce<int> major_cache;
  const int major = major_cache.get(device, [device] {
    int m = 0;
    if (cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    return m;
  });
  return major >= 9;
}

// Writes the programmatic-stream-serialization attribute to *attr when use_pdl and the device takes
// it; returns the number of attributes written (0 or 1), to add to a cudaLaunchConfig_t's numAttrs.
inline unsigned int pdl_attribute(bool use_pdl, cudaLaunchAttribute* attr) {
  if (!use_pdl || !pdl_supported()) return 0;
  attr->id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr->val.programmaticStreamSerializationAllowed = 1;
  return 1;
}

// kernel<<<grid, block, smem_bytes, stream>>>(args...), with programmatic stream serialization when
// use_pdl (and the device takes it; without it this is exactly the <<<>>> launch). Returns the launch's
// error, consumed from the runtime's last-error state.
template <typename... Params, typename... Args>
cudaError_t launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                       bool use_pdl, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  cudaLaunchAttribute attr;
  config.numAttrs = pdl_attribute(use_pdl, &attr);
  config.attrs = config.numAttrs > 0 ? &attr : nullptr;
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  const cudaError_t last = cudaGetLastError();
  return err != cudaSuccess ? err : last;
}

}  // namespace dots1
