// Launchers of the MoE decode family (csrc/moe_decode/moe_decode_kernels.cu): the routed and shared
// experts of a few tokens straight from topk_ids, without permute / unpermute. Raw pointers only: the
// Tensor checks and dtype mapping live in moe_decode.cpp.
//
// Shape letters: T tokens, H hidden, E routed experts, k experts per token, I expert intermediate,
// Is shared-experts intermediate (0: no shared experts), NA = k*I + Is (act's row length).
// The down launchers take the shared experts' columns apart when shared_act is not null: act is then
// [T, k*I] and shared_act [T, Is] (both contiguous); act[t, k*I:] below reads shared_act[t].
//
//   gate_up: act[t, j*I + f]   = silu(g) * u of expert ids[t, j]'s gate / up rows of feature f,
//            act[t, k*I + f]   = the same for the shared experts' weight;
//   down:    out[t] = sum_j w[t, j] * (down[ids[t, j]] @ act[t, j*I:(j+1)*I]) + shared_down @ act[t, k*I:]
//                     + residual[t]
// Every dot product is an fp32 accumulation of the dtype's products; the SwiGLU epilogue is fp32 and
// the result is rounded once; the down combine adds the fp32 terms in exactly that order and rounds
// once. No float atomics: bitwise identical run to run and between eager and CUDA-graph replay.
//
// Ids are read on the device only. A pair (t, j) whose id is outside [0, E) gets NaN in its act
// columns (gate_up) and NaN in token t's whole output row (down); no memory outside the tensors is
// touched whatever the ids hold.
//
// Every launcher returns the launch's cudaError_t and launches nothing when there is no work.
#pragma once

#include <cstdint>

#include "dtype.h"

namespace dots1 {

// The gate_up weights' row order (the HF layout: gate rows [0, I) then up rows [I, 2I); interleaved:
// 16-row blocks [8 gate | 8 up], see csrc/grouped_gemm/grouped_gemm.h). The shared experts' weight is
// always in the HF layout.
enum class MoeGateUpLayout : int { kHF = 0, kInterleaved = 1 };

// How the fast kernels' lanes map onto the model-dtype weight rows (DOTS1_EXT_MOE_DECODE_LOADS;
// moe_decode_kernels.cu's header): kFrag, one warp load = 8 rows x 64 bytes (the MMA fragment's rows);
// kWide, 2 rows x 256 bytes (up to 2 tokens) or 4 rows x 128 bytes (3-8 tokens), frag above 8 tokens;
// kWideAll (the default) as kWide up to 8 tokens and 4 rows x 128 bytes with items of 8 pairs above
// (frag's items there hold 16). All compute the same sums in different fp32 orders. The int4 routed
// weights always use their own mapping.
enum class MoeDecodeLoads : int { kFrag = 0, kWide = 1, kWideAll = 2 };

// The fast (tensor-core, weight-streaming) kernels take at most this many (t, j) pairs per launch (64
// tokens of top-8); the launchers loop over token chunks of floor(kMoeDecodeMaxPairs / k) (at most
// kMoeDecodeMaxTokens) tokens, which is correct for any T and reads each touched expert once per chunk
// (an expert chosen by more than 8 NT pairs of a chunk: once per 8 NT of them, the extra reads served
// by L2; NT = 2 above 8 tokens).
constexpr int kMoeDecodeMaxPairs = 512;
constexpr int kMoeDecodeMaxTokens = 64;

}  // namespace dots1

// CPU-only builds have no CUDA headers: only the shared constants above.
#if defined(DOTS1_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime.h>

