// Token dispatch (permute / unpermute): the limits shared by the Tensor code (dispatch.cpp, every
// build) and the launchers on raw pointers (dispatch_kernels.cu, CUDA builds).
//
// Poison policy (every backend: the CPU and CUDA kernels and dots1_ext.reference): out-of-range data
// never leads to an out-of-bounds access, and cannot go unnoticed:
//  - permute: an id outside [0, E) sends its (token, slot) to NO expert and takes no row: its
//    row_map entry is -1 (the rows [expert_offsets[E], S) are zero).
//  - unpermute: a row_map entry outside [0, S) (such as that -1) makes the token's whole output row
//    NaN, so a bad expert id poisons exactly the tokens it belongs to.
#pragma once

#include <algorithm>
#include <cstdint>

namespace dots1 {

// Experts permute supports: the single-block CUDA index kernel keeps 32 x (E+1) int32 counters in
// shared memory (132 KiB at 1024, under the 227 KiB opt-in of sm_90). The one definition of this
// limit in C++ (dots1_ext/ops/dispatch.py MAX_EXPERTS mirrors it for the fake kernels).
constexpr int kPermuteMaxExperts = 1024;

// The CUDA index (expert_offsets, row_map) is one block for small N = T*k and many blocks past a
// threshold (launch_permute). Blocks take at least kPermuteMinIdsPerBlock ids each and number at most
// kPermuteMaxIndexBlocks (a per-bin scan runs over them serially).
constexpr int64_t kPermuteMinIdsPerBlock = 1024;
constexpr int kPermuteMaxIndexBlocks = 256;

// The multi-block index's block count for N ids (>= 2), and the ids each block takes.
inline int permute_index_blocks(int64_t N) {
  const int64_t per_block = std::max<int64_t>(kPermuteMinIdsPerBlock, (N + kPermuteMaxIndexBlocks - 1) / kPermuteMaxIndexBlocks);
  return static_cast<int>(std::max<int64_t>(2, (N + per_block - 1) / per_block));
}
inline int64_t permute_ids_per_block(int64_t N, int blocks) { return (N + blocks - 1) / blocks; }

// Workspace launch_permute needs (int32 entries): counts per bin, plus per block and bin with blocks.
inline int64_t permute_workspace_ints(int num_experts, int index_blocks) {
  return static_cast<int64_t>(num_experts + 1) * (1 + (index_blocks > 1 ? index_blocks : 0));
}

}  // namespace dots1

// CPU-only builds have no CUDA headers: only the limits above.
#if defined(DOTS1_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>

#include "dtype.h"

namespace dots1 {

// The index, then a token-parallel kernel that copies each hidden row to its k destinations with
// 16-byte stores and zeroes the padding / unused rows. The index counts ids per expert (per warp slice
// of the flat ids), scans them into expert_offsets and ranks every (token, slot) stably -> row_map:
// with index_blocks <= 1 in one single-block launch, otherwise in three launches over index_blocks
// blocks (permute_index_blocks; the same row_map). Requires 0 <= T*k and S < 2^31 (checked by the
// caller).
cudaError_t launch_permute(const void* hidden,      // [T, H] contiguous
                           const int32_t* topk_ids,  // [T, k] int32 contiguous
                           int64_t num_tokens, int k, int64_t hidden_size, int element_size, int num_experts,
                           int pad_to,
                           int64_t permuted_rows,      // S = T*k (+ E*(pad_to-1) when pad_to > 1)
                           int index_blocks,           // 0 or 1: the single block; else permute_index_blocks(T*k)
                           void* permuted,             // [S, H]
                           int32_t* expert_offsets,    // [E+1]
                           int32_t* row_map,           // [T*k]
                           int32_t* expert_counts_ws,  // [permute_workspace_ints(E, index_blocks)] workspace
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

#endif  // DOTS1_WITH_CUDA || __CUDACC__
