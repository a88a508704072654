// Top-k gating kernels: one warp per token, fp32 end to end, exact expf (no fast math), ties to the
// lower id, NaN ranked highest (gating_key in gating.h). Kernels and launchers only; Tensor code is in gating.cpp.
#include <cooperative_groups.h>

#include <atomic>
#include <type_traits>

#include "cuda_utils.cuh"
#include "pdl.cuh"
#include "phase_stamps.cuh"
#include "gating/gating.h"

namespace dots1 {

#ifdef DOTS1_EXT_PHASE_STAMPS
// Probe builds only (DOTS1_EXT_PHASE_STAMPS=1 at build time; bench/probes/moe_phase_stamps.py, as the MoE
// decode kernels' stamps): thread 0 of each CTA of the grid router records %globaltimer at the phase
// edges below, per CTA (blockIdx.x + gridDim.x blockIdx.y) and slot; each launch overwrites the last one's.
constexpr int kRouterStampBlocks = 512, kRouterStampSlots = 8;
__device__ unsigned long long g_router_stamps[kRouterStampBlocks][kRouterStampSlots];
__device__ __forceinline__ void router_stamp(int slot) {
  const unsigned block = blockIdx.x + gridDim.x * blockIdx.y;
  if (threadIdx.x == 0 && block < kRouterStampBlocks) g_router_stamps[block][slot] = globaltimer_ns();
}
#define DOTS1_ROUTER_STAMP(slot) ::dots1::router_stamp(slot)
#else
#define DOTS1_ROUTER_STAMP(slot) ((void)0)
#endif

namespace {

constexpr int kWarpsPerBlock = 8;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ uint64_t warp_max_key(uint64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t other = __shfl_xor_sync(kFullMask, v, o);
    v = other > v ? other : v;
  }
  return v;
}

// This lane's bias values in gate_token's layout (expert lane + 32 i in slot i; 0 past E). A separate
// step so that a kernel can read them before its PDL wait (the bias is a weight: never written in a step).
template <int kVPL>
__device__ __forceinline__ void load_bias_lane(const float* __restrict__ bias, int E, int lane, float (&out)[kVPL]) {
#pragma unroll
  for (int i = 0; i < kVPL; ++i) out[i] = lane + 32 * i < E ? __ldg(bias + lane + 32 * i) : 0.0f;
}

// Routes one token with the whole warp. Expert e lives in lane e % 32, slot e / 32 (coalesced
// loads). kVPL = slots per lane = ceil(E / 32). logits_row may point to global or shared memory.
// bias_lane: load_bias_lane's values. choice_smem: 32 * kVPL floats private to this warp (read only
// when kGrouped).
template <int kVPL, bool kGrouped>
__device__ __forceinline__ void gate_token(const float* logits_row, const float (&bias_lane)[kVPL], int E, int k,
                                           int n_group, int topk_group, bool renormalize, float scale,
                                           float* choice_smem, float* __restrict__ weights_out,
                                           int32_t* __restrict__ ids_out, int lane) {
  uint64_t key[kVPL];
  float score[kVPL];
#pragma unroll
  for (int i = 0; i < kVPL; ++i) {
    const int e = lane + 32 * i;
    key[i] = 0;
    score[i] = 0.0f;
    if (e < E) {
      // Exact expf and an IEEE division: the same sigmoid as torch's CUDA kernel, so the chosen
      // experts do not move with an approximation.
      const float s = 1.0f / (1.0f + expf(-logits_row[e]));
      const float c = s + bias_lane[i];
      score[i] = s;
      key[i] = gating_key(c, static_cast<uint32_t>(e));
      if constexpr (kGrouped) choice_smem[e] = c;
    }
  }

  if constexpr (kGrouped) {
    __syncwarp();
    const int group_size = E / n_group;
    // Group score = sum of the group's two best biased scores (one when groups have one expert).
    uint64_t group_key[kVPL];
#pragma unroll
    for (int i = 0; i < kVPL; ++i) {
      const int g = lane + 32 * i;
      group_key[i] = 0;
      if (g < n_group) {
        float m1 = -INFINITY, m2 = -INFINITY;
        bool has_nan = false;
        const float* grp = choice_smem + g * group_size;
        for (int j = 0; j < group_size; ++j) {
          const float v = grp[j];
          has_nan |= v != v;
          if (v > m1) {
            m2 = m1;
            m1 = v;
          } else if (v > m2) {
            m2 = v;
          }
        }
        // NaN rule (gating.h): a group holding a NaN score has a NaN score, which ranks first.
        const float gs = has_nan ? __int_as_float(0x7fffffff) : group_size >= 2 ? m1 + m2 : m1;
        group_key[i] = gating_key(gs, static_cast<uint32_t>(g));
      }
    }
    int expert_group[kVPL];
#pragma unroll
    for (int i = 0; i < kVPL; ++i) expert_group[i] = (lane + 32 * i) / group_size;
    unsigned kept = 0;  // bit i: slot i's expert is in a kept group
    for (int r = 0; r < topk_group; ++r) {
      uint64_t best = 0;
#pragma unroll
      for (int i = 0; i < kVPL; ++i) best = group_key[i] > best ? group_key[i] : best;
      best = warp_max_key(best);
      const int g = static_cast<int>(gating_key_index(best));
#pragma unroll
      for (int i = 0; i < kVPL; ++i) {
        if (lane + 32 * i == g) group_key[i] = 0;
        if (expert_group[i] == g) kept |= 1u << i;
      }
    }
#pragma unroll
    for (int i = 0; i < kVPL; ++i)
      if (!((kept >> i) & 1u)) key[i] = 0;
    __syncwarp();  // choice_smem is rewritten by this warp's next token
  }

  float my_weight = 0.0f;
  int32_t my_id = 0;
  float weight_sum = 0.0f;
  for (int j = 0; j < k; ++j) {
    uint64_t best = 0;
#pragma unroll
    for (int i = 0; i < kVPL; ++i) best = key[i] > best ? key[i] : best;
    best = warp_max_key(best);
    const int idx = static_cast<int>(gating_key_index(best));
    float w = 0.0f;
#pragma unroll
    for (int i = 0; i < kVPL; ++i) {
      if (lane + 32 * i == idx) {
        w = score[i];
        key[i] = 0;
      }
    }
    w = __shfl_sync(kFullMask, w, idx & 31);
    weight_sum += w;  // slot order, identical in every lane
    if (lane == j) {
      my_weight = w;
      my_id = idx;
    }
  }
  if (lane < k) {
    float w = renormalize ? my_weight / (weight_sum + 1e-20f) : my_weight;
    weights_out[lane] = w * scale;
    ids_out[lane] = my_id;
  }
}

// gate_token<kVPL, false>'s routing of tokens [0, T) of logits (shared memory, [T][32 kVPL]) by the
// whole block (kThreads threads, one per (token, expert) of kThreads / (32 kVPL) tokens at a time):
// each thread counts the keys of its token above its own (its rank; keys are distinct), and ranks
// 0 .. k-1 are the experts gate_token picks in its rounds, in the same order, their weights summed in
// that order: the same outputs, bit for bit. Why: gate_token's k rounds of warp-wide maxima are one
// warp's serial chain (~2-3 µs at T=1 in the decode step, measured by the router's phase stamps),
// on the critical path between the router and the MoE kernel; the ranks are counts in parallel.
// key_smem: kThreads entries; chosen_w / chosen_id: kThreads / 32 x kGatingMaxTopk entries. Every
// thread of the block calls it (barriers inside).
template <int kVPL, int kThreads>
__device__ void route_by_rank(const float* logits, const float (&bias_lane)[kVPL], int T, int E, int k,
                              bool renormalize, float scale, uint64_t* key_smem, float* chosen_w,
                              int32_t* chosen_id, float* __restrict__ weights_out, int32_t* __restrict__ ids_out) {
  constexpr int kRow = 32 * kVPL;
  static_assert(kThreads % kRow == 0, "whole tokens per pass");
  constexpr int kTokensPerPass = kThreads / kRow;
  const int tid = static_cast<int>(threadIdx.x);
  const int token_slot = tid / kRow, e = tid % kRow;
  // Expert e's bias: load_bias_lane put it in lane e % 32 (this thread's lane), slot e / 32.
  float bias_e = 0.0f;
#pragma unroll
  for (int i = 0; i < kVPL; ++i)
    if (i == e / 32) bias_e = bias_lane[i];
  const uint64_t* row_keys = key_smem + token_slot * kRow;
  float* row_w = chosen_w + token_slot * kGatingMaxTopk;
  int32_t* row_id = chosen_id + token_slot * kGatingMaxTopk;
  for (int t0 = 0; t0 < T; t0 += kTokensPerPass) {
    const int t = t0 + token_slot;
    const bool mine = t < T && e < E;
    uint64_t key = 0;  // past E: 0, below every expert's key (gating_key's are > 0), as in gate_token
    float score = 0.0f;
    if (mine) {
      // gate_token's sigmoid: exact expf and an IEEE division.
      score = 1.0f / (1.0f + expf(-logits[t * kRow + e]));
      key = gating_key(score + bias_e, static_cast<uint32_t>(e));
    }
    key_smem[tid] = key;
    __syncthreads();
    if (mine) {
      int rank = 0;
#pragma unroll 16
      for (int j = 0; j < kRow; ++j) rank += row_keys[j] > key ? 1 : 0;
      if (rank < k) {
        row_w[rank] = score;
        row_id[rank] = e;
      }
    }
    __syncthreads();
    if (t < T && e < k) {
      float weight_sum = 0.0f;  // gate_token's order: rank 0, 1, ...
      for (int j = 0; j < k; ++j) weight_sum += row_w[j];
      const float w = renormalize ? row_w[e] / (weight_sum + 1e-20f) : row_w[e];
      weights_out[static_cast<int64_t>(t) * k + e] = w * scale;
      ids_out[static_cast<int64_t>(t) * k + e] = row_id[e];
    }
    __syncthreads();  // key_smem and the chosen rows are rewritten by the next pass
  }
}

template <int kVPL, bool kGrouped>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    topk_gating_kernel(const float* __restrict__ logits, const float* __restrict__ bias, int64_t num_tokens, int E,
                       int k, int n_group, int topk_group, bool renormalize, float scale,
                       float* __restrict__ weights, int32_t* __restrict__ ids) {
  __shared__ float choice_smem[kGrouped ? kWarpsPerBlock * 32 * kVPL : 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= num_tokens) return;  // whole warp leaves; no block-wide barrier follows
  float bias_lane[kVPL];
  load_bias_lane(bias, E, lane, bias_lane);
  gate_token<kVPL, kGrouped>(logits + t * E, bias_lane, E, k, n_group, topk_group, renormalize, scale,
                             choice_smem + warp * 32 * kVPL, weights + t * k, ids + t * k, lane);
}

// ---- fused router projection + gating (sm_90 thread-block cluster) ----

constexpr int kRouterWarps = 8;
constexpr int kRouterUnroll = 8;  // 16-byte weight loads in flight per lane
static_assert(kRouterUnroll >= 1, "kRouterUnroll");

template <typename T>
__device__ __forceinline__ void load16_as_float(const T* p, float (&out)[16 / sizeof(T)]) {
  const Vec16<T> v = *reinterpret_cast<const Vec16<T>*>(p);
#pragma unroll
  for (int i = 0; i < Vec16<T>::kElems; ++i) out[i] = to_float(v.v[i]);
}

template <int kVPL, bool kGrouped, typename T>
__global__ void __launch_bounds__(kRouterWarps * 32)
    router_gating_cluster_kernel(const T* __restrict__ hidden, const T* __restrict__ weight,
                                 const float* __restrict__ bias, int num_tokens, int E, int H, int k, int n_group,
                                 int topk_group, bool renormalize, float scale, bool vectorized,
                                 float* __restrict__ weights_out, int32_t* __restrict__ ids_out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  constexpr int kRow = 32 * kVPL;
  // Each block writes the logits of its experts here; block 0 then pulls the others' entries
  // (distributed shared memory) into the same positions of its own copy.
  __shared__ float logits_smem[kRouterFusedMaxTokens * kRow];
  __shared__ float choice_smem[kGrouped ? kRouterWarps * kRow : 1];
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int nblocks = static_cast<int>(cluster.num_blocks());
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // PDL (csrc/pdl.cuh): the bias values (block 0 routes) are read before the wait, as weights; the
  // router weight's loads are interleaved with the hidden loads after it.
  float bias_lane[kVPL];
  load_bias_lane(bias, E, lane, bias_lane);
  pdl_wait();
  pdl_launch_dependents();

  constexpr int kV = Vec16<T>::kElems;
  for (int e = rank * kRouterWarps + warp; e < E; e += nblocks * kRouterWarps) {
    float acc[kRouterFusedMaxTokens];
#pragma unroll
    for (int t = 0; t < kRouterFusedMaxTokens; ++t) acc[t] = 0.0f;
    const T* wrow = weight + static_cast<int64_t>(e) * H;
    if (vectorized) {
      const int nvec = H / kV;
      for (int c0 = lane; c0 < nvec; c0 += 32 * kRouterUnroll) {
        float wv[kRouterUnroll][kV];
#pragma unroll
        for (int u = 0; u < kRouterUnroll; ++u) {
          const int c = c0 + 32 * u;
          if (c < nvec) {
            load16_as_float(wrow + static_cast<int64_t>(c) * kV, wv[u]);
          } else {
#pragma unroll
            for (int i = 0; i < kV; ++i) wv[u][i] = 0.0f;
          }
        }
#pragma unroll
        for (int u = 0; u < kRouterUnroll; ++u) {
          const int c = c0 + 32 * u;
          if (c >= nvec) break;
#pragma unroll
          for (int t = 0; t < kRouterFusedMaxTokens; ++t) {
            if (t < num_tokens) {
              float hv[kV];
              load16_as_float(hidden + static_cast<int64_t>(t) * H + static_cast<int64_t>(c) * kV, hv);
#pragma unroll
              for (int i = 0; i < kV; ++i) acc[t] = fmaf(hv[i], wv[u][i], acc[t]);
            }
          }
        }
      }
    } else {
      for (int h = lane; h < H; h += 32) {
        const float wv = to_float(wrow[h]);
#pragma unroll
        for (int t = 0; t < kRouterFusedMaxTokens; ++t)
          if (t < num_tokens) acc[t] = fmaf(to_float(hidden[static_cast<int64_t>(t) * H + h]), wv, acc[t]);
      }
    }
#pragma unroll
    for (int t = 0; t < kRouterFusedMaxTokens; ++t) {
      if (t < num_tokens) {
        const float s = warp_sum(acc[t]);
        if (lane == 0) logits_smem[t * kRow + e] = s;
      }
    }
  }
  // Release/acquire at cluster scope: every block's logits are visible to block 0, and every block
  // has started (a precondition of distributed shared memory access).
  cluster.sync();
  if (rank == 0) {
    for (int i = threadIdx.x; i < num_tokens * kRow; i += blockDim.x) {
      const int e = i % kRow;
      const int owner = (e / kRouterWarps) % nblocks;  // inverse of the expert loop above
      if (e < E && owner != 0) logits_smem[i] = cluster.map_shared_rank(logits_smem, owner)[i];
    }
  }
  // Block 0 has finished reading the others' shared memory (they may exit now) and its copy
  // loop is complete (the cluster barrier is also a block barrier).
  cluster.sync();
  if (rank != 0) return;
  for (int t = warp; t < num_tokens; t += kRouterWarps) {
    gate_token<kVPL, kGrouped>(logits_smem + t * kRow, bias_lane, E, k, n_group, topk_group, renormalize, scale,
                               choice_smem + warp * kRow, weights_out + static_cast<int64_t>(t) * k,
                               ids_out + static_cast<int64_t>(t) * k, lane);
  }
#endif
}

// ---- fused router projection + gating on a grid (any arch; the default for decode) ----
//
// The cluster kernel above reads the 1 MB router weight with 8-16 SMs: its time is their bandwidth.
// Here the weight is spread over the whole GPU: block (slice, group) computes the partial dot
// products of 8 experts (one per warp) over one 1 KB column slice of their rows and of the tokens'
// hidden rows, and writes them to a [slices, T, E] fp32 workspace. Each lane issues both of its
// 16-byte weight loads before anything else, so every byte of the weight is in flight at once. The
// last block to arrive (an arrival counter, reset by that block's own atomicInc wrap so that graph
// replays start from zero) sums the slices in slice order (deterministic) and routes the tokens.

constexpr int kRouterGridWarps = 8;
constexpr int kRouterSliceBytes = 1024;  // per row and block: 64 16-byte vectors, 2 per lane
constexpr int kRouterArrivalSlots = 64;

// Arrival counters, zero at module load and left at zero by every completed launch. Launches that
// may run at once (other streams) must use different slots: the host hands them out round-robin.
__device__ unsigned int g_router_arrivals[kRouterArrivalSlots];

template <typename T>
__host__ __device__ constexpr int router_slice_elems() {
  return kRouterSliceBytes / static_cast<int>(sizeof(T));
}

// (Two blocks per SM in the bounds: ptxas then keeps the pre-wait weights and bias in registers, where
// with the default it capped this kernel at 64 and spilled them.)
template <int kVPL, bool kGrouped, typename T>
__global__ void __launch_bounds__(kRouterGridWarps * 32, 2)
    router_gating_grid_kernel(const T* __restrict__ hidden, const T* __restrict__ weight,
                              const float* __restrict__ bias, int num_tokens, int E, int H, int k, int n_group,
                              int topk_group, bool renormalize, float scale, bool vectorized,
                              float* __restrict__ partial,  // [gridDim.x, num_tokens, E]
                              int arrival_slot, bool rank_routing, float* __restrict__ weights_out,
                              int32_t* __restrict__ ids_out) {
  constexpr int kSliceElems = router_slice_elems<T>();
  constexpr int kV = Vec16<T>::kElems;
  constexpr int kVecPerLane = kSliceElems / kV / 32;
  constexpr int kElemsPerLane = kSliceElems / 32;
  static_assert(kVecPerLane * kV * 32 == kSliceElems, "slice: whole vectors per lane");
  constexpr int kRow = 32 * kVPL;
  constexpr int kStageBytes = kRouterFusedMaxTokens * kRouterSliceBytes;
  constexpr int kLogitsBytes = kRouterFusedMaxTokens * kRow * static_cast<int>(sizeof(float));
  // The tokens' hidden slice [T, kSliceElems] while the block computes its partial sums; in the last
  // block, once those are done, the summed logits [T, kRow].
  __shared__ __align__(16) unsigned char smem_raw[kStageBytes > kLogitsBytes ? kStageBytes : kLogitsBytes];
  __shared__ float choice_smem[kGrouped ? kRouterGridWarps * kRow : 1];
  // The last block routes by ranks (route_by_rank) without group limits while a token's experts fit
  // the block's threads; otherwise with gate_token, one warp per token.
  constexpr bool kRankRouting = !kGrouped && kRow <= kRouterGridWarps * 32;
  constexpr int kRankTokens = kRankRouting ? kRouterGridWarps * 32 / kRow : 1;
  __shared__ uint64_t rank_keys_smem[kRankRouting ? kRouterGridWarps * 32 : 1];
  __shared__ float rank_w_smem[kRankTokens * kGatingMaxTopk];
  __shared__ int32_t rank_id_smem[kRankTokens * kGatingMaxTopk];
  T* hidden_smem = reinterpret_cast<T*>(smem_raw);
  float* logits_smem = reinterpret_cast<float*>(smem_raw);

  DOTS1_ROUTER_STAMP(0);  // resident
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slice = blockIdx.x;
  const int e = blockIdx.y * kRouterGridWarps + warp;
  const int h0 = slice * kSliceElems;
  const int slice_len = max(0, min(kSliceElems, H - h0));
  const T* wrow = weight + static_cast<int64_t>(e < E ? e : 0) * H + h0;

  // This lane's share of its expert's slice, loaded raw (converted at use) before anything waits.
  Vec16<T> wvec[kVecPerLane];
  T wscalar[kElemsPerLane];
  if (vectorized) {
#pragma unroll
    for (int u = 0; u < kVecPerLane; ++u) {
      const int c = (lane + 32 * u) * kV;
      if (e < E && c < slice_len) {
        wvec[u] = *reinterpret_cast<const Vec16<T>*>(wrow + c);
      } else {
#pragma unroll
        for (int i = 0; i < kV; ++i) wvec[u].v[i] = from_float<T>(0.0f);
      }
    }
  } else {
#pragma unroll
    for (int u = 0; u < kElemsPerLane; ++u) {
      const int c = lane + 32 * u;
      wscalar[u] = (e < E && c < slice_len) ? wrow[c] : from_float<T>(0.0f);
    }
  }

  // The last block routes; which one that is shows only at the end, so every block reads its bias values
  // here (512 bytes for 128 experts), off the path that follows the last arrival.
  float bias_lane[kVPL];
  load_bias_lane(bias, E, lane, bias_lane);

  // PDL (csrc/pdl.cuh): the router weight and bias are never written in a step, so they are loaded
  // above, before the wait, while the previous kernel (the producer of hidden) may still be running;
  // hidden, the workspace and the arrival counter only after it.
  pdl_wait();
  pdl_launch_dependents();
  DOTS1_ROUTER_STAMP(1);  // wait returned

  // Stage the tokens' hidden slice (read by all 8 warps) in shared memory.
  if (vectorized) {
    const int vecs = slice_len / kV;
    for (int i = threadIdx.x; i < num_tokens * vecs; i += blockDim.x) {
      const int t = i / vecs, c = (i % vecs) * kV;
      *reinterpret_cast<Vec16<T>*>(hidden_smem + t * kSliceElems + c) =
          *reinterpret_cast<const Vec16<T>*>(hidden + static_cast<int64_t>(t) * H + h0 + c);
    }
  } else {
    for (int i = threadIdx.x; i < num_tokens * slice_len; i += blockDim.x) {
      const int t = i / slice_len, c = i % slice_len;
      hidden_smem[t * kSliceElems + c] = hidden[static_cast<int64_t>(t) * H + h0 + c];
    }
  }
  __syncthreads();
  DOTS1_ROUTER_STAMP(2);  // hidden staged

  float acc[kRouterFusedMaxTokens];
#pragma unroll
  for (int t = 0; t < kRouterFusedMaxTokens; ++t) acc[t] = 0.0f;
#pragma unroll
  for (int t = 0; t < kRouterFusedMaxTokens; ++t) {
    if (t < num_tokens) {
      const T* hrow = hidden_smem + t * kSliceElems;
      if (vectorized) {
#pragma unroll
        for (int u = 0; u < kVecPerLane; ++u) {
          const int c = (lane + 32 * u) * kV;
          if (c < slice_len) {  // staged entries past the slice are not written
            const Vec16<T> hv = *reinterpret_cast<const Vec16<T>*>(hrow + c);
#pragma unroll
            for (int i = 0; i < kV; ++i) acc[t] = fmaf(to_float(hv.v[i]), to_float(wvec[u].v[i]), acc[t]);
          }
        }
      } else {
#pragma unroll
        for (int u = 0; u < kElemsPerLane; ++u) {
          const int c = lane + 32 * u;
          if (c < slice_len) acc[t] = fmaf(to_float(hrow[c]), to_float(wscalar[u]), acc[t]);
        }
      }
    }
  }
  const int64_t slice_base = static_cast<int64_t>(slice) * num_tokens * E;
#pragma unroll
  for (int t = 0; t < kRouterFusedMaxTokens; ++t) {
    if (t < num_tokens) {
      const float s = warp_sum(acc[t]);
      if (lane == 0 && e < E) partial[slice_base + static_cast<int64_t>(t) * E + e] = s;
    }
  }

  // Release this block's partial sums, then arrive. atomicInc wraps the counter to 0 on the last
  // arrival (total - 1), so the slot is ready for the next launch without a memset.
  DOTS1_ROUTER_STAMP(3);  // partial sums stored (thread 0's; issued)
  __threadfence();
  __syncthreads();
  DOTS1_ROUTER_STAMP(4);  // every warp fenced
  int is_last = 0;
  if (threadIdx.x == 0) {
    const unsigned int total = gridDim.x * gridDim.y;
    is_last = atomicInc(&g_router_arrivals[arrival_slot], total - 1) == total - 1;
  }
  DOTS1_ROUTER_STAMP(5);  // arrived
  if (!__syncthreads_or(is_last)) return;  // uniform per block; no barrier follows for the others
  __threadfence();  // acquire: every other block's partial sums are visible below

  // Logits in slice order (the same order on every run: deterministic). The staging buffer is free:
  // every warp passed the barrier above after its last read of it. __ldcg: the partial sums were
  // written by other SMs; read them from L2, never from a line this SM's L1 might hold.
  const int slices = static_cast<int>(gridDim.x);
  for (int i = threadIdx.x; i < num_tokens * kRow; i += blockDim.x) {
    const int t = i / kRow, ee = i % kRow;
    if (ee < E) {
      const float* p = partial + static_cast<int64_t>(t) * E + ee;
      const int64_t stride = static_cast<int64_t>(num_tokens) * E;
      float s = 0.0f;
#pragma unroll 8
      for (int sl = 0; sl < slices; ++sl) s += __ldcg(p + sl * stride);
      logits_smem[i] = s;
    }
  }
  __syncthreads();
  DOTS1_ROUTER_STAMP(6);  // last block: logits summed
  bool routed = false;
  if constexpr (kRankRouting) {
    if (rank_routing) {  // uniform: a kernel argument
      route_by_rank<kVPL, kRouterGridWarps * 32>(logits_smem, bias_lane, num_tokens, E, k, renormalize, scale,
                                                 rank_keys_smem, rank_w_smem, rank_id_smem, weights_out, ids_out);
      routed = true;
    }
  }
  if (!routed) {
    for (int t = warp; t < num_tokens; t += kRouterGridWarps) {
      gate_token<kVPL, kGrouped>(logits_smem + t * kRow, bias_lane, E, k, n_group, topk_group, renormalize, scale,
                                 choice_smem + warp * kRow, weights_out + static_cast<int64_t>(t) * k,
                                 ids_out + static_cast<int64_t>(t) * k, lane);
    }
  }
  DOTS1_ROUTER_STAMP(7);  // last block: routed (token 0's outputs written)
}

template <typename F>
cudaError_t dispatch_vpl(int E, F&& f) {
  if (E <= 32) return f(std::integral_constant<int, 1>{});
  if (E <= 64) return f(std::integral_constant<int, 2>{});
  if (E <= 128) return f(std::integral_constant<int, 4>{});
  if (E <= 256) return f(std::integral_constant<int, 8>{});
  if (E <= 512) return f(std::integral_constant<int, 16>{});
  return cudaErrorInvalidValue;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Cluster size for `kernel` on `device` (the current device): 16 where the GPU takes non-portable
// clusters, else 8; 0 when no cluster launch is possible. Host-only queries, run once per (device,
// kernel instantiation) by the caller's PerDeviceOnce. The caller has checked that no earlier error
// was pending, so the cudaGetLastError() calls here clear only what a failed probe call just set.
template <typename Kernel>
int query_cluster_size(Kernel kernel, int device) {
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    (void)cudaGetLastError();  // the failed query's own error
    return 0;
  }
  if (major < 9) return 0;
  for (int size : {16, 8})
    if (max_active_clusters(kernel, size, kRouterWarps * 32, 0) > 0) return size;
  return 0;
}

}  // namespace

