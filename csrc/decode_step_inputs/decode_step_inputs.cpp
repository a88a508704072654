// Tensor-level code of the decode-step inputs op: argument checks, the C++ CPU kernel and the CUDA entry
// point that calls the launcher of decode_step_inputs.h.
//
//   decode_step_inputs(tokens [B] int64, slot [1] int64, cache_start [B] int64, embed_weight [V, H],
//                      cache_len, cache_filled [1] int64, updated in place)
//     -> (x [B, H], positions [B], cache_rows [B], kv_end [B] int64)
//
// One decode step's embedding lookup and the integer inputs its layers read (schema in
// csrc/registry.cpp, semantics in dots1_ext/reference.py decode_step_inputs): what Dots1Model computed
// with a dozen small kernels per step. Nothing here reads a device value on the host (slot and the
// tokens stay on the device, so one CUDA graph serves every step). Poison policy, as the model's: a
// token id outside [0, V) gives a NaN row of x; a slot outside [0, cache_len) gives cache row -1 (the
// cache write rejects it and poisons the token) and kv_end -1 < kv_start (decode_attention poisons the
// sequence). So does a slot past cache_filled (the slots written so far): attending over it would read
// rows no step wrote (stale or empty) and give plausible numbers. A slot in the cache and not past it
// sets cache_filled to slot + 1: the step writes that slot, and the slots after it now belong to an
// older continuation. A sequence whose first real slot (cache_start) is after the slot gets -1 too:
// the slot is its padding, and the empty range [cache_start, slot + 1) would give a plausible zero.
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "common.h"
#include "decode_step_inputs/decode_step_inputs.h"

#ifdef DOTS1_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace dots1 {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Mirrors dots1_ext/ops/decode_step_inputs.py _check_decode_step_inputs.
void check_args(const at::Tensor& tokens, const at::Tensor& slot, const at::Tensor& cache_start,
                const at::Tensor& embed_weight, int64_t cache_len, const at::Tensor& cache_filled) {
  check_dtype(tokens, "tokens", {at::kLong});
  check_shape(tokens, "tokens", {-1});
  check_dtype(slot, "slot", {at::kLong});
  check_shape(slot, "slot", {1});
  check_dtype(cache_start, "cache_start", {at::kLong});
  check_shape(cache_start, "cache_start", {tokens.size(0)});
  check_dtype(embed_weight, "embed_weight", {at::kFloat, at::kHalf, at::kBFloat16});
  check_shape(embed_weight, "embed_weight", {-1, -1});
  TORCH_CHECK_VALUE(embed_weight.stride(1) == 1 || embed_weight.size(1) <= 1,
                    "dots1_ext: embed_weight must have a contiguous last dimension, got strides ", embed_weight.strides());
  check_same_device(slot, "slot", tokens, "tokens");
  check_same_device(cache_start, "cache_start", tokens, "tokens");
  check_same_device(embed_weight, "embed_weight", tokens, "tokens");
  check_dtype(cache_filled, "cache_filled", {at::kLong});
  check_shape(cache_filled, "cache_filled", {1});
  check_same_device(cache_filled, "cache_filled", tokens, "tokens");
  TORCH_CHECK_VALUE(cache_len >= 1, "dots1_ext: cache_len must be at least 1, got ", cache_len);
  TORCH_CHECK_VALUE(tokens.size(0) <= std::numeric_limits<int32_t>::max(), "dots1_ext: tokens: at most 2^31 - 1 "
                    "sequences, got ", tokens.size(0));
  // Cache rows are b * cache_len + slot: every one must fit in int64 (an overflow would alias another
  // sequence's rows).
  TORCH_CHECK_VALUE(cache_len <= std::numeric_limits<int64_t>::max() / std::max<int64_t>(tokens.size(0), 1),
                    "dots1_ext: cache_len ", cache_len, " x ", tokens.size(0), " sequences overflows int64 cache rows");
}

