// Token dispatch: argument checks, the CPU kernels, and the CUDA implementations that call the
// launchers of dispatch_kernels.cu. Semantics: dots1_ext.reference.permute / unpermute; bad ids and
// row_map entries follow the poison policy of dispatch.h on every backend.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <limits>
#include <vector>

#include "common.h"
#include "dispatch/dispatch.h"

#ifdef DOTS1_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace dots1 {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

int64_t permuted_rows(int64_t T, int64_t k, int64_t E, int64_t pad_to) {
  return T * k + (pad_to > 1 ? E * (pad_to - 1) : 0);
}

void check_permute(const at::Tensor& hidden, const at::Tensor& topk_ids, int64_t num_experts, int64_t pad_to) {
  check_dtype(hidden, "hidden", {at::kFloat, at::kHalf, at::kBFloat16});
  check_shape(hidden, "hidden", {-1, -1});
  check_dtype(topk_ids, "topk_ids", {at::kInt});
  check_shape(topk_ids, "topk_ids", {hidden.size(0), -1});
  check_same_device(topk_ids, "topk_ids", hidden, "hidden");
  TORCH_CHECK_VALUE(num_experts > 0 && num_experts <= kPermuteMaxExperts, "dots1_ext: num_experts must be in [1, ",
                    kPermuteMaxExperts, "], got ", num_experts);
  TORCH_CHECK_VALUE(pad_to > 0, "dots1_ext: pad_to must be positive, got ", pad_to);
  TORCH_CHECK_VALUE(pad_to <= kInt32Max && permuted_rows(topk_ids.size(0), topk_ids.size(1), num_experts, pad_to) <= kInt32Max,
                    "dots1_ext: permuted rows (T*k + num_experts*(pad_to-1)) must fit in int32 (row_map), got T=",
                    topk_ids.size(0), ", k=", topk_ids.size(1), ", num_experts=", num_experts, ", pad_to=", pad_to);
}

void check_unpermute(const at::Tensor& expert_out, const at::Tensor& row_map, const at::Tensor& topk_weights,
                     const std::optional<at::Tensor>& shared_out, const std::optional<at::Tensor>& residual) {
  check_dtype(expert_out, "expert_out", {at::kFloat, at::kHalf, at::kBFloat16});
  check_shape(expert_out, "expert_out", {-1, -1});
  check_dtype(topk_weights, "topk_weights", {at::kFloat});
  check_shape(topk_weights, "topk_weights", {-1, -1});
  const int64_t T = topk_weights.size(0), k = topk_weights.size(1), H = expert_out.size(1);
  check_dtype(row_map, "row_map", {at::kInt});
  check_shape(row_map, "row_map", {T * k});
  check_same_device(row_map, "row_map", expert_out, "expert_out");
  check_same_device(topk_weights, "topk_weights", expert_out, "expert_out");
  for (const auto& [t, name] : {std::pair{&shared_out, "shared_out"}, std::pair{&residual, "residual"}}) {
    if (!t->has_value()) continue;
    const at::Tensor& x = t->value();
    TORCH_CHECK_TYPE(x.scalar_type() == expert_out.scalar_type(), "dots1_ext: ", name, " must have dtype ",
                     c10::toString(expert_out.scalar_type()), ", got ", c10::toString(x.scalar_type()));
    check_shape(x, name, {T, H});
    check_same_device(x, name, expert_out, "expert_out");
  }
}

