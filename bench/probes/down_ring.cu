// Probe: would batch-1 int4 MoE decode reach its floor if each thread kept its weight pieces in flight
// through a shared-memory ring instead of register batches? The int4 down kernel at T=1 takes ~22 µs for
// 41 MB (0.45 of copy bandwidth) where a lone kernel reads that much at ~0.8 (read_ramp.cu). Under
// Nsight Compute (bench/results/2026-11-30-h200-1ceaff3-prefetch-experiments) each warp runs 4-5 load
// batches one after another, each paying a full load latency before its dequantization: 16 warps per
// SM with 128 registers each hold at most ~64 KB in flight, and none while they compute. Here the same
// bytes and the same arithmetic (dequantization and m16n8k16 MMAs, one token) in two schedules:
//
//   registers  as moe_down_kernel's frag mapping: a warp streams its K range of the shared experts in
//              batches of 8 steps, then its range of the routed steps in batches of 4 cut at item
//              boundaries, every batch loaded into registers before any of it is used
//   ring D     each thread copies its own 16-byte pieces (cp.async) D - 1 steps ahead into a ring of D
//              slots in shared memory and reads back only its own (no barrier), one step issued per step
//              consumed; the CTA's scales and zero points staged in shared memory at the start
//   ring D, scales in registers   the same, each step's scales and zero points loaded D - 1 steps
//              ahead into registers (what a kernel for every I would do)
//
// A standalone program (not part of the extension), run on the GPU:
//
//   nvcc -O3 -arch=sm_90a -Icsrc -o /tmp/down_ring bench/probes/down_ring.cu && /tmp/down_ring
//
// Shapes: Dots1's (H = 4096 output rows in CTAs of 16, shared experts' Is = 2816 in bf16, 6 routed
// experts of I = 1408 in int4 with a bf16 scale and a uint8 zero point per group of 128, drawn per call
// from 128). Shared-expert copies and the routed experts cycle so that L2 serves nothing. Timing:
// probe_util.cuh time_ms (launches back to back, no PDL). Floor: bytes / copy bandwidth.
#include <cuda_bf16.h>

#include <cstdint>
#include <random>

#include "../../csrc/weight_stream.cuh"
#include "probe_util.cuh"

using dots1::cp_async16;
using dots1::cp_async_commit;
using dots1::cp_async_wait_group;
using dots1::dequant8;
using dots1::mma_16816;
using dots1::word_of;

constexpr int kH = 4096, kIs = 2816, kI = 1408, kE = 128, kTopK = 6;
constexpr int kGroupK = 128, kGroups = kI / kGroupK;        // 11 int4 steps per routed item
constexpr int kSharedSteps = kIs / 32;                      // 88 bf16 steps of 32 k
constexpr int kRoutedSteps = kTopK * kGroups;               // 66 int4 steps of 128 k
constexpr int kWarps = 8, kThreads = 32 * kWarps, kRows = 16;
constexpr int kSharedCopies = 4;                            // 4 x 23 MB of shared experts cycled
constexpr int kIdSets = 64;

struct Weights {
  const __nv_bfloat16* shared_down;  // [kSharedCopies][kH][kIs]
  const uint8_t* codes;              // [kE][kH][kI / 2]
  const __nv_bfloat16* scales;       // [kE][kH][kGroups]
  const uint8_t* zeros;              // [kE][kH][kGroups]
  const __nv_bfloat16* act;          // [kTopK * kI + kIs]: one token's activations
  const int* ids;                    // [kIdSets][kTopK]
  float* out;                        // [kH]
};

// K range [begin, end) of warp w of n steps (as the kernel's range_start).
__device__ __forceinline__ int range_start(int n, int w) { return n * w / kWarps; }

// One bf16 step (32 k) of rows lo / hi against x (this lane's 8 activations).
__device__ __forceinline__ void step_bf16(const uint4& lo, const uint4& hi, const __nv_bfloat16* x, float (&acc)[4]) {
  const uint4 xv = dots1::load_act16_always(x);
  mma_16816<__nv_bfloat16>(acc, lo.x, hi.x, lo.y, hi.y, xv.x, xv.y);
  mma_16816<__nv_bfloat16>(acc, lo.z, hi.z, lo.w, hi.w, xv.z, xv.w);
}

