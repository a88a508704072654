// Probe: where does batch-1 int4 MoE decode's down kernel lose its time, and would another schedule of
// its loads help? The kernel at T=1 takes ~22 µs for 41 MB (0.45 of copy bandwidth) where a lone
// kernel reads that much at ~0.8 (read_ramp.cu). Here the same bytes and the same arithmetic
// (dequantization and m16n8k16 MMAs, one token; the kernels' own helpers from csrc/weight_stream.cuh)
// in several schedules:
//
//   registers  as moe_down_kernel's frag mapping: a warp streams its K range of the shared experts in
//              batches of 8 steps, then its range of the routed steps in batches of 4 cut at item
//              boundaries, every batch loaded into registers before any of it is used; also with a CTA
//              barrier between the two streams (as the kernel's shared-term sum and schedule build),
//              each stream alone, with the loads only (no dequantization, no MMA), and what-ifs of the
//              int4 arithmetic (step_int4's kMath)
//              and in a split order: warps 4-7 take their routed stream first (an SM's warps then stream
//              bf16 rows and dequantize int4 rows at the same time; the probe's one accumulator per warp
//              sums the two streams in the other order there, so its diff column shows rounding only)
//   ring D     each thread copies its own 16-byte pieces (cp.async) D - 1 steps ahead into a ring of D
//              slots in shared memory and reads back only its own (no barrier), one step issued per step
//              consumed; the CTA's scales and zero points staged in shared memory at the start (or, "scales
//              in registers", loaded D - 1 steps ahead, as a kernel for every I would do)
//   bulk D     a producer warp has the copy engine (cp.async.bulk + mbarriers) fill a D-slot ring of
//              stages (bulk_kernel below); 8 consumer warps compute from shared memory
//
// Answers (H200, bench/results/2026-11-30-h200-adc1fbd-int4-down-ring): registers 18.0 µs (0.54 of the
// floor; 16.9 with two accumulator sets, as the kernels), the barrier costs nothing, rings 21.9-22.4,
// bulk 19.6-20.9: the register batches are the best of the three. With the loads only the same schedule
// takes 12.7 µs (0.76: about what read_ramp.cu's lone kernel reaches at this size); the routed int4
// stream alone 11.2 µs with its arithmetic, 7.6 without; sparing the activation permutes saves 0.6 µs.
// What holds the probe is the work between the batches, not how far ahead its bytes are requested; the
// real kernel (21.7-23.4 µs) loses ~5 µs more to its structure around the streams.
//
// A standalone program (not part of the extension), run on the GPU:
//
//   nvcc -O3 -arch=sm_90a -Icsrc -std=c++17 -o /tmp/ids bench/probes/int4_down_schedules.cu && /tmp/ids
//
// Shapes: Dots1's (H = 4096 output rows in CTAs of 16, shared experts' Is = 2816 in bf16, 6 routed
// experts of I = 1408 in int4 with a bf16 scale and a uint8 zero point per group of 128, drawn per call
// from 128). Shared-expert copies and the routed experts cycle so that L2 serves nothing. Inputs are
// hashed bytes (fill_kernel); each schedule's output of one call is compared with the registers one.
// Timing: probe_util.cuh time_ms (launches back to back, no PDL). Floor: bytes / copy bandwidth.
#include <cuda_bf16.h>

