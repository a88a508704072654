// Tensor-level code of the MoE decode family: argument checks, the C++ CPU kernels and the CUDA
// entry points that call the launchers of moe_decode.h.
//
// Ops (schemas in csrc/registry.cpp, semantics in dots1_ext/reference.py):
//   moe_decode_gate_up(hidden [T, H], gate_up [E, 2I, H], topk_ids [T, k] int32, shared_gate_up [2Is, H]?,
//                      epilogue "swiglu" | "swiglu_interleaved") -> act [T, k*I + Is]
//   moe_decode_down(act [T, k*I + Is], down [E, H, I], topk_ids [T, k] int32, topk_weights [T, k] fp32,
//                   shared_down [H, Is]?, residual [T, H]?, shared_act [T, Is]?) -> out [T, H]
//                   (with shared_act, the shared experts' columns come from it and act is [T, k*I])
//   moe_decode_int4_gate_up / moe_decode_int4_down: the same, the routed weights in the int4 format
//                   (qweight [E, N, K/2] uint8, scales [E, N, K/128] bf16, zeros [E, N, K/128] uint8 or None;
//                   docs/design.md §7): exactly the ops above on the dequantized weights (each element
//                   (u - z) * s rounded once to the activations' dtype).
//
// Numerics (every backend): fp32 dot products of the dtype's values; gate_up applies silu(gate) * up
// in fp32 and rounds once (as reference.grouped_gemm's SwiGLU epilogue); down sums
// w[t, j] * dot_j for j = 0 .. k-1, then the shared experts' dot, then the residual, in fp32 in that
// order (each product and sum rounded to fp32 separately), and rounds once.
//
// Poison policy: an id outside [0, E) never reaches memory; its pair's act columns are NaN (gate_up)
// and its token's whole output row is NaN (down). Duplicate ids within a row are computed as given.
//
// The weights are read where they lie, never copied per call: they must be contiguous and 16-byte
// aligned (as grouped_gemm's); activations are copied when their layout needs it (they are small).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "common.h"
#include "moe_decode/moe_decode.h"

#ifdef DOTS1_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace dots1 {
namespace {

const std::initializer_list<at::ScalarType> kFloatTypes = {at::kFloat, at::kHalf, at::kBFloat16};

// ---------------------------------------------------------------------------------------------
// Checks (mirror dots1_ext/ops/moe_decode.py)

void check_weight_layout(const at::Tensor& w, const char* name, const char* layout) {
  TORCH_CHECK_VALUE(w.is_contiguous(), "dots1_ext: ", name, " must be contiguous (", layout,
                    ", rows packed), got strides ", w.strides(), " for shape ", w.sizes(),
                    "; make it contiguous once, at load");
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0, "dots1_ext: ", name,
                    " must start at a 16-byte aligned address, got an offset of ",
                    reinterpret_cast<uintptr_t>(w.data_ptr()) % 16, " bytes; copy it once, at load (.clone())");
}

struct GateUpShape {
  int64_t T, H, E, k, I, Is;
  bool interleaved;
};

void check_fits_int32(int64_t T, int64_t k, int64_t E) {
  TORCH_CHECK_VALUE(T <= std::numeric_limits<int32_t>::max() && k <= std::numeric_limits<int32_t>::max() &&
                        E <= std::numeric_limits<int32_t>::max(),
                    "dots1_ext: T, k and E must fit in int32, got ", T, ", ", k, ", ", E);
}

// check_gate_up after the routed weight [E, N = 2I, H] (dense or int4) and topk_ids were checked: the
// shared experts' weight and the int32 limits.
GateUpShape check_gate_up_rest(const at::Tensor& hidden, int64_t E, int64_t H, int64_t N, bool interleaved,
                               const at::Tensor& topk_ids, const std::optional<at::Tensor>& shared_gate_up) {
  int64_t Is = 0;
  if (shared_gate_up.has_value()) {
    const at::Tensor& s = *shared_gate_up;
    check_dtype(s, "shared_gate_up", {hidden.scalar_type()});
    check_shape(s, "shared_gate_up", {-1, H});
    check_same_device(s, "shared_gate_up", hidden, "hidden");
    TORCH_CHECK_VALUE(s.size(0) % 2 == 0,
                      "dots1_ext: shared_gate_up.shape[0] (gate rows then up rows, 2Is) must be even, got ", s.size(0));
    check_weight_layout(s, "shared_gate_up", "[2Is, H] with H contiguous");
    Is = s.size(0) / 2;
  }
  const int64_t T = hidden.size(0), k = topk_ids.size(1);
  check_fits_int32(T, k, E);
  return {T, H, E, k, N / 2, Is, interleaved};
}

