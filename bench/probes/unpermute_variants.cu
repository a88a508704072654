// Unpermute probe (issue 15): why does the weighted gather-reduce of permuted expert rows back into
// token order run at ~0.67 of copy bandwidth at T=16384 (csrc/dispatch unpermute_kernel: 0.338-0.346
// ms against a 0.228 ms floor, bench/results/2026-12-01-h200-s29), while permute's row scatter, its
// mirror image, reaches ~0.9? A standalone program (not part of the extension), run on the GPU:
//
//   nvcc -O3 -arch=sm_90a -std=c++17 -Xptxas -v -o /tmp/unpermute_variants bench/probes/unpermute_variants.cu && /tmp/unpermute_variants
//
// (-Xptxas -v prints each variant's registers: on nvcc 13.0 both_halves compiled to 40, fewer than its 12
// vectors need (48), so not all 12 loads can be in flight at once; warp_token to 69.)
//
// Real shape: T=16384 tokens, top-6, H=4096 bf16; the permuted rows [6T, H] random, grouped by expert
// as permute leaves them (E=128, balanced random routing, ranks by (token, slot) within an expert);
// fp32 weights. Every variant computes out[t] = sum_j w[t, j] * x[row_map[6t + j]] in fp32, slot by
// slot, product and sum rounded separately (the extension's order), so all outputs are compared bit
// for bit with the first variant's. Variants (the mapping and the loads in flight differ):
//   current      the extension's kernel: one 256-thread block per token, two 16-byte vectors per thread
//                one after the other, loads issued four slots at a time (6 = 4 + 2)
//   group8       the same, all six slots' loads issued together (measured 3-6% slower in the extension)
//   both_halves  one block per token, each thread issuing both of its vectors' six loads (12) at once
//   t128         128-thread blocks (16 resident per SM), four vectors per thread, two at a time (12 loads)
//   warp_token   persistent: one warp per token at a time, 16 vectors per lane, two at a time; the next
//                token's row_map and weights loaded before the current token's math
//   current_nc   current with ld.global.nc.L1::no_allocate.L2::256B loads of the rows
//   sequential   current over row_map[6t + j] = 6t + j (contiguous rows): the cost of the gather itself
// References: cudaMemcpy device to device (the benches' copy bandwidth) and a pure streaming read of
// the permuted rows. Timing: CUDA events around 20 calls after 3 warm-up calls, median of 5.
// Measured (H200, s30, bench/results/2026-12-01-h200-s30): every variant 0.216-0.232 ms, 0.95-1.02 of
// the floor; the mapping was never the problem. The extension's kernel differed in registers: it
// loaded rows as arrays of bf16 and kept k at run time, 64 registers and 4 blocks per SM (ncu: 309 µs,
// 46% occupancy). Raw 16-byte loads and a compile-time top-6 form give 39 registers (ncu: 214 µs, 67%).
#include <cuda_bf16.h>

#include <cstdint>

#include "probe_util.cuh"

constexpr int kT = 16384, kTopK = 6, kE = 128, kH = 4096;
constexpr int kV = 8;            // bf16 per 16-byte vector
constexpr int kNvec = kH / kV;   // 512 vectors per row
constexpr int64_t kS = int64_t{kT} * kTopK;

using Vec = uint4;

__device__ __forceinline__ void acc_vec(float (&acc)[kV], float w, const Vec& x) {
  const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&x);
#pragma unroll
  for (int i = 0; i < kV; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(w, __bfloat162float(e[i])));
}

__device__ __forceinline__ Vec pack(const float (&acc)[kV]) {
  Vec o;
  __nv_bfloat16* e = reinterpret_cast<__nv_bfloat16*>(&o);
#pragma unroll
  for (int i = 0; i < kV; ++i) e[i] = __float2bfloat16_rn(acc[i]);
  return o;
}

