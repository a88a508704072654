// Device helpers of the weight-streaming decode kernels (csrc/skinny_gemm, csrc/moe_decode): predicated
// 16-byte loads and the m16n8k16 tensor-core MMA with fp32 accumulation. One definition for both
// families, so a change of cache hint or operand layout reaches every kernel that streams weights.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace dots1 {

// The predicated 16-byte load's PTX: {%0, %1, %2, %3} = the 16 bytes at [%4] when %5 != 0, with
// ZERO_FILL (DOTS1_LD16_ZERO_FILL or nothing) before the load and CACHE_HINT (".L1::no_allocate" or
// nothing) in it. One text for every variant below; its operands are DOTS1_LD16_OPERANDS.
#define DOTS1_LD16_ZERO_FILL                                                         \
  "mov.b32 %0, 0;\n\t"                                                               \
  "mov.b32 %1, 0;\n\t"                                                               \
  "mov.b32 %2, 0;\n\t"                                                               \
  "mov.b32 %3, 0;\n\t"
#define DOTS1_LD16_PTX(ZERO_FILL, CACHE_HINT)                                        \
  "{\n\t"                                                                            \
  ".reg .pred p;\n\t"                                                                \
  "setp.ne.b32 p, %5, 0;\n\t"                                                        \
  ZERO_FILL                                                                          \
  "@p ld.global.nc" CACHE_HINT ".v4.u32 {%0, %1, %2, %3}, [%4];\n\t"                 \
  "}"
#define DOTS1_LD16_OPERANDS(v, p, pred)                                              \
  : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p), "r"(static_cast<int>(pred))

// 16 bytes at p, zeros when !pred. kStream: data read once (ld.global.nc.L1::no_allocate, so L1 keeps
// the small operands every CTA re-reads); otherwise the L1- and L2-cached read-only path. The weight
// load (kStream) is not volatile: the compiler may hoist a batch of them together, even above a PDL
// wait, which is right for weights (csrc/pdl.cuh rule 1). The activation load is volatile: it reads
// the previous kernel's output, so it must stay after the kernel's pdl_wait() (a volatile asm too).
template <bool kStream>
__device__ __forceinline__ uint4 load16(const void* p, bool pred) {
  uint4 v;
  if constexpr (kStream) {
    asm(DOTS1_LD16_PTX(DOTS1_LD16_ZERO_FILL, ".L1::no_allocate") DOTS1_LD16_OPERANDS(v, p, pred));
  } else {
    asm volatile(DOTS1_LD16_PTX(DOTS1_LD16_ZERO_FILL, "") DOTS1_LD16_OPERANDS(v, p, pred));
  }
  return v;
}

// A weight vector (read once per launch) and an activation vector (re-read by many CTAs).
__device__ __forceinline__ uint4 load_weight16(const void* p, bool pred) { return load16<true>(p, pred); }
__device__ __forceinline__ uint4 load_act16(const void* p, bool pred) { return load16<false>(p, pred); }

// For callers that never use a vector they did not load (no zero fill: saves the moves per load).
// load_weight16_if: as load_weight16 when pred, undefined otherwise. load_act16_always: as load_act16
// without a predicate (p must be readable).
__device__ __forceinline__ uint4 load_weight16_if(const void* p, bool pred) {
  uint4 v;
  asm(DOTS1_LD16_PTX("", ".L1::no_allocate") DOTS1_LD16_OPERANDS(v, p, pred));
  return v;
}
__device__ __forceinline__ uint4 load_act16_always(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

#undef DOTS1_LD16_OPERANDS
#undef DOTS1_LD16_PTX
#undef DOTS1_LD16_ZERO_FILL

// c += A (16 x 16, row) * B (16 x 8, col), fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

}  // namespace dots1