GateUpShape check_gate_up(const at::Tensor& hidden, const at::Tensor& gate_up, const at::Tensor& topk_ids,
                          const std::optional<at::Tensor>& shared_gate_up, const std::string& epilogue) {
  check_dtype(hidden, "hidden", kFloatTypes);
  check_shape(hidden, "hidden", {-1, -1});
  const int64_t T = hidden.size(0), H = hidden.size(1);
  check_dtype(gate_up, "gate_up", {hidden.scalar_type()});
  check_shape(gate_up, "gate_up", {-1, -1, H});
  check_same_device(gate_up, "gate_up", hidden, "hidden");
  TORCH_CHECK_VALUE(epilogue == "swiglu" || epilogue == "swiglu_interleaved",
                    "dots1_ext: epilogue must be one of ('swiglu', 'swiglu_interleaved'), got '", epilogue, "'");
  const bool interleaved = epilogue == "swiglu_interleaved";
  const int64_t N = gate_up.size(1);
  TORCH_CHECK_VALUE(N % 2 == 0, "dots1_ext: gate_up.shape[1] (gate + up rows, 2I) must be even, got ", N);
  TORCH_CHECK_VALUE(!interleaved || N % 16 == 0,
                    "dots1_ext: epilogue 'swiglu_interleaved' needs gate_up.shape[1] (2I) to be a multiple of 16 "
                    "(whole [8 gate | 8 up] blocks), got ", N);
  check_dtype(topk_ids, "topk_ids", {at::kInt});
  check_shape(topk_ids, "topk_ids", {T, -1});
  check_same_device(topk_ids, "topk_ids", hidden, "hidden");
  check_weight_layout(gate_up, "gate_up", "[E, 2I, H] with H contiguous");
  return check_gate_up_rest(hidden, gate_up.size(0), H, N, interleaved, topk_ids, shared_gate_up);
}

struct DownShape {
  int64_t T, H, E, k, I, Is;
};

DownShape check_down_rest(const at::Tensor& act, int64_t E, int64_t H, int64_t I, const at::Tensor& topk_ids,
                          const at::Tensor& topk_weights, const std::optional<at::Tensor>& shared_down,
                          const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& shared_act);

DownShape check_down(const at::Tensor& act, const at::Tensor& down, const at::Tensor& topk_ids,
                     const at::Tensor& topk_weights, const std::optional<at::Tensor>& shared_down,
                     const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& shared_act) {
  check_dtype(act, "act", kFloatTypes);
  check_shape(act, "act", {-1, -1});
  check_dtype(down, "down", {act.scalar_type()});
  check_shape(down, "down", {-1, -1, -1});
  check_same_device(down, "down", act, "act");
  check_weight_layout(down, "down", "[E, H, I] with I contiguous");
  return check_down_rest(act, down.size(0), down.size(1), down.size(2), topk_ids, topk_weights, shared_down, residual,
                         shared_act);
}

// check_down after the routed weight [E, H, I] (dense or int4) was checked.
DownShape check_down_rest(const at::Tensor& act, int64_t E, int64_t H, int64_t I, const at::Tensor& topk_ids,
                          const at::Tensor& topk_weights, const std::optional<at::Tensor>& shared_down,
                          const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& shared_act) {
  const int64_t T = act.size(0);
  check_dtype(topk_ids, "topk_ids", {at::kInt});
  check_shape(topk_ids, "topk_ids", {T, -1});
  check_same_device(topk_ids, "topk_ids", act, "act");
  const int64_t k = topk_ids.size(1);
  check_dtype(topk_weights, "topk_weights", {at::kFloat});
  check_shape(topk_weights, "topk_weights", {T, k});
  check_same_device(topk_weights, "topk_weights", act, "act");
  int64_t Is = 0;
  if (shared_down.has_value()) {
    const at::Tensor& s = *shared_down;
    check_dtype(s, "shared_down", {act.scalar_type()});
    check_shape(s, "shared_down", {H, -1});
    check_same_device(s, "shared_down", act, "act");
    check_weight_layout(s, "shared_down", "[H, Is] with Is contiguous");
    Is = s.size(1);
  }
  if (shared_act.has_value()) {
    TORCH_CHECK_VALUE(shared_down.has_value(), "dots1_ext: shared_act needs shared_down (the shared experts' down "
                      "weight [H, Is]), got None");
    check_dtype(*shared_act, "shared_act", {act.scalar_type()});
    check_shape(*shared_act, "shared_act", {T, Is});
    check_same_device(*shared_act, "shared_act", act, "act");
    TORCH_CHECK_VALUE(act.size(1) == k * I, "dots1_ext: act must have shape [T, k*I] = [", T, ", ", k * I,
                      "] when shared_act holds the shared experts' columns (k=", k, " from topk_ids, I=", I,
                      " from down), got ", act.sizes());
  } else {
    TORCH_CHECK_VALUE(act.size(1) == k * I + Is, "dots1_ext: act must have shape [T, k*I + Is] = [", T, ", ",
                      k * I + Is, "] (k=", k, " from topk_ids, I=", I, " from down, Is=", Is,
                      " from shared_down), got ", act.sizes());
  }
  if (residual.has_value()) {
    check_dtype(*residual, "residual", {act.scalar_type()});
    check_shape(*residual, "residual", {T, H});
    check_same_device(*residual, "residual", act, "act");
  }
  check_fits_int32(T, k, E);
  return {T, H, E, k, I, Is};
}

// The int4 routed weights of `what` ("gate_up" / "down"): qweight [E, N, K/2] uint8, scales [E, N, K/128]
// bf16, zeros [E, N, K/128] uint8 or None, on `ref`'s device; K % 128 == 0. Returns {E, N, K}.
constexpr int64_t kInt4Group = 128;

