// Launcher of the decode attention family (csrc/attention/attention_kernels.cu): one query per sequence
// over a static KV cache, split-KV (flash-decoding) with the splits of one (sequence, kv head) combined
// inside a thread-block cluster. Raw pointers only: the Tensor checks, layout decisions and dtype mapping
// live in attention.cpp.
//
// Semantics (matching dots1_ext/reference.py decode_attention): sequence b attends to cache slots
// [lo, kv_end[b]) with lo = kv_start[b], or max(kv_start[b], kv_end[b] - window) when window > 0; query
// head h reads kv head h / (Hq / Hk). Scores q.k * scale, exact softmax with a running max, all in fp32;
// the output is rounded once to the dtype. An empty range gives exactly 0; bad bounds (kv_start < 0,
// kv_end > S, kv_start > kv_end) give NaN in every output element of that sequence, and nothing outside
// the cache is read.
//
// Every launcher returns the launch's cudaError_t and launches nothing when there is no work.
#pragma once

#include <cstdint>

#include "dtype.h"

namespace dots1 {

// The largest head_dim the kernels take (it must also be even: 4-byte loads of the fallback path).
constexpr int kAttentionMaxHeadDim = 256;
// The most KV splits of one (sequence, kv head): a thread-block cluster of 16, the non-portable size
// Hopper takes (GPUs that do not take 16 get at most 8, the portable size).
constexpr int kAttentionMaxSplits = 16;
// The K/V pipeline depths (stages of 32 KB per CTA) a launch may force; DOTS1_EXT_ATTENTION_STAGES.
constexpr int kAttentionShallowStages = 3;
constexpr int kAttentionDeepStages = 6;

}  // namespace dots1

// CPU-only builds have no CUDA headers.
#if defined(DOTS1_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime.h>