// ---- CPU ----

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_cpu(const at::Tensor& hidden_in, const at::Tensor& topk_ids_in,
                                                           int64_t num_experts, int64_t pad_to) {
  check_permute(hidden_in, topk_ids_in, num_experts, pad_to);
  const at::Tensor hidden = hidden_in.contiguous();
  const at::Tensor ids = topk_ids_in.contiguous();
  const int64_t T = ids.size(0), k = ids.size(1), H = hidden.size(1), N = T * k, E = num_experts;
  const int32_t* id = ids.data_ptr<int32_t>();

  // Poison policy (dispatch.h): an id outside [0, E) takes no row; its row_map entry is -1.
  const auto valid = [&](int64_t f) { return id[f] >= 0 && id[f] < E; };
  std::vector<int64_t> counts(E, 0);
  for (int64_t f = 0; f < N; ++f)
    if (valid(f)) ++counts[id[f]];
  at::Tensor offsets = at::empty({E + 1}, ids.options());
  int32_t* off = offsets.data_ptr<int32_t>();
  std::vector<int64_t> cursor(E);
  int64_t run = 0;
  for (int64_t e = 0; e < E; ++e) {
    off[e] = static_cast<int32_t>(run);
    cursor[e] = run;
    run += pad_to > 1 ? (counts[e] + pad_to - 1) / pad_to * pad_to : counts[e];
  }
  off[E] = static_cast<int32_t>(run);
  // A walk in (token, slot) order hands out each expert's rows in that order: stable by construction.
  at::Tensor row_map = at::empty({N}, ids.options());
  int32_t* rm = row_map.data_ptr<int32_t>();
  for (int64_t f = 0; f < N; ++f) rm[f] = valid(f) ? static_cast<int32_t>(cursor[id[f]]++) : -1;

  at::Tensor permuted = at::zeros({permuted_rows(T, k, E, pad_to), H}, hidden.options());
  const int64_t row_bytes = H * hidden.element_size();
  const char* src = static_cast<const char*>(hidden.data_ptr());
  char* dst = static_cast<char*>(permuted.data_ptr());
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t f = begin; f < end; ++f)
      if (rm[f] >= 0) std::memcpy(dst + static_cast<int64_t>(rm[f]) * row_bytes, src + (f / k) * row_bytes, row_bytes);
  });
  return {permuted, offsets, row_map};
}

at::Tensor unpermute_cpu(const at::Tensor& expert_out_in, const at::Tensor& row_map_in,
                         const at::Tensor& topk_weights_in, const std::optional<at::Tensor>& shared_out_in,
                         const std::optional<at::Tensor>& residual_in) {
  check_unpermute(expert_out_in, row_map_in, topk_weights_in, shared_out_in, residual_in);
  const at::Tensor expert_out = expert_out_in.contiguous();
  const at::Tensor row_map = row_map_in.contiguous();
  const at::Tensor weights = topk_weights_in.contiguous();
  const int64_t T = weights.size(0), k = weights.size(1), H = expert_out.size(1), S = expert_out.size(0);
  const int32_t* rm = row_map.data_ptr<int32_t>();
  at::Tensor shared_out, residual;
  if (shared_out_in.has_value()) shared_out = shared_out_in->contiguous();
  if (residual_in.has_value()) residual = residual_in->contiguous();
  at::Tensor out = at::empty({T, H}, expert_out.options());
  const float* w = weights.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, expert_out.scalar_type(), "dots1_ext::unpermute", [&] {
    const scalar_t* eo = expert_out.data_ptr<scalar_t>();
    const scalar_t* so = shared_out.defined() ? shared_out.data_ptr<scalar_t>() : nullptr;
    const scalar_t* re = residual.defined() ? residual.data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(H);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        bool poison = false;
        for (int64_t j = 0; j < k; ++j) {
          // Poison policy (dispatch.h): a row_map entry outside [0, S) makes the row NaN.
          const int32_t r = rm[t * k + j];
          if (r < 0 || r >= S) {
            poison = true;
            continue;
          }
          // Product and sum rounded separately, slot by slot, as the reference does.
          const float wj = w[t * k + j];
          const scalar_t* row = eo + static_cast<int64_t>(r) * H;
          for (int64_t h = 0; h < H; ++h) {
            acc[h] = acc[h] + wj * static_cast<float>(row[h]);
          }
        }
        if (so)
          for (int64_t h = 0; h < H; ++h) acc[h] = acc[h] + static_cast<float>(so[t * H + h]);
        if (re)
          for (int64_t h = 0; h < H; ++h) acc[h] = acc[h] + static_cast<float>(re[t * H + h]);
        if (poison) std::fill(acc.begin(), acc.end(), std::numeric_limits<float>::quiet_NaN());
        for (int64_t h = 0; h < H; ++h) o[t * H + h] = static_cast<scalar_t>(acc[h]);
      }
    });
  });
  return out;
}

// ---- CUDA ----
#ifdef DOTS1_WITH_CUDA

// The index's launch form for N = T*k ids (dispatch.h launch_permute): 1 = the single block, else the
// block count of the multi-block form. DOTS1_EXT_PERMUTE_INDEX (read per call; auto, single or multi;
// default auto) forces one: the tests run both, the benchmarks compare them. Auto takes the multi-block
// form from kPermuteMultiMinIds ids on. On the H200 (E=128, bench/probes/permute_index_forms.py) the
// single block / the multi-block form took 10.3 / 12.4 us at 384 ids, 17.2 / 12.3 us at 768, 17.1 / 13.3
// us at 1536 and 199 / 23 us at 98304 (T=16384).
constexpr int64_t kPermuteMultiMinIds = 768;

