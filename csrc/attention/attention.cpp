// Tensor-level code of the decode attention family: argument checks, the C++ CPU kernel and the CUDA
// entry point that calls the launcher of attention.h.
//
// Op (schema in csrc/registry.cpp, semantics in dots1_ext/reference.py decode_attention):
//   decode_attention(q [B, Hq, D], k_cache [B, S, Hk, D], v_cache [B, S, Hk, D], kv_start [B] int64,
//                    kv_end [B] int64, window, scale, kv_settled=False) -> [B, Hq, D] (new, contiguous, q's dtype)
// Sequence b attends to slots [lo, kv_end[b]), lo = kv_start[b], or max(kv_start[b], kv_end[b] - window)
// when window > 0; query head h reads kv head h / (Hq / Hk). fp32 math, exact softmax, one rounding.
//
//   qk_norm_rope_decode_attention(q [B, Hq, D], k [B, Hk, D], v [B, Hk, D], q_weight [D], k_weight [D],
//                    positions [B] int64, cos_sin_cache [P, D] fp32, eps, k_cache, v_cache, cache_rows [B]
//                    int64, kv_start, kv_end, window, scale, kv_settled=False) -> [B, Hq, D]
// The decode step's qk_norm_rope_kv_cache_ (csrc/norm) then decode_attention, in one launch on CUDA,
// with the same bits: out, and the k_cache / v_cache rows written. q and k are inputs only (the
// unfused pair leaves them normed and rotated; nothing reads them afterwards). Contract of the one
// launch: sequence b's new key goes to slot kv_end[b] - 1 of its own sequence, i.e. cache_rows[b] ==
// b * S + kv_end[b] - 1; any other cache row, inside the cache or not, counts as a bad cache row
// (norm.cpp's poison policy: nothing written, NaN q, so a NaN output unless the range is empty). The
// CPU kernel is the two ops' CPU kernels in order (on copies of q and k, with such rows set to -1);
// CUDA runs the same two ops where the fused kernel does not apply (Hq / Hk > 8, head_dim not 64 / 128
// / 256, weights not in q's dtype or not contiguous, unaligned pointers or strides).
//
// Poison policy (every backend: this CPU kernel, the CUDA kernel and dots1_ext.reference): bounds are
// device data, so bad ones cannot raise; a sequence with kv_start < 0, kv_end > S or kv_start > kv_end
// gets NaN in every output element and reads nothing. An empty range (kv_start == kv_end, or a window
// that leaves nothing) gives exactly 0, flash-attention's convention.
//
// DOTS1_EXT_ATTENTION_SPLITS (CUDA, read per call; default auto) forces the number of KV splits per
// (sequence, kv head): tests use it to run every combine path; the automatic choice depends on the
// batch, the heads, the SM count and the cache capacity only, never on the lengths.
// DOTS1_EXT_ATTENTION_COMBINE (CUDA, read per call; auto = last, workspace or cluster) picks how both ops
// combine their splits (attention.h launch_decode_attention's workspace and last_split_combines: the last
// split to arrive, a second kernel, or thread-block clusters; same bits for the same split count).
// DOTS1_EXT_ATTENTION_STAGES (CUDA, read per call; auto, 3 or 6; default auto) forces the K/V
// pipeline's depth (attention.h pipeline_stages): tests run both, benchmarks compare them; same bits.
// kv_settled (both ops; attention.h launch_decode_attention): the caller's promise that the bounds (and
// the fused op's positions and cache rows) and every cache row but slot kv_end - 1 predate the launch
// right before the op, so that the kernel starts its copies before its PDL wait. Ignored on the CPU,
// without PDL, and where the op copies a cache first (then the copy is the launch right before).
// DOTS1_EXT_PDL=0 (read per call, csrc/common.h pdl_enabled; default on) launches without programmatic
// dependent launch (benchmarks compare the two; the results are the same).
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <utility>