namespace dots1 {

// out[b, h, :] = softmax_j(q[b, h] . k_cache[b, j, h / G] * scale) @ v_cache[b, j, h / G], j in the
// sequence's range (G = Hq / Hk).
//
// num_splits: 0 chooses the split count from batch * Hk, the SM count and cache_len (never from the
// device lengths, so one CUDA graph serves every length); a positive value forces the largest power of
// two not above it that the GPU's clusters take (at most kAttentionMaxSplits; GPUs without clusters
// always run 1 split). *splits_used, when not null, receives the split count launched.
// use_pdl: on sm_90+ the kernel is launched with programmatic stream serialization (csrc/pdl.cuh): its
// CTAs may be scheduled while the previous kernel of the stream drains and wait for that kernel's
// completion and memory before their first global read (it has no weights to read earlier); it lets
// the next kernel launch right after that wait. DOTS1_EXT_PDL=0 (read by attention.cpp) turns it off.
// pipeline_stages: the K/V pipeline's depth (attention_kernels.cu header): 0 chooses (with a workspace
// shallow; in the cluster mode deep where the grid fits the GPU at one CTA per SM, so batch 1, else
// shallow); kAttentionShallowStages or
// kAttentionDeepStages forces one (deep only where the device's shared memory holds it). Same bits.
// kv_settled: the caller's promise that kv_start, kv_end (and the fused op's positions and cache_rows)
// and every cache row but slot kv_end[b] - 1 of each sequence were written before the kernel launched
// right before this one (in a decode step: the bounds by decode_step_inputs at its start, the rows by
// earlier steps; slot kv_end - 1 by qk_norm_rope_kv_cache_ or, fused, by this kernel). With PDL the
// kernel then reads the bounds and issues its first tiles' copies (without that slot) before its wait
// (csrc/pdl.cuh rule 1's exception). Same bits either way; a broken promise reads stale rows.
cudaError_t launch_decode_attention(const void* q,             // [B, Hq, D], strides q_batch_stride, q_head_stride
                                    int64_t q_batch_stride, int64_t q_head_stride,
                                    const void* k_cache,       // [B, S, Hk, D] contiguous
                                    const void* v_cache,       // [B, S, Hk, D] contiguous
                                    const int64_t* kv_start,   // [B], element stride kv_start_stride
                                    int64_t kv_start_stride,
                                    const int64_t* kv_end,     // [B], element stride kv_end_stride
                                    int64_t kv_end_stride,
                                    void* out,                 // [B, Hq, D] contiguous
                                    int64_t batch, int64_t cache_len, int64_t num_q_heads, int64_t num_kv_heads,
                                    int64_t head_dim, int64_t window, float scale, int num_splits, DType dtype,
                                    cudaStream_t stream, int* splits_used = nullptr, bool use_pdl = true,
                                    int pipeline_stages = 0, float* workspace = nullptr, bool kv_settled = false,
                                    bool last_split_combines = true);

// workspace (both launchers; attention.cpp passes one unless DOTS1_EXT_ATTENTION_COMBINE=cluster): nullptr
// combines the splits in thread-block clusters; else the splits are independent CTAs that leave their
// partials in it (at least
// decode_attention_workspace_floats(batch, num_q_heads, head_dim) fp32, 16-byte aligned, any contents)
// and, with last_split_combines, the last split of each (sequence, kv head, head chunk) to arrive on a
// device counter combines them (launches of more than 4096 such units, and last_split_combines false,
// use a second kernel); the same bits as the cluster mode for the same split count either way. The
// counters are per device, in 64 slots handed out round-robin per launch (a captured launch keeps its
// slot): two launches running at once on different streams must not share a slot, which the round
// robin guarantees for any two of 64 consecutive launches.
int64_t decode_attention_workspace_floats(int64_t batch, int64_t num_q_heads, int64_t head_dim);

// The fused op's inputs besides the plain op's (qk_norm_rope_decode_attention, attention.cpp): this
// step's raw k and v and what qk_norm_rope_kv_cache_ (norm.h) takes. Strides in elements.
struct DecodeQkNormRopeArgs {
  const void* k;  // [B, Hk, D], q's dtype
  int64_t k_batch_stride, k_head_stride;
  const void* v;  // [B, Hk, D], q's dtype
  int64_t v_batch_stride, v_head_stride;
  const void* q_weight;  // [D] contiguous, q's dtype (read before the PDL wait: never written in a step)
  const void* k_weight;  // [D] contiguous, q's dtype
  const int64_t* positions;  // [B]
  int64_t positions_stride;
  const float* cos_sin_cache;  // [num_positions, D] contiguous: cos | sin
  int64_t num_positions;
  const int64_t* cache_rows;  // [B], flat rows of k_cache.view(-1, Hk, D)
  int64_t cache_rows_stride;
  float eps;
};

// Whether launch_qk_norm_rope_decode_attention takes these shapes and pointers: Hq / Hk <= 8 (one CTA
// per kv head and split), head_dim 64, 128 or 256, every pointer 16-byte aligned and every stride a
// whole number of 16-byte vectors. Otherwise attention.cpp runs the two ops.
bool can_fuse_qk_norm_rope(const void* q, int64_t q_batch_stride, int64_t q_head_stride, const void* k_cache,
                           const void* v_cache, const DecodeQkNormRopeArgs& args, int64_t num_q_heads,
                           int64_t num_kv_heads, int64_t head_dim, DType dtype);

// One launch: qk_norm_rope_kv_cache_ (norm.h: per-head RMSNorm + neox RoPE of q and k, k and v written
// at cache_rows) then launch_decode_attention, same bits. q (raw) and k are not written; the caches
// are. Contract: sequence b's cache row is slot kv_end[b] - 1 of its own sequence
// (b * cache_len + kv_end[b] - 1); any other row, in range or not, is a bad cache row (nothing written,
// NaN output). cudaErrorInvalidValue where can_fuse_qk_norm_rope is false.
cudaError_t launch_qk_norm_rope_decode_attention(const void* q,  // [B, Hq, D] raw, strides as launch_decode_attention
                                                 int64_t q_batch_stride, int64_t q_head_stride,
                                                 void* k_cache,  // [B, S, Hk, D] contiguous
                                                 void* v_cache, const int64_t* kv_start, int64_t kv_start_stride,
                                                 const int64_t* kv_end, int64_t kv_end_stride,
                                                 void* out,  // [B, Hq, D] contiguous
                                                 int64_t batch, int64_t cache_len, int64_t num_q_heads,
                                                 int64_t num_kv_heads, int64_t head_dim, int64_t window, float scale,
                                                 const DecodeQkNormRopeArgs& args, int num_splits, DType dtype,
                                                 cudaStream_t stream, int* splits_used = nullptr,
                                                 bool use_pdl = true, int pipeline_stages = 0,
                                                 float* workspace = nullptr, bool kv_settled = false,
                                                 bool last_split_combines = true);

}  // namespace dots1

#endif  // DOTS1_WITH_CUDA || __CUDACC__