// One int4 step (128 k, this lane's 32 codes of each row): scale2 = lo | hi << 16 (bf16 bits), zero2 the
// same for the zero points; x this lane's first activation of the step.
__device__ __forceinline__ void step_int4(const uint4& lo, const uint4& hi, uint32_t scale2, uint32_t zero2,
                                          const __nv_bfloat16* x, float (&acc)[4]) {
  const uint32_t s_lo2 = __byte_perm(scale2, 0, 0x1010), s_hi2 = __byte_perm(scale2, 0, 0x3232);
  const uint32_t nz_lo2 = (zero2 & 0xFFFFu) * 0x00010001u | 0xC300C300u;
  const uint32_t nz_hi2 = (zero2 >> 16) * 0x00010001u | 0xC300C300u;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint4 xv = dots1::load_act16_always(x + 8 * i);
    uint32_t dl[4], dh[4];
    dequant8(word_of(lo, i), nz_lo2, s_lo2, dl);
    dequant8(word_of(hi, i), nz_hi2, s_hi2, dh);
    const uint32_t b0 = __byte_perm(xv.x, xv.z, 0x5410), b1 = __byte_perm(xv.x, xv.z, 0x7632);
    const uint32_t b2 = __byte_perm(xv.y, xv.w, 0x5410), b3 = __byte_perm(xv.y, xv.w, 0x7632);
    mma_16816<__nv_bfloat16>(acc, dl[0], dh[0], dl[1], dh[1], b0, b1);
    mma_16816<__nv_bfloat16>(acc, dl[2], dh[2], dl[3], dh[3], b2, b3);
  }
}

// Where step j of this warp's sequence (its shared steps, then its routed steps) reads: the lane's
// 16 bytes of rows lo and hi, and for a routed step its expert row and group.
struct StepSource {
  const uint8_t* lo;
  const uint8_t* hi;
  int item, group;  // item < 0: a shared step (group = the k step)
};

__device__ __forceinline__ StepSource step_source(const Weights& w, const __nv_bfloat16* shared_down,
                                                  const int* ids, int h0, int warp, int j) {
  const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int s_begin = range_start(kSharedSteps, warp), s_end = range_start(kSharedSteps, warp + 1);
  if (j < s_end - s_begin) {
    const int step = s_begin + j;
    const auto* row = reinterpret_cast<const uint8_t*>(shared_down + static_cast<int64_t>(h0 + g) * kIs);
    return {row + step * 64 + 16 * c, row + 8 * kIs * 2 + step * 64 + 16 * c, -1, step};
  }
  const int r = range_start(kRoutedSteps, warp) + j - (s_end - s_begin);
  const int item = r / kGroups, group = r % kGroups;
  const int64_t row = static_cast<int64_t>(ids[item]) * kH + h0 + g;
  const uint8_t* base = w.codes + row * (kI / 2) + group * 64 + 16 * c;
  return {base, base + 8 * (kI / 2), item, group};
}

__device__ __forceinline__ int warp_steps(int warp) {
  return range_start(kSharedSteps, warp + 1) - range_start(kSharedSteps, warp) + range_start(kRoutedSteps, warp + 1) -
         range_start(kRoutedSteps, warp);
}

// Step j of this warp's sequence on its 16-byte pieces lo / hi: a shared-expert step (bf16), or a
// routed one (int4) whose scales and zero points meta(item, group, scale2, zero2) gives.
template <typename Meta>
__device__ __forceinline__ void compute_step(const Weights& w, int warp, int j, const uint4& lo, const uint4& hi,
                                             Meta meta, float (&acc)[4]) {
  const int c = threadIdx.x & 3;
  const int s_count = range_start(kSharedSteps, warp + 1) - range_start(kSharedSteps, warp);
  if (j < s_count) {
    const int step = range_start(kSharedSteps, warp) + j;
    step_bf16(lo, hi, w.act + kTopK * kI + step * 32 + 8 * c, acc);
  } else {
    const int r = range_start(kRoutedSteps, warp) + j - s_count;
    const int item = r / kGroups, group = r % kGroups;
    uint32_t scale2, zero2;
    meta(item, group, scale2, zero2);
    step_int4(lo, hi, scale2, zero2, w.act + item * kI + group * kGroupK + 32 * c, acc);
  }
}