namespace dots1 {

// All matrices row-major with contiguous rows, as laid out below; weights 16-byte aligned.
// use_pdl: programmatic dependent launch on sm_90+ (csrc/pdl.cuh); the fast kernels prefetch their first
// shared experts' weight rows into L2 before waiting for the previous kernel, so the weights must not
// be written by the kernel right before the launch (moe_decode.cpp never copies them).
// hidden_settled (gate_up, use_pdl): the caller guarantees that hidden was written before the launch
// right before this one (in the model: the router, which reads it); the fast kernels then stream the
// shared experts' tiles, which read hidden, before their PDL wait and wait only before the routing ids,
// so the shared experts run while the router finishes (csrc/pdl.cuh, the exception to rule 1). The
// same bits either way; false is always safe.
// n_tiles: the fast kernels' n-tiles of 8 columns per MMA (1, 2 or 4; items of at most 8 n_tiles pairs);
// 0 picks by the launch's token count (1 up to 8 tokens, else 2). Any value gives a correct result.
// loads: the weight-load mapping (MoeDecodeLoads); n_tiles applies to the launches that take frag.
// carry_tiles (DOTS1_EXT_MOE_DECODE_CARRY, read by moe_decode.cpp, default on): in the wide launches of
// two n-tiles (P = 2, 5-64 tokens under kWideAll) each warp loads its first weight batch of the CTA's
// next routed tile before the current tile's reduction and store (moe_decode_kernels.cu, RowsCarry);
// the same loads, issued earlier: the same bits either way.
// preload_shared (down, use_pdl; DOTS1_EXT_MOE_DECODE_DOWN_PRELOAD, read by moe_decode.cpp, default on):
// the fast kernels' warps load their first weight batch of the shared experts' first pass into
// registers before the PDL wait (shared_down is a weight); the same loads, issued earlier: the same bits.
cudaError_t launch_moe_decode_gate_up(const void* hidden,          // [T, H]
                                      const void* gate_up,         // [E, 2I, H]
                                      const int32_t* topk_ids,     // [T, k] device
                                      const void* shared_gate_up,  // [2Is, H] or nullptr (Is == 0)
                                      void* act,                   // [T, NA]
                                      int64_t T, int64_t H, int64_t E, int64_t k, int64_t I, int64_t Is,
                                      MoeGateUpLayout layout, DType dtype, int n_tiles, MoeDecodeLoads loads,
                                      cudaStream_t stream, bool use_pdl, bool hidden_settled = false,
                                      bool carry_tiles = true);

cudaError_t launch_moe_decode_down(const void* act,            // [T, NA]
                                   const void* shared_act,     // [T, Is] or nullptr (then act[:, k*I:])
                                   const void* down,           // [E, H, I]
                                   const int32_t* topk_ids,    // [T, k] device
                                   const float* topk_weights,  // [T, k] device
                                   const void* shared_down,    // [H, Is] or nullptr (Is == 0)
                                   const void* residual,       // [T, H] or nullptr
                                   void* out,                  // [T, H]
                                   int64_t T, int64_t H, int64_t E, int64_t k, int64_t I, int64_t Is, DType dtype,
                                   int n_tiles, MoeDecodeLoads loads, cudaStream_t stream, bool use_pdl,
                                   bool preload_shared = true);

// int4 routed experts (W4A16, docs/design.md §7; Python: dots1_ext/ops/moe_decode_int4.py): the same
// ops with the routed weights as qweight [E, N, K/2] uint8 (code 2j in the low nibble of byte j),
// scales [E, N, K/128] bf16 and zeros [E, N, K/128] uint8 or nullptr (symmetric: zero point 8); each
// element is (u - z) * s rounded once to the activations' dtype, then the math above. K % 128 == 0
// (H for gate_up, I for down; else cudaErrorInvalidValue), weights 16-byte aligned. bf16 activations
// run the tensor-core kernels (one 128-k group per warp step), fp16 / fp32 the fallback kernels.
// staged (gate_up; DOTS1_EXT_MOE_DECODE_INT4_STAGED, read by moe_decode.cpp, default above 8 tokens):
// where H <= 4096 the routed tiles' weights go through shared memory, each thread copying its pieces of
// its next tile while it computes the current one (moe_decode_kernels.cu, stream_rows_int4_staged), and
// the launch takes 64 KB more shared memory; same bits either way. row_groups (1, 2 or 4;
// DOTS1_EXT_MOE_DECODE_INT4_ROW_GROUPS, read by moe_decode.cpp, default 4 unless staged; launches of up
// to 8 tokens): the routed tiles hold 8 x row_groups features, each warp streaming one row group over a
// 1 / (8 / row_groups) share of H instead of every warp one eighth of H of 8 features (more of a warp's
// work per tile, fewer tiles); the fp32 sums split K into 8 / row_groups ranges, so results differ from
// 1's by rounding (each setting is bitwise reproducible). Staged applies with one row group only.
// act_smem (DOTS1_EXT_MOE_DECODE_INT4_ACT_SMEM, read by moe_decode.cpp, default on): with 4 row groups at
// one token (H <= 8192) or 3-8 tokens (T H <= 32768), the routed tiles read the tokens' activations from a
// shared-memory copy laid out as the MMA's operand registers (T H bf16 more shared memory); same bits.
cudaError_t launch_moe_decode_int4_gate_up(const void* hidden,          // [T, H]
                                           const uint8_t* qweight,      // [E, 2I, H/2]
                                           const void* scales,          // [E, 2I, H/128] bf16
                                           const uint8_t* zeros,        // [E, 2I, H/128] or nullptr
                                           const int32_t* topk_ids,     // [T, k] device
                                           const void* shared_gate_up,  // [2Is, H] or nullptr (Is == 0)
                                           void* act,                   // [T, NA]
                                           int64_t T, int64_t H, int64_t E, int64_t k, int64_t I, int64_t Is,
                                           MoeGateUpLayout layout, DType dtype, int n_tiles, cudaStream_t stream,
                                           bool use_pdl, bool staged, int row_groups, bool act_smem,
                                           bool hidden_settled = false);

cudaError_t launch_moe_decode_int4_down(const void* act,            // [T, NA]
                                        const void* shared_act,     // [T, Is] or nullptr (then act[:, k*I:])
                                        const uint8_t* qweight,     // [E, H, I/2]
                                        const void* scales,         // [E, H, I/128] bf16
                                        const uint8_t* zeros,       // [E, H, I/128] or nullptr
                                        const int32_t* topk_ids,    // [T, k] device
                                        const float* topk_weights,  // [T, k] device
                                        const void* shared_down,    // [H, Is] or nullptr (Is == 0)
                                        const void* residual,       // [T, H] or nullptr
                                        void* out,                  // [T, H]
                                        int64_t T, int64_t H, int64_t E, int64_t k, int64_t I, int64_t Is,
                                        DType dtype, int n_tiles, cudaStream_t stream, bool use_pdl,
                                        bool preload_shared = true);

}  // namespace dots1

#endif  // DOTS1_WITH_CUDA || __CUDACC__