cudaError_t launch_topk_gating(const float* logits, const float* bias, int64_t num_tokens, int num_experts, int k,
                               int n_group, int topk_group, bool renormalize, float scale, float* topk_weights,
                               int32_t* topk_ids, cudaStream_t stream) {
  if (num_tokens <= 0) return cudaSuccess;
  if (num_experts < 1 || num_experts > kGatingMaxExperts || k < 1 || k > kGatingMaxTopk || k > num_experts ||
      n_group < 1 || num_experts % n_group != 0 || topk_group < 1 || topk_group > n_group)
    return cudaErrorInvalidValue;
  const bool grouped = topk_group < n_group;
  const dim3 grid(ceil_div(num_tokens, kWarpsPerBlock));
  const dim3 block(kWarpsPerBlock * 32);
  return dispatch_vpl(num_experts, [&](auto vpl) {
    constexpr int kVPL = decltype(vpl)::value;
    if (grouped)
      topk_gating_kernel<kVPL, true><<<grid, block, 0, stream>>>(logits, bias, num_tokens, num_experts, k, n_group,
                                                                 topk_group, renormalize, scale, topk_weights,
                                                                 topk_ids);
    else
      topk_gating_kernel<kVPL, false><<<grid, block, 0, stream>>>(logits, bias, num_tokens, num_experts, k, n_group,
                                                                  topk_group, renormalize, scale, topk_weights,
                                                                  topk_ids);
    return cudaGetLastError();
  });
}

