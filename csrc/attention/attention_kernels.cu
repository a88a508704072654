// Decode attention kernels: one query per sequence over a static KV cache. Kernels and launchers only;
// Tensor code is in attention.cpp, the semantics in attention.h.
//
// Work decomposition. A CTA serves one (sequence b, kv head, chunk of kGT query heads of that kv head,
// KV split): every K/V byte it loads is used by all of its query heads (GQA without repeated K/V). Within
// the CTA, a key row is spread over kLanesPerKey lanes (16 bytes each on the vector path) and a warp
// holds kKeysPerWarp keys at a time. K and V stream through a cp.async pipeline in shared memory (32 KB
// per stage: each thread copies kUnroll keys' vectors and later reads back only its own, so the only
// ordering needed is its own wait_group; all stages but the one consumed stay in flight). Plain
// register loads would not do: ptxas issues about 8 of them and then starts the math, which waits for
// the first and so delays the rest by a full memory latency.
//
// Pipeline depth. In the cluster mode, a grid that fits the GPU at one CTA per SM (batch 1: 32 kv heads
// x 1 or 2 splits) runs kDeepStages stages (192 KB of shared memory, 160 KB in flight per CTA) instead of 3: measured on
// the H200 (bench/probes/attention_splits.py, 61f4a58) 3-5% faster at 2 splits (14.0 vs 14.6 us at
// context 2048). Not more: a CTA reads ~45 GB/s at either depth (1 split, 2048: 23.2 vs 23.7 us), so
// its bytes in flight are not what bounds it; and 128 CTAs read less in total than 64, so neither is
// its loop alone (the access pattern, each CTA on one head's rows 8 KB apart, is the suspect:
// bench/probes/kv_read_patterns.cu). The depth is a launch argument, not a template one: it changes
// where bytes land, never the arithmetic or its order (the same bits). The workspace mode runs 3 unless
// forced: at its automatic 4 splits the deep pipeline was 0-2% slower (a0f98fa, contexts 2048-32768).
//
// Each key group keeps its own running (max, sum, acc) in fp32 (online softmax, one rescale per tile);
// the groups are merged through shuffles, then the warps through shared memory in warp order (one
// barrier, every thread merging some elements).
//
// Splits. The host picks the split count from the batch, the heads, the SM count and the cache capacity
// (never the device lengths: one CUDA graph serves every length). Each split derives its key range from
// the device length: chunk = ceil(len / splits) rounded up to the tile, so a short context leaves the
// later splits empty instead of paying for the capacity.
//
// Combining the splits (DOTS1_EXT_ATTENTION_COMBINE). The default, workspace: the splits are independent
// CTAs; each writes its partial (max, sum, acc) to a caller-given fp32 workspace, then arrives on a
// device counter (g_attention_arrivals), and the last split of each (sequence, kv head, head chunk) to
// arrive combines every output element of its heads in split order (combine_element). With
// last_split_combines false (DOTS1_EXT_ATTENTION_COMBINE=workspace), or more units than a counter slot
// holds, decode_attention_combine_kernel (a second launch, PDL-chained) does the same combine: the same
// bits; the last-arriving combine saves the second kernel's boundary (H200, 8-layer real-shape bf16 step,
// B=1, context 2048: 1.2708 -> 1.2594 ms, bench/results/2026-11-30-h200-10b2424-carry). The alternative, cluster: the splits of one (b, kv head, head chunk) form one thread-block
// cluster (sm_90; up to 16 CTAs, the non-portable size, where the GPU takes it) and combine their
// partials through distributed shared memory after a cluster barrier: no second kernel, but a cluster
// must fit one GPC, and measured on the H200 at batch 1 (bench/probes/attention_splits.py, a0f98fa)
// the cluster mode's 4 and 8 splits read the cache slower than its 2, while the workspace mode's 4
// read at 0.85-0.95 of copy bandwidth from context 8192 (0.73-0.78 for the cluster mode's best
// automatic choice). Both combine with the same arithmetic in the same order: the same bits for the
// same split count, deterministic (bitwise equal across runs, and between graph replay and eager), no
// counters or atomics. GPUs without clusters run one split in the cluster mode.
#include <cooperative_groups.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <type_traits>

#include "attention/attention.h"
#include "cuda_utils.cuh"
#include "norm/norm_rope.cuh"
#include "pdl.cuh"

