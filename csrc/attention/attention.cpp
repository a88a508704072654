// Tensor-level code of the decode attention family: argument checks, the C++ CPU kernel and the CUDA
// entry point that calls the launcher of attention.h.
//
// Op (schema in csrc/registry.cpp, semantics in dots1_ext/reference.py decode_attention):
//   decode_attention(q [B, Hq, D], k_cache [B, S, Hk, D], v_cache [B, S, Hk, D], kv_start [B] int64,
//                    kv_end [B] int64, window, scale) -> [B, Hq, D] (new, contiguous, q's dtype)
// Sequence b attends to slots [lo, kv_end[b]), lo = kv_start[b], or max(kv_start[b], kv_end[b] - window)
// when window > 0; query head h reads kv head h / (Hq / Hk). fp32 math, exact softmax, one rounding.
//
// Poison policy (every backend: this CPU kernel, the CUDA kernel and dots1_ext.reference): bounds are
// device data, so bad ones cannot raise; a sequence with kv_start < 0, kv_end > S or kv_start > kv_end
// gets NaN in every output element and reads nothing. An empty range (kv_start == kv_end, or a window
// that leaves nothing) gives exactly 0, flash-attention's convention.
//
// DOTS1_EXT_ATTENTION_SPLITS (CUDA, read per call; default auto) forces the number of KV splits per
// (sequence, kv head): tests use it to run every combine path; the automatic choice depends on the
// batch, the heads, the SM count and the cache capacity only, never on the lengths.
// DOTS1_EXT_PDL=0 (read per call, csrc/common.h pdl_enabled; default on) launches without programmatic
// dependent launch (benchmarks compare the two; the results are the same).
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>

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

// ---------------------------------------------------------------------------------------------
// CPU kernel: per sequence, fp32 matmul + softmax over the attended slots (ATen ops).

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& kv_start, const at::Tensor& kv_end, int64_t window, double scale) {
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

bool aligned_to(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& kv_start, const at::Tensor& kv_end, int64_t window, double scale) {
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
  // A dim of size 1 may carry any stride: 0 keeps the kernel's address math trivially in range.
  const int64_t q_batch_stride = B == 1 ? 0 : q.stride(0), q_head_stride = Hq == 1 ? 0 : q.stride(1);
  const int64_t start_stride = B == 1 ? 0 : kv_start.stride(0), end_stride = B == 1 ? 0 : kv_end.stride(0);
  C10_CUDA_CHECK(launch_decode_attention(
      q.const_data_ptr(), q_batch_stride, q_head_stride, kc.const_data_ptr(), vc.const_data_ptr(),
      kv_start.const_data_ptr<int64_t>(), start_stride, kv_end.const_data_ptr<int64_t>(), end_stride,
      out.mutable_data_ptr(), B, S, Hq, Hk, D, window, static_cast<float>(scale), forced_splits(),
      to_dtype(q.scalar_type()), c10::cuda::getCurrentCUDAStream(), nullptr, pdl_enabled()));
  return out;
}

#endif  // DOTS1_WITH_CUDA

}  // namespace
}  // namespace dots1

TORCH_LIBRARY_IMPL(dots1_ext, CPU, m) { m.impl("decode_attention", &dots1::decode_attention_cpu); }

#ifdef DOTS1_WITH_CUDA
TORCH_LIBRARY_IMPL(dots1_ext, CUDA, m) { m.impl("decode_attention", &dots1::decode_attention_cuda); }
#endif