#include <cmath>
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
// same for the zero points; x this lane's first activation of the step. kMath (registers_kernel's
// what-ifs; only 0 and 1 compute the kernels' result): 0 the kernels' math into one accumulator set;
// 1 the same over two sets (acc, acc2: independent MMA chains, as the kernels' int4 stream); 2 as 1
// without the activation byte permutes (what a packing of codes (2j, 2j + 1) into nibble j of the two
// half-words would allow); 3 as 2 with one bf16x2 FMA per code pair instead of two.
template <int kMath = 0>
__device__ __forceinline__ void step_int4(const uint4& lo, const uint4& hi, uint32_t scale2, uint32_t zero2,
                                          const __nv_bfloat16* x, float (&acc)[4], float (&acc2)[4]) {
  const uint32_t s_lo2 = __byte_perm(scale2, 0, 0x1010), s_hi2 = __byte_perm(scale2, 0, 0x3232);
  const uint32_t nz_lo2 = (zero2 & 0xFFFFu) * 0x00010001u | 0xC300C300u;
  const uint32_t nz_hi2 = (zero2 >> 16) * 0x00010001u | 0xC300C300u;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint4 xv = dots1::load_act16_always(x + 8 * i);
    uint32_t dl[4], dh[4];
    if (kMath < 3) {
      dequant8(word_of(lo, i), nz_lo2, s_lo2, dl);
      dequant8(word_of(hi, i), nz_hi2, s_hi2, dh);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        dl[j] = dots1::bf16x2_fma(dots1::and_or(word_of(lo, i) >> (4 * j), 0x000F000Fu, 0x43004300u), s_lo2, nz_lo2);
        dh[j] = dots1::bf16x2_fma(dots1::and_or(word_of(hi, i) >> (4 * j), 0x000F000Fu, 0x43004300u), s_hi2, nz_hi2);
      }
    }
    uint32_t b0 = xv.x, b1 = xv.y, b2 = xv.z, b3 = xv.w;
    if (kMath < 2) {
      b0 = __byte_perm(xv.x, xv.z, 0x5410), b1 = __byte_perm(xv.x, xv.z, 0x7632);
      b2 = __byte_perm(xv.y, xv.w, 0x5410), b3 = __byte_perm(xv.y, xv.w, 0x7632);
    }
    mma_16816<__nv_bfloat16>(acc, dl[0], dh[0], dl[1], dh[1], b0, b1);
    mma_16816<__nv_bfloat16>(kMath == 0 ? acc : acc2, dl[2], dh[2], dl[3], dh[3], b2, b3);
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
    step_int4(lo, hi, scale2, zero2, w.act + item * kI + group * kGroupK + 32 * c, acc, acc);
  }
}

__device__ __forceinline__ void finish(const Weights& w, int h0, const float (&acc)[4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  if (c == 0) {  // column 0: the token
    atomicAdd(w.out + h0 + g, acc[0]);
    atomicAdd(w.out + h0 + g + 8, acc[2]);
  }
}

// The register schedule (moe_down_kernel, frag mapping, T = 1); kBarrier: the CTA's warps meet between
// the shared and the routed streams, as the kernel's do (its shared-term sum and schedule build).
// kStreams: 1 the shared experts' stream only, 2 the routed only, 3 both; kCompute false: the loaded
// words are only XORed (no dequantization, no MMA), so the row is the schedule's loads alone.
// kSplit: warps kWarps / 2 .. kWarps - 1 take their routed stream first, then their shared one (the
// same sums: an SM then has warps in both kinds of phase at once; no barrier between the streams).
template <bool kBarrier, int kStreams = 3, bool kCompute = true, int kMath = 0, bool kSplit = false>
__global__ void __launch_bounds__(kThreads, 2) registers_kernel(Weights w, int call) {
  static_assert(!(kSplit && kBarrier), "the split order has no barrier between the streams");
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int h0 = blockIdx.x * kRows;
  const __nv_bfloat16* shared_down = w.shared_down + static_cast<int64_t>(call % kSharedCopies) * kH * kIs;
  const int* ids = w.ids + (call % kIdSets) * kTopK;
  float acc[4] = {0.f, 0.f, 0.f, 0.f}, acc2[4] = {0.f, 0.f, 0.f, 0.f};
  uint32_t mix = 0;
  const auto shared_stream = [&]() {
  if (kStreams & 1) {
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
        if (s0 + u < s_end) {
          if (kCompute)
            step_bf16(lo[u], hi[u], x + (s0 + u) * 32, acc);
          else
            mix ^= lo[u].x ^ lo[u].y ^ lo[u].z ^ lo[u].w ^ hi[u].x ^ hi[u].y ^ hi[u].z ^ hi[u].w;
        }
    }
  }
  };
  const auto routed_stream = [&]() {
  const int r_begin = range_start(kRoutedSteps, warp), r_end = range_start(kRoutedSteps, warp + 1);
  for (int it = r_begin / kGroups; (kStreams & 2) && it * kGroups < r_end; ++it) {
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
        if (s0 + u < b) {
          if (kCompute)
            step_int4<kMath>(lo[u], hi[u], scale2[u], zero2[u], x + (s0 + u) * kGroupK, acc, acc2);
          else
            mix ^= lo[u].x ^ lo[u].y ^ lo[u].z ^ lo[u].w ^ hi[u].x ^ hi[u].y ^ hi[u].z ^ hi[u].w ^ scale2[u] ^ zero2[u];
        }
    }
  }
  };
  if (kSplit && warp >= kWarps / 2) {
    routed_stream();
    shared_stream();
  } else {
    shared_stream();
    if (kBarrier) __syncthreads();
    routed_stream();
  }
  if (!kCompute) acc[0] = __uint_as_float(mix & 0x3fffffffu);  // finite: keeps the loads
