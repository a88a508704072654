// Launcher of the skinny GEMM family (csrc/skinny_gemm/skinny_gemm_kernels.cu): the decode linears,
// x [M, K] @ weight [N, K]^T for M <= 16, optionally with a SwiGLU epilogue. Raw pointers only: the
// Tensor checks and the M > 16 path (cuBLAS) live in skinny_gemm.cpp.
//
// Epilogues (N_out = N for "none", N / 2 for the SwiGLU ones):
//   kNone        - out[m, n] = sum_k x[m, k] * weight[n, k]
//   kHF          - out[m, f] = silu(gate) * up with gate = row f, up = row N/2 + f (N even)
//   kInterleaved - the same with 16-row blocks [8 gate | 8 up]: gate = row 16*(f/8) + f%8, up = that + 8
//                  (N % 16 == 0; dots1_ext.ops.interleave_gate_up's layout, as in grouped_gemm)
// Numerics: products and sums in fp32 (bf16/fp16 products are exact in fp32), the epilogue in fp32 on
// the fp32 sums, one rounding to the output dtype: dots1_ext.reference.skinny_gemm.
//
// Every sum is taken in a fixed order (no atomics, no split across CTAs): results are bitwise
// reproducible from run to run for a given shape and alignment.
#pragma once

#include <cstdint>

#include "dtype.h"

namespace dots1 {

enum class SkinnyEpilogue : int { kNone = 0, kHF = 1, kInterleaved = 2 };

// The tensor-core kernel's weight-load mapping (skinny_gemm_kernels.cu): kFrag, one MMA fragment row
// per weight row (each warp load: 8 rows x 64 bytes); kWide, P k-parts of a row per fragment (each
// warp load: 2 rows x 256 bytes for M <= 2, 4 rows x 128 bytes for M <= 4; larger M runs kFrag).
enum class SkinnyKernel : int { kFrag = 0, kWide = 1 };

// The most rows of x the launcher takes (two 8-column tensor-core tiles); the Tensor code sends
// larger M to cuBLAS.
constexpr int64_t kSkinnyMaxRows = 16;

}  // namespace dots1

#if defined(DOTS1_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime.h>

namespace dots1 {

// out = epilogue(x @ weight^T). Kernel choice (one place: the launcher):
//   fp16/bf16 with K % 8 == 0, weight and x 16-byte aligned (pointers and row strides) -> the
//     tensor-core streaming kernel (mma.sync m16n8k16, weight rows as the 16-row operand, the K
//     range split over the 8 warps of a CTA, reduced in shared memory);
//   anything else (fp32, odd K, misaligned views) -> a portable CUDA-core kernel (scalar loads).
// tiles_per_warp: 16-row weight tiles per warp in the tensor-core kernel (1 or 2; 0 = choose from
// the shape and the SM count); variant: its weight-load mapping (same results up to the summation
// order; each variant is deterministic). M in [1, kSkinnyMaxRows]; M == 0 or N_out == 0 launches nothing.
// K == 0 gives zeros (then the epilogue: silu(0) * 0 = 0).
// use_pdl: programmatic dependent launch on sm_90+ (csrc/pdl.cuh): the tensor-core kernel requests its
// first batch of weight before waiting for the previous kernel, so `weight` must not be written by the
// kernel right before this launch in the stream (a decode step never writes weights).
cudaError_t launch_skinny_gemm(const void* x,       // [M, K], row stride x_row_stride (elements)
                               const void* weight,  // [N, K], row stride weight_row_stride (elements)
                               void* out,           // [M, N_out] contiguous
                               int64_t M, int64_t N, int64_t K, int64_t x_row_stride, int64_t weight_row_stride,
                               SkinnyEpilogue epilogue, DType dtype, int tiles_per_warp, SkinnyKernel variant,
                               cudaStream_t stream, bool use_pdl);

// Which kernel launch_skinny_gemm picks for these arguments (for tests and the benchmark's notes):
// 0 = none (no work), 1 = tensor-core kernel, 2 = portable kernel.
int skinny_gemm_kernel_kind(const void* x, const void* weight, int64_t M, int64_t N, int64_t K,
                            int64_t x_row_stride, int64_t weight_row_stride, DType dtype);

}  // namespace dots1

#endif  // DOTS1_WITH_CUDA || __CUDACC__