__device__ __forceinline__ void finish(const Weights& w, int h0, const float (&acc)[4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  if (c == 0) {  // column 0: the token
    atomicAdd(w.out + h0 + g, acc[0]);
    atomicAdd(w.out + h0 + g + 8, acc[2]);
  }
}

// The register schedule (moe_down_kernel, frag mapping, T = 1).
__global__ void __launch_bounds__(kThreads, 2) registers_kernel(Weights w, int call) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int h0 = blockIdx.x * kRows;
  const __nv_bfloat16* shared_down = w.shared_down + static_cast<int64_t>(call % kSharedCopies) * kH * kIs;
  const int* ids = w.ids + (call % kIdSets) * kTopK;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  {
    const int s_begin = range_start(kSharedSteps, warp), s_end = range_start(kSharedSteps, warp + 1);
    const __nv_bfloat16* x = w.act + kTopK * kI + 8 * c;
    for (int s0 = s_begin; s0 < s_end; s0 += 8) {
      uint4 lo[8], hi[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const bool ok = s0 + u < s_end;
        const auto* row = reinterpret_cast<const uint8_t*>(shared_down + static_cast<int64_t>(h0 + g) * kIs);
        lo[u] = dots1::load_weight16_if(row + (s0 + u) * 64 + 16 * c, ok);
        hi[u] = dots1::load_weight16_if(row + 8 * kIs * 2 + (s0 + u) * 64 + 16 * c, ok);
      }
#pragma unroll
      for (int u = 0; u < 8; ++u)
        if (s0 + u < s_end) step_bf16(lo[u], hi[u], x + (s0 + u) * 32, acc);
    }
  }
  const int r_begin = range_start(kRoutedSteps, warp), r_end = range_start(kRoutedSteps, warp + 1);
  for (int it = r_begin / kGroups; it * kGroups < r_end; ++it) {
    const int a = max(r_begin, it * kGroups) - it * kGroups, b = min(r_end, (it + 1) * kGroups) - it * kGroups;
    const int64_t row = static_cast<int64_t>(ids[it]) * kH + h0 + g;
    const __nv_bfloat16* x = w.act + it * kI + 32 * c;
    for (int s0 = a; s0 < b; s0 += 4) {
      uint4 lo[4], hi[4];
      uint32_t scale2[4], zero2[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const bool ok = s0 + u < b;
        const int gi = min(s0 + u, kGroups - 1);
        lo[u] = dots1::load_weight16_if(w.codes + row * (kI / 2) + gi * 64 + 16 * c, ok);
        hi[u] = dots1::load_weight16_if(w.codes + (row + 8) * (kI / 2) + gi * 64 + 16 * c, ok);
        const auto* s = reinterpret_cast<const unsigned short*>(w.scales);
        scale2[u] = __ldg(s + row * kGroups + gi) | static_cast<uint32_t>(__ldg(s + (row + 8) * kGroups + gi)) << 16;
        const uint32_t z_hi = __ldg(w.zeros + (row + 8) * kGroups + gi);
        zero2[u] = __ldg(w.zeros + row * kGroups + gi) | z_hi << 16;
      }
#pragma unroll
      for (int u = 0; u < 4; ++u)
        if (s0 + u < b) step_int4(lo[u], hi[u], scale2[u], zero2[u], x + (s0 + u) * kGroupK, acc);
    }
  }
  finish(w, h0, acc);
}

// The ring schedule: slots [D][2][kThreads] uint4 (thread-major: consecutive threads, consecutive 16
// bytes), then the CTA's scales [kTopK][kRows][kGroups] bf16 and zero points (same shape) as copied.
template <int D>
__global__ void __launch_bounds__(kThreads, 2) ring_kernel(Weights w, int call) {
  extern __shared__ __align__(16) unsigned char smem[];
  uint4* ring = reinterpret_cast<uint4*>(smem);
  auto* meta_scales = reinterpret_cast<unsigned short*>(smem + D * 2 * kThreads * 16);
  auto* meta_zeros = reinterpret_cast<uint8_t*>(meta_scales + kTopK * kRows * kGroups);
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2;
  const int h0 = blockIdx.x * kRows;
  const __nv_bfloat16* shared_down = w.shared_down + static_cast<int64_t>(call % kSharedCopies) * kH * kIs;
  const int* ids = w.ids + (call % kIdSets) * kTopK;
  // The CTA's scales (16 rows x 11 x 2 B = 352 B per item, 16-byte aligned) and zero points (176 B).
  constexpr int kScale16 = kRows * kGroups * 2 / 16, kZero16 = kRows * kGroups / 16;
  for (int i = threadIdx.x; i < kTopK * (kScale16 + kZero16); i += kThreads) {
    const int item = i / (kScale16 + kZero16), piece = i % (kScale16 + kZero16);
    const int64_t row0 = static_cast<int64_t>(ids[item]) * kH + h0;
    if (piece < kScale16)
      cp_async16(meta_scales + item * kRows * kGroups + piece * 8, w.scales + row0 * kGroups + piece * 8);
    else
      cp_async16(meta_zeros + item * kRows * kGroups + (piece - kScale16) * 16,
                 w.zeros + row0 * kGroups + (piece - kScale16) * 16);
  }
  cp_async_commit();
  const int n = warp_steps(warp);
  const auto issue = [&](int j) {
    if (j < n) {
      const StepSource src = step_source(w, shared_down, ids, h0, warp, j);
      cp_async16(ring + ((j % D) * 2 + 0) * kThreads + threadIdx.x, src.lo);
      cp_async16(ring + ((j % D) * 2 + 1) * kThreads + threadIdx.x, src.hi);
    }
    cp_async_commit();  // also when empty: one group per step keeps the wait count fixed
  };
#pragma unroll
  for (int j = 0; j < D - 1; ++j) issue(j);
  cp_async_wait_group<D - 1>();  // the meta group (the oldest) has landed
  __syncthreads();         // ... for every thread
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  const auto staged_meta = [&](int item, int group, uint32_t& scale2, uint32_t& zero2) {
    const int m = item * kRows * kGroups + g * kGroups + group;
    scale2 = meta_scales[m] | static_cast<uint32_t>(meta_scales[m + 8 * kGroups]) << 16;
    zero2 = meta_zeros[m] | static_cast<uint32_t>(meta_zeros[m + 8 * kGroups]) << 16;
  };
  for (int j = 0; j < n; ++j) {
    cp_async_wait_group<D - 2>();  // step j's group
    const uint4 lo = ring[((j % D) * 2 + 0) * kThreads + threadIdx.x];
    const uint4 hi = ring[((j % D) * 2 + 1) * kThreads + threadIdx.x];
    issue(j + D - 1);  // into the slot consumed at j - 1
    compute_step(w, warp, j, lo, hi, staged_meta, acc);
  }
  finish(w, h0, acc);
}