__device__ __forceinline__ Vec ld_nc(const Vec* p) {
  Vec v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// Block-per-token variants: the token's row_map entries and weights into shared memory, then a barrier.
__device__ __forceinline__ void stage_token(int64_t t, const int32_t* __restrict__ row_map,
                                            const float* __restrict__ weights, int32_t* src_s, float* w_s) {
  if (threadIdx.x < kTopK) {
    src_s[threadIdx.x] = row_map[t * kTopK + threadIdx.x];
    w_s[threadIdx.x] = weights[t * kTopK + threadIdx.x];
  }
  __syncthreads();
}

// current / group8 / current_nc: the extension's mapping.
template <int kGroup, bool kNc>
__global__ void block_per_token(const Vec* __restrict__ rows, const int32_t* __restrict__ row_map,
                                const float* __restrict__ weights, Vec* __restrict__ out) {
  __shared__ int32_t src_s[kTopK];
  __shared__ float w_s[kTopK];
  const int64_t t = blockIdx.x;
  stage_token(t, row_map, weights, src_s, w_s);
  for (int v = threadIdx.x; v < kNvec; v += blockDim.x) {
    float acc[kV] = {};
    for (int j0 = 0; j0 < kTopK; j0 += kGroup) {
      Vec x[kGroup];
      float w[kGroup];
      int32_t r[kGroup];
#pragma unroll
      for (int u = 0; u < kGroup; ++u) {
        r[u] = j0 + u < kTopK ? src_s[j0 + u] : -1;
        w[u] = j0 + u < kTopK ? w_s[j0 + u] : 0.0f;
        if (r[u] >= 0) x[u] = kNc ? ld_nc(rows + int64_t{r[u]} * kNvec + v) : rows[int64_t{r[u]} * kNvec + v];
      }
#pragma unroll
      for (int u = 0; u < kGroup; ++u)
        if (r[u] >= 0) acc_vec(acc, w[u], x[u]);
    }
    out[t * kNvec + v] = pack(acc);
  }
}

// both_halves (kThreads = 256, kPer = 2) and t128 (kThreads = 128, kPer = 4, two at a time): each thread
// owns kPer vectors v = tid + i * kThreads and issues the six loads of kAtOnce of them together.
template <int kThreads, int kPer, int kAtOnce>
__global__ void __launch_bounds__(kThreads) block_multi(const Vec* __restrict__ rows, const int32_t* __restrict__ row_map,
                                                         const float* __restrict__ weights, Vec* __restrict__ out) {
  __shared__ int32_t src_s[kTopK];
  __shared__ float w_s[kTopK];
  const int64_t t = blockIdx.x;
  stage_token(t, row_map, weights, src_s, w_s);
  int32_t r[kTopK];
  float w[kTopK];
#pragma unroll
  for (int j = 0; j < kTopK; ++j) {
    r[j] = src_s[j];
    w[j] = w_s[j];
  }
#pragma unroll
  for (int i0 = 0; i0 < kPer; i0 += kAtOnce) {
    Vec x[kAtOnce][kTopK];
#pragma unroll
    for (int i = 0; i < kAtOnce; ++i)
#pragma unroll
      for (int j = 0; j < kTopK; ++j) x[i][j] = rows[int64_t{r[j]} * kNvec + threadIdx.x + (i0 + i) * kThreads];
#pragma unroll
    for (int i = 0; i < kAtOnce; ++i) {
      float acc[kV] = {};
#pragma unroll
      for (int j = 0; j < kTopK; ++j) acc_vec(acc, w[j], x[i][j]);
      out[t * kNvec + threadIdx.x + (i0 + i) * kThreads] = pack(acc);
    }
  }
}

// warp_token: persistent warps, one token at a time; lane l owns vectors l + 32 i (i < 16), two at a time.
__global__ void __launch_bounds__(256) warp_per_token(const Vec* __restrict__ rows, const int32_t* __restrict__ row_map,
                                                      const float* __restrict__ weights, Vec* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  const int warps = gridDim.x * (blockDim.x / 32);
  int t = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  int32_t r_next = t < kT && lane < kTopK ? row_map[int64_t{t} * kTopK + lane] : 0;
  float w_next = t < kT && lane < kTopK ? weights[int64_t{t} * kTopK + lane] : 0.0f;
  for (; t < kT; t += warps) {
    int32_t r[kTopK];
    float w[kTopK];
#pragma unroll
    for (int j = 0; j < kTopK; ++j) {
      r[j] = __shfl_sync(0xffffffffu, r_next, j);
      w[j] = __shfl_sync(0xffffffffu, w_next, j);
    }
    const int tn = t + warps;
    r_next = tn < kT && lane < kTopK ? row_map[int64_t{tn} * kTopK + lane] : 0;
    w_next = tn < kT && lane < kTopK ? weights[int64_t{tn} * kTopK + lane] : 0.0f;
#pragma unroll 1
    for (int i0 = 0; i0 < kNvec / 32; i0 += 2) {
      Vec x[2][kTopK];
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < kTopK; ++j) x[i][j] = rows[int64_t{r[j]} * kNvec + lane + (i0 + i) * 32];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float acc[kV] = {};
#pragma unroll
        for (int j = 0; j < kTopK; ++j) acc_vec(acc, w[j], x[i][j]);
        out[int64_t{t} * kNvec + lane + (i0 + i) * 32] = pack(acc);
      }
    }
  }
}