std::array<int64_t, 3> check_int4_weight(const std::string& what, const at::Tensor& qweight, const at::Tensor& scales,
                                         const std::optional<at::Tensor>& zeros, const at::Tensor& ref,
                                         const char* ref_name) {
  const std::string qn = what + "_qweight", sn = what + "_scales", zn = what + "_zeros";
  check_dtype(qweight, qn.c_str(), {at::kByte});
  check_shape(qweight, qn.c_str(), {-1, -1, -1});
  check_same_device(qweight, qn.c_str(), ref, ref_name);
  const int64_t E = qweight.size(0), N = qweight.size(1), K = 2 * qweight.size(2);
  TORCH_CHECK_VALUE(K > 0 && K % kInt4Group == 0, "dots1_ext: ", qn, ": the reduction dimension K = 2 x ",
                    qweight.size(2), " = ", K, " must be a positive multiple of the int4 group size ", kInt4Group);
  check_weight_layout(qweight, qn.c_str(), "[E, N, K/2] uint8, two codes per byte");
  check_dtype(scales, sn.c_str(), {at::kBFloat16});
  check_shape(scales, sn.c_str(), {E, N, K / kInt4Group});
  check_same_device(scales, sn.c_str(), ref, ref_name);
  TORCH_CHECK_VALUE(scales.is_contiguous(), "dots1_ext: ", sn, " must be contiguous, got strides ", scales.strides());
  if (zeros.has_value()) {
    check_dtype(*zeros, zn.c_str(), {at::kByte});
    check_shape(*zeros, zn.c_str(), {E, N, K / kInt4Group});
    check_same_device(*zeros, zn.c_str(), ref, ref_name);
    TORCH_CHECK_VALUE(zeros->is_contiguous(), "dots1_ext: ", zn, " must be contiguous, got strides ",
                      zeros->strides());
  }
  return {E, N, K};
}

// The checks of check_gate_up with the int4 weight in place of gate_up.
GateUpShape check_int4_gate_up(const at::Tensor& hidden, const at::Tensor& qweight, const at::Tensor& scales,
                               const std::optional<at::Tensor>& zeros, const at::Tensor& topk_ids,
                               const std::optional<at::Tensor>& shared_gate_up, const std::string& epilogue) {
  check_dtype(hidden, "hidden", kFloatTypes);
  check_shape(hidden, "hidden", {-1, -1});
  const auto [E, N, K] = check_int4_weight("gate_up", qweight, scales, zeros, hidden, "hidden");
  TORCH_CHECK_VALUE(K == hidden.size(1), "dots1_ext: gate_up_qweight must have shape [E, 2I, H/2] = [E, 2I, ",
                    hidden.size(1) / 2, "] (H = ", hidden.size(1), " from hidden), got ", qweight.sizes());
  TORCH_CHECK_VALUE(epilogue == "swiglu" || epilogue == "swiglu_interleaved",
                    "dots1_ext: epilogue must be one of ('swiglu', 'swiglu_interleaved'), got '", epilogue, "'");
  TORCH_CHECK_VALUE(N % 2 == 0, "dots1_ext: gate_up_qweight.shape[1] (gate + up rows, 2I) must be even, got ", N);
  TORCH_CHECK_VALUE(epilogue != "swiglu_interleaved" || N % 16 == 0,
                    "dots1_ext: epilogue 'swiglu_interleaved' needs gate_up_qweight.shape[1] (2I) to be a multiple of "
                    "16 (whole [8 gate | 8 up] blocks), got ", N);
  const int64_t T = hidden.size(0), H = K;
  check_dtype(topk_ids, "topk_ids", {at::kInt});
  check_shape(topk_ids, "topk_ids", {T, -1});
  check_same_device(topk_ids, "topk_ids", hidden, "hidden");
  return check_gate_up_rest(hidden, E, H, N, epilogue == "swiglu_interleaved", topk_ids, shared_gate_up);
}

// The checks of check_down with the int4 weight in place of down.
DownShape check_int4_down(const at::Tensor& act, const at::Tensor& qweight, const at::Tensor& scales,
                          const std::optional<at::Tensor>& zeros, const at::Tensor& topk_ids,
                          const at::Tensor& topk_weights, const std::optional<at::Tensor>& shared_down,
                          const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& shared_act) {
  check_dtype(act, "act", kFloatTypes);
  check_shape(act, "act", {-1, -1});
  const auto [E, H, I] = check_int4_weight("down", qweight, scales, zeros, act, "act");
  return check_down_rest(act, E, H, I, topk_ids, topk_weights, shared_down, residual, shared_act);
}

// ---------------------------------------------------------------------------------------------
// CPU kernels: per distinct expert, the tokens that chose it as one fp32 matmul.

// Valid pairs (t*k + j) grouped by expert, experts in increasing order.
std::map<int32_t, std::vector<int64_t>> pairs_by_expert(const int32_t* ids, int64_t P, int64_t E) {
  std::map<int32_t, std::vector<int64_t>> groups;
  for (int64_t p = 0; p < P; ++p)
    if (ids[p] >= 0 && ids[p] < E) groups[ids[p]].push_back(p);
  return groups;
}