#pragma unroll
  for (int r = 0; r < 4; ++r) acc[r] += acc2[r];
  finish(w, h0, acc);
}

// The ring schedule: slots [D][2][kThreads] uint4 (thread-major: consecutive threads, consecutive 16
// bytes), then the CTA's scales [kTopK][kRows][kGroups] bf16 and zero points (same shape) as copied.
template <int D>
__global__ void __launch_bounds__(kThreads, 2) ring_kernel(Weights w, int call) {
  extern __shared__ __align__(128) unsigned char smem[];
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
  extern __shared__ __align__(128) unsigned char smem[];
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

// The bulk schedule: the CTA's bytes as 17 stages, each one copy-engine transfer group into a slot of
// a D-slot ring in shared memory: 11 shared-expert stages of 16 rows x 256 k (16 row copies of 512 B)
// and one stage per routed item (its 16 rows of codes, 11264 contiguous bytes, with their scales and
// zero points, 352 + 176 B). Warp 8 is the producer (its lanes issue a stage's copies once the 8
// consumer warps have released the slot); consumer warp w takes step w of a shared stage (32 k) and the
// groups w, w + 8 of a routed one. mbarriers: full[slot] (the producer's expect_tx arrival plus the
// copies' bytes), empty[slot] (one arrival per consumer warp).
constexpr int kSharedStageK = 256;
constexpr int kSharedStages = kIs / kSharedStageK;
constexpr int kBulkStages = kSharedStages + kTopK;
constexpr int kItemCodeBytes = kRows * kI / 2, kItemScaleBytes = kRows * kGroups * 2, kItemZeroBytes = kRows * kGroups;
constexpr int kSlotBytes = kItemCodeBytes + kItemScaleBytes + kItemZeroBytes;
static_assert(kSharedStages * kSharedStageK == kIs && kSharedStageK / 32 == kWarps, "a shared stage: a step per warp");
static_assert(kRows * kSharedStageK * 2 <= kSlotBytes && kSlotBytes % 16 == 0, "slots hold either kind of stage");

__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, int bytes, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

template <int D>
__global__ void __launch_bounds__(kThreads + 32, 2) bulk_kernel(Weights w, int call) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ __align__(8) uint64_t full[D], empty[D];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int h0 = blockIdx.x * kRows;
  const __nv_bfloat16* shared_down = w.shared_down + static_cast<int64_t>(call % kSharedCopies) * kH * kIs;
  const int* ids = w.ids + (call % kIdSets) * kTopK;
  if (threadIdx.x < D) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_addr(&full[threadIdx.x])) : "memory");
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(&empty[threadIdx.x])), "r"(kWarps)
                 : "memory");
  }
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  __syncthreads();
  if (warp == kWarps) {  // the producer
    for (int s = 0; s < kBulkStages; ++s) {
      const int slot = s % D;
      const uint32_t bar = smem_addr(&full[slot]), dst = smem_addr(smem + slot * kSlotBytes);
      if (s >= D) mbar_wait(smem_addr(&empty[slot]), ((s / D) - 1) & 1);
      const bool shared_stage = s < kSharedStages;
      if (lane == 0)
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar),
                     "r"(shared_stage ? kRows * kSharedStageK * 2 : kSlotBytes)
                     : "memory");
      __syncwarp();
      if (shared_stage) {
        if (lane < kRows)
          bulk_copy(dst + lane * kSharedStageK * 2,
                    shared_down + static_cast<int64_t>(h0 + lane) * kIs + s * kSharedStageK, kSharedStageK * 2, bar);
      } else {
        const int64_t row0 = static_cast<int64_t>(ids[s - kSharedStages]) * kH + h0;
        if (lane == 0) bulk_copy(dst, w.codes + row0 * (kI / 2), kItemCodeBytes, bar);
        if (lane == 1) bulk_copy(dst + kItemCodeBytes, w.scales + row0 * kGroups, kItemScaleBytes, bar);
        if (lane == 2) bulk_copy(dst + kItemCodeBytes + kItemScaleBytes, w.zeros + row0 * kGroups, kItemZeroBytes, bar);
      }
    }
    return;
  }
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int s = 0; s < kBulkStages; ++s) {
    const int slot = s % D;
    mbar_wait(smem_addr(&full[slot]), (s / D) & 1);
    const unsigned char* st = smem + slot * kSlotBytes;
    if (s < kSharedStages) {
      const int row_bytes = kSharedStageK * 2;
      const uint4 lo = *reinterpret_cast<const uint4*>(st + g * row_bytes + warp * 64 + 16 * c);
      const uint4 hi = *reinterpret_cast<const uint4*>(st + (g + 8) * row_bytes + warp * 64 + 16 * c);
      step_bf16(lo, hi, w.act + kTopK * kI + s * kSharedStageK + warp * 32 + 8 * c, acc);
    } else {
      const int item = s - kSharedStages;
      const auto* sc = reinterpret_cast<const unsigned short*>(st + kItemCodeBytes);
      const uint8_t* zp = st + kItemCodeBytes + kItemScaleBytes;
      for (int gi = warp; gi < kGroups; gi += kWarps) {
        const uint4 lo = *reinterpret_cast<const uint4*>(st + g * (kI / 2) + gi * 64 + 16 * c);
        const uint4 hi = *reinterpret_cast<const uint4*>(st + (g + 8) * (kI / 2) + gi * 64 + 16 * c);
        const uint32_t scale2 = sc[g * kGroups + gi] | static_cast<uint32_t>(sc[(g + 8) * kGroups + gi]) << 16;
        const uint32_t zero2 = zp[g * kGroups + gi] | static_cast<uint32_t>(zp[(g + 8) * kGroups + gi]) << 16;
        step_int4(lo, hi, scale2, zero2, w.act + item * kI + gi * kGroupK + 32 * c, acc, acc);
      }
    }
    __syncwarp();
    if (lane == 0) asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(&empty[slot])) : "memory");
  }
  finish(w, h0, acc);
}

