// Tensor-level code of the norm family: argument checks, layout decisions, the C++ CPU kernels and
// the CUDA entry points that call the launchers of norm.h.
//
// Ops (schemas in csrc/registry.cpp, semantics in dots1_ext/reference.py):
//   rms_norm(x [..., H], weight [H], eps) -> [..., H] (new, contiguous)
//   add_rms_norm_(x [..., H], residual [..., H], weight [H], eps): residual += x; x = rms_norm(residual)
//   qk_norm_rope_(q [T, Hq, D], k [T, Hk, D], q_weight [D], k_weight [D], positions [T] int64,
//                 cos_sin_cache [P, D] fp32, eps)
//   qk_norm_rope_kv_cache_(..., v [T, Hk, D], ..., k_cache [..., Hk, D], v_cache [..., Hk, D], cache_rows [T] int64)
//
// Weights may have any float dtype: the math multiplies by weight.float() either way. The CUDA
// kernels read a weight in x's dtype or in fp32 directly; other combinations are converted to fp32.
//
// Poison policy (every backend: these CPU kernels, the CUDA kernels and dots1_ext.reference):
// out-of-range indices never reach memory, and the rows they would have produced are NaN, so a bad
// index cannot pass for a plausible number. A token whose position is outside [0, P) gets NaN in all
// of its q and k heads (with the KV cache, its valid cache row receives that NaN k, and v as given);
// a token whose cache row is outside the cache writes no cache row and gets NaN in all of its q heads
// (so its attention output is NaN). The Python wrappers' check_positions=True raises IndexError for
// both on the host instead (a synchronisation on CUDA).
//
// DOTS1_EXT_PDL=0 launches the CUDA kernels without programmatic dependent launch (csrc/pdl.cuh); a
// weight converted per call (a dtype other than x's or fp32, or non-contiguous) is launched without it.
//
// In-place ops check, before any write, that the tensors they write have distinct elements and do
// not overlap each other or the tensors they read (csrc/common.h check_no_overlap).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "common.h"
#include "norm/norm.h"

#ifdef DOTS1_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace dots1 {
namespace {

const std::initializer_list<at::ScalarType> kFloatTypes = {at::kFloat, at::kHalf, at::kBFloat16};

// ---------------------------------------------------------------------------------------------
// Checks (mirror dots1_ext/ops/norm.py)

void check_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_eps(eps);
  check_dtype(x, "x", kFloatTypes);
  TORCH_CHECK_VALUE(x.dim() >= 1, "dots1_ext: x must have at least one dimension");
  check_dtype(weight, "weight", kFloatTypes);
  check_shape(weight, "weight", {x.size(-1)});
  check_same_device(weight, "weight", x, "x");
}

void check_add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_rms_norm(x, weight, eps);
  check_dtype(residual, "residual", {x.scalar_type()});
  TORCH_CHECK_VALUE(residual.sizes() == x.sizes(), "dots1_ext: residual must have shape ", x.sizes(), ", got ",
                    residual.sizes());
  check_same_device(residual, "residual", x, "x");
  // Before any write: an expanded x (or residual) would be written through shared elements, and
  // x aliasing residual would have one overwrite the other mid-op.
  check_no_internal_overlap(x, "x");
  check_no_internal_overlap(residual, "residual");
  check_no_overlap(x, "x", residual, "residual");
  check_no_overlap(x, "x", weight, "weight");
  check_no_overlap(residual, "residual", weight, "weight");
}