at::Tensor pair_index(const std::vector<int64_t>& v) {
  return at::from_blob(const_cast<int64_t*>(v.data()), {static_cast<int64_t>(v.size())}, at::kLong).clone();
}

// silu(gate) * up of the fp32 product y [n, 2I] whose columns are in `interleaved` or HF order.
at::Tensor swiglu_of(const at::Tensor& y, int64_t I, bool interleaved) {
  const int64_t n = y.size(0);
  if (interleaved) {
    const at::Tensor blocks = y.view({n, I / 8, 2, 8});
    return at::silu(blocks.select(2, 0).reshape({n, I})) * blocks.select(2, 1).reshape({n, I});
  }
  return at::silu(y.narrow(1, 0, I)) * y.narrow(1, I, I);
}

// Expert e's routed weight [N, K] in fp32 (its values in the activations' dtype, widened).
using ExpertWeight = std::function<at::Tensor(int64_t)>;

// Expert e of an int4 weight (check_int4_weight), dequantized as dots1_ext.quant.dequantize_int4:
// (u - z) * s exact in fp32, rounded once to `dtype`, then widened back to fp32.
at::Tensor dequantize_int4_expert(const at::Tensor& qweight, const at::Tensor& scales,
                                  const std::optional<at::Tensor>& zeros, int64_t e, at::ScalarType dtype) {
  const at::Tensor q = qweight.select(0, e);  // [N, K/2]
  const int64_t N = q.size(0), K = 2 * q.size(1), G = K / kInt4Group;
  const at::Tensor codes = at::stack({at::bitwise_and(q, 15), at::bitwise_right_shift(q, 4)}, -1)
                               .reshape({N, G, kInt4Group})
                               .to(at::kFloat);
  const at::Tensor s = scales.select(0, e).to(at::kFloat).unsqueeze(-1);
  const at::Tensor z = zeros.has_value() ? zeros->select(0, e).to(at::kFloat).unsqueeze(-1)
                                         : at::full({1}, 8.0f, codes.options());
  return ((codes - z) * s).reshape({N, K}).to(dtype).to(at::kFloat);
}

at::Tensor gate_up_cpu(const at::Tensor& hidden_in, const GateUpShape& g, const at::Tensor& topk_ids_in,
                       const std::optional<at::Tensor>& shared_gate_up, const ExpertWeight& expert_weight) {
  const at::Tensor x = hidden_in.to(at::kFloat).contiguous();
  const at::Tensor ids = topk_ids_in.contiguous();
  const int64_t NA = g.k * g.I + g.Is;
  at::Tensor act = at::empty({g.T, NA}, hidden_in.options());
  // Routed columns, one row per pair (t*k + j): [T*k, I]; pairs with a bad id stay NaN.
  at::Tensor routed = at::full({g.T * g.k, g.I}, std::numeric_limits<float>::quiet_NaN(), act.options());
  for (const auto& [e, pairs] : pairs_by_expert(ids.data_ptr<int32_t>(), g.T * g.k, g.E)) {
    std::vector<int64_t> tokens(pairs.size());
    for (size_t i = 0; i < pairs.size(); ++i) tokens[i] = pairs[i] / g.k;
    const at::Tensor y = at::matmul(x.index_select(0, pair_index(tokens)), expert_weight(e).t());
    routed.index_copy_(0, pair_index(pairs), swiglu_of(y, g.I, g.interleaved).to(act.scalar_type()));
  }
  act.narrow(1, 0, g.k * g.I).copy_(routed.view({g.T, g.k * g.I}));
  if (g.Is > 0) {
    const at::Tensor y = at::matmul(x, shared_gate_up->to(at::kFloat).t());
    act.narrow(1, g.k * g.I, g.Is).copy_(swiglu_of(y, g.Is, /*interleaved=*/false).to(act.scalar_type()));
  }
  return act;
}

at::Tensor down_cpu(const at::Tensor& act_in, const DownShape& d, const at::Tensor& topk_ids_in,
                    const at::Tensor& topk_weights, const std::optional<at::Tensor>& shared_down,
                    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& shared_act,
                    const ExpertWeight& expert_weight) {
  const at::Tensor a = act_in.to(at::kFloat).contiguous();
  const at::Tensor ids = topk_ids_in.contiguous();
  const int32_t* id = ids.data_ptr<int32_t>();
  // terms[t*k + j] = down[ids[t, j]] @ act[t, j*I:(j+1)*I] in fp32 (zero for a bad id: poisoned below).
  at::Tensor terms = at::zeros({d.T * d.k, d.H}, a.options());
  const at::Tensor routed = a.narrow(1, 0, d.k * d.I).reshape({d.T * d.k, d.I});
  for (const auto& [e, pairs] : pairs_by_expert(id, d.T * d.k, d.E)) {
    const at::Tensor p = pair_index(pairs);
    terms.index_copy_(0, p, at::matmul(routed.index_select(0, p), expert_weight(e).t()));
  }
  terms = terms.view({d.T, d.k, d.H});
  const at::Tensor w = topk_weights.to(at::kFloat);
  at::Tensor acc = at::zeros({d.T, d.H}, a.options());
  for (int64_t j = 0; j < d.k; ++j) acc = acc + w.narrow(1, j, 1) * terms.select(1, j);
  if (d.Is > 0) {
    const at::Tensor s = shared_act.has_value() ? shared_act->to(at::kFloat) : a.narrow(1, d.k * d.I, d.Is);
    acc = acc + at::matmul(s, shared_down->to(at::kFloat).t());
  }
  if (residual.has_value()) acc = acc + residual->to(at::kFloat);
  std::vector<uint8_t> bad(d.T, 0);
  for (int64_t p = 0; p < d.T * d.k; ++p)
    if (id[p] < 0 || id[p] >= d.E) bad[p / d.k] = 1;
  for (int64_t t = 0; t < d.T; ++t)
    if (bad[t]) acc.select(0, t).fill_(std::numeric_limits<float>::quiet_NaN());
  return acc.to(act_in.scalar_type());
}