namespace dots1 {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
// Pipeline depths (stages of 32 KB): the default, two CTAs per SM; the deep one, one CTA per SM.
constexpr int kShallowStages = kAttentionShallowStages;
constexpr int kDeepStages = kAttentionDeepStages;
constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- K/V staging: kVecBytes (16 or 4) bytes per copy, global -> shared without a register round trip ----

template <int kVecBytes>
struct alignas(kVecBytes) Words {
  uint32_t w[kVecBytes / 4];
};

// Copies kVecBytes from gmem to smem asynchronously; src_bytes 0 reads nothing and writes zeros (the
// tail of a range). 16-byte copies bypass L1 (K and V are read once) and let L2 fetch the whole
// 256-byte block from DRAM at the first miss: a bf16 key row of one head (D = 128) is exactly one
// such block, and the two halves of it otherwise reach DRAM as separate requests. (A hint only: it
// never faults and stays inside the aligned block, so inside the allocation's page.)
__device__ __forceinline__ void cp_async(void* smem, const void* gmem, int src_bytes, std::integral_constant<int, 16>) {
  const auto dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async(void* smem, const void* gmem, int src_bytes, std::integral_constant<int, 4>) {
  const auto dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Element i (of 4 / sizeof(T)) of a 32-bit word holding T values, as float (exact).
template <typename T>
__device__ __forceinline__ float word_elem(uint32_t w, int i);
template <>
__device__ __forceinline__ float word_elem<float>(uint32_t w, int) { return __uint_as_float(w); }
template <>
__device__ __forceinline__ float word_elem<__nv_bfloat16>(uint32_t w, int i) {
  return __uint_as_float(i == 0 ? (w << 16) : (w & 0xffff0000u));
}
template <>
__device__ __forceinline__ float word_elem<__half>(uint32_t w, int i) {
  const __half h = __ushort_as_half(static_cast<unsigned short>(i == 0 ? (w & 0xffffu) : (w >> 16)));
  return __half2float(h);
}

// 2^x: one MUFU instruction (2 ulp); 2^-inf = 0, which the masking below relies on.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The subtrahend that turns running maxima into rescale factors: 0 while nothing was seen (max -inf),
// so that 2^(-inf - 0) = 0 instead of 2^(-inf + inf) = NaN.
__device__ __forceinline__ float safe_max(float m) { return m == kNegInf ? 0.0f : m; }

// Shapes derived from (dtype, padded head_dim, load width, query heads per CTA).
template <typename T, int kDPad, int kVecBytes, int kGT>
struct Tiling {
  static constexpr int kElemsPerVec = kVecBytes / static_cast<int>(sizeof(T));
  static constexpr int kVecsPerRow = kDPad / kElemsPerVec;
  static constexpr int kLanesPerKey = kVecsPerRow < 32 ? kVecsPerRow : 32;
  static constexpr int kVecsPerLane = kVecsPerRow / kLanesPerKey;
  static constexpr int kKeysPerWarp = 32 / kLanesPerKey;
  // Keys per thread per pipeline stage: 128 bytes of K and V per thread (32 KB per CTA) per stage.
  static constexpr int kUnrollBase = 128 / (kVecsPerLane * 2 * kVecBytes);
  static constexpr int kUnroll = kUnrollBase < 1 ? 1 : (kUnrollBase > 8 ? 8 : kUnrollBase);
  static constexpr int kTile = kWarps * kKeysPerWarp * kUnroll;  // keys per CTA iteration
  static constexpr int kStageWords = 2 * kUnroll * kVecsPerLane * kThreads;  // K then V, per stage
  // The warps' states (one slot each), then the CTA's merged partial: acc, then max and sum.
  static constexpr int kReduceBytes = ((kWarps + 1) * kGT * kDPad + 2 * (kWarps + 1) * kGT) * 4;
  // The fused op's extra buffer, after the pipeline / reduce area: its normed + rotated query heads
  // [kGT][kDPad] and the new key and value rows [kDPad] each, in T.
  static constexpr int kFreshBytes = (kGT + 2) * kDPad * static_cast<int>(sizeof(T));
  // The pipeline / reduce area (they alias) of a pipeline of `stages` stages.
  static constexpr int area_bytes(int stages) {
    return stages * kStageWords * kVecBytes > kReduceBytes ? stages * kStageWords * kVecBytes : kReduceBytes;
  }
  static constexpr int smem_bytes(int stages, bool fused) { return area_bytes(stages) + (fused ? kFreshBytes : 0); }
  static_assert(kVecsPerRow * kElemsPerVec == kDPad, "kDPad must be a multiple of the vector");
  static_assert(kVecsPerRow % kLanesPerKey == 0, "vectors per row");
  static_assert((kLanesPerKey & (kLanesPerKey - 1)) == 0, "lanes per key must be a power of two");
};

// Merges the running state (mb, lb, ab) into (ma, la, aa), `a` first: rescaled to the larger max.
template <int kN>
__device__ __forceinline__ void merge_state(float& ma, float& la, float (&aa)[kN], float mb, float lb,
                                            const float (&ab)[kN]) {
  const float m = fmaxf(ma, mb);
  const float ms = safe_max(m);
  const float fa = fast_exp2(ma - ms), fb = fast_exp2(mb - ms);
  la = la * fa + lb * fb;
#pragma unroll
  for (int i = 0; i < kN; ++i) aa[i] = aa[i] * fa + ab[i] * fb;
  ma = m;
}

// Output value of one element: NaN for a poisoned sequence, 0 for an empty range (sum 0), else acc / sum
// (a NaN sum, from NaN inputs, stays NaN).
__device__ __forceinline__ float finish(float acc, float sum, bool bad) {
  if (bad) return __int_as_float(0x7fc00000);
  return sum == 0.0f ? 0.0f : acc / sum;
}

// The fused op's inputs (qk_norm_rope_decode_attention; attention.h DecodeQkNormRopeArgs), typed and
// offset to the launch's first sequence. Unused by the plain op.
template <typename T>
struct FreshKv {
  const T* k;  // [B, Hk, D] raw (before norm and rope)
  int64_t k_batch_stride, k_head_stride;
  const T* v;
  int64_t v_batch_stride, v_head_stride;
  const T* q_weight;  // [D]
  const T* k_weight;
  const int64_t* positions;
  int64_t positions_stride;
  const float* cos_sin;  // [num_positions, D]: cos | sin
  int64_t num_positions;
  const int64_t* cache_rows;
  int64_t cache_rows_stride;
  int64_t first_row;  // flat cache row (of k_cache.view(-1, Hk, D)) of slot 0 of the launch's sequence 0
  T* k_cache;         // the kernel's k_cache / v_cache, writable: the new row goes there
  T* v_cache;
  float eps;
};

// The workspace split mode (attention.h pipeline / combine): split `split` of query head h of sequence b
// keeps its partial (acc [d_pad], then max, then sum: the cluster mode's part_acc / part_m / part_l)
// at workspace_slot. Layout [B][Hq][splits][d_pad + 2] fp32.
__device__ __forceinline__ float* workspace_slot(float* workspace, int64_t b, int q_head, int num_q_heads, int split,
                                                 int num_splits, int d_pad) {
  return workspace + ((b * num_q_heads + q_head) * num_splits + split) * (d_pad + 2);
}

// The workspace mode's second kernel: grid (Hq, batch), kCombineThreads threads; each output element
// combined from the splits' partials in split order, exactly as the cluster mode's combine (the same
// bits). A sequence with bad bounds gets NaN, as in the main kernel (it wrote no partial worth reading).
constexpr int kCombineThreads = 128;

// Element d of one query head's output from its splits' partials (first: split 0's slot), in split
// order. __ldcg: in the last-arriving combine the partials were written by other SMs (read from L2,
// never from a line this SM's L1 may hold); the same values either way.
__device__ __forceinline__ float combine_element(const float* first, int d, int d_pad, int num_splits, bool bad) {
  float m_all = kNegInf;
  for (int i = 0; i < num_splits; ++i) m_all = fmaxf(m_all, __ldcg(first + i * (d_pad + 2) + d_pad));
  const float m_safe = safe_max(m_all);
  float sum = 0.0f, a = 0.0f;
  for (int i = 0; i < num_splits; ++i) {
    const float* part = first + i * (d_pad + 2);
    const float f = fast_exp2(__ldcg(part + d_pad) - m_safe);
    sum = sum + __ldcg(part + d_pad + 1) * f;
    a = a + __ldcg(part + d) * f;
  }
  return finish(a, sum, bad);
}

// The workspace mode's last-arriving combine (the header's "Combining the splits"): per launch a slot of
// arrival counters, one per (sequence, kv head, head chunk) of the launch. Zero at module load and left at
// zero by every completed launch (the last split's atomicInc wraps its counter), so CUDA graph replays
// need no reset. Launches that may run at once (other streams) must use different slots: the host hands
// them out round-robin, as the router does (gating_kernels.cu). Launches of more units than a slot holds
// (more than 4096 / (Hk x head chunks) sequences: above 128 at 32 kv heads) take the combine kernel.
constexpr int kAttentionArrivalSlots = 64;
constexpr int kAttentionArrivalUnits = 4096;
__device__ unsigned int g_attention_arrivals[kAttentionArrivalSlots][kAttentionArrivalUnits];

template <typename T>
__global__ void __launch_bounds__(kCombineThreads)
    decode_attention_combine_kernel(const float* __restrict__ workspace, const int64_t* __restrict__ kv_start,
                                    int64_t kv_start_stride, const int64_t* __restrict__ kv_end,
                                    int64_t kv_end_stride, T* __restrict__ out, int64_t cache_len, int num_q_heads,
                                    int head_dim, int d_pad, int num_splits) {
  // PDL: the partials come from the previous kernel (the main one); nothing is read before its end.
  pdl_wait();
  pdl_launch_dependents();
  const int q_head = blockIdx.x;
  const int64_t b = blockIdx.y;
  const int64_t start = kv_start[b * kv_start_stride], end = kv_end[b * kv_end_stride];
  const bool bad = start < 0 || end > cache_len || start > end;
  const float* first = workspace + (b * num_q_heads + q_head) * num_splits * (d_pad + 2);
  T* row = out + (b * num_q_heads + q_head) * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += kCombineThreads)
    row[d] = from_float<T>(combine_element(first, d, d_pad, num_splits, bad));
}

// grid (splits, Hk * head_chunks, batch); cluster (splits, 1, 1) when splits > 1 and no workspace. num_stages:
// kShallowStages or kDeepStages, with Tiling::smem_bytes(num_stages, kFused) of dynamic shared memory.
//
// kFused (qk_norm_rope_decode_attention, head_chunks == 1, head_dim == kDPad, 16-byte vectors): q is
// the raw query; the CTA normalises and rotates its query heads (the norm family's math,
// csrc/norm/norm_rope.cuh) into shared memory before the key loop. The new key / value (slot end - 1)
// belongs to exactly one split of (b, kv head): the one whose key range holds it, or split 0 when no
// split reads it (empty or bad range). That CTA computes it, writes it to the cache, and, when it also
// attends to it, skips that row in its cp.async copies and puts its own copy into its stage slots
// (the thread that would have copied it does, after its wait_group): no CTA reads the row it writes,
// and no other CTA reads the row at all (other splits, sequences and kv heads never do).
template <typename T, int kDPad, int kVecBytes, int kGT, bool kFused>
__global__ void __launch_bounds__(kThreads, kGT >= 8 ? 1 : 2)
    decode_attention_kernel(const T* __restrict__ q, int64_t q_batch_stride, int64_t q_head_stride,
                            // not __restrict__: the fused variant writes the new row through fresh.k_cache
                            // (only cp.async, an asm statement, reads through these)
                            const T* k_cache, const T* v_cache,
                            const int64_t* __restrict__ kv_start, int64_t kv_start_stride,
                            const int64_t* __restrict__ kv_end, int64_t kv_end_stride, T* __restrict__ out,
                            int64_t cache_len, int num_q_heads, int num_kv_heads, int head_dim, int group,
                            int head_chunks, int64_t window, float q_scale, int num_stages, float* workspace,
                            FreshKv<T> fresh, bool kv_settled, int arrival_slot) {
  using Tl = Tiling<T, kDPad, kVecBytes, kGT>;
  constexpr int kEPV = Tl::kElemsPerVec, kVPL = Tl::kVecsPerLane, kLPK = Tl::kLanesPerKey;
  constexpr int kKPW = Tl::kKeysPerWarp, kU = Tl::kUnroll, kTile = Tl::kTile;
  constexpr int kAcc = kVPL * kEPV;  // head_dim elements per lane

  // One dynamic buffer: the K/V pipeline stages during the key loop, then the warps' states
  // (red_acc [kWarps][kGT][kDPad], red_m and red_l [kWarps][kGT]) and the CTA's merged partial
  // (part_acc [kGT][kDPad], part_m and part_l [kGT]), which the cluster combine reads.
  extern __shared__ __align__(16) unsigned char attention_smem[];
  auto* stages = reinterpret_cast<Words<kVecBytes>*>(attention_smem);
  float* const red_base = reinterpret_cast<float*>(attention_smem);
  auto* red_acc = reinterpret_cast<float(*)[kGT][kDPad]>(red_base);
  auto* red_m = reinterpret_cast<float(*)[kGT]>(red_base + kWarps * kGT * kDPad);
  auto* red_l = reinterpret_cast<float(*)[kGT]>(red_base + kWarps * kGT * kDPad + kWarps * kGT);
  float* const part_acc = red_base + kWarps * kGT * kDPad + 2 * kWarps * kGT;  // [kGT][kDPad]
  float* const part_m = part_acc + kGT * kDPad;                                 // [kGT]
  float* const part_l = part_m + kGT;                                           // [kGT]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int key_slot = lane / kLPK, sub = lane % kLPK;
  const int64_t b = blockIdx.z;
  const int kv_head = blockIdx.y / head_chunks;
  const int g0 = (blockIdx.y % head_chunks) * kGT;  // first query head of this CTA within the group
  const int split = blockIdx.x, num_splits = gridDim.x;

  using NormRope = NormRopeLanes<T, kDPad>;
  constexpr int kHalf = NormRope::kHalf, kNormLanes = NormRope::kLanes, kHalfD = kDPad / 2;
  constexpr int kNormGroups = kThreads / kNormLanes;  // heads normalised at once (fused)
  const int norm_group = threadIdx.x / kNormLanes;
  const int norm_off = (threadIdx.x % kNormLanes) * kHalf;
  float w1[kFused ? kHalf : 1], w2[kFused ? kHalf : 1];
  // Fused: items [0, kGT) are this CTA's query heads, item kGT the kv head. The norm weights of each
  // thread's first item are read before the PDL wait (never written in a step, csrc/pdl.cuh).
  const auto load_norm_weight = [&](int item) {
    if constexpr (kFused) {
      const T* weight = item < kGT ? fresh.q_weight : fresh.k_weight;
      load_vec_float<T, kHalf>(weight + norm_off, w1);
      load_vec_float<T, kHalf>(weight + kHalfD + norm_off, w2);
    }
  };
  load_norm_weight(norm_group);

  // PDL (csrc/pdl.cuh): everything above ran while the previous kernel of the stream may still be
  // writing q, the cache or the bounds; nothing else global is read before the wait. Then the next
  // kernel (the o_proj GEMM) may be scheduled as this grid's CTAs retire and start streaming its weight.
  // kv_settled (the caller's promise, rule 1's exception: the bounds, the fused op's positions and
  // cache rows, and every cache row but slot end - 1 of each sequence were written before the kernel
  // right before this one): the bounds are read and the first stage_count - 1 tiles' copies issued
  // before the wait, without slot end - 1 (which that kernel writes: copied after the wait). Only the
  // 16-byte copies, which bypass L1.
  const bool early = kVecBytes == 16 && kv_settled;
  const auto wait_for_previous = [] {
    pdl_wait();
    pdl_launch_dependents();
  };
  if (!early) wait_for_previous();

  // The bounds and q are independent loads, issued together: the first K/V copy waits for the bounds
  // only, not for the bounds and then q.
  const int64_t start = kv_start[b * kv_start_stride], end = kv_end[b * kv_end_stride];
  int64_t position = 0, cache_row = -1;
  // Fused: the raw head of a thread's item (a query head of this CTA, or the kv head), a clamped one
  // for groups without an item. The first round's is loaded here, with the bounds: nothing it needs
  // depends on them.
  T x1[kFused ? kHalf : 1], x2[kFused ? kHalf : 1];
  const auto load_raw_head = [&](int item) {
    if constexpr (kFused) {
      const bool is_q = item < kGT;
      const int q_head = kv_head * group + g0 + (is_q && g0 + item < group ? item : 0);
      const T* src = is_q ? q + b * q_batch_stride + static_cast<int64_t>(q_head) * q_head_stride
                          : fresh.k + b * fresh.k_batch_stride + static_cast<int64_t>(kv_head) * fresh.k_head_stride;
      load_vec<T, kHalf>(src + norm_off, x1);
      load_vec<T, kHalf>(src + kHalfD + norm_off, x2);
    }
  };
  if constexpr (kFused) {
    position = fresh.positions[b * fresh.positions_stride];
    cache_row = fresh.cache_rows[b * fresh.cache_rows_stride];
    if (!early) load_raw_head(norm_group);
  }

  // Head-dim element of vector j, element e of this lane: ((j * kLPK + sub) * kEPV + e).
  const auto elem = [&](int j, int e) { return (j * kLPK + sub) * kEPV + e; };

  float qf[kGT][kAcc];
  const auto load_q = [&] {
    if constexpr (!kFused) {
#pragma unroll
      for (int g = 0; g < kGT; ++g) {
        const bool head_ok = g0 + g < group;
        const T* qrow = q + b * q_batch_stride + static_cast<int64_t>(kv_head * group + g0 + g) * q_head_stride;
#pragma unroll
        for (int j = 0; j < kVPL; ++j)
#pragma unroll
          for (int e = 0; e < kEPV; ++e) {
            const int d = elem(j, e);
            qf[g][j * kEPV + e] = head_ok && d < head_dim ? to_float(qrow[d]) * q_scale : 0.0f;
          }
      }
    }
  };
  if (!early) load_q();

  const bool bad = start < 0 || end > cache_len || start > end;
  int64_t lo = start;
  if (window > 0 && end - window > lo) lo = end - window;

  // This split's keys [k_begin, k_end) (none when bad).
  const int64_t len = end - lo;
  int64_t chunk = (len + num_splits - 1) / num_splits;
  chunk = (chunk + kTile - 1) / kTile * kTile;
  const int64_t k_begin = lo + split * chunk;
  const int64_t k_end = k_begin + chunk < end ? k_begin + chunk : end;
  const int64_t row_stride = static_cast<int64_t>(num_kv_heads) * head_dim;  // elements between slots
  const int64_t head_offset = (b * cache_len) * row_stride + static_cast<int64_t>(kv_head) * head_dim;
  const T* k_base = k_cache + head_offset;
  const T* v_base = v_cache + head_offset;
  const int64_t num_tiles = !bad && k_begin < k_end ? (k_end - k_begin + kTile - 1) / kTile : 0;
  const int stage_count = num_stages == kDeepStages ? kDeepStages : kShallowStages;
  // Waits until tile t's copies (the oldest group but stage_count - 2 newer ones) have landed.
  const auto wait_oldest = [&] {
    if (stage_count == kDeepStages)
      cp_async_wait<kDeepStages - 1>();
    else
      cp_async_wait<kShallowStages - 1>();
  };
  const auto stage_of = [&](int64_t t) { return stages + static_cast<int>(t % stage_count) * Tl::kStageWords; };

  // The slot this CTA fills itself instead of copying it from the cache with the others: fused, from
  // its own copy of the new key / value; early, slot end - 1 when a copy issued before the wait holds it.
  int64_t fresh_key = -1;

  // Each thread stages, and later reads back, only its own vectors: the copies need no barrier,
  // only the thread's own wait_group. Keys past the range and vectors past head_dim are zero-filled.
  const auto issue = [&](int64_t t) {
    if (t < num_tiles) {
      Words<kVecBytes>* stage = stage_of(t);
      const int64_t tile = k_begin + t * kTile;
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int64_t key = tile + (u * kWarps + warp) * kKPW + key_slot;
#pragma unroll
        for (int j = 0; j < kVPL; ++j) {
          const bool ok = key < k_end && elem(j, 0) < head_dim && key != fresh_key;
          const int64_t offset = ok ? key * row_stride + elem(j, 0) : 0;
          const int bytes = ok ? kVecBytes : 0;
          const int slot = (u * kVPL + j) * kThreads + threadIdx.x;
          cp_async(stage + slot, k_base + offset, bytes, std::integral_constant<int, kVecBytes>{});
          cp_async(stage + kU * kVPL * kThreads + slot, v_base + offset, bytes,
                   std::integral_constant<int, kVecBytes>{});
        }
      }
    }
    cp_async_commit();  // also when empty: one group per tile index keeps the wait count fixed
  };

  // Fused: the normed + rotated query heads, then the new key and value row (after the pipeline).
  T* const fresh_q = reinterpret_cast<T*>(attention_smem + Tl::area_bytes(stage_count));  // [kGT][kDPad]
  T* const fresh_k = fresh_q + kGT * kDPad;                                    // [kDPad]
  T* const fresh_v = fresh_k + kDPad;                                          // [kDPad]
  if constexpr (kFused) {
    // Poison policy of qk_norm_rope_kv_cache_ (norm.h): a bad position gives NaN q and k; a bad cache
    // row (here also any row other than slot end - 1 of this sequence) writes nothing, NaN q.
    const bool position_bad = position < 0 || position >= fresh.num_positions;
    const bool row_ok = end >= 1 && end <= cache_len && cache_row == fresh.first_row + b * cache_len + end - 1;
    const bool attended = !bad && lo < end;  // then slot end - 1 is in exactly one split's range
    const bool writer = row_ok && (attended ? k_begin <= end - 1 && end - 1 < k_end : split == 0);
    if (writer && attended) fresh_key = end - 1;
    // The first copies fly while the heads are normalised (the new row is not among them).
    for (int t = 0; t < stage_count - 1; ++t) issue(t);
    if (early) {
      wait_for_previous();
      load_raw_head(norm_group);
    }

    const float* cs_row = fresh.cos_sin + (position_bad ? 0 : position) * kDPad;
    // Every warp runs every round (full-mask shuffles); a group without an item computes on a clamped one.
    for (int base = 0; base < kGT + 1; base += kNormGroups) {
      const int item = base + norm_group;
      if (base > 0) {
        load_norm_weight(item);
        load_raw_head(item);
      }
      const bool is_q = item < kGT;
      const bool has_work = is_q ? g0 + item < group : item == kGT && writer;
      float c[kHalf], s[kHalf];
      if (position_bad) {  // the table may even be empty: nothing to read
#pragma unroll
        for (int j = 0; j < kHalf; ++j) c[j] = s[j] = 0.f;
      } else {
        load_vec<float, kHalf>(cs_row + norm_off, c);
        load_vec<float, kHalf>(cs_row + kHalfD + norm_off, s);
      }
      norm_rope_in_lanes<T, kDPad>(x1, x2, w1, w2, c, s, fresh.eps);
      if (position_bad || (is_q && !row_ok)) {
#pragma unroll
        for (int j = 0; j < kHalf; ++j) x1[j] = x2[j] = from_float<T>(__int_as_float(0x7fffffff));
      }
      if (has_work) {
        T* dst = is_q ? fresh_q + item * kDPad : fresh_k;
        store_vec<T, kHalf>(dst + norm_off, x1);
        store_vec<T, kHalf>(dst + kHalfD + norm_off, x2);
        if (!is_q) {
          const T* v_src = fresh.v + b * fresh.v_batch_stride + static_cast<int64_t>(kv_head) * fresh.v_head_stride;
          T v1[kHalf], v2[kHalf];
          load_vec<T, kHalf>(v_src + norm_off, v1);
          load_vec<T, kHalf>(v_src + kHalfD + norm_off, v2);
          store_vec<T, kHalf>(fresh_v + norm_off, v1);
          store_vec<T, kHalf>(fresh_v + kHalfD + norm_off, v2);
          const int64_t row_offset = head_offset + (end - 1) * row_stride + norm_off;
          store_vec<T, kHalf>(fresh.k_cache + row_offset, x1);
          store_vec<T, kHalf>(fresh.k_cache + row_offset + kHalfD, x2);
          store_vec<T, kHalf>(fresh.v_cache + row_offset, v1);
          store_vec<T, kHalf>(fresh.v_cache + row_offset + kHalfD, v2);
        }
      }
    }
    __syncthreads();  // fresh_q / fresh_k / fresh_v complete
#pragma unroll
    for (int g = 0; g < kGT; ++g) {
      const bool head_ok = g0 + g < group;
#pragma unroll
      for (int j = 0; j < kVPL; ++j)
#pragma unroll
        for (int e = 0; e < kEPV; ++e) {
          const int d = elem(j, e);  // as the plain op reads q: rounded to T, times scale * log2(e)
          qf[g][j * kEPV + e] = head_ok && d < head_dim ? to_float(fresh_q[g * kDPad + d]) * q_scale : 0.0f;
        }
    }
  } else {
    // Early: slot end - 1, if one of these tiles holds it, is left out of the copies (zero-filled)
    // and read after the wait; a later tile's copies are issued after the wait and take it as any row.
    if (early && num_tiles > 0 && end - 1 < k_end && (end - 1 - k_begin) / kTile < stage_count - 1)
      fresh_key = end - 1;
    for (int t = 0; t < stage_count - 1; ++t) issue(t);
    if (early) {
      wait_for_previous();
      load_q();
    }
  }
  // The tile holding fresh_key (-1: none).
  const int64_t fresh_tile = fresh_key >= 0 ? (fresh_key - k_begin) / kTile : -1;

  float m[kGT], l[kGT], acc[kGT][kAcc];
#pragma unroll
  for (int g = 0; g < kGT; ++g) {
    m[g] = kNegInf;
    l[g] = 0.0f;
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc[g][i] = 0.0f;
  }

  {
    for (int64_t t = 0; t < num_tiles; ++t) {
      issue(t + stage_count - 1);  // into the stage consumed at t - 1 (by this thread only, already read)
      wait_oldest();
      const int64_t tile = k_begin + t * kTile;
      if (t == fresh_tile) {  // the new row: the copier's own copy into its slots (zero-filled, landed)
        Words<kVecBytes>* own = stage_of(t);
        // Fused: this CTA's normed copy in shared memory; early: the cache row, after the wait.
        const auto* fresh_k_words =
            reinterpret_cast<const Words<kVecBytes>*>(kFused ? fresh_k : k_base + fresh_key * row_stride);
        const auto* fresh_v_words =
            reinterpret_cast<const Words<kVecBytes>*>(kFused ? fresh_v : v_base + fresh_key * row_stride);
#pragma unroll
        for (int u = 0; u < kU; ++u)
          if (tile + (u * kWarps + warp) * kKPW + key_slot == fresh_key) {
#pragma unroll
            for (int j = 0; j < kVPL; ++j) {
              if (!kFused && elem(j, 0) >= head_dim) continue;  // past head_dim: stays zero, as copied
              own[(u * kVPL + j) * kThreads + threadIdx.x] = fresh_k_words[j * kLPK + sub];
              own[kU * kVPL * kThreads + (u * kVPL + j) * kThreads + threadIdx.x] = fresh_v_words[j * kLPK + sub];
            }
          }
      }
      const Words<kVecBytes>* stage = stage_of(t);

      // Scores (already in log2 units: q carries scale * log2(e)), summed over the key's lanes.
      float s[kU][kGT];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        Words<kVecBytes> kw[kVPL];
#pragma unroll
        for (int j = 0; j < kVPL; ++j) kw[j] = stage[(u * kVPL + j) * kThreads + threadIdx.x];
        const bool valid = tile + (u * kWarps + warp) * kKPW + key_slot < k_end;
#pragma unroll
        for (int g = 0; g < kGT; ++g) {
          float dot = 0.0f;
#pragma unroll
          for (int j = 0; j < kVPL; ++j)
#pragma unroll
            for (int e = 0; e < kEPV; ++e)
              dot = fmaf(qf[g][j * kEPV + e], word_elem<T>(kw[j].w[e * sizeof(T) / 4], e % (4 / sizeof(T))), dot);
#pragma unroll
          for (int o = kLPK / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(kFullMask, dot, o);
          s[u][g] = valid ? dot : kNegInf;
        }
      }

      // Online softmax: one rescale per tile and head.
      float p[kU][kGT];
#pragma unroll
      for (int g = 0; g < kGT; ++g) {
        float m_new = m[g];
#pragma unroll
        for (int u = 0; u < kU; ++u) m_new = fmaxf(m_new, s[u][g]);
        const float ms = safe_max(m_new);
        const float alpha = fast_exp2(m[g] - ms);
        l[g] *= alpha;
#pragma unroll
        for (int i = 0; i < kAcc; ++i) acc[g][i] *= alpha;
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          p[u][g] = fast_exp2(s[u][g] - ms);
          l[g] += p[u][g];
        }
        m[g] = m_new;
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
#pragma unroll
        for (int j = 0; j < kVPL; ++j) {
          const Words<kVecBytes> vw = stage[kU * kVPL * kThreads + (u * kVPL + j) * kThreads + threadIdx.x];
#pragma unroll
          for (int e = 0; e < kEPV; ++e) {
            const float v = word_elem<T>(vw.w[e * sizeof(T) / 4], e % (4 / sizeof(T)));
#pragma unroll
            for (int g = 0; g < kGT; ++g) acc[g][j * kEPV + e] = fmaf(p[u][g], v, acc[g][j * kEPV + e]);
          }
        }
      }
    }
  }
  // The pipeline's buffer becomes the merge slots: no copy may still be landing in it, and every
  // thread must be done reading its stages.
  cp_async_wait<0>();
  __syncthreads();

