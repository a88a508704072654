// Device building blocks of per-head QK-RMSNorm + neox RoPE, shared by the norm family's
// qk_norm_rope kernels (csrc/norm/norm_kernels.cu) and the fused decode attention
// (csrc/attention/attention_kernels.cu, qk_norm_rope_decode_attention): one definition of the math,
// so the two produce the same bits (same operations, same order, same roundings).
//
// Layout of one head (norm_rope_in_lanes): a group of NormRopeLanes<T, kD>::kLanes consecutive lanes
// (a power of two, at most 32, aligned within the warp); lane l of the group holds the 16-byte vector
// at element l * kHalf of the first half of the head (x1) and the matching one of the second half (x2),
// so rotate_half pairs never leave the lane and the norm is a kLanes-wide shuffle reduction.
#pragma once

#include "cuda_utils.cuh"

namespace dots1 {

// N elements of T aligned to their size (N * sizeof(T) in {2, 4, 8, 16}): one vector access.
template <typename T, int N>
struct alignas(sizeof(T) * N) VecN {
  T v[N];
};

// Loads N contiguous elements (p aligned to min(16, N * sizeof(T)) bytes) in 16-byte pieces.
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, T (&out)[N]) {
  constexpr int kChunk = (N * sizeof(T) >= 16) ? static_cast<int>(16 / sizeof(T)) : N;
  static_assert(N % kChunk == 0, "N must be a multiple of the 16-byte chunk");
  using Chunk = VecN<T, kChunk>;
#pragma unroll
  for (int c = 0; c < N / kChunk; ++c) {
    const Chunk chunk = reinterpret_cast<const Chunk*>(p)[c];
#pragma unroll
    for (int j = 0; j < kChunk; ++j) out[c * kChunk + j] = chunk.v[j];
  }
}

template <typename T, int N>
__device__ __forceinline__ void load_vec_float(const T* p, float (&out)[N]) {
  T raw[N];
  load_vec<T, N>(p, raw);
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = to_float(raw[j]);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const T (&in)[N]) {
  constexpr int kChunk = (N * sizeof(T) >= 16) ? static_cast<int>(16 / sizeof(T)) : N;
  static_assert(N % kChunk == 0, "N must be a multiple of the 16-byte chunk");
  using Chunk = VecN<T, kChunk>;
#pragma unroll
  for (int c = 0; c < N / kChunk; ++c) {
    Chunk chunk;
#pragma unroll
    for (int j = 0; j < kChunk; ++j) chunk.v[j] = in[c * kChunk + j];
    reinterpret_cast<Chunk*>(p)[c] = chunk;
  }
}

template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

// The reference's rms_norm on one element: normalise, round to T, times the weight in fp32, round.
template <typename T>
__device__ __forceinline__ T norm_times_weight(float x, float scale, float w) {
  return from_float<T>(__fmul_rn(round_to<T>(__fmul_rn(x, scale)), w));
}

// Rope on a pair of rounded, weighted values (y1 from the first half, y2 from the second); the
// products and the sum are rounded separately, as the reference's eager ops do.
__device__ __forceinline__ float rope_first(float y1, float y2, float c, float s) {
  return __fsub_rn(__fmul_rn(y1, c), __fmul_rn(y2, s));
}
__device__ __forceinline__ float rope_second(float y1, float y2, float c, float s) {
  return __fadd_rn(__fmul_rn(y2, c), __fmul_rn(y1, s));
}

template <typename T, int kD>
struct NormRopeLanes {
  static constexpr int kHalf = 16 / static_cast<int>(sizeof(T));  // elements per lane in each half
  static constexpr int kLanes = kD / (2 * kHalf);
  static_assert(kLanes >= 1 && kLanes <= 32 && (kLanes & (kLanes - 1)) == 0, "unsupported head_dim");
};

// In place on one head held as described at the top: RMSNorm over kD (fp32 sum of squares, rounded to
// T, times the weight w1 | w2 in fp32, rounded), then RoPE with c | s, rounded. Every lane of the warp
// must call it (full-mask shuffles); lanes of a group without work compute on any in-bounds data.
template <typename T, int kD>
__device__ __forceinline__ void norm_rope_in_lanes(T (&x1)[NormRopeLanes<T, kD>::kHalf],
                                                   T (&x2)[NormRopeLanes<T, kD>::kHalf],
                                                   const float (&w1)[NormRopeLanes<T, kD>::kHalf],
                                                   const float (&w2)[NormRopeLanes<T, kD>::kHalf],
                                                   const float (&c)[NormRopeLanes<T, kD>::kHalf],
                                                   const float (&s)[NormRopeLanes<T, kD>::kHalf], float eps) {
  constexpr int kHalf = NormRopeLanes<T, kD>::kHalf, kLanes = NormRopeLanes<T, kD>::kLanes;
  float sum_sq = 0.f;
#pragma unroll
  for (int j = 0; j < kHalf; ++j) {
    const float f1 = to_float(x1[j]), f2 = to_float(x2[j]);
    sum_sq += f1 * f1 + f2 * f2;
  }
#pragma unroll
  for (int o = kLanes / 2; o > 0; o >>= 1) sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, o);
  const float scale = rsqrtf(sum_sq / static_cast<float>(kD) + eps);
#pragma unroll
  for (int j = 0; j < kHalf; ++j) {
    const float y1 = to_float(norm_times_weight<T>(to_float(x1[j]), scale, w1[j]));
    const float y2 = to_float(norm_times_weight<T>(to_float(x2[j]), scale, w2[j]));
    x1[j] = from_float<T>(rope_first(y1, y2, c[j], s[j]));
    x2[j] = from_float<T>(rope_second(y1, y2, c[j], s[j]));
  }
}

}  // namespace dots1
