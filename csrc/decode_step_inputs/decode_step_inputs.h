// Launcher of the decode-step inputs op (csrc/decode_step_inputs/decode_step_inputs_kernels.cu): the
// token embedding and the per-sequence positions, cache rows and attention ends of one decode step in
// one launch (what took a dozen elementwise kernels at the start of every step). Raw pointers only: the
// Tensor checks live in decode_step_inputs.cpp, the semantics in dots1_ext/reference.py.
#pragma once

#include <cstdint>

#include "dtype.h"

#if defined(DOTS1_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime.h>

namespace dots1 {

// For b in [0, batch), with s = *slot and V = vocab:
//   x[b, :]       = embed_weight[tokens[b], :], or NaN where tokens[b] is outside [0, V)
//   positions[b]  = max(s - cache_start[b], 0)
//   cache_rows[b] = b * cache_len + s, or -1 where s is unusable for sequence b: outside
//                   [0, cache_len), past *cache_filled (the slots written so far; attending over
//                   unwritten ones would read stale rows) or before cache_start[b] (its padding)
//   kv_end[b]     = s + 1, or -1 where s is unusable for sequence b
//   *cache_filled = s + 1 where s is in [0, cache_len) and <= *cache_filled (else unchanged); every CTA
//                   sees the same verdict whether it reads the old or the new value, since both are >= s.
// x and embed_weight rows are contiguous (row length hidden, row stride hidden for x and
// weight_row_stride for embed_weight). Launches nothing when batch == 0. With use_pdl the kernel
// waits for its predecessor before reading anything (tokens, slot and cache_filled are written by the
// step before in a greedy-decoding graph).
cudaError_t launch_decode_step_inputs(const int64_t* tokens, const int64_t* slot, const int64_t* cache_start,
                                      int64_t* cache_filled, const void* embed_weight, int64_t weight_row_stride,
                                      void* x, int64_t* positions, int64_t* cache_rows, int64_t* kv_end, int64_t batch,
                                      int64_t vocab, int64_t hidden, int64_t cache_len, DType dtype,
                                      cudaStream_t stream, bool use_pdl);

}  // namespace dots1
#endif