  // Merge the key groups of each warp (lanes kLPK apart) into key group 0, lower group first; the
  // upper lanes' state is not used afterwards.
#pragma unroll
  for (int o = kLPK; o < 32; o <<= 1) {
#pragma unroll
    for (int g = 0; g < kGT; ++g) {
      const float mo = __shfl_xor_sync(kFullMask, m[g], o);
      const float lo_ = __shfl_xor_sync(kFullMask, l[g], o);
      float ao[kAcc];
#pragma unroll
      for (int i = 0; i < kAcc; ++i) ao[i] = __shfl_xor_sync(kFullMask, acc[g][i], o);
      if ((lane & o) == 0) merge_state(m[g], l[g], acc[g], mo, lo_, ao);
    }
  }

  // Every warp's state into its slot, then one barrier: each (head, element) of the CTA is merged over
  // the warps in warp order by one thread (all threads share the work; no log-depth tree of barriers).
  const bool lead_group = key_slot == 0;
  if (lead_group) {
#pragma unroll
    for (int g = 0; g < kGT; ++g) {
      if (sub == 0) {
        red_m[warp][g] = m[g];
        red_l[warp][g] = l[g];
      }
#pragma unroll
      for (int j = 0; j < kVPL; ++j)
#pragma unroll
        for (int e = 0; e < kEPV; ++e) red_acc[warp][g][elem(j, e)] = acc[g][j * kEPV + e];
    }
  }
  __syncthreads();

