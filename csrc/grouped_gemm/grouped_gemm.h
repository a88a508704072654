// Launchers of the grouped expert GEMM (raw pointers, no torch types: the .cu files stay light).
//
// Shape letters: S permuted rows, E experts, N output features of the weight, K input features,
// N_out = N ("none") or N/2 (the SwiGLU epilogues). Every matrix is row-major with its last dimension
// contiguous.
//
// SwiGLU weight layouts (N = 2I rows per expert):
//   HF          - rows [0, I) gate, [I, 2I) up; output feature f = silu(row f) * row (I + f).
//   interleaved - 16-row blocks [8 gate | 8 up]: output feature f uses gate row 16*(f/8) + f%8 and up
//                 row 16*(f/8) + 8 + f%8 (N % 16 == 0). Made once at load (dots1_ext.ops.
//                 interleave_gate_up) so the sm90 epilogue finds gate and up in one thread's registers.
// expert_offsets [E+1] int32 lives on the device: expert e owns rows [off[e], off[e+1]). Kernels
// clamp every offset into [0, S] and never touch memory outside the tensors whatever the offsets
// hold; results are specified only for non-decreasing offsets (the permute contract), where the
// rows outside every expert's range are [0, off[0]) and [off[E], S).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "dtype.h"

namespace dots1 {

// ---- grouped_gemm_decode.cu: portable kernels (any sm >= 80, fp32/fp16/bf16) ----

// Weight-streaming grouped GEMM for few rows per expert (decode). Each block takes one
// (expert, chunk of up to kDecodeRowsPerPass rows) pair and a slice of weight rows, so only experts
// with rows are read and, for <= kDecodeRowsPerPass rows per expert, each weight byte once. Correct
// (if slow) for any S; the CUDA fallback when nothing faster applies. Writes every row of out: rows
// outside every expert's range are zeroed by the same launch.
constexpr int kDecodeRowsPerPass = 8;
enum class SwiGLULayout : int { kNone = 0, kHF = 1, kInterleaved = 2 };  // kNone: no SwiGLU epilogue
cudaError_t launch_grouped_gemm_decode(const void* x,                // [S, K]
                                       const void* weight,           // [E, N, K]
                                       const int32_t* expert_offsets,  // [E+1] device
                                       void* out,                    // [S, N_out]
                                       int64_t S, int64_t E, int64_t N, int64_t K, SwiGLULayout swiglu,
                                       DType dtype, cudaStream_t stream);

// out[r, :] = 0 for the rows outside every expert's range: [0, off[0]) and [off[E], S).
cudaError_t launch_zero_uncovered_rows(void* out,                    // [S, N_out]
                                       const int32_t* expert_offsets,  // [E+1] device
                                       int64_t S, int64_t E, int64_t N_out, DType dtype, cudaStream_t stream);

// out[r, f] = silu(gate) * up of feature f of gate_up's row r (columns in `layout`, kHF or
// kInterleaved), in fp32, rounded once (16-byte vectors).
cudaError_t launch_silu_mul(const void* gate_up,  // [S, N]
                            void* out,            // [S, N/2]
                            int64_t S, int64_t N, SwiGLULayout layout, DType dtype, cudaStream_t stream);

// ---- grouped_gemm_sm90*.cu: CUTLASS 3 ptr-array grouped GEMM (sm90a, fp16/bf16) ----

// Kernel configurations (instantiated in their own .cu files; see grouped_gemm_sm90.cuh).
enum class Sm90GemmConfig : int {
  kCooperative128x256 = 0,  // many rows per expert (prefill): 2 consumer warpgroups on one 128-row tile
  kPingpong64x256 = 1,      // fewer rows per expert: 64-row tiles waste less on partial tiles
};

enum class Sm90Epilogue : int {
  kNone = 0,               // out [S, N] = the product (TMA store)
  kSwiGLUInterleaved = 1,  // out [S, N/2] = silu(gate) * up, weights in the interleaved layout, N % 16 == 0
};

// Whether this build carries the sm90a kernels (compiled with an sm_90a target).
bool sm90_grouped_gemm_compiled();

// Device bytes the sm90 grouped GEMM needs for its argument arrays and CUTLASS workspace; the caller
// allocates them (torch's caching allocator: CUDA-graph safe) and passes them to
// launch_grouped_gemm_sm90. Depends only on E, the config and the SM count, not on data.
size_t grouped_gemm_sm90_workspace_bytes(int64_t E, Sm90GemmConfig config, Sm90Epilogue epilogue, DType dtype,
                                         int sm_count);

// out = per-expert x[rows_e] @ weight[e]^T, or its SwiGLU (see Sm90Epilogue). A tiny kernel turns expert_offsets into
// CUTLASS's per-group problem shapes, pointers and strides on the device (no host synchronisation),
// so the pair of launches captures in a CUDA graph. Rows outside every range are left untouched.
cudaError_t launch_grouped_gemm_sm90(const void* x,                  // [S, K]
                                     const void* weight,             // [E, N, K]
                                     const int32_t* expert_offsets,  // [E+1] device
                                     void* out,                      // [S, N_out]
                                     int64_t S, int64_t E, int64_t N, int64_t K, Sm90GemmConfig config,
                                     Sm90Epilogue epilogue, DType dtype, void* workspace, size_t workspace_bytes,
                                     int sm_count, cudaStream_t stream);


// ---- grouped_gemm_int4_sm90*.cu: W4A16 mixed-input grouped GEMM (sm90a, bf16 activations) ----

// The int4 format's group along K (docs/design.md §7; dots1_ext.quant.GROUP_SIZE).
constexpr int kInt4GroupK = 128;

// Whether this build carries the sm90a int4 kernels (compiled with an sm_90a target).
bool sm90_grouped_gemm_int4_compiled();

// The int4 kernels' cooperative tiles, (weight rows) x (rows of x) x 64 k: the consumer warpgroups
// convert each k block of their weight rows once for the tile's rows of x, so 256 rows of x convert
// half as often per MMA as 128, while 64 or 32 waste fewer MMAs on padding when experts get few rows
// (DOTS1_EXT_GEMM_INT4_TILE, read by grouped_gemm.cpp, which also picks the default by rows per expert).
enum class Int4Sm90Tile { k128x32, k128x64, k128x128, k128x192, k128x256 };

// Device bytes the int4 grouped GEMM needs (argument arrays, the fp32 scales and zero terms
// [E, K/128, N] it derives per call, CUTLASS's workspace), for a 256-byte aligned buffer the caller
// allocates. Depends only on E, N, K, the epilogue and the SM count.
size_t grouped_gemm_int4_sm90_workspace_bytes(int64_t E, int64_t N, int64_t K, Int4Sm90Tile tile, Sm90Epilogue epilogue,
                                              int sm_count);

// out = per-expert x[rows_e] @ dq(weight[e])^T (bf16, fp32 accumulation), or its SwiGLU over
// interleaved rows; dq(w) = bf16((u - z) * s) exactly (see grouped_gemm_int4_sm90.cuh). The weight in
// the stored int4 format; no host synchronisation. Rows outside every range are left untouched.
cudaError_t launch_grouped_gemm_int4_sm90(const void* x,                  // [S, K] bf16
                                          const uint8_t* qweight,         // [E, N, K/2] codes
                                          const void* scales,             // [E, N, K/128] bf16
                                          const uint8_t* zeros,           // [E, N, K/128] or null (8)
                                          const int32_t* expert_offsets,  // [E+1] device
                                          void* out,                      // [S, N_out] bf16
                                          int64_t S, int64_t E, int64_t N, int64_t K, Int4Sm90Tile tile,
                                          Sm90Epilogue epilogue, void* workspace, size_t workspace_bytes,
                                          int sm_count, cudaStream_t stream);

}  // namespace dots1