// hidden_settled only moves the CUDA kernel's PDL wait (csrc/pdl.cuh): no meaning here.
at::Tensor moe_decode_gate_up_cpu(const at::Tensor& hidden, const at::Tensor& gate_up, const at::Tensor& topk_ids,
                                  const std::optional<at::Tensor>& shared_gate_up, c10::string_view epilogue,
                                  bool /*hidden_settled*/) {
  const GateUpShape g = check_gate_up(hidden, gate_up, topk_ids, shared_gate_up, std::string(epilogue));
  return gate_up_cpu(hidden, g, topk_ids, shared_gate_up,
                     [&](int64_t e) { return gate_up.select(0, e).to(at::kFloat); });
}

at::Tensor moe_decode_down_cpu(const at::Tensor& act, const at::Tensor& down, const at::Tensor& topk_ids,
                               const at::Tensor& topk_weights, const std::optional<at::Tensor>& shared_down,
                               const std::optional<at::Tensor>& residual,
                               const std::optional<at::Tensor>& shared_act) {
  const DownShape d = check_down(act, down, topk_ids, topk_weights, shared_down, residual, shared_act);
  return down_cpu(act, d, topk_ids, topk_weights, shared_down, residual, shared_act,
                  [&](int64_t e) { return down.select(0, e).to(at::kFloat); });
}

// int4: each touched expert dequantized once (the reference rule), then the same CPU math.
at::Tensor moe_decode_int4_gate_up_cpu(const at::Tensor& hidden, const at::Tensor& qweight, const at::Tensor& scales,
                                       const std::optional<at::Tensor>& zeros, const at::Tensor& topk_ids,
                                       const std::optional<at::Tensor>& shared_gate_up, c10::string_view epilogue,
                                       bool /*hidden_settled*/) {
  const GateUpShape g =
      check_int4_gate_up(hidden, qweight, scales, zeros, topk_ids, shared_gate_up, std::string(epilogue));
  const at::ScalarType dtype = hidden.scalar_type();
  return gate_up_cpu(hidden, g, topk_ids, shared_gate_up,
                     [&](int64_t e) { return dequantize_int4_expert(qweight, scales, zeros, e, dtype); });
}

at::Tensor moe_decode_int4_down_cpu(const at::Tensor& act, const at::Tensor& qweight, const at::Tensor& scales,
                                    const std::optional<at::Tensor>& zeros, const at::Tensor& topk_ids,
                                    const at::Tensor& topk_weights, const std::optional<at::Tensor>& shared_down,
                                    const std::optional<at::Tensor>& residual,
                                    const std::optional<at::Tensor>& shared_act) {
  const DownShape d =
      check_int4_down(act, qweight, scales, zeros, topk_ids, topk_weights, shared_down, residual, shared_act);
  const at::ScalarType dtype = act.scalar_type();
  return down_cpu(act, d, topk_ids, topk_weights, shared_down, residual, shared_act,
                  [&](int64_t e) { return dequantize_int4_expert(qweight, scales, zeros, e, dtype); });
}

// ---------------------------------------------------------------------------------------------
// CUDA

#ifdef DOTS1_WITH_CUDA

// DOTS1_EXT_MOE_DECODE_NT (read per call; unset or empty: by token count): the fast kernels' n-tiles of
// 8 columns per MMA, 1, 2 or 4 (benchmarks compare them; every value computes a correct result, the
// bits may differ between values). Any other value raises ValueError.
int moe_decode_n_tiles() {
  const char* v = std::getenv("DOTS1_EXT_MOE_DECODE_NT");
  if (v == nullptr || *v == '\0') return 0;
  const std::string s(v);
  TORCH_CHECK_VALUE(s == "1" || s == "2" || s == "4", "dots1_ext: DOTS1_EXT_MOE_DECODE_NT must be 1, 2 or 4, got '",
                    s, "'");
  return s[0] - '0';
}