void check_qk_norm_rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_weight,
                        const at::Tensor& k_weight, const at::Tensor& positions, const at::Tensor& cos_sin_cache) {
  check_dtype(q, "q", kFloatTypes);
  check_shape(q, "q", {-1, -1, -1});
  const int64_t T = q.size(0), D = q.size(2);
  check_dtype(k, "k", {q.scalar_type()});
  check_shape(k, "k", {T, -1, D});
  TORCH_CHECK_VALUE(D > 0 && D % 2 == 0, "dots1_ext: head_dim (q.shape[2]) must be positive and even for RoPE, got ",
                    D);
  TORCH_CHECK_VALUE(q.stride(2) == 1, "dots1_ext: q must have a contiguous last dimension, got strides ", q.strides());
  TORCH_CHECK_VALUE(k.stride(2) == 1, "dots1_ext: k must have a contiguous last dimension, got strides ", k.strides());
  check_dtype(q_weight, "q_weight", kFloatTypes);
  check_shape(q_weight, "q_weight", {D});
  check_dtype(k_weight, "k_weight", kFloatTypes);
  check_shape(k_weight, "k_weight", {D});
  check_dtype(positions, "positions", {at::kLong});
  check_shape(positions, "positions", {T});
  check_dtype(cos_sin_cache, "cos_sin_cache", {at::kFloat});
  check_shape(cos_sin_cache, "cos_sin_cache", {-1, D});
  check_same_device(k, "k", q, "q");
  check_same_device(q_weight, "q_weight", q, "q");
  check_same_device(k_weight, "k_weight", q, "q");
  check_same_device(positions, "positions", q, "q");
  check_same_device(cos_sin_cache, "cos_sin_cache", q, "q");
  // q and k are written in place by parallel threads: no shared elements within or between them.
  check_no_internal_overlap(q, "q");
  check_no_internal_overlap(k, "k");
  check_no_overlap(q, "q", k, "k");
}

void check_kv_cache(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                    const at::Tensor& v_cache, const at::Tensor& cache_rows) {
  const int64_t T = k.size(0), Hk = k.size(1), D = k.size(2);
  check_dtype(v, "v", {q.scalar_type()});
  check_shape(v, "v", {T, Hk, D});
  TORCH_CHECK_VALUE(v.stride(2) == 1, "dots1_ext: v must have a contiguous last dimension, got strides ", v.strides());
  const auto check_cache = [&](const at::Tensor& t, const char* name) {
    check_dtype(t, name, {q.scalar_type()});
    TORCH_CHECK_VALUE(t.dim() >= 3 && t.size(-2) == Hk && t.size(-1) == D, "dots1_ext: ", name,
                      " must have shape [..., ", Hk, ", ", D, "], got ", t.sizes());
    TORCH_CHECK_VALUE(t.is_contiguous(), "dots1_ext: ", name, " must be contiguous");
    check_same_device(t, name, q, "q");
  };
  check_cache(k_cache, "k_cache");
  check_cache(v_cache, "v_cache");
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "dots1_ext: v_cache must have k_cache's shape ",
                    k_cache.sizes(), ", got ", v_cache.sizes());
  check_dtype(cache_rows, "cache_rows", {at::kLong});
  check_shape(cache_rows, "cache_rows", {T});
  check_same_device(v, "v", q, "q");
  check_same_device(cache_rows, "cache_rows", q, "q");
  // The caches are written too; v is read while k and q are written.
  check_no_overlap(k_cache, "k_cache", v_cache, "v_cache");
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    check_no_overlap(k_cache, "k_cache", *t, name);
    check_no_overlap(v_cache, "v_cache", *t, name);
  }
  check_no_overlap(q, "q", v, "v");
  check_no_overlap(k, "k", v, "v");
}

// ---------------------------------------------------------------------------------------------
// Layout helpers

// Whether x [..., H] is a set of evenly spaced, non-overlapping rows with a contiguous last dim
// (e.g. any contiguous tensor or a column slice of one); if so, *row_stride is their spacing.
bool as_rows(const at::Tensor& x, int64_t* row_stride) {
  const int64_t H = x.size(-1);
  if (H > 1 && x.stride(-1) != 1) return false;
  bool found = false;
  int64_t stride = H, next = 0;
  for (int64_t d = x.dim() - 2; d >= 0; --d) {
    if (x.size(d) == 1) continue;
    if (!found) {
      stride = x.stride(d);
      found = true;
    } else if (x.stride(d) != next) {
      return false;
    }
    next = x.stride(d) * x.size(d);
  }
  if (stride < H) return false;
  *row_stride = stride;
  return true;
}

int64_t num_rows(const at::Tensor& x) { return x.size(-1) == 0 ? 0 : x.numel() / x.size(-1); }