Outputs empty_outputs(const at::Tensor& tokens, const at::Tensor& embed_weight) {
  const int64_t B = tokens.size(0);
  const auto ints = tokens.options().dtype(at::kLong);
  return {at::empty({B, embed_weight.size(1)}, embed_weight.options().memory_format(at::MemoryFormat::Contiguous)),
          at::empty({B}, ints), at::empty({B}, ints), at::empty({B}, ints)};
}

Outputs decode_step_inputs_cpu(const at::Tensor& tokens_in, const at::Tensor& slot_in,
                               const at::Tensor& cache_start_in, const at::Tensor& embed_weight, int64_t cache_len,
                               const at::Tensor& cache_filled) {
  check_args(tokens_in, slot_in, cache_start_in, embed_weight, cache_len, cache_filled);
  const at::Tensor tokens = tokens_in.contiguous(), cache_start = cache_start_in.contiguous();
  auto [x, positions, cache_rows, kv_end] = empty_outputs(tokens, embed_weight);
  const int64_t B = tokens.size(0), V = embed_weight.size(0);
  const int64_t s = slot_in.item<int64_t>();  // CPU tensors: no device synchronisation
  const int64_t filled = cache_filled.item<int64_t>();
  const bool writable = s >= 0 && s < cache_len && s <= filled;
  if (writable && B > 0) cache_filled.fill_(s + 1);  // the CUDA launcher launches nothing for B == 0
  const int64_t* tok = tokens.data_ptr<int64_t>();
  const int64_t* start = cache_start.data_ptr<int64_t>();
  int64_t* pos = positions.data_ptr<int64_t>();
  int64_t* rows = cache_rows.data_ptr<int64_t>();
  int64_t* end = kv_end.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    if (tok[b] >= 0 && tok[b] < V)
      x[b].copy_(embed_weight[tok[b]]);
    else
      x[b].fill_(std::numeric_limits<float>::quiet_NaN());
    const bool usable = writable && s >= start[b];  // a slot before the sequence's first real one is padding
    pos[b] = std::max<int64_t>(s - start[b], 0);
    rows[b] = usable ? b * cache_len + s : -1;
    end[b] = usable ? s + 1 : -1;
  }
  return {x, positions, cache_rows, kv_end};
}

#ifdef DOTS1_WITH_CUDA
Outputs decode_step_inputs_cuda(const at::Tensor& tokens_in, const at::Tensor& slot_in,
                                const at::Tensor& cache_start_in, const at::Tensor& embed_weight, int64_t cache_len,
                                const at::Tensor& cache_filled) {
  check_args(tokens_in, slot_in, cache_start_in, embed_weight, cache_len, cache_filled);
  const c10::cuda::CUDAGuard guard(tokens_in.device());
  const at::Tensor tokens = tokens_in.contiguous(), cache_start = cache_start_in.contiguous();
  auto [x, positions, cache_rows, kv_end] = empty_outputs(tokens, embed_weight);
  const cudaError_t err = launch_decode_step_inputs(
      tokens.data_ptr<int64_t>(), slot_in.data_ptr<int64_t>(), cache_start.data_ptr<int64_t>(),
      cache_filled.data_ptr<int64_t>(), embed_weight.data_ptr(), embed_weight.stride(0), x.data_ptr(),
      positions.data_ptr<int64_t>(), cache_rows.data_ptr<int64_t>(), kv_end.data_ptr<int64_t>(), tokens.size(0),
      embed_weight.size(0), embed_weight.size(1), cache_len, to_dtype(embed_weight.scalar_type()),
      c10::cuda::getCurrentCUDAStream(), pdl_enabled());
  DOTS1_CHECK(err == cudaSuccess, "decode_step_inputs launch failed: ", cudaGetErrorString(err));
  return {x, positions, cache_rows, kv_end};
}
#endif

}  // namespace
}  // namespace dots1

TORCH_LIBRARY_IMPL(dots1_ext, CPU, m) { m.impl("decode_step_inputs", &dots1::decode_step_inputs_cpu); }

#ifdef DOTS1_WITH_CUDA
TORCH_LIBRARY_IMPL(dots1_ext, CUDA, m) { m.impl("decode_step_inputs", &dots1::decode_step_inputs_cuda); }
#endif