// DOTS1_EXT_MOE_DECODE_LOADS (read per call, so a benchmark can time all in one process; unset or empty:
// wide_all): the fast kernels' weight-load mapping for model-dtype weights, frag, wide or wide_all
// (moe_decode.h MoeDecodeLoads). Any other value raises ValueError.
MoeDecodeLoads moe_decode_loads() {
  const char* v = std::getenv("DOTS1_EXT_MOE_DECODE_LOADS");
  // Wide up to 8 tokens (H200, 48bd321): the 8-layer B=1 step 1.52 -> 1.35 ms with the skinny GEMM's
  // wide kernel; B=8 3.86 -> 3.77 ms. Wide above 8 too (H200, real shape, bench/results/
  // 2026-11-30-h200-06dd60c-moe-decode-defaults): T = 16 / 32 / 64 0.589 / 0.867 / 1.098 ms with frag
  // there, 0.577 / 0.852 / 1.075 ms.
  if (v == nullptr || *v == '\0') return MoeDecodeLoads::kWideAll;
  const std::string s(v);
  TORCH_CHECK_VALUE(s == "frag" || s == "wide" || s == "wide_all",
                    "dots1_ext: DOTS1_EXT_MOE_DECODE_LOADS must be frag, wide or wide_all, got '", s, "'");
  return s == "wide" ? MoeDecodeLoads::kWide : s == "wide_all" ? MoeDecodeLoads::kWideAll : MoeDecodeLoads::kFrag;
}

// DOTS1_EXT_MOE_DECODE_INT4_STAGED (read per call; unset or empty: auto): whether the int4 gate_up kernel
// streams its routed tiles through shared memory (moe_decode.h) or keeps them in registers; same bits.
// auto stages above 8 tokens (H200, 2026-11-30-h200-06dd60c-moe-decode-defaults: T = 1-8 staged 7-10%
// slower, T = 16-64 6-9% faster), 1 always, 0 never. Any other value raises ValueError.
bool moe_decode_int4_staged(int64_t tokens) {
  const char* v = std::getenv("DOTS1_EXT_MOE_DECODE_INT4_STAGED");
  if (v == nullptr || *v == '\0') return tokens > 8;
  const std::string s(v);
  TORCH_CHECK_VALUE(s == "auto" || s == "0" || s == "1",
                    "dots1_ext: DOTS1_EXT_MOE_DECODE_INT4_STAGED must be auto, 0 or 1, got '", s, "'");
  return s == "auto" ? tokens > 8 : s == "1";
}

// DOTS1_EXT_MOE_DECODE_INT4_ROW_GROUPS (read per call; unset or empty: 4, or 1 where the launch is
// staged): the int4 gate_up kernel's routed tiles of 8 x R features, R = 1, 2 or 4 (moe_decode.h), for
// launches of up to 8 tokens (H200, bench/results/2026-11-30-h200-0e68104-int4-row-groups: R = 4
// against 1, gate_up 15-20% and the pair 11-14% faster at T = 1-8). The staged stream takes tiles of
// one row group, so R = 2 or 4 with STAGED=1 at up to 8 tokens raises ValueError, as does any other value.
int moe_decode_int4_row_groups(int64_t tokens, bool staged) {
  const char* v = std::getenv("DOTS1_EXT_MOE_DECODE_INT4_ROW_GROUPS");
  if (v == nullptr || *v == '\0') return staged ? 1 : 4;
  const std::string s(v);
  TORCH_CHECK_VALUE(s == "1" || s == "2" || s == "4",
                    "dots1_ext: DOTS1_EXT_MOE_DECODE_INT4_ROW_GROUPS must be 1, 2 or 4, got '", s, "'");
  TORCH_CHECK_VALUE(s == "1" || !staged || tokens > 8, "dots1_ext: DOTS1_EXT_MOE_DECODE_INT4_ROW_GROUPS=", s,
                    " and DOTS1_EXT_MOE_DECODE_INT4_STAGED=1 cannot combine at ", tokens,
                    " tokens: the staged stream takes tiles of one row group");
  return std::stoi(s);
}

// A 0 / 1 switch read per call: unset or empty gives on_by_default; any value but 0 or 1 raises ValueError
// naming the variable.
bool env_switch(const char* name, bool on_by_default) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return on_by_default;
  const std::string s(v);
  TORCH_CHECK_VALUE(s == "0" || s == "1", "dots1_ext: ", name, " must be 0 or 1, got '", s, "'");
  return s == "1";
}

// DOTS1_EXT_MOE_DECODE_INT4_ACT_SMEM (read per call; unset or empty: 1): whether the int4 gate_up kernel
// (4 row groups; one token with H <= 8192, or 3-8 tokens with T H <= 32768) reads the tokens' activations
// from a shared-memory copy laid out as its MMA operands; same bits either way (H200, real shape, bench/
// results/2026-11-30-h200-1b2a918-act-smem: at one token gate_up alone 30.6 -> 29.4 us, the 8-layer
// step's MoE block 53.7 -> 52.9 us; at 8 tokens the pair 176-179 -> 172-174 us). Any value other than 0
// or 1 raises ValueError.
bool moe_decode_int4_act_smem() { return env_switch("DOTS1_EXT_MOE_DECODE_INT4_ACT_SMEM", true); }

// DOTS1_EXT_MOE_DECODE_CARRY (read per call; unset or empty: 1): whether the model-dtype gate_up kernel's
// wide launches of two n-tiles (5-64 tokens by default) load each warp's first weight batch of its next
// routed tile before the current tile's reduction and store; same bits either way (H200, real shape,
// bench/results/2026-11-30-h200-10b2424-carry: gate_up 241 -> 227 us at 8 tokens, 579 -> 565 at 32, 725
// -> 710 at 64). Any value other than 0 or 1 raises ValueError.
bool moe_decode_carry_tiles() { return env_switch("DOTS1_EXT_MOE_DECODE_CARRY", true); }

