// Read-ramp probe: how close to copy bandwidth can ANY kernel read N bytes from HBM, as a function of N?
// Batch-1 decode attention at context 2048 reads 33.5 MB of K/V and reaches 0.62 of copy bandwidth; a
// pure read with its CTA structure 0.75 (kv_read_patterns.cu). This asks whether a different structure
// would get further at that size, or whether a lone kernel of ~8 µs of bytes is bound by its launch and
// ramp whatever it does. A standalone program (not part of the extension), run on the GPU:
//
//   nvcc -O3 -arch=sm_90a -o /tmp/read_ramp bench/probes/read_ramp.cu && /tmp/read_ramp
//
// Variants, each reading every byte of an N-byte buffer once per call (buffers cycled so that the
// footprint of a timing loop is >= 512 MB: L2 serves nothing):
//   flat 2x256    persistent grid of 2 CTAs x 256 threads per SM, each warp streaming contiguous 4 KB
//                 pieces (8 x 16 B loads per lane in flight, ld.global.nc.L1::no_allocate)
//   flat 1x1024   the same with one CTA of 1024 threads per SM (twice the loads in flight per SM)
//   bulk S        one CTA per SM whose one thread keeps S cp.async.bulk copies of 32 KB in flight into
//                 shared memory (the TMA engine, no per-lane loads), S = 4 and 6
// N: 8.4 / 16.8 / 33.5 / 67 / 134 / 537 MB (decode attention's K/V at contexts 512 ... 32768).
// Timing: probe_util.cuh time_ms (20 launches back to back, no PDL: each launch pays its own ramp, as a
// lone op does). Reference: cudaMemcpy device to device over 1 GB (read + write bytes / time).
#include <cstdint>

#include "probe_util.cuh"

constexpr int kU = 8;                     // 16-byte loads per lane in flight (flat)
constexpr int kPieceBytes = 32 * 16 * kU;  // 4 KB per warp per step (flat)
constexpr int kChunkBytes = 32 * 1024;    // per bulk copy

__device__ __forceinline__ uint4 ld_stream(const char* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Warps of the whole grid take the 4 KB pieces round-robin; every lane holds its 8 loads before
// consuming any.
__global__ void flat_kernel(const char* __restrict__ buf, int64_t pieces, unsigned* sink) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  unsigned acc = 0;
  for (int64_t piece = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); piece < pieces;
       piece += warps) {
    const char* p = buf + piece * kPieceBytes + lane * 16;
    uint4 v[kU];
#pragma unroll
    for (int j = 0; j < kU; ++j) v[j] = ld_stream(p + j * 512);
#pragma unroll
    for (int j = 0; j < kU; ++j) acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
  }
  if (acc == 0x9e3779b9u) sink[blockIdx.x] = acc;  // keeps the loads; practically never stores
}

// One thread per CTA (one CTA per SM): chunk c of this CTA goes to stage c % S; before a stage is
// reused its previous copy's barrier phase must have completed. The bytes land in shared memory and
// are not read: the copy engine's completion is the read.
template <int S>
__global__ void bulk_kernel(const char* __restrict__ buf, int64_t chunks) {
  extern __shared__ __align__(128) unsigned char stage_smem[];
  __shared__ __align__(8) uint64_t bars[S];
  if (threadIdx.x != 0) return;
  for (int s = 0; s < S; ++s)
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_addr(&bars[s])) : "memory");
  // The barriers' initialisation visible to the async proxy (the copy engine) before it signals them.
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  int issued = 0;
  for (int64_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x, ++issued) {
    const int s = issued % S;
    const uint32_t bar = smem_addr(&bars[s]);
    if (issued >= S) mbar_wait(bar, ((issued / S) - 1) & 1);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(kChunkBytes)
                 : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
            smem_addr(stage_smem + s * kChunkBytes)),
        "l"(buf + chunk * kChunkBytes), "r"(kChunkBytes), "r"(bar)
        : "memory");
  }
  for (int k = issued > S ? issued - S : 0; k < issued; ++k)  // the copies still in flight
    mbar_wait(smem_addr(&bars[k % S]), (k / S) & 1);
}

int main() {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int64_t copy_bytes = int64_t{1} << 30;  // the buffer the variants read (cycled)
  char* src = nullptr;
  unsigned* sink = nullptr;
  CHECK(cudaMalloc(&src, copy_bytes));
  CHECK(cudaMalloc(&sink, 4096 * sizeof(unsigned)));
  CHECK(cudaMemset(src, 0x5a, copy_bytes));
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  const double copy_gbs = copy_bandwidth_gbs(a, b);
  if (copy_gbs <= 0) return std::printf("copy bandwidth: no 2 GB for its buffers\n"), 1;
  std::printf("copy bandwidth (cudaMemcpy D2D, read + write over 1 GB): %.0f GB/s; %d SMs\n\n", copy_gbs, sms);
  CHECK(cudaFuncSetAttribute(bulk_kernel<4>, cudaFuncAttributeMaxDynamicSharedMemorySize, 4 * kChunkBytes));
  CHECK(cudaFuncSetAttribute(bulk_kernel<6>, cudaFuncAttributeMaxDynamicSharedMemorySize, 6 * kChunkBytes));

  // K + V of one sequence, 32 kv heads x 128 x bf16 per slot: 16 KB per slot.
  const int contexts[] = {512, 1024, 2048, 4096, 8192, 32768};
  std::printf("| context | MB | variant | µs | GB/s | of copy bandwidth |\n| --- | --- | --- | --- | --- | --- |\n");
  for (int ctx : contexts) {
    const int64_t n = static_cast<int64_t>(ctx) * 16 * 1024;
    const int copies = static_cast<int>(std::max<int64_t>(1, copy_bytes / 2 / n));  // >= 512 MB cycled
    auto row = [&](const char* name, auto launch) {
      const float ms = time_ms([&](int i) { launch(src + (i % copies) * n); }, a, b);
      const double gbs = n / (ms * 1e6);
      std::printf("| %d | %.1f | %s | %.2f | %.0f | %.2f |\n", ctx, n / 1e6, name, ms * 1e3, gbs, gbs / copy_gbs);
    };
    row("flat 2x256", [&](const char* p) { flat_kernel<<<2 * sms, 256>>>(p, n / kPieceBytes, sink); });
    row("flat 1x1024", [&](const char* p) { flat_kernel<<<sms, 1024>>>(p, n / kPieceBytes, sink); });
    row("bulk 4 x 32 KB", [&](const char* p) { bulk_kernel<4><<<sms, 32, 4 * kChunkBytes>>>(p, n / kChunkBytes); });
    row("bulk 6 x 32 KB", [&](const char* p) { bulk_kernel<6><<<sms, 32, 6 * kChunkBytes>>>(p, n / kChunkBytes); });
    CHECK(cudaGetLastError());
  }
  CHECK(cudaDeviceSynchronize());
  return 0;
}