// The ring with each step's scales and zero points loaded D - 1 steps ahead into registers instead of
// staged per CTA (a real kernel's meta does not fit shared memory for every I): the loop is unrolled
// by D so that the register slots are indexed statically.
template <int D>
__global__ void __launch_bounds__(kThreads, 2) ring_meta_regs_kernel(Weights w, int call) {
  extern __shared__ __align__(16) unsigned char smem[];
  uint4* ring = reinterpret_cast<uint4*>(smem);
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2;
  const int h0 = blockIdx.x * kRows;
  const __nv_bfloat16* shared_down = w.shared_down + static_cast<int64_t>(call % kSharedCopies) * kH * kIs;
  const int* ids = w.ids + (call % kIdSets) * kTopK;
  const int n = warp_steps(warp);
  uint32_t scale2[D], zero2[D];
  const auto issue = [&](int j, uint32_t& s2, uint32_t& z2) {
    if (j < n) {
      const StepSource src = step_source(w, shared_down, ids, h0, warp, j);
      cp_async16(ring + ((j % D) * 2 + 0) * kThreads + threadIdx.x, src.lo);
      cp_async16(ring + ((j % D) * 2 + 1) * kThreads + threadIdx.x, src.hi);
      if (src.item >= 0) {
        const int64_t row = static_cast<int64_t>(ids[src.item]) * kH + h0 + g;
        const auto* sc = reinterpret_cast<const unsigned short*>(w.scales);
        s2 = __ldg(sc + row * kGroups + src.group) |
             static_cast<uint32_t>(__ldg(sc + (row + 8) * kGroups + src.group)) << 16;
        const uint32_t z_hi = __ldg(w.zeros + (row + 8) * kGroups + src.group);
        z2 = __ldg(w.zeros + row * kGroups + src.group) | z_hi << 16;
      }
    }
    cp_async_commit();
  };
#pragma unroll
  for (int j = 0; j < D - 1; ++j) issue(j, scale2[j], zero2[j]);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int j0 = 0; j0 < n; j0 += D) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const int j = j0 + d;
      if (j >= n) break;  // warp-uniform
      cp_async_wait_group<D - 2>();
      const uint4 lo = ring[(d * 2 + 0) * kThreads + threadIdx.x];
      const uint4 hi = ring[(d * 2 + 1) * kThreads + threadIdx.x];
      const uint32_t s2 = scale2[d], z2 = zero2[d];
      issue(j + D - 1, scale2[(d + D - 1) % D], zero2[(d + D - 1) % D]);
      compute_step(w, warp, j, lo, hi, [&](int, int, uint32_t& s, uint32_t& z) { s = s2, z = z2; }, acc);
    }
  }
  finish(w, h0, acc);
}