  const auto out_row = [&](int g) {
    return out + (b * num_q_heads + static_cast<int64_t>(kv_head) * group + g0 + g) * head_dim;
  };

  for (int idx = threadIdx.x; idx < kGT * kDPad; idx += kThreads) {
    const int g = idx / kDPad, d = idx % kDPad;
    float m_all = kNegInf;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, red_m[w][g]);
    const float m_safe = safe_max(m_all);
    float sum = 0.0f, a = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = fast_exp2(red_m[w][g] - m_safe);
      sum = sum + red_l[w][g] * f;
      a = a + red_acc[w][g][d] * f;
    }
    if (num_splits == 1) {
      if (d < head_dim && g0 + g < group) out_row(g)[d] = from_float<T>(finish(a, sum, bad));
    } else if (workspace != nullptr) {
      if (g0 + g < group) {
        float* slot = workspace_slot(workspace, b, kv_head * group + g0 + g, num_q_heads, split, num_splits, kDPad);
        slot[d] = a;
        if (d == 0) {
          slot[kDPad] = m_all;
          slot[kDPad + 1] = sum;
        }
      }
    } else {
      part_acc[g * kDPad + d] = a;
      if (d == 0) {
        part_m[g] = m_all;
        part_l[g] = sum;
      }
    }
  }
  // Split partials in the workspace: the last split of this (b, kv head, head chunk) to arrive combines
  // them (arrival_slot >= 0), or decode_attention_combine does (a second kernel). The fences make each
  // split's partials visible before its arrival and the others' before the last one reads them.
  if (num_splits > 1 && workspace != nullptr && arrival_slot >= 0) {
    __threadfence();  // release this CTA's partials
    __syncthreads();
    int is_last = 0;
    if (threadIdx.x == 0) {
      const unsigned int unit = blockIdx.z * gridDim.y + blockIdx.y;
      is_last = atomicInc(&g_attention_arrivals[arrival_slot][unit], num_splits - 1) == num_splits - 1;
    }
    if (!__syncthreads_or(is_last)) return;
    __threadfence();  // acquire: the other splits' partials
    for (int idx = threadIdx.x; idx < kGT * head_dim; idx += kThreads) {
      const int g = idx / head_dim, d = idx % head_dim;
      if (g0 + g >= group) continue;
      const float* first = workspace_slot(workspace, b, kv_head * group + g0 + g, num_q_heads, 0, num_splits, kDPad);
      out_row(g)[d] = from_float<T>(combine_element(first, d, kDPad, num_splits, bad));
    }
    return;
  }
  if (num_splits == 1 || workspace != nullptr) return;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  // Release/acquire at cluster scope: every split's partial is visible to every CTA of the cluster.
  cluster.sync();
  const int rank = static_cast<int>(cluster.block_rank());
  for (int idx = rank * kThreads + static_cast<int>(threadIdx.x); idx < kGT * head_dim; idx += num_splits * kThreads) {
    const int g = idx / head_dim, d = idx % head_dim;
    if (g0 + g >= group) continue;
    // Two passes over the splits' partials (the max, then the sums) rather than 3 x 16 values held in
    // registers: with 16 splits those arrays pushed the kernel past its 128-register budget.
    float m_all = kNegInf;
    for (int i = 0; i < num_splits; ++i) m_all = fmaxf(m_all, cluster.map_shared_rank(part_m, i)[g]);
    const float m_safe = safe_max(m_all);
    float sum = 0.0f, a = 0.0f;
    for (int i = 0; i < num_splits; ++i) {
      const float f = fast_exp2(cluster.map_shared_rank(part_m, i)[g] - m_safe);
      sum = sum + cluster.map_shared_rank(part_l, i)[g] * f;
      a = a + cluster.map_shared_rank(part_acc, i)[g * kDPad + d] * f;
    }
    out_row(g)[d] = from_float<T>(finish(a, sum, bad));
  }
  // No CTA may exit while another may still read its shared memory.
  cluster.sync();