// Stride of a dim of size 1 is meaningless (and may be anything): report 0 so that it never spoils
// the alignment tests of the fast kernels.
HeadStrides head_strides(const at::Tensor& t) {
  return {t.size(0) == 1 ? 0 : t.stride(0), t.size(1) == 1 ? 0 : t.stride(1)};
}

// ---------------------------------------------------------------------------------------------
// CPU kernels (weights as fp32, which is exact for every float dtype)

template <typename T>
inline float norm_times_weight(float x, float scale, float w) {
  return static_cast<float>(static_cast<T>(static_cast<float>(static_cast<T>(x * scale)) * w));
}

template <typename T>
void rms_norm_rows_cpu(const T* x, int64_t xs, T* residual, int64_t rs, T* out, int64_t os, const float* w,
                       int64_t rows, int64_t H, float eps, bool add) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(H, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * xs;
      T* rr = add ? residual + r * rs : nullptr;
      T* orow = out + r * os;
      double sum_sq = 0.0;
      for (int64_t i = 0; i < H; ++i) {
        float f = static_cast<float>(xr[i]);
        if (add) {
          const T sum = static_cast<T>(static_cast<float>(rr[i]) + f);
          rr[i] = sum;
          f = static_cast<float>(sum);
        }
        sum_sq += static_cast<double>(f) * f;
      }
      const float scale = 1.0f / std::sqrt(static_cast<float>(sum_sq) / static_cast<float>(H) + eps);
      for (int64_t i = 0; i < H; ++i) {
        const float f = static_cast<float>(add ? rr[i] : xr[i]);
        orow[i] = static_cast<T>(norm_times_weight<T>(f, scale, w[i]));
      }
    }
  });
}

// One head in place: RMSNorm over D (weights w, fp32), then neox RoPE with the row cs = cos | sin.
template <typename T>
void norm_rope_head_cpu(T* base, const float* w, const float* cs, int64_t D, float eps) {
  const int64_t half = D / 2;
  double sum_sq = 0.0;
  for (int64_t i = 0; i < D; ++i) {
    const float f = static_cast<float>(base[i]);
    sum_sq += static_cast<double>(f) * f;
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(sum_sq) / static_cast<float>(D) + eps);
  for (int64_t i = 0; i < half; ++i) {
    const float y1 = norm_times_weight<T>(static_cast<float>(base[i]), scale, w[i]);
    const float y2 = norm_times_weight<T>(static_cast<float>(base[i + half]), scale, w[i + half]);
    const float c = cs[i], s = cs[i + half];
    const float a = y1 * c, b = y2 * s, e = y2 * c, f = y1 * s;  // rounded separately, as the reference
    base[i] = static_cast<T>(a - b);
    base[i + half] = static_cast<T>(e + f);
  }
}

template <typename T>
void qk_norm_rope_cpu_impl(T* q, T* k, const float* qw, const float* kw, const int64_t* positions,
                           const float* cos_sin, int64_t T_, int64_t Hq, int64_t Hk, int64_t D, int64_t P,
                           HeadStrides qs, HeadStrides ks, float eps, const T* v, HeadStrides vs, T* k_cache,
                           T* v_cache, const int64_t* cache_rows, int64_t num_cache_rows) {
  const int64_t heads = Hq + Hk;
  at::parallel_for(0, T_ * heads, std::max<int64_t>(1, 16384 / D), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / heads, h = item % heads;
      const int64_t pos = positions[t];
      const bool is_q = h < Hq;
      const int64_t kh = h - Hq;
      T* base = is_q ? q + t * qs.token + h * qs.head : k + t * ks.token + kh * ks.head;
      // cache_rows, not k_cache, says whether there is a cache: an empty cache has no data pointer, and
      // every row is out of range there.
      const int64_t row = cache_rows != nullptr ? cache_rows[t] : 0;
      const bool row_ok = cache_rows == nullptr || (row >= 0 && row < num_cache_rows);
      // Poison policy (top of file): a bad position poisons q and k, a bad cache row poisons q.
      if (pos < 0 || pos >= P || (is_q && !row_ok)) {
        for (int64_t i = 0; i < D; ++i) base[i] = static_cast<T>(std::numeric_limits<float>::quiet_NaN());
      } else {
        norm_rope_head_cpu<T>(base, is_q ? qw : kw, cos_sin + pos * D, D, eps);
      }
      if (cache_rows != nullptr && !is_q && row_ok) {
        T* kc = k_cache + (row * Hk + kh) * D;
        T* vc = v_cache + (row * Hk + kh) * D;
        const T* vr = v + t * vs.token + kh * vs.head;
        for (int64_t i = 0; i < D; ++i) {
          kc[i] = base[i];
          vc[i] = vr[i];
        }
      }
    }
  });
}