int permute_index_form(int64_t N) {
  const char* v = std::getenv("DOTS1_EXT_PERMUTE_INDEX");
  const std::string mode = v == nullptr || *v == '\0' ? "auto" : v;
  TORCH_CHECK_VALUE(mode == "auto" || mode == "single" || mode == "multi",
                    "dots1_ext: DOTS1_EXT_PERMUTE_INDEX must be auto, single or multi, got '", mode, "'");
  const bool multi = mode == "multi" || (mode == "auto" && N >= kPermuteMultiMinIds);
  return multi && N > 0 ? permute_index_blocks(N) : 1;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_cuda(const at::Tensor& hidden_in,
                                                            const at::Tensor& topk_ids_in, int64_t num_experts,
                                                            int64_t pad_to) {
  check_permute(hidden_in, topk_ids_in, num_experts, pad_to);
  c10::cuda::CUDAGuard guard(hidden_in.device());
  const at::Tensor hidden = hidden_in.contiguous();
  const at::Tensor ids = topk_ids_in.contiguous();
  const int64_t T = ids.size(0), k = ids.size(1), H = hidden.size(1);
  const int64_t S = permuted_rows(T, k, num_experts, pad_to);
  at::Tensor permuted = at::empty({S, H}, hidden.options());
  at::Tensor offsets = at::empty({num_experts + 1}, ids.options());
  at::Tensor row_map = at::empty({T * k}, ids.options());
  const int index_blocks = permute_index_form(T * k);
  at::Tensor counts = at::empty({permute_workspace_ints(static_cast<int>(num_experts), index_blocks)}, ids.options());
  C10_CUDA_CHECK(launch_permute(hidden.data_ptr(), ids.data_ptr<int32_t>(), T, static_cast<int>(k), H,
                                static_cast<int>(hidden.element_size()), static_cast<int>(num_experts),
                                static_cast<int>(pad_to), S, index_blocks, permuted.data_ptr(), offsets.data_ptr<int32_t>(),
                                row_map.data_ptr<int32_t>(), counts.data_ptr<int32_t>(),
                                c10::cuda::getCurrentCUDAStream()));
  return {permuted, offsets, row_map};
}

at::Tensor unpermute_cuda(const at::Tensor& expert_out_in, const at::Tensor& row_map_in,
                          const at::Tensor& topk_weights_in, const std::optional<at::Tensor>& shared_out_in,
                          const std::optional<at::Tensor>& residual_in) {
  check_unpermute(expert_out_in, row_map_in, topk_weights_in, shared_out_in, residual_in);
  c10::cuda::CUDAGuard guard(expert_out_in.device());
  const at::Tensor expert_out = expert_out_in.contiguous();
  const at::Tensor row_map = row_map_in.contiguous();
  const at::Tensor weights = topk_weights_in.contiguous();
  at::Tensor shared_out, residual;
  if (shared_out_in.has_value()) shared_out = shared_out_in->contiguous();
  if (residual_in.has_value()) residual = residual_in->contiguous();
  const int64_t T = weights.size(0), k = weights.size(1), H = expert_out.size(1);
  TORCH_CHECK_VALUE(T <= kInt32Max, "dots1_ext: topk_weights.shape[0] must fit in int32, got ", T);
  at::Tensor out = at::empty({T, H}, expert_out.options());
  C10_CUDA_CHECK(launch_unpermute(expert_out.data_ptr(), row_map.data_ptr<int32_t>(), weights.data_ptr<float>(),
                                  shared_out.defined() ? shared_out.data_ptr() : nullptr,
                                  residual.defined() ? residual.data_ptr() : nullptr,
                                  to_dtype(expert_out.scalar_type()), T, static_cast<int>(k), H, expert_out.size(0),
                                  out.data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

#endif  // DOTS1_WITH_CUDA

}  // namespace
}  // namespace dots1

TORCH_LIBRARY_IMPL(dots1_ext, CPU, m) {
  m.impl("permute", &dots1::permute_cpu);
  m.impl("unpermute", &dots1::unpermute_cpu);
}

#ifdef DOTS1_WITH_CUDA
TORCH_LIBRARY_IMPL(dots1_ext, CUDA, m) {
  m.impl("permute", &dots1::permute_cuda);
  m.impl("unpermute", &dots1::unpermute_cuda);
}
#endif
