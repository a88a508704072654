// Launchers of the norm family (csrc/norm/norm_kernels.cu): RMSNorm, fused add + RMSNorm, and
// per-head QK-RMSNorm + neox RoPE (optionally writing the KV cache). Raw pointers only: the Tensor
// checks, layout decisions and dtype mapping live in norm.cpp.
//
// Numerics (all ops, matching dots1_ext/reference.py): the sum of squares and the scale are fp32;
// normalised values are rounded to the activation dtype, multiplied by the weight in fp32 and rounded
// again; RoPE rotates those rounded values in fp32 and rounds once more.
//
// Every launcher returns the launch's cudaError_t and launches nothing when there is no work.
#pragma once

#include <cstdint>

#include "dtype.h"

namespace dots1 {

// Strides (in elements) of a [T, heads, D] activation whose last dim is contiguous.
struct HeadStrides {
  int64_t token;
  int64_t head;
};

}  // namespace dots1

// CPU-only builds have no CUDA headers: only the Tensor code's shared types above.
#if defined(DOTS1_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime.h>

namespace dots1 {

// use_pdl (every launcher): programmatic dependent launch on sm_90+ (csrc/pdl.cuh). The kernels read
// their norm weights before waiting for the previous kernel of the stream, so a weight must not be
// written by the kernel right before the launch (norm.cpp passes false when it converted the weight).

// out[r, :] = rms_norm(x[r, :]) * weight. Rows are `rows` apart by the given strides (in elements);
// the last dim is contiguous. weight_dtype is either dtype or kFloat32.
cudaError_t launch_rms_norm(const void* x,       // [rows, H], row stride x_row_stride
                            const void* weight,  // [H]
                            void* out,           // [rows, H], row stride out_row_stride
                            int64_t rows, int64_t hidden, int64_t x_row_stride, int64_t out_row_stride,
                            float eps, DType dtype, DType weight_dtype, cudaStream_t stream, bool use_pdl);

// In place: residual[r] = round(residual[r] + x[r]); x[r] = rms_norm(residual[r]) * weight.
cudaError_t launch_add_rms_norm(void* x,             // [rows, H], row stride x_row_stride
                                void* residual,      // [rows, H], row stride residual_row_stride
                                const void* weight,  // [H]
                                int64_t rows, int64_t hidden, int64_t x_row_stride, int64_t residual_row_stride,
                                float eps, DType dtype, DType weight_dtype, cudaStream_t stream, bool use_pdl);

// In place on q and k: per-head RMSNorm over D (weights q_weight / k_weight), then neox RoPE at
// positions[t] from cos_sin_cache.
//
// KV cache (k_cache != nullptr): the rotated k and the v rows of token t are also written to row
// cache_rows[t] of k_cache / v_cache viewed as [num_cache_rows, Hk, D] (contiguous).
//
// Poison policy (no index is ever dereferenced out of bounds; a bad one cannot go unnoticed): a token
// whose position is outside [0, num_positions) gets NaN in all of its q and k heads (its cache row,
// if valid, receives that NaN k and its v); a token whose cache row is outside [0, num_cache_rows)
// writes no cache row and gets NaN in all of its q heads. num_positions == 0 poisons every token.
cudaError_t launch_qk_norm_rope(void* q,                     // [T, Hq, D], strides q_strides
                                void* k,                     // [T, Hk, D], strides k_strides
                                const void* q_weight,        // [D], weight_dtype
                                const void* k_weight,        // [D], weight_dtype
                                const int64_t* positions,    // [T]
                                const float* cos_sin_cache,  // [num_positions, D] contiguous: cos | sin
                                int64_t num_tokens, int64_t num_q_heads, int64_t num_k_heads, int64_t head_dim,
                                int64_t num_positions, HeadStrides q_strides, HeadStrides k_strides, float eps,
                                // KV cache variant (selected by cache_rows != nullptr; an empty cache
                                // has null k_cache / v_cache); all nullptr / 0 for the plain op.
                                const void* v,               // [T, Hk, D], strides v_strides
                                HeadStrides v_strides,
                                void* k_cache,               // [num_cache_rows, Hk, D] contiguous
                                void* v_cache,               // [num_cache_rows, Hk, D] contiguous
                                const int64_t* cache_rows,   // [T]
                                int64_t num_cache_rows, DType dtype, DType weight_dtype, cudaStream_t stream,
                                bool use_pdl);

}  // namespace dots1

#endif  // DOTS1_WITH_CUDA || __CUDACC__
