// KV-read probe: is batch-1 decode attention bound by how its CTAs read the cache, or by what they
// compute? A standalone program (not part of the extension), run on the GPU:
//
//   nvcc -O3 -arch=sm_90a -o /tmp/kv_read_patterns bench/probes/kv_read_patterns.cu && /tmp/kv_read_patterns
//
// Every variant reads the K and V of one sequence (Hk = 32 heads, head_dim 128, bf16) exactly once per
// call with decode_attention's CTA structure (csrc/attention/attention_kernels.cu): grid (splits, Hk),
// 256 threads, one CTA streaming one (kv head, split) key range in tiles of 64 keys; per tile each
// thread cp.async-copies 4 keys x 16 B of K and of V (16 lanes per 256-byte row) into its own slots of
// a pipeline stage (32 KB), waits for its oldest group, reads its words back and folds them into a
// register. No math: what is left is the reading. Variants:
//   layout   [S, Hk, D] (the cache's layout: a head's rows 8 KB apart) or [Hk, S, D] (head-major:
//            a head's rows contiguous). The second stands for any contiguous stream per CTA, such as
//            a CTA that takes a key range of every head of the [S, Hk, D] cache: if it reads much
//            faster, that decomposition is the fix and the cache layout can stay.
//   stages   3 (the default, two CTAs per SM) or 6 (the deep pipeline, one CTA per SM)
//   splits   1, 2, 4, 8, 16 (no clusters, no combine: the splits only divide the range)
//   order    heads-fastest grid (blockIdx.x = head) against splits-fastest (blockIdx.x = split, the
//            kernel's order)
// at contexts 2048 (33.5 MB: cycled through 8 copies so that L2 does not serve it) and 32768 (537 MB).
// Timing: probe_util.cuh time_ms. Reference:
// cudaMemcpy device to device over 1 GB (read + write bytes / time, the benches' "copy bandwidth").
#include <cstdint>

#include "probe_util.cuh"

constexpr int kHeads = 32;
constexpr int kD = 128;                    // bf16 elements per row: 256 B
constexpr int kRowBytes = kD * 2;
constexpr int kThreads = 256;
constexpr int kKeysPerWarp = 2;            // 16 lanes x 16 B per key row
constexpr int kUnroll = 4;                 // keys per thread per tile
constexpr int kTile = 8 * kKeysPerWarp * kUnroll;  // 64 keys
constexpr int kStageWords = 2 * kUnroll * kThreads;  // uint4 words per stage (K then V): 32 KB

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const auto dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// kHeadMajor: rows of head h are at h * S + key; else at key * kHeads + h. kHeadsFastest: blockIdx.x
// is the head, blockIdx.y the split; else the reverse.
template <int kStages, bool kHeadMajor, bool kHeadsFastest>
__global__ void __launch_bounds__(kThreads, 1) kv_stream(const char* __restrict__ k, const char* __restrict__ v,
                                                         int S, unsigned* sink) {
  extern __shared__ __align__(16) uint4 stages[];
  const int head = kHeadsFastest ? blockIdx.x : blockIdx.y;
  const int split = kHeadsFastest ? blockIdx.y : blockIdx.x;
  const int splits = kHeadsFastest ? gridDim.y : gridDim.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, key_slot = lane >> 4, sub = lane & 15;
  int chunk = (S + splits - 1) / splits;
  chunk = (chunk + kTile - 1) / kTile * kTile;
  const int k_begin = split * chunk, k_end = min(S, k_begin + chunk);
  const int tiles = k_begin < k_end ? (k_end - k_begin + kTile - 1) / kTile : 0;
  const auto row_offset = [&](int key) -> int64_t {
    return (kHeadMajor ? static_cast<int64_t>(head) * S + key : static_cast<int64_t>(key) * kHeads + head) *
           kRowBytes + sub * 16;
  };
  const auto issue = [&](int t) {
    if (t < tiles) {
      uint4* stage = stages + (t % kStages) * kStageWords;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int key = min(k_begin + t * kTile + (u * 8 + warp) * kKeysPerWarp + key_slot, k_end - 1);
        cp_async16(stage + u * kThreads + threadIdx.x, k + row_offset(key));
        cp_async16(stage + (kUnroll + u) * kThreads + threadIdx.x, v + row_offset(key));
      }
    }
    cp_commit();
  };
  unsigned acc = 0;
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) issue(t);
  for (int t = 0; t < tiles; ++t) {
    issue(t + kStages - 1);
    cp_wait<kStages - 1>();
    const uint4* stage = stages + (t % kStages) * kStageWords;
#pragma unroll
    for (int i = 0; i < 2 * kUnroll; ++i) {
      const uint4 w = stage[i * kThreads + threadIdx.x];
      acc ^= w.x ^ w.y ^ w.z ^ w.w;
    }
  }
  cp_wait<0>();
  if (acc == 0x9e3779b9u) sink[blockIdx.y * gridDim.x + blockIdx.x] = acc;  // keeps the reads
}