namespace {

template <int kVPL, bool kGrouped, typename T>
cudaError_t launch_router_cluster(const T* hidden, const T* weight, const float* bias, int num_tokens, int E, int H,
                                  int k, int n_group, int topk_group, bool renormalize, float scale,
                                  float* weights_out, int32_t* ids_out, cudaStream_t stream, bool use_pdl) {
  auto kernel = router_gating_cluster_kernel<kVPL, kGrouped, T>;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  // An error still pending belongs to an earlier launch: report it here rather than let the probe
  // below clear it.
  err = cudaPeekAtLastError();
  if (err != cudaSuccess) return err;
  static PerDeviceOnce<int> cluster_sizes;  // one per template instantiation (kernel)
  const int cluster = cluster_sizes.get(device, [&] { return query_cluster_size(kernel, device); });
  if (cluster == 0) return cudaErrorNotSupported;
  const bool vectorized = (H % Vec16<T>::kElems) == 0 && aligned16(hidden) && aligned16(weight);
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(cluster);
  config.blockDim = dim3(kRouterWarps * 32);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute attrs[2];
  attrs[0].id = cudaLaunchAttributeClusterDimension;
  attrs[0].val.clusterDim.x = cluster;
  attrs[0].val.clusterDim.y = 1;
  attrs[0].val.clusterDim.z = 1;
  config.attrs = attrs;
  config.numAttrs = 1 + pdl_attribute(use_pdl, &attrs[1]);
  err = cudaLaunchKernelEx(&config, kernel, hidden, weight, bias, num_tokens, E, H, k, n_group, topk_group,
                           renormalize, scale, vectorized, weights_out, ids_out);
  const cudaError_t last = cudaGetLastError();  // this launch's error state, consumed (reported below)
  return err != cudaSuccess ? err : last;
}

template <int kVPL, bool kGrouped, typename T>
cudaError_t launch_router_grid(const T* hidden, const T* weight, const float* bias, int num_tokens, int E, int H, int k,
                               int n_group, int topk_group, bool renormalize, float scale, float* workspace,
                               float* weights_out, int32_t* ids_out, cudaStream_t stream, bool use_pdl,
                               bool rank_routing) {
  static std::atomic<unsigned int> next_slot{0};
  const int slot = static_cast<int>(next_slot.fetch_add(1, std::memory_order_relaxed) % kRouterArrivalSlots);
  const bool vectorized = (H % Vec16<T>::kElems) == 0 && aligned16(hidden) && aligned16(weight);
  const dim3 grid(router_grid_slices(H, static_cast<int>(sizeof(T))), ceil_div(E, kRouterGridWarps));
  return launch_pdl(router_gating_grid_kernel<kVPL, kGrouped, T>, grid, dim3(kRouterGridWarps * 32), 0, stream, use_pdl,
                    hidden, weight, bias, num_tokens, E, H, k, n_group, topk_group, renormalize, scale, vectorized,
                    workspace, slot, rank_routing, weights_out, ids_out);
}

// The decode routers' shared preconditions: cudaSuccess to launch, or the error to return (with
// num_tokens <= 0 answered by the callers first: nothing to launch).
cudaError_t router_decode_args(int64_t num_tokens, int num_experts, int hidden_size, int k, int n_group,
                               int topk_group) {
  if (num_tokens > kRouterFusedMaxTokens) return cudaErrorNotSupported;
  if (num_experts < 1 || num_experts > kGatingMaxExperts || k < 1 || k > kGatingMaxTopk || k > num_experts ||
      n_group < 1 || num_experts % n_group != 0 || topk_group < 1 || topk_group > n_group || hidden_size < 0)
    return cudaErrorInvalidValue;
  return cudaSuccess;
}

// The decode routers' compile-time dispatch: launch(vpl, grouped, (const T*)nullptr) with the experts
// per lane, whether group-limited routing runs, and the element type as constants.
template <typename Launch>
cudaError_t dispatch_router(DType dtype, int num_experts, bool grouped, Launch&& launch) {
  cudaError_t err = cudaErrorInvalidValue;
  DOTS1_DISPATCH_FLOAT_TYPES(dtype, scalar_t, {
    err = dispatch_vpl(num_experts, [&](auto vpl) {
      const scalar_t* tag = nullptr;
      return grouped ? launch(vpl, std::true_type{}, tag) : launch(vpl, std::false_type{}, tag);
    });
  });
  return err;
}

}  // namespace

