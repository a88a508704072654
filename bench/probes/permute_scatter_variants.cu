// Permute scatter probe (issue 15): permute's row copy (csrc/dispatch permute_scatter_kernel) moves its
// bytes at ~0.85 of copy bandwidth at T=16384 (0.284-0.290 ms with the index against a 0.226 ms floor,
// bench/results/2026-12-01-h200-s30), while unpermute, its mirror image, reaches ~1.0 since s30.
// A standalone program (not part of the extension), run on the GPU:
//
//   nvcc -O3 -arch=sm_90a -std=c++17 -Xptxas -v -o /tmp/permute_scatter_variants bench/probes/permute_scatter_variants.cu && /tmp/permute_scatter_variants
//
// Real shape: T=16384 tokens, top-6, H=4096 bf16, E=128 balanced random routing; each token's row is
// copied to its six destination rows (row_map from the routing, rows ordered by expert, token, slot).
// Every variant's output is compared bit for bit with the first's. Variants:
//   current      the extension's kernel: one 128-thread block per token, four 16-byte vectors per
//                thread loaded together, then stored to each destination in turn
//   current at 7 / 10 blocks per SM   the same, held by dynamic shared memory to the occupancy of the
//                extension's kernel (68 registers) and of its form with 32-bit indices (42); 32 here
// Measured (H200, s30, bench/results/2026-12-01-h200-s30): every block-per-token form 0.250-0.257 ms
// (0.86-0.88 of the floor) at any occupancy from 7 to 16 blocks per SM, the prefetching persistent
// form 0.261, streaming stores 0.250; a pure write of the 805 MB of rows alone takes 0.187 ms. The
// scatter is bound by its writes, not by occupancy or load latency, so the extension keeps its kernel.
//   t256         one 256-thread block per token, two vectors per thread
//   t512         one 512-thread block per token, one vector per thread
//   prefetch     persistent 128-thread blocks over tokens, the next token's four vectors and
//                destinations loaded before the current token's stores
//   current_cs   current with st.global.cs (streaming) stores
//   sequential   current over row_map[6t + j] = 6t + j: the cost of the scatter itself
// References: cudaMemcpy device to device (the benches' copy bandwidth) and a pure write of the
// permuted rows. Timing: CUDA events around 20 calls after 3 warm-up calls, median of 5.
#include <cstdint>
#include <utility>

#include "probe_util.cuh"

constexpr int kT = 16384, kTopK = 6, kE = 128, kH = 4096;
constexpr int kNvec = kH / 8;  // 16-byte vectors per bf16 row
constexpr int64_t kS = int64_t{kT} * kTopK;

using Vec = uint4;

__device__ __forceinline__ void st_cs(Vec* p, const Vec& v) {
  asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

// current / t256 / t512 / current_cs: one block per token, kPer vectors per thread (blockDim * kPer = 512).
template <int kPer, bool kCs>
__global__ void block_per_token(const Vec* __restrict__ hidden, const int32_t* __restrict__ row_map,
                                Vec* __restrict__ permuted) {
  __shared__ int32_t dst_s[kTopK];
  const int64_t t = blockIdx.x;
  if (threadIdx.x < kTopK) {
    const int32_t d = row_map[t * kTopK + threadIdx.x];
    dst_s[threadIdx.x] = (d >= 0 && d < kS) ? d : -1;
  }
  __syncthreads();
  Vec val[kPer];
#pragma unroll
  for (int u = 0; u < kPer; ++u) val[u] = hidden[t * kNvec + threadIdx.x + u * blockDim.x];
  for (int j = 0; j < kTopK; ++j) {
    const int32_t d = dst_s[j];
    if (d < 0) continue;
    Vec* dst = permuted + static_cast<int64_t>(d) * kNvec;
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      if (kCs)
        st_cs(dst + threadIdx.x + u * blockDim.x, val[u]);
      else
        dst[threadIdx.x + u * blockDim.x] = val[u];
    }
  }
}

// prefetch: persistent 128-thread blocks, tokens t = blockIdx.x + i * gridDim.x; the next token's
// vectors and destinations are in flight while the current token's rows are stored.
__global__ void __launch_bounds__(128) persistent_prefetch(const Vec* __restrict__ hidden,
                                                           const int32_t* __restrict__ row_map,
                                                           Vec* __restrict__ permuted) {
  constexpr int kPer = 4;
  int t = blockIdx.x;
  Vec next[kPer];
  int32_t d_next = 0;
  const int lane = threadIdx.x % 32;
  if (t < kT) {
#pragma unroll
    for (int u = 0; u < kPer; ++u) next[u] = hidden[int64_t{t} * kNvec + threadIdx.x + u * 128];
    d_next = lane < kTopK ? row_map[int64_t{t} * kTopK + lane] : 0;
  }
  for (; t < kT; t += gridDim.x) {
    Vec val[kPer];
#pragma unroll
    for (int u = 0; u < kPer; ++u) val[u] = next[u];
    const int32_t d_mine = d_next;
    const int tn = t + gridDim.x;
    if (tn < kT) {
#pragma unroll
      for (int u = 0; u < kPer; ++u) next[u] = hidden[int64_t{tn} * kNvec + threadIdx.x + u * 128];
      d_next = lane < kTopK ? row_map[int64_t{tn} * kTopK + lane] : 0;
    }
#pragma unroll
    for (int j = 0; j < kTopK; ++j) {
      const int32_t d = __shfl_sync(0xffffffffu, d_mine, j);
      if (d < 0 || d >= kS) continue;
      Vec* dst = permuted + static_cast<int64_t>(d) * kNvec;
#pragma unroll
      for (int u = 0; u < kPer; ++u) dst[threadIdx.x + u * 128] = val[u];
    }
  }
}