#include <ATen/core/dispatch/Dispatcher.h>

#include "attention/attention.h"
#include "common.h"

#ifdef DOTS1_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace dots1 {
namespace {

const std::initializer_list<at::ScalarType> kFloatTypes = {at::kFloat, at::kHalf, at::kBFloat16};

// ---------------------------------------------------------------------------------------------
// Checks (mirror dots1_ext/ops/attention.py)

void check_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& kv_start, const at::Tensor& kv_end, int64_t window) {
  check_dtype(q, "q", kFloatTypes);
  check_shape(q, "q", {-1, -1, -1});
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  TORCH_CHECK_VALUE(D > 0 && D % 2 == 0 && D <= kAttentionMaxHeadDim,
                    "dots1_ext: head_dim (q.shape[2]) must be positive, even and at most ", kAttentionMaxHeadDim,
                    ", got ", D);
  TORCH_CHECK_VALUE(q.stride(2) == 1, "dots1_ext: q must have a contiguous last dimension, got strides ", q.strides());
  check_dtype(k_cache, "k_cache", {q.scalar_type()});
  check_shape(k_cache, "k_cache", {B, -1, -1, D});
  const int64_t Hk = k_cache.size(2);
  TORCH_CHECK_VALUE(Hk > 0 && Hq % Hk == 0, "dots1_ext: the query heads (q.shape[1] = ", Hq,
                    ") must be a multiple of the kv heads (k_cache.shape[2] = ", Hk, ")");
  check_dtype(v_cache, "v_cache", {q.scalar_type()});
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "dots1_ext: v_cache must have k_cache's shape ",
                    k_cache.sizes(), ", got ", v_cache.sizes());
  TORCH_CHECK_VALUE(k_cache.is_contiguous(), "dots1_ext: k_cache must be contiguous");
  TORCH_CHECK_VALUE(v_cache.is_contiguous(), "dots1_ext: v_cache must be contiguous");
  check_dtype(kv_start, "kv_start", {at::kLong});
  check_shape(kv_start, "kv_start", {B});
  check_dtype(kv_end, "kv_end", {at::kLong});
  check_shape(kv_end, "kv_end", {B});
  TORCH_CHECK_VALUE(window >= 0, "dots1_ext: window must be >= 0 (0 = no window), got ", window);
  check_same_device(k_cache, "k_cache", q, "q");
  check_same_device(v_cache, "v_cache", q, "q");
  check_same_device(kv_start, "kv_start", q, "q");
  check_same_device(kv_end, "kv_end", q, "q");
}

// The attended slots [lo, end) of a sequence, or bad = true (poison).
struct KvRange {
  int64_t lo, end;
  bool bad;
};

KvRange kv_range(int64_t start, int64_t end, int64_t window, int64_t cache_len) {
  if (start < 0 || end > cache_len || start > end) return {0, 0, true};
  const int64_t lo = window > 0 ? std::max(start, end - window) : start;
  return {lo, end, false};
}