template <int kStages, bool kHeadMajor, bool kHeadsFastest>
int row(const char* name, int S, int splits, int copies, char* const* ks, char* const* vs, unsigned* sink,
        double copy_gbs, cudaEvent_t a, cudaEvent_t b) {
  auto kernel = kv_stream<kStages, kHeadMajor, kHeadsFastest>;
  const int smem = kStages * kStageWords * 16;
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid = kHeadsFastest ? dim3(kHeads, splits) : dim3(splits, kHeads);
  const float ms = time_ms([&](int i) { kernel<<<grid, kThreads, smem>>>(ks[i % copies], vs[i % copies], S, sink); },
                           a, b);
  CHECK(cudaGetLastError());
  const double bytes = 2.0 * S * kHeads * kRowBytes;
  const double gbs = bytes / (ms * 1e6);
  std::printf("| %d | %s | %d | %.1f | %.0f | %.2f |\n", S, name, splits, ms * 1e3, gbs, gbs / copy_gbs);
  return 0;
}

int main() {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  unsigned* sink = nullptr;
  CHECK(cudaMalloc(&sink, 1 << 16));

  const double copy_gbs = copy_bandwidth_gbs(a, b);
  if (copy_gbs <= 0) return std::printf("copy bandwidth: no 2 GB for its buffers\n"), 1;
  std::printf("copy bandwidth (cudaMemcpy D2D, read + write): %.0f GB/s\n\n", copy_gbs);
  std::printf("| context | variant | splits | us | GB/s | of copy |\n| --- | --- | --- | --- | --- | --- |\n");

  for (const int S : {2048, 32768}) {
    const int copies = S <= 4096 ? 8 : 1;
    const int64_t bytes = int64_t(S) * kHeads * kRowBytes;
    std::vector<char*> ks(copies), vs(copies);
    for (int c = 0; c < copies; ++c) {
      CHECK(cudaMalloc(&ks[c], bytes));
      CHECK(cudaMalloc(&vs[c], bytes));
      CHECK(cudaMemset(ks[c], 0x11 + c, bytes));
      CHECK(cudaMemset(vs[c], 0x22 + c, bytes));
    }
    for (const int splits : {1, 2, 4, 8, 16}) {
      row<3, false, false>("[S, Hk, D], 3 stages, splits fastest (the kernel)", S, splits, copies, ks.data(), vs.data(),
                           sink, copy_gbs, a, b);
      row<6, false, false>("[S, Hk, D], 6 stages, splits fastest", S, splits, copies, ks.data(), vs.data(), sink,
                           copy_gbs, a, b);
      row<3, false, true>("[S, Hk, D], 3 stages, heads fastest", S, splits, copies, ks.data(), vs.data(), sink,
                          copy_gbs, a, b);
      row<3, true, false>("[Hk, S, D], 3 stages, splits fastest", S, splits, copies, ks.data(), vs.data(), sink,
                          copy_gbs, a, b);
      row<6, true, false>("[Hk, S, D], 6 stages, splits fastest", S, splits, copies, ks.data(), vs.data(), sink,
                          copy_gbs, a, b);
    }
    for (int c = 0; c < copies; ++c) {
      CHECK(cudaFree(ks[c]));
      CHECK(cudaFree(vs[c]));
    }
  }
  CHECK(cudaDeviceSynchronize());
  return 0;
}