#else
  __trap();  // the host launches several splits only on GPUs with clusters
#endif
}

// ---- host side ----

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// log2(kAttentionMaxSplits) + 1: cluster sizes 1 (no cluster), 2, 4, 8, 16.
constexpr int kSplitLevels = 5;
static_assert(1 << (kSplitLevels - 1) == kAttentionMaxSplits, "split levels");

// What one kernel instantiation can keep resident on the current device at one pipeline depth: CTAs
// per SM times SMs (the one-split case) and clusters of 2, 4, 8 and 16 CTAs (0 where that size is not
// available: 16 is non-portable, Hopper takes it).
struct Resident {
  int ctas = 0;
  int clusters[kSplitLevels] = {};  // index log2(cluster size); [0] unused

  // CTAs of `splits`-CTA clusters resident at once (0: that split count cannot run); plain: the
  // splits are independent CTAs (the workspace mode), any CTA slot takes any of them.
  int ctas_in_clusters(int splits, bool plain) const {
    int lg = 0;
    while ((1 << lg) < splits) ++lg;
    return lg == 0 || plain ? ctas : clusters[lg] * splits;
  }
};

struct Residency {
  int sm_count = 0;
  int major = 0;
  Resident shallow, deep;  // deep all 0 where the device's shared memory cannot hold kDeepStages
  cudaError_t err = cudaSuccess;
};