// A pure write of n vectors (the scatter's writes alone): persistent, 8 stores per thread per step.
__global__ void write_all(Vec* __restrict__ p, int64_t n) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  const Vec v{1u, 2u, 3u, 4u};
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += stride) p[i] = v;
}

int main() {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  std::mt19937 rng(0);
  const std::vector<int32_t> row_map = balanced_row_map(kT, kTopK, kE, rng);
  std::vector<int32_t> sequential(kS);
  std::iota(sequential.begin(), sequential.end(), 0);
  std::vector<uint32_t> hidden_host(static_cast<size_t>(kT) * kH / 2);
  for (size_t i = 0; i < hidden_host.size(); ++i) hidden_host[i] = static_cast<uint32_t>(i * 2654435761u);

  const Vec* hidden = reinterpret_cast<const Vec*>(to_device(hidden_host));
  const int32_t* map_d = to_device(row_map);
  const int32_t* seq_d = to_device(sequential);
  Vec *out = nullptr, *out_ref = nullptr;
  const size_t hidden_bytes = hidden_host.size() * 4, out_bytes = static_cast<size_t>(kS) * kH * 2;
  if (hidden == nullptr || map_d == nullptr || seq_d == nullptr) CHECK(cudaErrorMemoryAllocation);
  CHECK(cudaMalloc(&out, out_bytes));
  CHECK(cudaMalloc(&out_ref, out_bytes));
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);

  const double bytes = static_cast<double>(hidden_bytes + out_bytes);  // hidden read once, rows written once
  const double floor_ms = dispatch_table_head(kT, kTopK, kH, kE, bytes, a, b);
  const float write_ms = time_ms([&](int) { write_all<<<4 * sms, 512>>>(out, kS * kNvec); }, a, b);
  std::printf("| pure write of the rows (reference) | %.4f | %.0f | | |\n", write_ms, out_bytes / (write_ms * 1e6));

  auto run = [&](const char* name, auto launch, const Vec* ref, const char* no_ref = "(reference)") {
    return run_variant(name, launch, out, ref, out_bytes, bytes, floor_ms, a, b, no_ref);
  };
  if (run("current", [&] { block_per_token<4, false><<<kT, 128>>>(hidden, map_d, out); }, nullptr)) return 1;
  CHECK(cudaMemcpy(out_ref, out, out_bytes, cudaMemcpyDeviceToDevice));
  // The extension's kernel uses 68 registers (7 blocks of 128 per SM); with 32-bit vector indices it
  // would use 42 (10 blocks). Dynamic shared memory that admits only that many blocks per SM puts the
  // same mapping at those occupancies.
  CHECK(cudaFuncSetAttribute(block_per_token<4, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, 32 * 1024));
  for (const auto& occupancy : {std::pair{7, 30}, std::pair{10, 21}}) {
    const int blocks = occupancy.first, smem_kb = occupancy.second;
    char name[64];
    std::snprintf(name, sizeof(name), "current at %d blocks per SM", blocks);
    if (run(name, [&] { block_per_token<4, false><<<kT, 128, smem_kb * 1024>>>(hidden, map_d, out); }, out_ref))
      return 1;
  }
  if (run("t256", [&] { block_per_token<2, false><<<kT, 256>>>(hidden, map_d, out); }, out_ref)) return 1;
  if (run("t512", [&] { block_per_token<1, false><<<kT, 512>>>(hidden, map_d, out); }, out_ref)) return 1;
  for (int per_sm : {4, 8, 16}) {
    char name[64];
    std::snprintf(name, sizeof(name), "prefetch (%d blocks per SM)", per_sm);
    if (run(name, [&] { persistent_prefetch<<<per_sm * sms, 128>>>(hidden, map_d, out); }, out_ref)) return 1;
  }
  if (run("current_cs", [&] { block_per_token<4, true><<<kT, 128>>>(hidden, map_d, out); }, out_ref)) return 1;
  if (run("sequential (row_map 6t + j)", [&] { block_per_token<4, false><<<kT, 128>>>(hidden, seq_d, out); }, nullptr,
          "(other rows)"))
    return 1;
  return 0;
}