// A pure read of n vectors (a floor for the gather's reads): persistent, 8 loads in flight per thread.
__global__ void read_all(const Vec* __restrict__ p, int64_t n, unsigned* __restrict__ sink) {
  unsigned s = 0;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += 8 * stride) {
    Vec v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) v[u] = i + u * stride < n ? ld_nc(p + i + u * stride) : Vec{};
#pragma unroll
    for (int u = 0; u < 8; ++u) s ^= v[u].x ^ v[u].w;
  }
  if (s == 0x12345678u) sink[0] = s;
}

int main() {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  std::mt19937 rng(0);
  const std::vector<int32_t> row_map = balanced_row_map(kT, kTopK, kE, rng);
  std::vector<int32_t> sequential(kS);
  std::iota(sequential.begin(), sequential.end(), 0);
  std::vector<float> weights(kS);
  std::uniform_real_distribution<float> uni(0.0f, 1.0f);
  for (auto& w : weights) w = uni(rng);
  // Values in [1, 2) of either sign, from a multiplicative hash of the index (fast for 805 MB).
  std::vector<uint16_t> rows_host(static_cast<size_t>(kS) * kH);
  for (size_t i = 0; i < rows_host.size(); ++i) {
    const uint32_t h = static_cast<uint32_t>(i * 2654435761u) >> 7;
    rows_host[i] = static_cast<uint16_t>((0x3f80 | (h & 0x7f)) | ((h >> 7) & 1) << 15);
  }

  const Vec* rows = reinterpret_cast<const Vec*>(to_device(rows_host));
  const int32_t* map_d = to_device(row_map);
  const int32_t* seq_d = to_device(sequential);
  const float* w_d = to_device(weights);
  Vec *out = nullptr, *out_ref = nullptr;
  unsigned* sink = nullptr;
  const size_t rows_bytes = rows_host.size() * 2, out_bytes = size_t{kT} * kH * 2;
  if (rows == nullptr || map_d == nullptr || seq_d == nullptr || w_d == nullptr) CHECK(cudaErrorMemoryAllocation);
  CHECK(cudaMalloc(&out, out_bytes));
  CHECK(cudaMalloc(&out_ref, out_bytes));
  CHECK(cudaMalloc(&sink, 64));
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);

  const double bytes = static_cast<double>(rows_bytes + out_bytes);  // rows read once, out written once
  const double floor_ms = dispatch_table_head(kT, kTopK, kH, kE, bytes, a, b);
  const float read_ms = time_ms([&](int) { read_all<<<4 * sms, 512>>>(rows, kS * kNvec, sink); }, a, b);
  std::printf("| pure read of the rows (reference) | %.4f | %.0f | | |\n", read_ms, rows_bytes / (read_ms * 1e6));

  auto run = [&](const char* name, auto launch, const Vec* ref, const char* no_ref = "(reference)") {
    return run_variant(name, launch, out, ref, out_bytes, bytes, floor_ms, a, b, no_ref);
  };
  if (run("current", [&] { block_per_token<4, false><<<kT, 256>>>(rows, map_d, w_d, out); }, nullptr)) return 1;
  CHECK(cudaMemcpy(out_ref, out, out_bytes, cudaMemcpyDeviceToDevice));
  if (run("group8", [&] { block_per_token<8, false><<<kT, 256>>>(rows, map_d, w_d, out); }, out_ref)) return 1;
  if (run("both_halves", [&] { block_multi<256, 2, 2><<<kT, 256>>>(rows, map_d, w_d, out); }, out_ref)) return 1;
  if (run("t128", [&] { block_multi<128, 4, 2><<<kT, 128>>>(rows, map_d, w_d, out); }, out_ref)) return 1;
  if (run("warp_token", [&] { warp_per_token<<<8 * sms, 256>>>(rows, map_d, w_d, out); }, out_ref)) return 1;
  if (run("current_nc", [&] { block_per_token<4, true><<<kT, 256>>>(rows, map_d, w_d, out); }, out_ref)) return 1;
  if (run("sequential (row_map 6t + j)", [&] { block_per_token<4, false><<<kT, 256>>>(rows, seq_d, w_d, out); }, nullptr,
          "(other rows)"))
    return 1;
  return 0;
}