template <typename Kernel>
cudaError_t query_resident(Kernel kernel, int smem_bytes, bool clusters, Resident* out) {
  int per_sm = 0;
  cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem_bytes);
  if (err != cudaSuccess) return err;
  int sm_count = 0;
  err = current_sm_count(&sm_count);
  if (err != cudaSuccess) return err;
  out->ctas = per_sm * sm_count;
  if (clusters)
    for (int lg = 1; lg < kSplitLevels; ++lg) out->clusters[lg] = max_active_clusters(kernel, 1 << lg, kThreads, smem_bytes);
  return cudaSuccess;
}

// Also raises the kernel's dynamic shared memory limit to the deep pipeline's size where the device
// allows it, else to the shallow one's (a per-device function attribute, so it is set here, once per
// device, before anything is launched).
template <typename Kernel>
Residency query_residency(Kernel kernel, int device, int shallow_bytes, int deep_bytes) {
  Residency r;
  int sm_count = 0, major = 0, optin = 0;
  r.err = current_sm_count(&sm_count);
  if (r.err == cudaSuccess) r.err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (r.err == cudaSuccess) r.err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (r.err != cudaSuccess) return r;
  const bool deep_fits = optin >= deep_bytes;
  r.err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, deep_fits ? deep_bytes : shallow_bytes);
  // All of L1 as shared memory where it helps: K and V bypass L1, and two CTAs per SM need ~200 KB.
  if (r.err == cudaSuccess)
    r.err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  if (r.err == cudaSuccess) r.err = query_resident(kernel, shallow_bytes, major >= 9, &r.shallow);
  if (r.err == cudaSuccess && deep_fits) r.err = query_resident(kernel, deep_bytes, major >= 9, &r.deep);
  r.sm_count = sm_count;
  r.major = major;
  return r;
}

// The pipeline depth of a launch of `ctas` CTAs in `splits`-CTA clusters (plain: the workspace mode,
// shallow unless forced): deep where they all fit at once at one CTA per SM (then nothing else wants the SMs' shared memory), shallow otherwise (forced
// deep, a grid that would run at two CTAs per SM ran 10-45% slower: the probe above at 4-16 splits);
// `requested` (kShallowStages / kDeepStages) forces one, deep only where it can run at all.
int choose_stages(const Residency& r, int splits, bool plain, int64_t ctas, int requested) {
  const int deep_resident = r.deep.ctas_in_clusters(splits, plain);
  if (requested == kShallowStages || deep_resident <= 0) return kShallowStages;
  if (requested == kDeepStages) return kDeepStages;
  if (plain) return kShallowStages;  // the workspace mode: the header's "Pipeline depth"
  return ctas <= deep_resident ? kDeepStages : kShallowStages;
}

// The split count, from a wave model in units of "time to stream one (sequence, kv head, head chunk)
// at full bandwidth": the clusters of one split count run in waves of at most r.shallow.clusters (.ctas for
// one split); a wave of n clusters takes max(n, R / splits), where R is about how many CTAs saturate
// HBM and R / splits is the time of one CTA streaming its 1 / splits share alone. R = sm_count / 2:
// measured on the H200 (B=1, 32 kv heads, context 16k-32k), 64 CTAs read the cache at 4.1 TB/s while
// 128 (4 splits) reached only 3.3 and 256 (8 splits) 3.2 TB/s, so on a tie the fewer splits win.
// Costs within 10% count as a tie (the model is coarse; more splits also pay more combine work).
// A split needs at least one tile of the capacity.
// plain (the workspace mode: splits are independent CTAs, no clusters): any CTA slot takes any split,
// and R = 3 sm_count / 4 (one CTA reads ~45 GB/s, so ~95 of them fill 4.2 TB/s). Measured on the H200
// (bench/probes/attention_splits.py, a0f98fa; B=1, 32 kv heads): it picks 4 splits, the fastest or
// within 1% of it at contexts 2048, 8192 and 32768 (2 splits: 14-23% slower, 16: 3-27% slower).
int choose_splits(const Residency& r, int sm_count, int64_t units, int64_t cache_len, int tile, bool plain) {
  const auto cost = [&](int64_t resident, int splits) {
    const double lone = (plain ? 0.75 : 0.5) * sm_count / splits;
    const int64_t full = units / resident, rest = units % resident;
    return full * std::max(static_cast<double>(resident), lone) + (rest ? std::max(static_cast<double>(rest), lone) : 0.0);
  };
  double costs[kSplitLevels];
  double lowest = 1e300;
  const int64_t useful = (cache_len + tile - 1) / tile;
  for (int lg = 0; lg < kSplitLevels; ++lg) {
    const int size = 1 << lg;
    const int resident = lg == 0 ? r.shallow.ctas : plain ? r.shallow.ctas / size : r.shallow.clusters[lg];
    costs[lg] = (size > useful || resident <= 0) ? 1e300 : cost(resident, size);
    lowest = std::min(lowest, costs[lg]);
  }
  for (int lg = 0; lg < kSplitLevels; ++lg)
    if (costs[lg] <= lowest * 1.1) return 1 << lg;
  return 1;
}