int main() {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int64_t shared_elems = static_cast<int64_t>(kSharedCopies) * kH * kIs;
  const int64_t code_bytes = static_cast<int64_t>(kE) * kH * (kI / 2), meta = static_cast<int64_t>(kE) * kH * kGroups;
  __nv_bfloat16 *shared_down = nullptr, *scales = nullptr, *act = nullptr;
  uint8_t *codes = nullptr, *zeros = nullptr;
  int* ids = nullptr;
  float* out = nullptr;
  CHECK(cudaMalloc(&shared_down, shared_elems * 2));
  CHECK(cudaMalloc(&codes, code_bytes));
  CHECK(cudaMalloc(&scales, meta * 2));
  CHECK(cudaMalloc(&zeros, meta));
  CHECK(cudaMalloc(&act, (kTopK * kI + kIs) * 2));
  CHECK(cudaMalloc(&ids, kIdSets * kTopK * sizeof(int)));
  CHECK(cudaMalloc(&out, kH * sizeof(float)));
  // Bytes that decode to small finite values: 0x3c3c (bf16 ~0.0115) for activations, weights and scales;
  // codes and zero points any byte (nibbles 0..15 and z = byte & 15 are what the math reads).
  CHECK(cudaMemset(shared_down, 0x3c, shared_elems * 2));
  CHECK(cudaMemset(codes, 0x5a, code_bytes));
  CHECK(cudaMemset(scales, 0x3c, meta * 2));
  CHECK(cudaMemset(zeros, 0x08, meta));
  CHECK(cudaMemset(act, 0x3c, (kTopK * kI + kIs) * 2));
  std::vector<int> host_ids(kIdSets * kTopK);
  std::mt19937 rng(0);
  for (int s = 0; s < kIdSets; ++s) {
    std::vector<int> perm(kE);
    for (int e = 0; e < kE; ++e) perm[e] = e;
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int j = 0; j < kTopK; ++j) host_ids[s * kTopK + j] = perm[j];
  }
  CHECK(cudaMemcpy(ids, host_ids.data(), host_ids.size() * sizeof(int), cudaMemcpyHostToDevice));
  const Weights w{shared_down, codes, scales, zeros, act, ids, out};

  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  const double copy_gbs = copy_bandwidth_gbs(a, b);
  if (copy_gbs <= 0) return std::printf("copy bandwidth: no 2 GB for its buffers\n"), 1;
  const double bytes = static_cast<double>(kH) * kIs * 2 + static_cast<double>(kTopK) * kH * (kI / 2 + kGroups * 3);
  const double floor_us = bytes / (copy_gbs * 1e3);
  std::printf("copy bandwidth %.0f GB/s, %d SMs; bytes per call %.1f MB, floor %.2f µs\n\n", copy_gbs, sms,
              bytes / 1e6, floor_us);
  std::printf("| schedule | shared memory per CTA | µs | floor / time |\n| --- | --- | --- | --- |\n");
  const dim3 grid(kH / kRows);
  auto row = [&](const char* name, int smem_bytes, auto launch) {
    const float ms = time_ms([&](int i) { launch(i); }, a, b);
    std::printf("| %s | %d KB | %.2f | %.2f |\n", name, smem_bytes / 1024, ms * 1e3, floor_us / (ms * 1e3));
  };
  row("registers (moe_down_kernel's frag schedule)", 0,
      [&](int i) { registers_kernel<<<grid, kThreads>>>(w, i); });
  // A ring kernel of D slots: its shared memory (the slots, plus the staged scales and zero points
  // where it stages them), its row.
  const auto ring_row = [&](auto kernel, int D, int meta_bytes, const char* what) -> int {
    const int smem_bytes = D * 2 * kThreads * 16 + meta_bytes;
    CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
    char name[80];
    std::snprintf(name, sizeof(name), "ring, %d slots (%d steps ahead)%s", D, D - 1, what);
    row(name, smem_bytes, [&](int i) { kernel<<<grid, kThreads, smem_bytes>>>(w, i); });
    return 0;
  };
  constexpr int kMetaBytes = kTopK * kRows * kGroups * 3;
  if (ring_row(ring_kernel<4>, 4, kMetaBytes, "") || ring_row(ring_kernel<8>, 8, kMetaBytes, "") ||
      ring_row(ring_kernel<12>, 12, kMetaBytes, "") || ring_row(ring_kernel<16>, 16, kMetaBytes, "") ||
      ring_row(ring_meta_regs_kernel<8>, 8, 0, ", scales in registers") ||
      ring_row(ring_meta_regs_kernel<12>, 12, 0, ", scales in registers"))
    return 1;
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  return 0;
}