cudaError_t launch_router_topk_gating_fused(const void* hidden, const void* router_weight, DType dtype,
                                            const float* bias, int64_t num_tokens, int num_experts,
                                            int hidden_size, int k, int n_group, int topk_group, bool renormalize,
                                            float scale, float* topk_weights, int32_t* topk_ids,
                                            cudaStream_t stream, bool use_pdl) {
  if (num_tokens <= 0) return cudaSuccess;
  if (const cudaError_t bad = router_decode_args(num_tokens, num_experts, hidden_size, k, n_group, topk_group))
    return bad;
  return dispatch_router(dtype, num_experts, topk_group < n_group, [&](auto vpl, auto grouped, auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    return launch_router_cluster<decltype(vpl)::value, decltype(grouped)::value, T>(
        static_cast<const T*>(hidden), static_cast<const T*>(router_weight), bias, static_cast<int>(num_tokens),
        num_experts, hidden_size, k, n_group, topk_group, renormalize, scale, topk_weights, topk_ids, stream, use_pdl);
  });
}

}  // namespace dots1

namespace dots1 {

int router_grid_slices(int hidden_size, int elem_bytes) {
  const int slice_elems = kRouterSliceBytes / elem_bytes;
  return hidden_size <= 0 ? 1 : static_cast<int>((static_cast<int64_t>(hidden_size) + slice_elems - 1) / slice_elems);
}

int64_t router_grid_workspace_floats(int64_t num_tokens, int num_experts, int hidden_size, DType dtype) {
  return static_cast<int64_t>(router_grid_slices(hidden_size, dtype == DType::kFloat32 ? 4 : 2)) * num_tokens *
         num_experts;
}

cudaError_t launch_router_topk_gating_grid(const void* hidden, const void* router_weight, DType dtype,
                                           const float* bias, int64_t num_tokens, int num_experts, int hidden_size,
                                           int k, int n_group, int topk_group, bool renormalize, float scale,
                                           float* workspace, float* topk_weights, int32_t* topk_ids,
                                           cudaStream_t stream, bool use_pdl, bool rank_routing) {
  if (num_tokens <= 0) return cudaSuccess;
  if (const cudaError_t bad = router_decode_args(num_tokens, num_experts, hidden_size, k, n_group, topk_group))
    return bad;
  return dispatch_router(dtype, num_experts, topk_group < n_group, [&](auto vpl, auto grouped, auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    return launch_router_grid<decltype(vpl)::value, decltype(grouped)::value, T>(
        static_cast<const T*>(hidden), static_cast<const T*>(router_weight), bias, static_cast<int>(num_tokens),
        num_experts, hidden_size, k, n_group, topk_group, renormalize, scale, workspace, topk_weights, topk_ids,
        stream, use_pdl, rank_routing);
  });
}

#ifdef DOTS1_EXT_PHASE_STAMPS
// The probe's reader (bench/probes/moe_phase_stamps.py, through ctypes): the grid router's stamps of its
// last launch, [512][8] uint64 ns (copy_phase_stamps).
extern "C" __attribute__((visibility("default"))) int dots1_router_stamps_copy(void* dst, int clear) {
  return copy_phase_stamps(g_router_stamps, dst, clear);
}
#endif

}  // namespace dots1