// fresh (kFused only): the fused op's inputs for the whole batch (first_row 0); each launch offsets them.
template <typename T, int kDPad, int kVecBytes, int kGT, bool kFused>
cudaError_t launch_tiled(const T* q, int64_t q_batch_stride, int64_t q_head_stride, const T* k_cache,
                         const T* v_cache, const int64_t* kv_start, int64_t kv_start_stride, const int64_t* kv_end,
                         int64_t kv_end_stride, T* out, int64_t batch, int64_t cache_len, int num_q_heads,
                         int num_kv_heads, int head_dim, int64_t window, float scale, int num_splits,
                         int pipeline_stages, float* workspace, cudaStream_t stream, int* splits_used,
                         bool use_pdl, const FreshKv<T>& fresh, bool kv_settled, bool last_split_combines) {
  using Tl = Tiling<T, kDPad, kVecBytes, kGT>;
  auto kernel = decode_attention_kernel<T, kDPad, kVecBytes, kGT, kFused>;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  // An error still pending belongs to an earlier launch: report it rather than let the probes clear it.
  err = cudaPeekAtLastError();
  if (err != cudaSuccess) return err;
  static PerDeviceOnce<Residency> residency;  // one per instantiation
  const Residency r = residency.get(device, [&] {
    return query_residency(kernel, device, Tl::smem_bytes(kShallowStages, kFused), Tl::smem_bytes(kDeepStages, kFused));
  });
  if (r.err != cudaSuccess) return r.err;

  const int group = num_q_heads / num_kv_heads;
  const int head_chunks = (group + kGT - 1) / kGT;
  if (kFused && (head_chunks != 1 || head_dim != kDPad)) return cudaErrorInvalidValue;  // see can_fuse
  const int64_t grid_y = static_cast<int64_t>(num_kv_heads) * head_chunks;
  if (grid_y > 65535) return cudaErrorInvalidConfiguration;
  // The workspace mode (a partial per split in global memory, then decode_attention_combine_kernel)
  // where the caller gives a workspace; its splits need no clusters.
  const bool plain = workspace != nullptr;
  int splits;
  if (num_splits <= 0) {
    splits = choose_splits(r, r.sm_count, batch * grid_y, cache_len, Tl::kTile, plain);
  } else {
    splits = 1;  // the largest power of two not above the request that the GPU can run
    for (int lg = 1; lg < kSplitLevels; ++lg)
      if ((1 << lg) <= num_splits && (plain || r.shallow.clusters[lg] > 0)) splits = 1 << lg;
  }
  if (splits_used) *splits_used = splits;
  // Every launch of the loop below has at most kMaxGridZ sequences.
  const int64_t ctas = std::min<int64_t>(batch, 65535) * grid_y * splits;
  const int stages = choose_stages(r, splits, plain, ctas, pipeline_stages);

  const float q_scale = scale * kLog2e;
  constexpr int64_t kMaxGridZ = 65535;
  for (int64_t b0 = 0; b0 < batch; b0 += kMaxGridZ) {
    const int64_t nb = batch - b0 < kMaxGridZ ? batch - b0 : kMaxGridZ;
    const T* qb = q + b0 * q_batch_stride;
    const int64_t kv_offset = b0 * cache_len * num_kv_heads * head_dim;
    const int64_t* sb = kv_start + b0 * kv_start_stride;
    const int64_t* eb = kv_end + b0 * kv_end_stride;
    T* ob = out + b0 * num_q_heads * head_dim;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(splits, static_cast<unsigned>(grid_y), static_cast<unsigned>(nb));
    config.blockDim = dim3(kThreads);
    config.dynamicSmemBytes = Tl::smem_bytes(stages, kFused);
    config.stream = stream;
    cudaLaunchAttribute attrs[2];
    unsigned num_attrs = 0;
    if (splits > 1 && !plain) {
      attrs[num_attrs].id = cudaLaunchAttributeClusterDimension;
      attrs[num_attrs].val.clusterDim.x = splits;
      attrs[num_attrs].val.clusterDim.y = 1;
      attrs[num_attrs].val.clusterDim.z = 1;
      ++num_attrs;
    }
    // PDL: the launch and the CTAs' index math overlap the previous kernel's tail (in a decode step
    // qk_norm_rope_kv_cache_, or the qkv GEMM for the fused op); the kernel's pdl_wait keeps every
    // global read after it but the fused op's norm weights.
    num_attrs += pdl_attribute(use_pdl && r.major >= 9, &attrs[num_attrs]);
    config.attrs = attrs;
    config.numAttrs = num_attrs;
    FreshKv<T> fb = {};
    if constexpr (kFused) {
      fb = fresh;
      fb.k += b0 * fresh.k_batch_stride;
      fb.v += b0 * fresh.v_batch_stride;
      fb.positions += b0 * fresh.positions_stride;
      fb.cache_rows += b0 * fresh.cache_rows_stride;
      fb.first_row = b0 * cache_len;
      fb.k_cache += kv_offset;
      fb.v_cache += kv_offset;
    }
    int arrival_slot = -1;  // >= 0: the last split of each unit combines (no second kernel)
    if (plain && splits > 1 && last_split_combines && nb * grid_y <= kAttentionArrivalUnits) {
      static std::atomic<unsigned int> next_slot{0};
      arrival_slot = static_cast<int>(next_slot.fetch_add(1, std::memory_order_relaxed) % kAttentionArrivalSlots);
    }
    err = cudaLaunchKernelEx(&config, kernel, qb, q_batch_stride, q_head_stride, k_cache + kv_offset,
                             v_cache + kv_offset, sb, kv_start_stride, eb, kv_end_stride, ob, cache_len, num_q_heads,
                             num_kv_heads, head_dim, group, head_chunks, window, q_scale, stages,
                             plain ? workspace + b0 * num_q_heads * splits * (kDPad + 2) : nullptr, fb,
                             kv_settled && use_pdl && r.major >= 9, arrival_slot);
    const cudaError_t last = cudaGetLastError();  // this launch's error state, consumed (reported below)
    if (err == cudaSuccess) err = last;
    if (err != cudaSuccess) return err;
    if (plain && splits > 1 && arrival_slot < 0) {
      err = launch_pdl(decode_attention_combine_kernel<T>, dim3(num_q_heads, static_cast<unsigned>(nb)),
                       dim3(kCombineThreads), 0, stream, use_pdl && r.major >= 9,
                       static_cast<const float*>(workspace + b0 * num_q_heads * splits * (kDPad + 2)), sb,
                       kv_start_stride, eb, kv_end_stride, ob, cache_len, num_q_heads, head_dim, kDPad, splits);
      if (err != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

// Query heads per CTA: the group size rounded up to a power of two, at most 8 (larger groups take
// several head chunks, each reading the kv head again, mostly from L2).
template <typename F>
cudaError_t dispatch_heads(int group, F&& f) {
  if (group <= 1) return f(std::integral_constant<int, 1>{});
  if (group <= 2) return f(std::integral_constant<int, 2>{});
  if (group <= 4) return f(std::integral_constant<int, 4>{});
  return f(std::integral_constant<int, 8>{});
}

// head_dim padded to 64, 128 or 256 (exact sizes are the fast case; others mask the tail).
template <typename F>
cudaError_t dispatch_head_dim(int64_t head_dim, F&& f) {
  if (head_dim <= 64) return f(std::integral_constant<int, 64>{});
  if (head_dim <= 128) return f(std::integral_constant<int, 128>{});
  return f(std::integral_constant<int, 256>{});
}

// Shared by both public launchers; args is null for the plain op.
template <bool kFused>
cudaError_t launch_impl(const void* q, int64_t q_batch_stride, int64_t q_head_stride, const void* k_cache,
                        const void* v_cache, const int64_t* kv_start, int64_t kv_start_stride, const int64_t* kv_end,
                        int64_t kv_end_stride, void* out, int64_t batch, int64_t cache_len, int64_t num_q_heads,
                        int64_t num_kv_heads, int64_t head_dim, int64_t window, float scale, int num_splits,
                        int pipeline_stages, float* workspace, DType dtype, cudaStream_t stream, int* splits_used,
                        bool use_pdl, bool kv_settled, bool last_split_combines,
                        const DecodeQkNormRopeArgs* args, void* k_cache_mut, void* v_cache_mut) {
  if (splits_used) *splits_used = 0;
  if (batch <= 0 || num_q_heads <= 0 || head_dim <= 0) return cudaSuccess;
  if (num_kv_heads <= 0 || num_q_heads % num_kv_heads != 0 || head_dim > kAttentionMaxHeadDim || head_dim % 2 != 0 ||
      cache_len < 0 || window < 0 || num_q_heads > (1 << 30))
    return cudaErrorInvalidValue;
  cudaError_t err = cudaErrorInvalidValue;
  DOTS1_DISPATCH_FLOAT_TYPES(dtype, scalar_t, {
    // 16-byte loads when every key row starts 16-byte aligned; 4-byte loads (an even head_dim keeps
    // pairs of 16-bit values word aligned) otherwise.
    const bool vec16 = (head_dim * static_cast<int64_t>(sizeof(scalar_t))) % 16 == 0 && aligned16(k_cache) &&
                       aligned16(v_cache);
    const int group = static_cast<int>(num_q_heads / num_kv_heads);
    FreshKv<scalar_t> fresh = {};
    if constexpr (kFused) {
      fresh.k = static_cast<const scalar_t*>(args->k);
      fresh.k_batch_stride = args->k_batch_stride;
      fresh.k_head_stride = args->k_head_stride;
      fresh.v = static_cast<const scalar_t*>(args->v);
      fresh.v_batch_stride = args->v_batch_stride;
      fresh.v_head_stride = args->v_head_stride;
      fresh.q_weight = static_cast<const scalar_t*>(args->q_weight);
      fresh.k_weight = static_cast<const scalar_t*>(args->k_weight);
      fresh.positions = args->positions;
      fresh.positions_stride = args->positions_stride;
      fresh.cos_sin = args->cos_sin_cache;
      fresh.num_positions = args->num_positions;
      fresh.cache_rows = args->cache_rows;
      fresh.cache_rows_stride = args->cache_rows_stride;
      fresh.first_row = 0;
      fresh.k_cache = static_cast<scalar_t*>(k_cache_mut);
      fresh.v_cache = static_cast<scalar_t*>(v_cache_mut);
      fresh.eps = args->eps;
    }
    err = dispatch_head_dim(head_dim, [&](auto dpad) {
      constexpr int kDPad = decltype(dpad)::value;
      return dispatch_heads(group, [&](auto gt) {
        constexpr int kGT = decltype(gt)::value;
        const auto run = [&](auto vec_bytes) -> cudaError_t {
          constexpr int kVecBytes = decltype(vec_bytes)::value;
          if constexpr (kFused && kVecBytes != 16) {
            return cudaErrorInvalidValue;  // can_fuse requires 16-byte rows: no 4-byte fused variant
          } else {
            return launch_tiled<scalar_t, kDPad, kVecBytes, kGT, kFused>(
                static_cast<const scalar_t*>(q), q_batch_stride, q_head_stride,
                static_cast<const scalar_t*>(k_cache), static_cast<const scalar_t*>(v_cache), kv_start,
                kv_start_stride, kv_end, kv_end_stride, static_cast<scalar_t*>(out), batch, cache_len,
                static_cast<int>(num_q_heads), static_cast<int>(num_kv_heads), static_cast<int>(head_dim), window,
                scale, num_splits, pipeline_stages, workspace, stream, splits_used, use_pdl, fresh, kv_settled,
                last_split_combines);
          }
        };
        return vec16 ? run(std::integral_constant<int, 16>{}) : run(std::integral_constant<int, 4>{});
      });
    });
  });
  return err;
}

}  // namespace

int64_t decode_attention_workspace_floats(int64_t batch, int64_t num_q_heads, int64_t head_dim) {
  const int64_t d_pad = head_dim <= 64 ? 64 : head_dim <= 128 ? 128 : 256;  // dispatch_head_dim
  return batch * num_q_heads * kAttentionMaxSplits * (d_pad + 2);
}

bool can_fuse_qk_norm_rope(const void* q, int64_t q_batch_stride, int64_t q_head_stride, const void* k_cache,
                           const void* v_cache, const DecodeQkNormRopeArgs& args, int64_t num_q_heads,
                           int64_t num_kv_heads, int64_t head_dim, DType dtype) {
  if (num_kv_heads <= 0 || num_q_heads % num_kv_heads != 0 || num_q_heads / num_kv_heads > 8) return false;
  if (head_dim != 64 && head_dim != 128 && head_dim != 256) return false;
  const int64_t elem_bytes = dtype == DType::kFloat32 ? 4 : 2;
  const int64_t per16 = 16 / elem_bytes;  // elements per 16-byte vector
  for (const void* p : {q, k_cache, v_cache, args.k, args.v, args.q_weight, args.k_weight,
                        static_cast<const void*>(args.cos_sin_cache)})
    if (!aligned16(p)) return false;
  for (const int64_t stride : {q_batch_stride, q_head_stride, args.k_batch_stride, args.k_head_stride,
                               args.v_batch_stride, args.v_head_stride})
    if (stride % per16 != 0) return false;
  return true;
}

cudaError_t launch_decode_attention(const void* q, int64_t q_batch_stride, int64_t q_head_stride, const void* k_cache,
                                    const void* v_cache, const int64_t* kv_start, int64_t kv_start_stride,
                                    const int64_t* kv_end, int64_t kv_end_stride, void* out, int64_t batch,
                                    int64_t cache_len, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                                    int64_t window, float scale, int num_splits, DType dtype, cudaStream_t stream,
                                    int* splits_used, bool use_pdl, int pipeline_stages, float* workspace,
                                    bool kv_settled, bool last_split_combines) {
  return launch_impl<false>(q, q_batch_stride, q_head_stride, k_cache, v_cache, kv_start, kv_start_stride, kv_end,
                            kv_end_stride, out, batch, cache_len, num_q_heads, num_kv_heads, head_dim, window, scale,
                            num_splits, pipeline_stages, workspace, dtype, stream, splits_used, use_pdl, kv_settled,
                            last_split_combines, nullptr, nullptr, nullptr);
}

cudaError_t launch_qk_norm_rope_decode_attention(const void* q, int64_t q_batch_stride, int64_t q_head_stride,
                                                 void* k_cache, void* v_cache, const int64_t* kv_start,
                                                 int64_t kv_start_stride, const int64_t* kv_end,
                                                 int64_t kv_end_stride, void* out, int64_t batch, int64_t cache_len,
                                                 int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                                                 int64_t window, float scale, const DecodeQkNormRopeArgs& args,
                                                 int num_splits, DType dtype, cudaStream_t stream, int* splits_used,
                                                 bool use_pdl, int pipeline_stages, float* workspace,
                                                 bool kv_settled, bool last_split_combines) {
  if (!can_fuse_qk_norm_rope(q, q_batch_stride, q_head_stride, k_cache, v_cache, args, num_q_heads, num_kv_heads,
                             head_dim, dtype)) {
    if (splits_used) *splits_used = 0;
    return cudaErrorInvalidValue;
  }
  return launch_impl<true>(q, q_batch_stride, q_head_stride, k_cache, v_cache, kv_start, kv_start_stride, kv_end,
                           kv_end_stride, out, batch, cache_len, num_q_heads, num_kv_heads, head_dim, window, scale,
                           num_splits, pipeline_stages, workspace, dtype, stream, splits_used, use_pdl, kv_settled,
                           last_split_combines, &args, k_cache, v_cache);
}

}  // namespace dots1
