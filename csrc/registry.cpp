// Every dots1_ext op schema, in one place. Backends (csrc/<family>/<family>.cpp) only register
// implementations with TORCH_LIBRARY_IMPL; fake (meta) kernels live in dots1_ext/ops/<family>.py.
//
// Shape letters: T tokens, E experts, k experts per token, H hidden, S permuted rows,
// N/K GEMM output/input features, Hq/Hk query/key heads, D head_dim, P cached positions.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(dots1_ext, m) {
  // ---- gating: csrc/gating ----
  // logits [T, E] fp32, bias [E] fp32 -> weights [T, k] fp32, ids [T, k] int32
  m.def("topk_gating(Tensor logits, Tensor bias, int k, int n_group, int topk_group, "
        "bool renormalize, float scale) -> (Tensor weights, Tensor ids)");
  // hidden [T, H], router_weight [E, H] (any float dtype; fp32 accumulate), bias [E] fp32
  m.def("router_topk_gating(Tensor hidden, Tensor router_weight, Tensor bias, int k, int n_group, "
        "int topk_group, bool renormalize, float scale) -> (Tensor weights, Tensor ids)");

  // ---- dispatch: csrc/dispatch ----
  // hidden [T, H], topk_ids [T, k] int32 -> permuted [S, H], expert_offsets [E+1] int32, row_map [T*k] int32
  m.def("permute(Tensor hidden, Tensor topk_ids, int num_experts, int pad_to) "
        "-> (Tensor permuted, Tensor expert_offsets, Tensor row_map)");
  // expert_out [S, H], row_map [T*k] int32, topk_weights [T, k] fp32, shared_out/residual [T, H] -> [T, H]
  m.def("unpermute(Tensor expert_out, Tensor row_map, Tensor topk_weights, Tensor? shared_out, "
        "Tensor? residual) -> Tensor");

  // ---- grouped GEMM: csrc/grouped_gemm ----
  // x [S, K], weight [E, N, K], expert_offsets [E+1] int32 -> [S, N] ("none") or [S, N/2] ("swiglu")
  m.def("grouped_gemm(Tensor x, Tensor weight, Tensor expert_offsets, str epilogue) -> Tensor");
  // The same with the weight in the int4 format (docs/design.md §7): x [S, K] bf16, qweight [E, N, K/2]
  // uint8, scales [E, N, K/128] bf16, zeros [E, N, K/128] uint8 or None (symmetric), K % 128 == 0;
  // epilogue "none" or "swiglu_interleaved" -> [S, N] or [S, N/2] bf16
  m.def("grouped_gemm_int4(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor expert_offsets, "
        "str epilogue) -> Tensor");

  // ---- decode step inputs: csrc/decode_step_inputs ----
  // One decode step's embedding and integer inputs: tokens [B] int64, slot [1] int64 (the step's cache
  // slot, a device value), cache_start [B] int64, embed_weight [V, H] -> x [B, H] (embed_weight row
  // tokens[b]; NaN for an id outside [0, V)), positions [B] = max(slot - cache_start[b], 0), cache_rows
  // [B] = b * cache_len + slot and kv_end [B] = slot + 1 (both -1 for a slot outside [0, cache_len),
  // past cache_filled [1] int64 (the slots written so far, which any other slot sets to slot + 1) or,
  // per sequence, before cache_start[b])
  m.def("decode_step_inputs(Tensor tokens, Tensor slot, Tensor cache_start, Tensor embed_weight, int cache_len, "
        "Tensor(a!) cache_filled) -> (Tensor x, Tensor positions, Tensor cache_rows, Tensor kv_end)");

  // ---- norms and RoPE: csrc/norm ----
  // x [T, H], weight [H] -> [T, H]
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // in place: residual += x; x = rms_norm(residual)
  m.def("add_rms_norm_(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  // in place: q [T, Hq, D], k [T, Hk, D]; positions [T] int64; cos_sin_cache [P, D] fp32
  m.def("qk_norm_rope_(Tensor(a!) q, Tensor(b!) k, Tensor q_weight, Tensor k_weight, "
        "Tensor positions, Tensor cos_sin_cache, float eps) -> ()");
  // as qk_norm_rope_, then k and v written to k_cache/v_cache ([..., Hk, D]) at rows cache_rows [T] int64
  m.def("qk_norm_rope_kv_cache_(Tensor(a!) q, Tensor(b!) k, Tensor v, Tensor q_weight, "
        "Tensor k_weight, Tensor positions, Tensor cos_sin_cache, float eps, Tensor(c!) k_cache, "
        "Tensor(d!) v_cache, Tensor cache_rows) -> ()");

  // ---- decode attention: csrc/attention ----
  // One query per sequence over the static cache. q [B, Hq, D]; k_cache/v_cache [B, S, Hk, D] (Hq a
  // multiple of Hk: query head h reads kv head h / (Hq / Hk)); kv_start/kv_end [B] int64 on the device:
  // sequence b attends to slots [kv_start[b], kv_end[b]), and with window > 0 only to slots
  // >= kv_end[b] - window (HF: a query at p sees (p - window, p]); window 0 = no window -> out [B, Hq, D]
  // kv_settled: the caller's promise that kv_start / kv_end and every cache row but slot kv_end - 1
  // predate the launch right before (the decode step's); the kernel then copies before its PDL wait.
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor kv_start, Tensor kv_end, "
        "int window, float scale, bool kv_settled=False) -> Tensor");
  // qk_norm_rope_kv_cache_ then decode_attention in one launch (csrc/attention/attention.cpp): raw q [B, Hq, D],
  // k, v [B, Hk, D] (not written), the norm weights, positions and cos_sin_cache as qk_norm_rope_kv_cache_;
  // the new k, v go to cache_rows [B], which must be slot kv_end[b] - 1 of sequence b (else: poison) -> out
  m.def("qk_norm_rope_decode_attention(Tensor q, Tensor k, Tensor v, Tensor q_weight, Tensor k_weight, "
        "Tensor positions, Tensor cos_sin_cache, float eps, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor cache_rows, Tensor kv_start, Tensor kv_end, int window, float scale, bool kv_settled=False) -> Tensor");

  // ---- skinny GEMM (decode linears): csrc/skinny_gemm ----
  // x [M, K], weight [N, K] -> [M, N] ("none") or [M, N/2] ("swiglu": gate rows [0, N/2), up rows
  // [N/2, N); "swiglu_interleaved": the grouped_gemm 16-row blocks). Fast for M <= 16; any M works.
  m.def("skinny_gemm(Tensor x, Tensor weight, str epilogue) -> Tensor");

  // ---- MoE decode (routed + shared experts without permute): csrc/moe_decode ----
  // hidden [T, H], gate_up [E, 2I, H] (epilogue "swiglu" or "swiglu_interleaved"), topk_ids [T, k]
  // int32, shared_gate_up [2Is, H] (gate rows then up rows) -> act [T, k*I + Is]: routed expert j of
  // token t in columns [j*I, (j+1)*I), the shared experts in [k*I, k*I + Is). hidden_settled: the
  // caller guarantees hidden was written before the launch right before this op (the CUDA kernel then
  // reads it without waiting for that launch: csrc/pdl.cuh); the same result either way.
  m.def("moe_decode_gate_up(Tensor hidden, Tensor gate_up, Tensor topk_ids, Tensor? shared_gate_up, "
        "str epilogue, bool hidden_settled=False) -> Tensor");
  // act [T, k*I + Is], down [E, H, I], topk_ids [T, k] int32, topk_weights [T, k] fp32, shared_down
  // [H, Is], residual [T, H] -> out[t] = sum_j w[t, j] * down_j(act) + shared_down(act) + residual[t],
  // summed in fp32 in that fixed order, rounded once. shared_act [T, Is]: the shared experts' columns
  // given apart (act is then [T, k*I]; e.g. computed on another stream).
  m.def("moe_decode_down(Tensor act, Tensor down, Tensor topk_ids, Tensor topk_weights, "
        "Tensor? shared_down, Tensor? residual, Tensor? shared_act=None) -> Tensor");
  // The same two with int4 routed experts (docs/design.md §7): the weight as qweight [E, N, K/2] uint8,
  // scales [E, N, K/128] bf16, zeros [E, N, K/128] uint8 or None (symmetric); equal to the ops above on
  // the dequantized weights ((u - z) * s rounded once to the activations' dtype). K % 128 == 0.
  m.def("moe_decode_int4_gate_up(Tensor hidden, Tensor gate_up_qweight, Tensor gate_up_scales, "
        "Tensor? gate_up_zeros, Tensor topk_ids, Tensor? shared_gate_up, str epilogue, "
        "bool hidden_settled=False) -> Tensor");
  m.def("moe_decode_int4_down(Tensor act, Tensor down_qweight, Tensor down_scales, Tensor? down_zeros, "
        "Tensor topk_ids, Tensor topk_weights, Tensor? shared_down, Tensor? residual, Tensor? shared_act=None) "
        "-> Tensor");
}

// Importing dots1_ext._C loads this library and so runs the registrations above; there are no
// pybind11 bindings: every op is reached through torch.ops.dots1_ext.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