// The fused op's checks: decode_attention's, and qk_norm_rope_kv_cache_'s for B tokens (mirror
// dots1_ext/ops/attention.py and csrc/norm/norm.cpp; the messages name the arguments the same way).
void check_qk_norm_rope_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& q_weight, const at::Tensor& k_weight,
                                         const at::Tensor& positions, const at::Tensor& cos_sin_cache,
                                         const at::Tensor& k_cache, const at::Tensor& v_cache,
                                         const at::Tensor& cache_rows, const at::Tensor& kv_start,
                                         const at::Tensor& kv_end, int64_t window) {
  check_decode_attention(q, k_cache, v_cache, kv_start, kv_end, window);
  const int64_t B = q.size(0), D = q.size(2), Hk = k_cache.size(2);
  check_dtype(k, "k", {q.scalar_type()});
  check_shape(k, "k", {B, Hk, D});
  TORCH_CHECK_VALUE(k.stride(2) == 1, "dots1_ext: k must have a contiguous last dimension, got strides ", k.strides());
  check_dtype(v, "v", {q.scalar_type()});
  check_shape(v, "v", {B, Hk, D});
  TORCH_CHECK_VALUE(v.stride(2) == 1, "dots1_ext: v must have a contiguous last dimension, got strides ", v.strides());
  check_dtype(q_weight, "q_weight", kFloatTypes);
  check_shape(q_weight, "q_weight", {D});
  check_dtype(k_weight, "k_weight", kFloatTypes);
  check_shape(k_weight, "k_weight", {D});
  check_dtype(positions, "positions", {at::kLong});
  check_shape(positions, "positions", {B});
  check_dtype(cos_sin_cache, "cos_sin_cache", {at::kFloat});
  check_shape(cos_sin_cache, "cos_sin_cache", {-1, D});
  check_dtype(cache_rows, "cache_rows", {at::kLong});
  check_shape(cache_rows, "cache_rows", {B});
  for (const auto& [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}, std::pair{&q_weight, "q_weight"},
                                std::pair{&k_weight, "k_weight"}, std::pair{&positions, "positions"},
                                std::pair{&cos_sin_cache, "cos_sin_cache"}, std::pair{&cache_rows, "cache_rows"}})
    check_same_device(*t, name, q, "q");
  // The caches are written while q, k and v are read.
  check_no_overlap(k_cache, "k_cache", v_cache, "v_cache");
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    check_no_overlap(k_cache, "k_cache", *t, name);
    check_no_overlap(v_cache, "v_cache", *t, name);
  }
}

// ---------------------------------------------------------------------------------------------
// CPU kernel: per sequence, fp32 matmul + softmax over the attended slots (ATen ops).

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& kv_start, const at::Tensor& kv_end, int64_t window, double scale,
                                bool /*kv_settled: a PDL launch detail*/) {
  check_decode_attention(q, k_cache, v_cache, kv_start, kv_end, window);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), S = k_cache.size(1), Hk = k_cache.size(2);
  auto out = at::empty({B, Hq, D}, q.options());
  if (out.numel() == 0) return out;
  const int64_t G = Hq / Hk;
  const auto starts = kv_start.accessor<int64_t, 1>();  // strided reads: expanded bounds are fine
  const auto ends = kv_end.accessor<int64_t, 1>();
  for (int64_t b = 0; b < B; ++b) {
    const KvRange r = kv_range(starts[b], ends[b], window, S);
    if (r.bad) {
      out[b].fill_(std::numeric_limits<double>::quiet_NaN());
      continue;
    }
    if (r.lo == r.end) {
      out[b].zero_();
      continue;
    }
    const auto k = k_cache[b].slice(0, r.lo, r.end).to(at::kFloat);     // [L, Hk, D]
    const auto v = v_cache[b].slice(0, r.lo, r.end).to(at::kFloat);     // [L, Hk, D]
    const auto qb = q[b].to(at::kFloat).reshape({Hk, G, D});            // [Hk, G, D]
    const auto scores = at::matmul(qb, k.permute({1, 2, 0})) * scale;   // [Hk, G, L]
    const auto probs = at::softmax(scores, -1);
    const auto o = at::matmul(probs, v.permute({1, 0, 2}));             // [Hk, G, D]
    out[b].copy_(o.reshape({Hq, D}));
  }
  return out;
}

