// The decode-step inputs kernel: one CTA per sequence copies its token's embedding row (16-byte vectors
// where the row allows, else elements) and its first thread writes the step's integer inputs.
#include <cstdint>
#include <limits>

#include "cuda_utils.cuh"
#include "decode_step_inputs/decode_step_inputs.h"
#include "pdl.cuh"

namespace dots1 {
namespace {

constexpr int kThreads = 128;

template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads) decode_step_inputs_kernel(
    const int64_t* __restrict__ tokens, const int64_t* __restrict__ slot, const int64_t* __restrict__ cache_start,
    int64_t* cache_filled, const T* __restrict__ embed_weight, int64_t weight_row_stride, T* __restrict__ x,
    int64_t* __restrict__ positions, int64_t* __restrict__ cache_rows, int64_t* __restrict__ kv_end, int64_t vocab,
    int64_t hidden, int64_t cache_len) {
  pdl_wait();  // tokens and slot may come from the previous kernel (a greedy step's argmax)
  pdl_launch_dependents();
  const int64_t b = blockIdx.x;
  const int64_t token = tokens[b];
  const bool valid = token >= 0 && token < vocab;
  T* out = x + b * hidden;
  if (kVector) {  // hidden * sizeof(T) % 16 == 0 and both rows 16-byte aligned (checked by the launcher)
    constexpr int kPer = 16 / sizeof(T);
    uint4 nan_vec;
    if (!valid) {
      const T nan_value = from_float<T>(std::numeric_limits<float>::quiet_NaN());
      T lanes[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) lanes[i] = nan_value;
      nan_vec = *reinterpret_cast<const uint4*>(lanes);
    }
    const uint4* row = reinterpret_cast<const uint4*>(embed_weight + (valid ? token : 0) * weight_row_stride);
    uint4* dst = reinterpret_cast<uint4*>(out);
    for (int64_t i = threadIdx.x; i < hidden / kPer; i += kThreads) dst[i] = valid ? __ldg(row + i) : nan_vec;
  } else {
    const T nan_value = from_float<T>(std::numeric_limits<float>::quiet_NaN());
    const T* row = embed_weight + (valid ? token : 0) * weight_row_stride;
    for (int64_t i = threadIdx.x; i < hidden; i += kThreads) out[i] = valid ? row[i] : nan_value;
  }
  if (threadIdx.x == 0) {
    const int64_t s = *slot;
    // cache_filled is not __restrict__/__ldg: CTA 0 writes it while the others read it (either value
    // gives the same verdict, see the header).
    const int64_t filled = *reinterpret_cast<volatile int64_t*>(cache_filled);
    const bool writable = s >= 0 && s < cache_len && s <= filled;
    const int64_t position = s - cache_start[b];
    const bool usable = writable && position >= 0;  // a slot before the sequence's first real one is padding
    positions[b] = position > 0 ? position : 0;
    cache_rows[b] = usable ? b * cache_len + s : -1;
    kv_end[b] = usable ? s + 1 : -1;
    if (writable && b == 0) *cache_filled = s + 1;
  }
}

template <typename T>
cudaError_t launch_typed(const int64_t* tokens, const int64_t* slot, const int64_t* cache_start,
                         int64_t* cache_filled, const void* embed_weight, int64_t weight_row_stride, void* x,
                         int64_t* positions, int64_t* cache_rows, int64_t* kv_end, int64_t batch, int64_t vocab,
                         int64_t hidden, int64_t cache_len, cudaStream_t stream, bool use_pdl) {
  const bool vector = (hidden * static_cast<int64_t>(sizeof(T))) % 16 == 0 &&
                      (weight_row_stride * static_cast<int64_t>(sizeof(T))) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(embed_weight) % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  const auto* w = static_cast<const T*>(embed_weight);
  auto* out = static_cast<T*>(x);
  const dim3 grid(static_cast<unsigned>(batch));
  return vector ? launch_pdl(decode_step_inputs_kernel<T, true>, grid, dim3(kThreads), 0, stream, use_pdl, tokens,
                             slot, cache_start, cache_filled, w, weight_row_stride, out, positions, cache_rows, kv_end,
                             vocab, hidden, cache_len)
                : launch_pdl(decode_step_inputs_kernel<T, false>, grid, dim3(kThreads), 0, stream, use_pdl, tokens,
                             slot, cache_start, cache_filled, w, weight_row_stride, out, positions, cache_rows, kv_end,
                             vocab, hidden, cache_len);
}

}  // namespace

cudaError_t launch_decode_step_inputs(const int64_t* tokens, const int64_t* slot, const int64_t* cache_start,
                                      int64_t* cache_filled, const void* embed_weight, int64_t weight_row_stride,
                                      void* x, int64_t* positions, int64_t* cache_rows, int64_t* kv_end, int64_t batch,
                                      int64_t vocab, int64_t hidden, int64_t cache_len, DType dtype,
                                      cudaStream_t stream, bool use_pdl) {
  if (batch == 0) return cudaSuccess;
  if (batch > std::numeric_limits<int32_t>::max()) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return launch_typed<float>(tokens, slot, cache_start, cache_filled, embed_weight, weight_row_stride, x,
                                 positions, cache_rows, kv_end, batch, vocab, hidden, cache_len, stream, use_pdl);
    case DType::kFloat16:
      return launch_typed<__half>(tokens, slot, cache_start, cache_filled, embed_weight, weight_row_stride, x,
                                  positions, cache_rows, kv_end, batch, vocab, hidden, cache_len, stream, use_pdl);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(tokens, slot, cache_start, cache_filled, embed_weight, weight_row_stride,
                                         x, positions, cache_rows, kv_end, batch, vocab, hidden, cache_len, stream,
                                         use_pdl);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dots1