// DOTS1_EXT_MOE_DECODE_DOWN_PRELOAD (read per call; unset or empty: 1): whether the down kernels' warps
// load their first weight batch of the shared experts' first pass before the PDL wait; same bits either
// way. Any value other than 0 or 1 raises ValueError.
bool moe_decode_down_preload() { return env_switch("DOTS1_EXT_MOE_DECODE_DOWN_PRELOAD", true); }

// A pointer usable by 16-byte vector loads; otherwise a fresh (aligned) copy. Activations only.
at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

// The launchers read DOTS1_EXT_MOE_DECODE_KERNEL themselves ("simple" forces the fallback kernels);
// a value they would not recognise is an error here rather than silently the default.
void check_kernel_env() {
  const char* v = std::getenv("DOTS1_EXT_MOE_DECODE_KERNEL");
  if (v == nullptr || *v == '\0') return;
  const std::string s(v);
  TORCH_CHECK_VALUE(s == "auto" || s == "fast" || s == "simple",
                    "dots1_ext: DOTS1_EXT_MOE_DECODE_KERNEL must be auto, fast or simple, got '", s, "'");
}

// hidden_settled holds for the caller's hidden; a copy made here (aligned_contiguous) is written by the
// launch right before the kernel, so the kernel must wait before reading it.
bool settled_after_copy(const at::Tensor& hidden, const at::Tensor& hidden_in, bool hidden_settled) {
  return hidden_settled && hidden.data_ptr() == hidden_in.data_ptr();
}

at::Tensor moe_decode_gate_up_cuda(const at::Tensor& hidden_in, const at::Tensor& gate_up,
                                   const at::Tensor& topk_ids_in, const std::optional<at::Tensor>& shared_gate_up,
                                   c10::string_view epilogue_view, bool hidden_settled) {
  check_kernel_env();
  const GateUpShape g = check_gate_up(hidden_in, gate_up, topk_ids_in, shared_gate_up, std::string(epilogue_view));
  c10::cuda::CUDAGuard guard(hidden_in.device());
  const at::Tensor hidden = aligned_contiguous(hidden_in);
  const at::Tensor ids = topk_ids_in.contiguous();
  at::Tensor act = at::empty({g.T, g.k * g.I + g.Is}, hidden.options());
  C10_CUDA_CHECK(launch_moe_decode_gate_up(
      hidden.data_ptr(), gate_up.data_ptr(), ids.data_ptr<int32_t>(),
      shared_gate_up.has_value() ? shared_gate_up->data_ptr() : nullptr, act.data_ptr(), g.T, g.H, g.E, g.k, g.I,
      g.Is, g.interleaved ? MoeGateUpLayout::kInterleaved : MoeGateUpLayout::kHF, to_dtype(hidden.scalar_type()),
      moe_decode_n_tiles(), moe_decode_loads(), c10::cuda::getCurrentCUDAStream(), pdl_enabled(),
      settled_after_copy(hidden, hidden_in, hidden_settled), moe_decode_carry_tiles()));
  return act;
}

// The down ops' tensors as the kernels read them (on the current device): act aligned and contiguous,
// the ids, weights and residual contiguous; and the output [T, H], new.
struct DownInputs {
  at::Tensor act, shared_act, ids, weights, residual, out;
};

DownInputs down_inputs(const DownShape& d, const at::Tensor& act_in, const at::Tensor& topk_ids_in,
                       const at::Tensor& topk_weights_in, const std::optional<at::Tensor>& residual_in,
                       const std::optional<at::Tensor>& shared_act_in) {
  DownInputs in;
  in.act = aligned_contiguous(act_in);
  if (shared_act_in.has_value()) in.shared_act = aligned_contiguous(*shared_act_in);
  in.ids = topk_ids_in.contiguous();
  in.weights = topk_weights_in.contiguous();
  if (residual_in.has_value()) in.residual = residual_in->contiguous();
  in.out = at::empty({d.T, d.H}, in.act.options());
  return in;
}

at::Tensor moe_decode_down_cuda(const at::Tensor& act_in, const at::Tensor& down, const at::Tensor& topk_ids_in,
                                const at::Tensor& topk_weights_in, const std::optional<at::Tensor>& shared_down,
                                const std::optional<at::Tensor>& residual_in,
                                const std::optional<at::Tensor>& shared_act_in) {
  check_kernel_env();
  const DownShape d = check_down(act_in, down, topk_ids_in, topk_weights_in, shared_down, residual_in, shared_act_in);
  c10::cuda::CUDAGuard guard(act_in.device());
  const DownInputs in = down_inputs(d, act_in, topk_ids_in, topk_weights_in, residual_in, shared_act_in);
  C10_CUDA_CHECK(launch_moe_decode_down(in.act.data_ptr(), in.shared_act.defined() ? in.shared_act.data_ptr() : nullptr,
                                        down.data_ptr(), in.ids.data_ptr<int32_t>(),
                                        in.weights.data_ptr<float>(),
                                        shared_down.has_value() ? shared_down->data_ptr() : nullptr,
                                        in.residual.defined() ? in.residual.data_ptr() : nullptr, in.out.data_ptr(),
                                        d.T, d.H, d.E, d.k, d.I, d.Is, to_dtype(in.act.scalar_type()),
                                        moe_decode_n_tiles(), moe_decode_loads(), c10::cuda::getCurrentCUDAStream(),
                                        pdl_enabled(), moe_decode_down_preload()));
  return in.out;
}