// The fused op as its two ops, through the dispatcher (the CPU kernel; the CUDA fallback): on copies
// of q and k (the fused op does not write them), with every cache row other than slot kv_end[b] - 1 of
// sequence b replaced by -1 (a bad row for qk_norm_rope_kv_cache_: nothing written, NaN q).
at::Tensor qk_norm_rope_decode_attention_two_ops(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const at::Tensor& q_weight, const at::Tensor& k_weight,
                                                 const at::Tensor& positions, const at::Tensor& cos_sin_cache,
                                                 double eps, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                                 const at::Tensor& cache_rows, const at::Tensor& kv_start,
                                                 const at::Tensor& kv_end, int64_t window, double scale,
                                                 bool kv_settled) {
  static const auto qk_norm_rope_kv_cache =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dots1_ext::qk_norm_rope_kv_cache_", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, const at::Tensor&, double, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&)>();
  static const auto decode_attention =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dots1_ext::decode_attention", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, int64_t, double, bool)>();
  const int64_t B = q.size(0), S = k_cache.size(1);
  const auto own_slot = at::arange(B, kv_end.options()) * S + kv_end - 1;
  const auto rows_ok = kv_end.ge(1).logical_and(kv_end.le(S)).logical_and(cache_rows.eq(own_slot));
  const auto rows = at::where(rows_ok, cache_rows, at::full({}, -1, cache_rows.options()));
  const auto q_rotated = q.clone(), k_rotated = k.clone();
  qk_norm_rope_kv_cache.call(q_rotated, k_rotated, v, q_weight, k_weight, positions, cos_sin_cache, eps, k_cache,
                             v_cache, rows);
  // qk_norm_rope_kv_cache_ (the kernel right before) wrote only slot kv_end - 1: the caller's promise holds.
  return decode_attention.call(q_rotated, k_cache, v_cache, kv_start, kv_end, window, scale, kv_settled);
}

// ---------------------------------------------------------------------------------------------
// CUDA entry point

#ifdef DOTS1_WITH_CUDA

int forced_splits() {
  const char* v = std::getenv("DOTS1_EXT_ATTENTION_SPLITS");
  if (v == nullptr || *v == '\0' || std::string(v) == "auto") return 0;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  TORCH_CHECK_VALUE(end != v && *end == '\0' && n >= 1 && n <= kAttentionMaxSplits,
                    "dots1_ext: DOTS1_EXT_ATTENTION_SPLITS must be auto or an integer in [1, ", kAttentionMaxSplits,
                    "], got '", v, "'");
  return static_cast<int>(n);
}

// DOTS1_EXT_ATTENTION_COMBINE: auto = last (default) | workspace | cluster (attention_kernels.cu header).
std::string combine_mode() {
  const char* v = std::getenv("DOTS1_EXT_ATTENTION_COMBINE");
  if (v == nullptr || *v == '\0') return "last";
  const std::string s(v);
  TORCH_CHECK_VALUE(s == "auto" || s == "last" || s == "cluster" || s == "workspace",
                    "dots1_ext: DOTS1_EXT_ATTENTION_COMBINE must be auto, last, workspace or cluster, got '", v, "'");
  return s == "auto" ? "last" : s;
}
bool workspace_combine() { return combine_mode() != "cluster"; }
// The workspace mode's splits: the last one to arrive combines (no second kernel), unless "workspace".
bool last_split_combines() { return combine_mode() == "last"; }

// The workspace mode's partials (undefined in the cluster mode): from the caching allocator, so a CUDA
// graph keeps its own.
at::Tensor combine_workspace(const at::Tensor& q) {
  if (!workspace_combine()) return {};
  return at::empty({decode_attention_workspace_floats(q.size(0), q.size(1), q.size(2))},
                   q.options().dtype(at::kFloat));
}

int forced_stages() {
  const char* v = std::getenv("DOTS1_EXT_ATTENTION_STAGES");
  if (v == nullptr || *v == '\0' || std::string(v) == "auto") return 0;
  const std::string s(v);
  TORCH_CHECK_VALUE(s == std::to_string(kAttentionShallowStages) || s == std::to_string(kAttentionDeepStages),
                    "dots1_ext: DOTS1_EXT_ATTENTION_STAGES must be auto, ", kAttentionShallowStages, " or ",
                    kAttentionDeepStages, ", got '", v, "'");
  return std::stoi(s);
}

