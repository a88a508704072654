// Token dispatch (permute / unpermute): launchers on raw pointers. Tensor code: dispatch.cpp.
//
// Out-of-range data never leads to an out-of-bounds access on the GPU:
//  - permute: an id outside [0, E) sends its (token, slot) to NO expert: its row_map entry points
//    past expert_offsets[E] (those rows are zero; they are ranked after every valid row, in
//    (token, slot) order).
//  - unpermute: a row_map entry outside [0, S) contributes zero.
// (The CPU kernels raise IndexError instead.)
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "dtype.h"

namespace dots1 {

// Experts the single-block index kernel can rank (its shared memory holds 32 x (E+1) counters).
constexpr int kPermuteMaxExperts = 1024;

// Two launches: a single-block kernel that counts ids per expert (per warp slice of the flat ids),
// scans them into expert_offsets and ranks every (token, slot) stably -> row_map; then a
// token-parallel kernel that copies each hidden row to its k destinations with 16-byte stores and
// zeroes the padding / unused rows. Requires 0 <= T*k and S < 2^31 (checked by the caller).
cudaError_t launch_permute(const void* hidden,      // [T, H] contiguous
                           const int32_t* topk_ids,  // [T, k] int32 contiguous
                           int64_t num_tokens, int k, int64_t hidden_size, int element_size, int num_experts,
                           int pad_to,
                           int64_t permuted_rows,      // S = T*k (+ E*(pad_to-1) when pad_to > 1)
                           void* permuted,             // [S, H]
                           int32_t* expert_offsets,    // [E+1]
                           int32_t* row_map,           // [T*k]
                           int32_t* expert_counts_ws,  // [E+1] workspace
                           cudaStream_t stream);

// out[t] = sum_j w[t, j] * expert_out[row_map[t*k + j]] (+ shared_out[t]) (+ residual[t]), fp32,
// j in order, each product and sum rounded separately (no FMA contraction): bitwise reproducible.
cudaError_t launch_unpermute(const void* expert_out,     // [S, H] contiguous
                             const int32_t* row_map,     // [T*k]
                             const float* topk_weights,  // [T, k] fp32
                             const void* shared_out,     // [T, H] or nullptr
                             const void* residual,       // [T, H] or nullptr
                             DType dtype, int64_t num_tokens, int k, int64_t hidden_size, int64_t expert_rows,
                             void* out,  // [T, H]
                             cudaStream_t stream);

}  // namespace dots1