at::Tensor moe_decode_int4_gate_up_cuda(const at::Tensor& hidden_in, const at::Tensor& qweight,
                                        const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                                        const at::Tensor& topk_ids_in, const std::optional<at::Tensor>& shared_gate_up,
                                        c10::string_view epilogue_view, bool hidden_settled) {
  check_kernel_env();
  const GateUpShape g =
      check_int4_gate_up(hidden_in, qweight, scales, zeros, topk_ids_in, shared_gate_up, std::string(epilogue_view));
  const bool staged = moe_decode_int4_staged(g.T);
  const int row_groups = moe_decode_int4_row_groups(g.T, staged);
  c10::cuda::CUDAGuard guard(hidden_in.device());
  const at::Tensor hidden = aligned_contiguous(hidden_in);
  const at::Tensor ids = topk_ids_in.contiguous();
  at::Tensor act = at::empty({g.T, g.k * g.I + g.Is}, hidden.options());
  C10_CUDA_CHECK(launch_moe_decode_int4_gate_up(
      hidden.data_ptr(), qweight.data_ptr<uint8_t>(), scales.data_ptr(),
      zeros.has_value() ? zeros->data_ptr<uint8_t>() : nullptr, ids.data_ptr<int32_t>(),
      shared_gate_up.has_value() ? shared_gate_up->data_ptr() : nullptr, act.data_ptr(), g.T, g.H, g.E, g.k, g.I,
      g.Is, g.interleaved ? MoeGateUpLayout::kInterleaved : MoeGateUpLayout::kHF, to_dtype(hidden.scalar_type()),
      moe_decode_n_tiles(), c10::cuda::getCurrentCUDAStream(), pdl_enabled(), staged, row_groups,
      moe_decode_int4_act_smem(), settled_after_copy(hidden, hidden_in, hidden_settled)));
  return act;
}

at::Tensor moe_decode_int4_down_cuda(const at::Tensor& act_in, const at::Tensor& qweight, const at::Tensor& scales,
                                     const std::optional<at::Tensor>& zeros, const at::Tensor& topk_ids_in,
                                     const at::Tensor& topk_weights_in, const std::optional<at::Tensor>& shared_down,
                                     const std::optional<at::Tensor>& residual_in,
                                     const std::optional<at::Tensor>& shared_act_in) {
  check_kernel_env();
  const DownShape d = check_int4_down(act_in, qweight, scales, zeros, topk_ids_in, topk_weights_in, shared_down,
                                      residual_in, shared_act_in);
  c10::cuda::CUDAGuard guard(act_in.device());
  const DownInputs in = down_inputs(d, act_in, topk_ids_in, topk_weights_in, residual_in, shared_act_in);
  C10_CUDA_CHECK(launch_moe_decode_int4_down(
      in.act.data_ptr(), in.shared_act.defined() ? in.shared_act.data_ptr() : nullptr, qweight.data_ptr<uint8_t>(),
      scales.data_ptr(),
      zeros.has_value() ? zeros->data_ptr<uint8_t>() : nullptr, in.ids.data_ptr<int32_t>(),
      in.weights.data_ptr<float>(), shared_down.has_value() ? shared_down->data_ptr() : nullptr,
      in.residual.defined() ? in.residual.data_ptr() : nullptr, in.out.data_ptr(), d.T, d.H, d.E, d.k, d.I, d.Is,
      to_dtype(in.act.scalar_type()), moe_decode_n_tiles(), c10::cuda::getCurrentCUDAStream(), pdl_enabled(),
      moe_decode_down_preload()));
  return in.out;
}

#endif  // DOTS1_WITH_CUDA

}  // namespace
}  // namespace dots1

TORCH_LIBRARY_IMPL(dots1_ext, CPU, m) {
  m.impl("moe_decode_gate_up", &dots1::moe_decode_gate_up_cpu);
  m.impl("moe_decode_down", &dots1::moe_decode_down_cpu);
  m.impl("moe_decode_int4_gate_up", &dots1::moe_decode_int4_gate_up_cpu);
  m.impl("moe_decode_int4_down", &dots1::moe_decode_int4_down_cpu);
}

#ifdef DOTS1_WITH_CUDA
TORCH_LIBRARY_IMPL(dots1_ext, CUDA, m) {
  m.impl("moe_decode_gate_up", &dots1::moe_decode_gate_up_cuda);
  m.impl("moe_decode_down", &dots1::moe_decode_down_cuda);
  m.impl("moe_decode_int4_gate_up", &dots1::moe_decode_int4_gate_up_cuda);
  m.impl("moe_decode_int4_down", &dots1::moe_decode_int4_down_cuda);
}
#endif