bool aligned_to(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& kv_start, const at::Tensor& kv_end, int64_t window, double scale,
                                 bool kv_settled) {
  check_decode_attention(q, k_cache, v_cache, kv_start, kv_end, window);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), S = k_cache.size(1), Hk = k_cache.size(2);
  auto out = at::empty({B, Hq, D}, q.options());
  if (out.numel() == 0) return out;
  DOTS1_CHECK(Hk * ((Hq / Hk + 7) / 8) <= 65535, "at most 65535 (kv head, chunk of 8 query heads) pairs are ",
              "supported, got Hk = ", Hk, " with ", Hq / Hk, " query heads each");
  // The kernels copy K/V rows in 4-byte (or 16-byte) units: a 16-bit cache that starts at an odd element
  // (a view at an odd offset) is copied once to an aligned buffer.
  const auto aligned = [](const at::Tensor& t) { return aligned_to(t.const_data_ptr(), 4) ? t : t.clone(); };
  const at::Tensor kc = aligned(k_cache), vc = aligned(v_cache);
  // A copy is the kernel right before the attention kernel and wrote every row: nothing is settled then.
  const bool settled = kv_settled && kc.is_same(k_cache) && vc.is_same(v_cache);
  // A dim of size 1 may carry any stride: 0 keeps the kernel's address math trivially in range.
  const int64_t q_batch_stride = B == 1 ? 0 : q.stride(0), q_head_stride = Hq == 1 ? 0 : q.stride(1);
  const int64_t start_stride = B == 1 ? 0 : kv_start.stride(0), end_stride = B == 1 ? 0 : kv_end.stride(0);
  at::Tensor workspace = combine_workspace(q);
  C10_CUDA_CHECK(launch_decode_attention(
      q.const_data_ptr(), q_batch_stride, q_head_stride, kc.const_data_ptr(), vc.const_data_ptr(),
      kv_start.const_data_ptr<int64_t>(), start_stride, kv_end.const_data_ptr<int64_t>(), end_stride,
      out.mutable_data_ptr(), B, S, Hq, Hk, D, window, static_cast<float>(scale), forced_splits(),
      to_dtype(q.scalar_type()), c10::cuda::getCurrentCUDAStream(), nullptr, pdl_enabled(), forced_stages(),
      workspace.defined() ? workspace.mutable_data_ptr<float>() : nullptr, settled, last_split_combines()));
  return out;
}

#endif  // DOTS1_WITH_CUDA

