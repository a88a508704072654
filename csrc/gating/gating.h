// Top-k gating (DeepSeek-V3 / Dots1 sigmoid routing): launchers on raw pointers and the selection
// key shared by the CPU and CUDA kernels.
//
// Tie rule (every backend): experts are ranked by the biased score s + bias, then by LOWER expert
// id; groups by their top-2 sum, then by lower group id. This is what a stable descending sort
// gives (dots1_ext.reference), so ids agree with the reference even on exact ties.
//
// NaN rule (every backend): torch.topk's policy, NaN ranks above every number (+inf included), of
// either sign; several NaN tie, broken by the lower id as any tie (torch.topk itself leaves the order
// of several NaN unspecified; torch.sort(descending=True, stable=True), the reference, gives this).
// A group holding a NaN biased score has a NaN group score (the reference's top-2 sum), which ranks
// first among groups the same way. Its weight is NaN, so a NaN logit poisons its token's weights.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(DOTS1_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>

#include "dtype.h"
#endif

#if defined(__CUDACC__)
#define DOTS1_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DOTS1_HOST_DEVICE inline
#endif

namespace dots1 {

constexpr int kGatingMaxExperts = 512;
constexpr int kGatingMaxTopk = 16;
// router_topk_gating computes the projection inside the gating launch up to this many tokens
// (decode); above it, logits come from one GEMM and topk_gating runs on them. Fixed by the fused
// kernels' per-lane accumulators (acc[16]) and their [16 x 512] fp32 logits tile in shared memory
// (with the grouped routing's [8 x 512] scratch: the 48 KB of static shared memory, exactly).
// dots1_ext/ops/gating.py ROUTER_FUSED_MAX_TOKENS mirrors it (the one Python definition).
constexpr int kRouterFusedMaxTokens = 16;

// A totally ordered 64-bit key: the float's order in the high word (IEEE bits flipped so that
// unsigned order == numeric order, -0 folded onto +0, every NaN folded onto the top value 0xFFFFFFFF,
// above +inf), the complement of the index in the low word so that on equal scores the lower index is
// the larger key. max() over keys is therefore "best score, NaN first, lowest index on ties", and 0
// is below every real key (used for "taken"/"masked").
DOTS1_HOST_DEVICE uint64_t gating_key(float score, uint32_t index) {
  if (score == 0.0f) score = 0.0f;  // -0 == +0 must tie, broken by index
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(score);
#else
  std::memcpy(&bits, &score, sizeof(bits));
#endif
  bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  if (score != score) bits = 0xFFFFFFFFu;  // NaN (any sign or payload) ranks highest
  return (static_cast<uint64_t>(bits) << 32) | static_cast<uint64_t>(0xFFFFFFFFu - index);
}

DOTS1_HOST_DEVICE uint32_t gating_key_index(uint64_t key) {
  return 0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFu);
}

#if defined(DOTS1_WITH_CUDA) || defined(__CUDACC__)

// One warp per token. Requires 1 <= E <= 512, 1 <= k <= min(E, 16), E % n_group == 0,
// 1 <= topk_group <= n_group, k <= topk_group * (E / n_group) (checked by the caller).
cudaError_t launch_topk_gating(const float* logits,  // [T, E] fp32, contiguous
                               const float* bias,    // [E] fp32
                               int64_t num_tokens, int num_experts, int k, int n_group, int topk_group,
                               bool renormalize, float scale,
                               float* topk_weights,  // [T, k] fp32
                               int32_t* topk_ids,    // [T, k] int32
                               cudaStream_t stream);

// Router projection + gating in ONE launch on a plain grid (any arch), for num_tokens <=
// kRouterFusedMaxTokens: block (slice, group) writes the partial logits of 8 experts over one 1 KB
// column slice to `workspace`; the last block to arrive sums them in slice order and routes. The
// arrival counter is a device global reset by the kernel itself (graph replays stay correct).
// workspace: router_grid_workspace_floats(...) fp32, any contents (every entry read is written
// first), not shared with a concurrent launch. cudaErrorNotSupported for too many tokens.
// use_pdl (both fused launchers): programmatic dependent launch on sm_90+ (csrc/pdl.cuh); the grid
// kernel loads its router weight slice before waiting for the previous kernel, so router_weight must
// not be written by the kernel right before the launch (gating.cpp passes false when it copied it).
// rank_routing: without a group limit (topk_group == n_group) and with at most 256 experts, the last
// block routes by ranks with all its threads (route_by_rank) instead of one warp per token
// (gate_token); the same outputs, bit for bit (gating.cpp: DOTS1_EXT_ROUTER_RANK=0 for the latter).
int router_grid_slices(int hidden_size, int elem_bytes);
int64_t router_grid_workspace_floats(int64_t num_tokens, int num_experts, int hidden_size, DType dtype);
cudaError_t launch_router_topk_gating_grid(const void* hidden,         // [T, H] dtype, contiguous
                                           const void* router_weight,  // [E, H] dtype, contiguous
                                           DType dtype,
                                           const float* bias,  // [E] fp32
                                           int64_t num_tokens, int num_experts, int hidden_size, int k,
                                           int n_group, int topk_group, bool renormalize, float scale,
                                           float* workspace,     // [router_grid_workspace_floats] fp32
                                           float* topk_weights,  // [T, k] fp32
                                           int32_t* topk_ids,    // [T, k] int32
                                           cudaStream_t stream, bool use_pdl, bool rank_routing = true);

// Router projection (fp32 accumulate) + gating in ONE launch (the former decode default, now
// DOTS1_EXT_ROUTER_KERNEL=cluster), for num_tokens <= kRouterFusedMaxTokens.
// Uses a thread-block cluster (sm_90+): the cluster's blocks split the experts' weight rows and
// write their logits into block 0's shared memory, which then runs the gating. Returns
// cudaErrorNotSupported (and launches nothing) where that is not possible (pre-Hopper GPU, too many
// tokens); the caller then computes the logits with a GEMM and calls launch_topk_gating.
cudaError_t launch_router_topk_gating_fused(const void* hidden,         // [T, H] dtype, contiguous
                                            const void* router_weight,  // [E, H] dtype, contiguous
                                            DType dtype,
                                            const float* bias,  // [E] fp32
                                            int64_t num_tokens, int num_experts, int hidden_size, int k,
                                            int n_group, int topk_group, bool renormalize, float scale,
                                            float* topk_weights,  // [T, k] fp32
                                            int32_t* topk_ids,    // [T, k] int32
                                            cudaStream_t stream, bool use_pdl);

#endif

}  // namespace dots1
