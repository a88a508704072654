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

// load_weight16 issued where it stands (volatile): a load meant to be in flight across the code that
// follows (a carried batch, moe_decode's stream_rows), which the compiler would otherwise sink to its use.
__device__ __forceinline__ uint4 load_weight16_now(const void* p, bool pred) {
  uint4 v;
  asm volatile(DOTS1_LD16_PTX(DOTS1_LD16_ZERO_FILL, ".L1::no_allocate") DOTS1_LD16_OPERANDS(v, p, pred));
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

// ---------------------------------------------------------------------------------------------
// int4 weights (docs/design.md §7) and per-thread staging through shared memory: the MoE decode
// kernels' helpers, here so that a probe of their schedule runs the same instructions
// (bench/probes/int4_down_schedules.cu).

// d = a * b + c on bf16x2, rounded once (round to nearest even).
__device__ __forceinline__ uint32_t bf16x2_fma(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// (a & b) | c in one instruction (lop3 with the masks in registers: the compiler's own lowering of two
// different immediates takes two).
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// 8 codes of one row (word w) -> d[j] = the bf16x2 pair (code j, code j + 4), j = 0..3, each element
// (u - z) * s rounded once to bf16, exactly the reference's dequantized value:
//   (w >> 4j) & 0x000F000F | 0x43004300 is the bf16 pair 128 + u (2^7: mantissa ulp 1, exact);
//   times 1 plus neg_z128 = -(128 + z): u - z, exact (|u - z| <= 15);
//   times s plus -0: the exact product rounded once (-0 keeps the product's zero sign).
__device__ __forceinline__ void dequant8(uint32_t w, uint32_t neg_z128x2, uint32_t sx2, uint32_t (&d)[4]) {
  constexpr uint32_t kMask = 0x000F000Fu, kMagic128 = 0x43004300u, kOne = 0x3F803F80u, kNegZero = 0x80008000u;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t q = and_or(w >> (4 * j), kMask, kMagic128);
    d[j] = bf16x2_fma(bf16x2_fma(q, kOne, neg_z128x2), sx2, kNegZero);
  }
}

// 16 bytes global -> shared without a register (cp.async, sm_80+; L2 only), completed by this thread's
// cp_async_wait_group: a thread that reads back only what it copied needs no barrier.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned int dst = static_cast<unsigned int>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait_group() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

}  // namespace dots1