at::Tensor weight_as_float(const at::Tensor& w) { return w.to(at::kFloat).contiguous(); }

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm(x, weight, eps);
  auto out = at::empty(x.sizes(), x.options());
  const int64_t rows = num_rows(x), H = x.size(-1);
  if (rows == 0) return out;
  int64_t xs = 0;
  const at::Tensor xin = as_rows(x, &xs) ? x : x.contiguous();
  if (!xin.is_same(x)) xs = H;
  const auto w = weight_as_float(weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_cpu", [&] {
    rms_norm_rows_cpu<scalar_t>(xin.const_data_ptr<scalar_t>(), xs, nullptr, 0, out.mutable_data_ptr<scalar_t>(), H,
                                w.const_data_ptr<float>(), rows, H, static_cast<float>(eps), false);
  });
  return out;
}

// Runs fn(x_rows, x_row_stride, residual_rows, residual_row_stride) on row views of x and residual,
// through contiguous copies (written back) where a tensor is not a set of evenly spaced rows.
template <typename Fn>
void with_row_views(const at::Tensor& x, const at::Tensor& residual, Fn fn) {
  int64_t xs = 0, rs = 0;
  const bool x_rows = as_rows(x, &xs), r_rows = as_rows(residual, &rs);
  at::Tensor xw = x_rows ? x : x.contiguous();
  at::Tensor rw = r_rows ? residual : residual.contiguous();
  if (!x_rows) xs = x.size(-1);
  if (!r_rows) rs = residual.size(-1);
  fn(xw, xs, rw, rs);
  if (!x_rows) x.copy_(xw);
  if (!r_rows) residual.copy_(rw);
}

void add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_add_rms_norm(x, residual, weight, eps);
  const int64_t rows = num_rows(x), H = x.size(-1);
  if (rows == 0) return;
  const auto w = weight_as_float(weight);
  with_row_views(x, residual, [&](const at::Tensor& xw, int64_t xs, const at::Tensor& rw, int64_t rs) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_rms_norm_cpu", [&] {
      scalar_t* xp = xw.mutable_data_ptr<scalar_t>();
      rms_norm_rows_cpu<scalar_t>(xp, xs, rw.mutable_data_ptr<scalar_t>(), rs, xp, xs, w.const_data_ptr<float>(),
                                  rows, H, static_cast<float>(eps), true);
    });
  });
}

void qk_norm_rope_cpu_common(const at::Tensor& q, const at::Tensor& k, const at::Tensor* v,
                             const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& positions,
                             const at::Tensor& cos_sin_cache, double eps, const at::Tensor* k_cache,
                             const at::Tensor* v_cache, const at::Tensor* cache_rows) {
  const int64_t T = q.size(0), Hq = q.size(1), Hk = k.size(1), D = q.size(2), P = cos_sin_cache.size(0);
  if (T == 0 || Hq + Hk == 0) return;  // P == 0: every position is bad, every token poisoned
  const auto qw = weight_as_float(q_weight), kw = weight_as_float(k_weight);
  const auto pos = positions.contiguous();
  const auto cs = cos_sin_cache.contiguous();
  const auto rows = cache_rows ? cache_rows->contiguous() : at::Tensor();
  const int64_t num_cache_rows = k_cache && Hk > 0 ? k_cache->numel() / (Hk * D) : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "qk_norm_rope_cpu", [&] {
    qk_norm_rope_cpu_impl<scalar_t>(
        q.mutable_data_ptr<scalar_t>(), k.mutable_data_ptr<scalar_t>(), qw.const_data_ptr<float>(),
        kw.const_data_ptr<float>(), pos.const_data_ptr<int64_t>(), cs.const_data_ptr<float>(), T, Hq, Hk, D, P,
        head_strides(q), head_strides(k), static_cast<float>(eps), v ? v->const_data_ptr<scalar_t>() : nullptr,
        v ? head_strides(*v) : HeadStrides{0, 0}, k_cache ? k_cache->mutable_data_ptr<scalar_t>() : nullptr,
        v_cache ? v_cache->mutable_data_ptr<scalar_t>() : nullptr,
        cache_rows ? rows.const_data_ptr<int64_t>() : nullptr, num_cache_rows);
  });
}