// Fills n bytes with a hash of their index: kind 0 any byte (codes); bf16 values in [-0.5, 0.5) (kind 1)
// or [0.005, 0.02) (kind 2, scales); kind 3 0..15 (zero points): a schedule that reads the wrong bytes
// gives a different sum.
__global__ void fill_kernel(uint8_t* p, int64_t n, uint32_t seed, int kind) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    if (kind == 0 || kind == 3) {
      p[i] = static_cast<uint8_t>(kind == 0 ? h : h & 15);
    } else if (i % 2 == 0 && i + 1 < n) {
      const float v = kind == 1 ? (h % 1000) / 1000.0f - 0.5f : 0.005f + (h % 1000) * 1.5e-5f;
      *reinterpret_cast<__nv_bfloat16*>(p + i) = __float2bfloat16(v);
    }
  }
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
  fill_kernel<<<1024, 256>>>(reinterpret_cast<uint8_t*>(shared_down), shared_elems * 2, 1, 1);
  fill_kernel<<<1024, 256>>>(codes, code_bytes, 2, 0);
  fill_kernel<<<1024, 256>>>(reinterpret_cast<uint8_t*>(scales), meta * 2, 3, 2);
  fill_kernel<<<1024, 256>>>(zeros, meta, 4, 3);
  fill_kernel<<<64, 256>>>(reinterpret_cast<uint8_t*>(act), (kTopK * kI + kIs) * 2, 5, 1);
  CHECK(cudaGetLastError());
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
  std::printf("| schedule | shared memory per CTA | µs | floor / time | max abs diff vs registers / max abs |\n"
              "| --- | --- | --- | --- | --- |\n");
  const dim3 grid(kH / kRows);
  // One call (call 0) into a zeroed output, as floats on the host.
  std::vector<float> reference(kH), got(kH);
  const auto one_call = [&](auto launch, std::vector<float>& into) -> int {
    CHECK(cudaMemset(out, 0, kH * sizeof(float)));
    launch(0);
    CHECK(cudaGetLastError());
    CHECK(cudaMemcpy(into.data(), out, kH * sizeof(float), cudaMemcpyDeviceToHost));
    return 0;
  };
  if (one_call([&](int i) { registers_kernel<false><<<grid, kThreads>>>(w, i); }, reference)) return 1;
  float ref_max = 0.0f;
  for (float v : reference) ref_max = std::max(ref_max, std::fabs(v));
  auto row = [&](const char* name, int smem_bytes, auto launch) -> int {
    if (one_call(launch, got)) return 1;
    float diff = 0.0f;
    for (int h = 0; h < kH; ++h) diff = std::max(diff, std::fabs(got[h] - reference[h]));  // NaN: printed as nan
    const float ms = time_ms([&](int i) { launch(i); }, a, b);
    std::printf("| %s | %d KB | %.2f | %.2f | %.1e |\n", name, smem_bytes / 1024, ms * 1e3, floor_us / (ms * 1e3),
                diff / ref_max);
    return 0;
  };
  if (row("registers (moe_down_kernel's frag schedule)", 0,
          [&](int i) { registers_kernel<false><<<grid, kThreads>>>(w, i); }) ||
      row("registers, a CTA barrier between the shared and routed streams", 0,
          [&](int i) { registers_kernel<true><<<grid, kThreads>>>(w, i); }) ||
      row("registers, warps 4-7 routed stream first (split order)", 0,
          [&](int i) { registers_kernel<false, 3, true, 0, true><<<grid, kThreads>>>(w, i); }) ||
      row("registers, split order, two accumulator sets (as the kernels' int4 stream)", 0,
          [&](int i) { registers_kernel<false, 3, true, 1, true><<<grid, kThreads>>>(w, i); }))
    return 1;
  // The parts alone (their rows' diff column compares with the whole: not meaningful; floor / time is
  // against the whole call's floor: shared experts 23.1 MB = 56% of it, routed 18.1 MB = 44%).
  std::printf("| (rows below: diff column not meaningful; floor / time against the whole call's 41.2 MB) |||||\n");
  if (row("registers, the shared experts' stream only", 0,
          [&](int i) { registers_kernel<false, 1><<<grid, kThreads>>>(w, i); }) ||
      row("registers, the routed stream only", 0,
          [&](int i) { registers_kernel<false, 2><<<grid, kThreads>>>(w, i); }) ||
      row("registers, loads only (no dequantization, no MMA)", 0,
          [&](int i) { registers_kernel<false, 3, false><<<grid, kThreads>>>(w, i); }) ||
      row("registers, shared stream loads only", 0,
          [&](int i) { registers_kernel<false, 1, false><<<grid, kThreads>>>(w, i); }) ||
      row("registers, routed stream loads only", 0,
          [&](int i) { registers_kernel<false, 2, false><<<grid, kThreads>>>(w, i); }))
    return 1;
  // The int4 arithmetic's what-ifs (step_int4's kMath; 2 and 3 do not compute the kernels' result).
  std::printf("| (what-ifs of the int4 arithmetic, whole call; 2 and 3 are timing only) |||||\n");
  if (row("registers, two accumulator sets", 0,
          [&](int i) { registers_kernel<false, 3, true, 1><<<grid, kThreads>>>(w, i); }) ||
      row("registers, routed only, two accumulator sets", 0,
          [&](int i) { registers_kernel<false, 2, true, 1><<<grid, kThreads>>>(w, i); }) ||
      row("registers, two sets, no activation permutes", 0,
          [&](int i) { registers_kernel<false, 3, true, 2><<<grid, kThreads>>>(w, i); }) ||
      row("registers, two sets, no permutes, one FMA per code pair", 0,
          [&](int i) { registers_kernel<false, 3, true, 3><<<grid, kThreads>>>(w, i); }) ||
      row("registers, routed only, two sets, no permutes, one FMA per code pair", 0,
          [&](int i) { registers_kernel<false, 2, true, 3><<<grid, kThreads>>>(w, i); }))
    return 1;
  // A ring kernel of D slots: its shared memory (the slots, plus the staged scales and zero points
  // where it stages them), its row.
  const auto ring_row = [&](auto kernel, int D, int meta_bytes, const char* what) -> int {
    const int smem_bytes = D * 2 * kThreads * 16 + meta_bytes;
    CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
    char name[80];
    std::snprintf(name, sizeof(name), "ring, %d slots (%d steps ahead)%s", D, D - 1, what);
    return row(name, smem_bytes, [&](int i) { kernel<<<grid, kThreads, smem_bytes>>>(w, i); });
  };
  constexpr int kMetaBytes = kTopK * kRows * kGroups * 3;
  if (ring_row(ring_kernel<8>, 8, kMetaBytes, "") || ring_row(ring_kernel<12>, 12, kMetaBytes, "") ||
      ring_row(ring_meta_regs_kernel<8>, 8, 0, ", scales in registers"))
    return 1;
  // The bulk kernel with D slots of kSlotBytes.
  const auto bulk_row = [&](auto kernel, int D) -> int {
    const int smem_bytes = D * kSlotBytes;
    CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
    char name[80];
    std::snprintf(name, sizeof(name), "bulk copies, %d slots of %d B (producer warp)", D, kSlotBytes);
    return row(name, smem_bytes, [&](int i) { kernel<<<grid, kThreads + 32, smem_bytes>>>(w, i); });
  };
  if (bulk_row(bulk_kernel<2>, 2) || bulk_row(bulk_kernel<4>, 4) || bulk_row(bulk_kernel<6>, 6) ||
      bulk_row(bulk_kernel<8>, 8))
    return 1;
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  return 0;
}
