// Read-bandwidth probe: how fast can a weight-streaming kernel read HBM, and does the shape of each
// warp's 16-byte loads matter? A standalone program (not part of the extension), run on the GPU:
//
//   nvcc -O3 -arch=sm_90a -o /tmp/read_patterns bench/probes/read_patterns.cu && /tmp/read_patterns
//
// Every variant reads the same 1.5 GB bf16 matrix [N, 4096] once per call with the decode kernels'
// structure (csrc/weight_stream.cuh, csrc/skinny_gemm): persistent CTAs of 8 warps (2 per SM) over tiles
// of 16 rows, the 8 warps of a CTA splitting K in contiguous 1 KB ranges, each lane issuing a batch of
// U = 8 steps (two 16-byte loads per step) before it consumes any. Only the address pattern and the
// cache hints differ:
//   rows8x64   the MMA-fragment pattern the kernels use: one warp load covers 8 rows x 64 B
//   rows4x128  one warp load covers 4 rows x 128 B (one cache line each)
//   rows2x256  one warp load covers 2 rows x 256 B
//   row1x512   one warp load covers 512 contiguous bytes of one row
// each with ld.global.nc.L1::no_allocate, and with the .L2::256B prefetch-size hint added. Reference
// rows: cudaMemcpy device to device (read + write bytes / time, the benches' "copy bandwidth").
// Timing: CUDA events around 20 calls after 3 warm-up calls, the median of 5 repetitions.
#include <cstdint>

#include "probe_util.cuh"

constexpr int kK = 4096;           // elements per row (bf16): 8 KB
constexpr int kRowBytes = kK * 2;
constexpr int kWarps = 8;
constexpr int kWarpBytes = kRowBytes / kWarps;  // 1 KB of each of the tile's 16 rows per warp
constexpr int kU = 8;

template <bool kL2Prefetch256>
__device__ __forceinline__ uint4 ld_stream(const char* p) {
  uint4 v;
  if constexpr (kL2Prefetch256) {
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  } else {
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  }
  return v;
}

// Byte offset, within the warp's 16 rows x 1 KB share of a tile, of load `i` (0..31) of this lane.
// Each pattern reads every byte of the share exactly once over the 32 loads of its 32 lanes.
template <int kPattern>
__device__ __forceinline__ int64_t share_offset(int i, int lane) {
  if constexpr (kPattern == 0) {  // rows8x64: step s = i / 2, half h = i % 2 (rows g or g + 8)
    const int s = i >> 1, h = i & 1, g = lane >> 2, c = lane & 3;
    return static_cast<int64_t>(g + 8 * h) * kRowBytes + s * 64 + c * 16;
  } else if constexpr (kPattern == 3) {  // rows4x128: load i covers rows 4 (i / 8) + {0..3}, 128 B each
    const int quad = i >> 3, eighth = i & 7, r = lane >> 3, l = lane & 7;
    return static_cast<int64_t>(4 * quad + r) * kRowBytes + eighth * 128 + l * 16;
  } else if constexpr (kPattern == 1) {  // rows2x256: load i covers rows 2 (i / 4) + {0, 1}, 256 B each
    const int pair = i >> 2, quarter = i & 3, r = lane >> 4, l = lane & 15;
    return static_cast<int64_t>(2 * pair + r) * kRowBytes + quarter * 256 + l * 16;
  } else {  // row1x512: load i covers row i / 2, half i % 2
    return static_cast<int64_t>(i >> 1) * kRowBytes + (i & 1) * 512 + lane * 16;
  }
}

template <int kPattern, bool kL2Prefetch256>
__global__ void __launch_bounds__(256, 2) stream_kernel(const char* __restrict__ w, int tiles, unsigned* sink) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  unsigned acc = 0;
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const char* share = w + static_cast<int64_t>(tile) * 16 * kRowBytes + warp * kWarpBytes;
#pragma unroll
    for (int b = 0; b < 32; b += 2 * kU) {  // 32 loads per lane per tile, 2 U at a time
      uint4 v[2 * kU];
#pragma unroll
      for (int j = 0; j < 2 * kU; ++j) v[j] = ld_stream<kL2Prefetch256>(share + share_offset<kPattern>(b + j, lane));
#pragma unroll
      for (int j = 0; j < 2 * kU; ++j) acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
    }
  }
  if (acc == 0x9e3779b9u) sink[blockIdx.x] = acc;  // keeps the loads; practically never stores
}

int main() {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int64_t rows = 180224;  // 180224 x 8 KB = 1.48 GB
  const int64_t bytes = rows * kRowBytes;
  const int tiles = static_cast<int>(rows / 16);
  char *w = nullptr, *dst = nullptr;
  unsigned* sink = nullptr;
  CHECK(cudaMalloc(&w, bytes));
  CHECK(cudaMalloc(&dst, bytes));
  CHECK(cudaMalloc(&sink, 4096 * sizeof(unsigned)));
  CHECK(cudaMemset(w, 0x5a, bytes));
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);

  const float copy_ms = time_ms([&](int) { cudaMemcpyAsync(dst, w, bytes, cudaMemcpyDeviceToDevice); }, a, b);
  std::printf("| variant | ms | GB/s |\n| --- | --- | --- |\n");
  std::printf("| cudaMemcpy D2D (read + write) | %.4f | %.0f |\n", copy_ms, 2.0 * bytes / (copy_ms * 1e6));
  const int grid = 2 * sms;
  auto row = [&](const char* name, auto kernel) {
    const float ms = time_ms([&](int) { kernel<<<grid, 256>>>(w, tiles, sink); }, a, b);
    std::printf("| %s | %.4f | %.0f |\n", name, ms, bytes / (ms * 1e6));
  };
  row("rows8x64 (the kernels' pattern)", stream_kernel<0, false>);
  row("rows8x64 + L2::256B", stream_kernel<0, true>);
  row("rows4x128", stream_kernel<3, false>);
  row("rows4x128 + L2::256B", stream_kernel<3, true>);
  row("rows2x256", stream_kernel<1, false>);
  row("rows2x256 + L2::256B", stream_kernel<1, true>);
  row("row1x512", stream_kernel<2, false>);
  row("row1x512 + L2::256B", stream_kernel<2, true>);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  std::printf("\n%d SMs, grid %d x 256 threads, %.2f GB per call\n", sms, grid, bytes / 1e9);
  return 0;
}