void qk_norm_rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_weight, const at::Tensor& k_weight,
                      const at::Tensor& positions, const at::Tensor& cos_sin_cache, double eps) {
  check_qk_norm_rope(q, k, q_weight, k_weight, positions, cos_sin_cache);
  check_eps(eps);
  qk_norm_rope_cpu_common(q, k, nullptr, q_weight, k_weight, positions, cos_sin_cache, eps, nullptr, nullptr, nullptr);
}

void qk_norm_rope_kv_cache_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& positions,
                               const at::Tensor& cos_sin_cache, double eps, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& cache_rows) {
  check_qk_norm_rope(q, k, q_weight, k_weight, positions, cos_sin_cache);
  check_eps(eps);
  check_kv_cache(q, k, v, k_cache, v_cache, cache_rows);
  qk_norm_rope_cpu_common(q, k, &v, q_weight, k_weight, positions, cos_sin_cache, eps, &k_cache, &v_cache,
                          &cache_rows);
}

// ---------------------------------------------------------------------------------------------
// CUDA entry points

#ifdef DOTS1_WITH_CUDA

// The kernels read a weight in x's dtype or in fp32; any other weight dtype is converted to fp32
// (exact), and both q/k weights must share one dtype.
std::pair<at::Tensor, at::Tensor> cuda_weights(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  const bool native = w1.scalar_type() == x.scalar_type() && w2.scalar_type() == x.scalar_type();
  if (native) return {w1.contiguous(), w2.contiguous()};
  return {w1.to(at::kFloat).contiguous(), w2.to(at::kFloat).contiguous()};
}

// PDL (csrc/pdl.cuh) when DOTS1_EXT_PDL allows it and the kernel's weights are the caller's tensors:
// the kernels read them before waiting for the previous kernel, which must not be a conversion made here.
bool use_pdl_with(const at::Tensor& w, const at::Tensor& weight) { return pdl_enabled() && w.is_same(weight); }

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm(x, weight, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty(x.sizes(), x.options());
  const int64_t rows = num_rows(x), H = x.size(-1);
  if (rows == 0) return out;
  DOTS1_CHECK(rows <= 0x7fffffffLL, "x has ", rows, " rows; at most 2^31 - 1 are supported");
  int64_t xs = 0;
  const at::Tensor xin = as_rows(x, &xs) ? x : x.contiguous();
  if (!xin.is_same(x)) xs = H;
  const auto w = cuda_weights(x, weight, weight).first;
  C10_CUDA_CHECK(launch_rms_norm(xin.const_data_ptr(), w.const_data_ptr(), out.mutable_data_ptr(), rows, H, xs, H,
                                 static_cast<float>(eps), to_dtype(x.scalar_type()), to_dtype(w.scalar_type()),
                                 c10::cuda::getCurrentCUDAStream(), use_pdl_with(w, weight)));
  return out;
}