// The fused op's kernel. CPU: the two ops (their CPU kernels). CUDA: one fused launch where the
// inputs allow it, else the two ops (their CUDA kernels).
template <bool kCuda>
at::Tensor qk_norm_rope_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& q_weight, const at::Tensor& k_weight,
                                         const at::Tensor& positions, const at::Tensor& cos_sin_cache, double eps,
                                         const at::Tensor& k_cache, const at::Tensor& v_cache,
                                         const at::Tensor& cache_rows, const at::Tensor& kv_start,
                                         const at::Tensor& kv_end, int64_t window, double scale,
                                         bool kv_settled) {
  check_eps(eps);
  check_qk_norm_rope_decode_attention(q, k, v, q_weight, k_weight, positions, cos_sin_cache, k_cache, v_cache,
                                      cache_rows, kv_start, kv_end, window);
#ifdef DOTS1_WITH_CUDA
  if constexpr (kCuda) {
    const c10::cuda::CUDAGuard guard(q.device());
    const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), S = k_cache.size(1), Hk = k_cache.size(2);
    if (B == 0 || Hq == 0) return at::empty({B, Hq, D}, q.options());
    // A dim of size 1 may carry any stride: 0 keeps the kernel's address math trivially in range.
    const auto stride_or_0 = [](const at::Tensor& t, int dim) { return t.size(dim) == 1 ? 0 : t.stride(dim); };
    DecodeQkNormRopeArgs args;
    args.k = k.const_data_ptr();
    args.k_batch_stride = stride_or_0(k, 0);
    args.k_head_stride = stride_or_0(k, 1);
    args.v = v.const_data_ptr();
    args.v_batch_stride = stride_or_0(v, 0);
    args.v_head_stride = stride_or_0(v, 1);
    args.q_weight = q_weight.const_data_ptr();
    args.k_weight = k_weight.const_data_ptr();
    args.positions = positions.const_data_ptr<int64_t>();
    args.positions_stride = stride_or_0(positions, 0);
    args.cos_sin_cache = cos_sin_cache.const_data_ptr<float>();
    args.num_positions = cos_sin_cache.size(0);
    args.cache_rows = cache_rows.const_data_ptr<int64_t>();
    args.cache_rows_stride = stride_or_0(cache_rows, 0);
    args.eps = static_cast<float>(eps);
    const int64_t q_batch_stride = stride_or_0(q, 0), q_head_stride = stride_or_0(q, 1);
    // The kernel reads the weights in q's dtype, directly (and before the PDL wait: a weight converted
    // here would be written by the kernel right before). Anything else runs the two ops.
    const bool weights_direct = q_weight.scalar_type() == q.scalar_type() &&
                                k_weight.scalar_type() == q.scalar_type() && q_weight.is_contiguous() &&
                                k_weight.is_contiguous();
    // The row stride of cos_sin_cache is D when it is contiguous; a strided table runs the two ops.
    if (!weights_direct || !cos_sin_cache.is_contiguous() ||
        !can_fuse_qk_norm_rope(q.const_data_ptr(), q_batch_stride, q_head_stride, k_cache.const_data_ptr(),
                               v_cache.const_data_ptr(), args, Hq, Hk, D, to_dtype(q.scalar_type())))
      return qk_norm_rope_decode_attention_two_ops(q, k, v, q_weight, k_weight, positions, cos_sin_cache, eps, k_cache,
                                                   v_cache, cache_rows, kv_start, kv_end, window, scale,
                                                   kv_settled);
    auto out = at::empty({B, Hq, D}, q.options());
    const int64_t start_stride = B == 1 ? 0 : kv_start.stride(0), end_stride = B == 1 ? 0 : kv_end.stride(0);
    at::Tensor workspace = combine_workspace(q);
    C10_CUDA_CHECK(launch_qk_norm_rope_decode_attention(
        q.const_data_ptr(), q_batch_stride, q_head_stride, k_cache.mutable_data_ptr(), v_cache.mutable_data_ptr(),
        kv_start.const_data_ptr<int64_t>(), start_stride, kv_end.const_data_ptr<int64_t>(), end_stride,
        out.mutable_data_ptr(), B, S, Hq, Hk, D, window, static_cast<float>(scale), args, forced_splits(),
        to_dtype(q.scalar_type()), c10::cuda::getCurrentCUDAStream(), nullptr, pdl_enabled(), forced_stages(),
        workspace.defined() ? workspace.mutable_data_ptr<float>() : nullptr, kv_settled, last_split_combines()));
    return out;
  }
#endif
  return qk_norm_rope_decode_attention_two_ops(q, k, v, q_weight, k_weight, positions, cos_sin_cache, eps, k_cache,
                                               v_cache, cache_rows, kv_start, kv_end, window, scale, kv_settled);
}

}  // namespace
}  // namespace dots1

TORCH_LIBRARY_IMPL(dots1_ext, CPU, m) {
  m.impl("decode_attention", &dots1::decode_attention_cpu);
  m.impl("qk_norm_rope_decode_attention", &dots1::qk_norm_rope_decode_attention<false>);
}

#ifdef DOTS1_WITH_CUDA
TORCH_LIBRARY_IMPL(dots1_ext, CUDA, m) {
  m.impl("decode_attention", &dots1::decode_attention_cuda);
  m.impl("qk_norm_rope_decode_attention", &dots1::qk_norm_rope_decode_attention<true>);
}
#endif