void add_rms_norm_cuda(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_add_rms_norm(x, residual, weight, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = num_rows(x), H = x.size(-1);
  if (rows == 0) return;
  DOTS1_CHECK(rows <= 0x7fffffffLL, "x has ", rows, " rows; at most 2^31 - 1 are supported");
  const auto w = cuda_weights(x, weight, weight).first;
  with_row_views(x, residual, [&](const at::Tensor& xw, int64_t xs, const at::Tensor& rw, int64_t rs) {
    C10_CUDA_CHECK(launch_add_rms_norm(xw.mutable_data_ptr(), rw.mutable_data_ptr(), w.const_data_ptr(), rows, H, xs,
                                       rs, static_cast<float>(eps), to_dtype(x.scalar_type()),
                                       to_dtype(w.scalar_type()), c10::cuda::getCurrentCUDAStream(),
                                       use_pdl_with(w, weight)));
  });
}

void qk_norm_rope_cuda_common(const at::Tensor& q, const at::Tensor& k, const at::Tensor* v,
                              const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& positions,
                              const at::Tensor& cos_sin_cache, double eps, const at::Tensor* k_cache,
                              const at::Tensor* v_cache, const at::Tensor* cache_rows) {
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t T = q.size(0), Hq = q.size(1), Hk = k.size(1), D = q.size(2), P = cos_sin_cache.size(0);
  if (T == 0 || Hq + Hk == 0) return;  // P == 0: every position is bad, every token poisoned
  const auto [qw, kw] = cuda_weights(q, q_weight, k_weight);
  const auto pos = positions.contiguous();
  const auto cs = cos_sin_cache.contiguous();
  const auto rows = cache_rows ? cache_rows->contiguous() : at::Tensor();
  const int64_t num_cache_rows = k_cache && Hk > 0 ? k_cache->numel() / (Hk * D) : 0;
  C10_CUDA_CHECK(launch_qk_norm_rope(
      q.mutable_data_ptr(), k.mutable_data_ptr(), qw.const_data_ptr(), kw.const_data_ptr(),
      pos.const_data_ptr<int64_t>(), cs.const_data_ptr<float>(), T, Hq, Hk, D, P, head_strides(q), head_strides(k),
      static_cast<float>(eps), v ? v->const_data_ptr() : nullptr, v ? head_strides(*v) : HeadStrides{0, 0},
      k_cache ? k_cache->mutable_data_ptr() : nullptr, v_cache ? v_cache->mutable_data_ptr() : nullptr,
      cache_rows ? rows.const_data_ptr<int64_t>() : nullptr, num_cache_rows, to_dtype(q.scalar_type()),
      to_dtype(qw.scalar_type()), c10::cuda::getCurrentCUDAStream(),
      use_pdl_with(qw, q_weight) && use_pdl_with(kw, k_weight)));
}

void qk_norm_rope_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_weight,
                       const at::Tensor& k_weight, const at::Tensor& positions, const at::Tensor& cos_sin_cache,
                       double eps) {
  check_qk_norm_rope(q, k, q_weight, k_weight, positions, cos_sin_cache);
  check_eps(eps);
  qk_norm_rope_cuda_common(q, k, nullptr, q_weight, k_weight, positions, cos_sin_cache, eps, nullptr, nullptr,
                           nullptr);
}

void qk_norm_rope_kv_cache_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& positions,
                                const at::Tensor& cos_sin_cache, double eps, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& cache_rows) {
  check_qk_norm_rope(q, k, q_weight, k_weight, positions, cos_sin_cache);
  check_eps(eps);
  check_kv_cache(q, k, v, k_cache, v_cache, cache_rows);
  qk_norm_rope_cuda_common(q, k, &v, q_weight, k_weight, positions, cos_sin_cache, eps, &k_cache, &v_cache,
                           &cache_rows);
}

#endif  // DOTS1_WITH_CUDA

}  // namespace
}  // namespace dots1

TORCH_LIBRARY_IMPL(dots1_ext, CPU, m) {
  m.impl("rms_norm", &dots1::rms_norm_cpu);
  m.impl("add_rms_norm_", &dots1::add_rms_norm_cpu);
  m.impl("qk_norm_rope_", &dots1::qk_norm_rope_cpu);
  m.impl("qk_norm_rope_kv_cache_", &dots1::qk_norm_rope_kv_cache_cpu);
}

#ifdef DOTS1_WITH_CUDA
TORCH_LIBRARY_IMPL(dots1_ext, CUDA, m) {
  m.impl("rms_norm", &dots1::rms_norm_cuda);
  m.impl("add_rms_norm_", &dots1::add_rms_norm_cuda);
  m.impl("qk_norm_rope_", &dots1::qk_norm_rope_cuda);
  m.impl("qk_norm_rope_kv_cache_", &dots1::qk_norm_rope_kv_cache_cuda);
}
#endif
