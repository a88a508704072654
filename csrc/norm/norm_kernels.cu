// RMSNorm, fused add + RMSNorm, and per-head QK-RMSNorm + neox RoPE (+ KV-cache write): kernels and
// launchers only (Tensor code: norm.cpp). Numerics follow dots1_ext/reference.py step by step, with
// the same roundings to the activation dtype, so bf16 outputs agree with the reference bit for bit
// except where the fp32 sum of squares (different summation order) lands on a rounding boundary.
//
// Row kernels (rms_norm, add_rms_norm_): one block per row, the row held in registers as 16-byte
// vectors (kVecs per thread), so the data is read once and written once; a generic kernel (two
// passes, the second mostly from L2) covers rows that are not 16-byte aligned or too long.
//
// QK kernel: a group of kLanes = D / (2 * elems-per-16-bytes) lanes per (token, head): each lane
// holds one 16-byte vector of the first half of the head and the matching one of the second half,
// so rotate_half pairs never leave the lane and the norm is a kLanes-wide shuffle reduction.
// head_dim 64 / 128 / 256 take this path; any other even head_dim, or misaligned views, take a
// generic warp-per-head kernel.
//
// Bad indices follow the poison policy of norm.h: the kernels clamp every index they dereference
// into range, and write NaN to the q/k rows a bad position or cache row would have produced.
#include "norm/norm.h"

#include "cuda_utils.cuh"
#include "norm/norm_rope.cuh"
#include "pdl.cuh"

namespace dots1 {
namespace {

// Sum over the block; every thread gets the same value (each thread adds the per-warp partials in
// the same order). blockDim.x must be a multiple of 32. Uses smem once: call once per kernel.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  v = warp_sum(v);
  const int warp = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) smem[warp] = v;
  __syncthreads();
  float total = 0.f;
  const int num_warps = blockDim.x >> 5;
  for (int w = 0; w < num_warps; ++w) total += smem[w];
  return total;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ------------------------------------------------------------------------------------------------
// Row kernels. kAdd: residual = round(residual + x), and the norm is of residual; out may be x.
// No __restrict__ on x/out: the add variant writes x in place.

template <int kVecs>
constexpr int row_kernel_max_threads() {
  // 4+ vectors of x plus as many of the residual (and of the weight) per thread need more than the
  // 64 registers that 1024-thread blocks allow.
  return kVecs >= 4 ? 512 : 1024;
}

template <typename T, typename W, int kVecs, bool kAdd>
__global__ void __launch_bounds__(row_kernel_max_threads<kVecs>())
    rms_norm_vec_kernel(const T* x, T* out, T* residual, const W* __restrict__ weight, int64_t hidden,
                        int64_t x_row_stride, int64_t out_row_stride, int64_t residual_row_stride, float eps) {
  constexpr int kN = 16 / sizeof(T);
  __shared__ float smem[32];
  const int64_t row = blockIdx.x;
  const int num_vecs = static_cast<int>(hidden / kN);
  const T* x_row = x + row * x_row_stride;
  T* res_row = kAdd ? residual + row * residual_row_stride : nullptr;

  // Small weight slices are fetched first, before the PDL wait (csrc/pdl.cuh: norm weights are never
  // written in a step), so their latency hides behind it and the reduction; large ones (many vectors
  // per thread, fp32 weights) at their use, to stay clear of register spills.
  constexpr bool kPreloadWeight = kVecs * kN * sizeof(W) <= 64;
  W w_pre[kPreloadWeight ? kVecs : 1][kN];
  if constexpr (kPreloadWeight) {
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int v = threadIdx.x + i * blockDim.x;
      if (v < num_vecs) load_vec<W, kN>(weight + static_cast<int64_t>(v) * kN, w_pre[i]);
    }
  }
  pdl_wait();
  pdl_launch_dependents();

  T vals[kVecs][kN];
  T res[kAdd ? kVecs : 1][kN];
  // Every load first (x and residual may alias the stores below as far as the compiler knows).
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int v = threadIdx.x + i * blockDim.x;
    if (v < num_vecs) {
      load_vec<T, kN>(x_row + static_cast<int64_t>(v) * kN, vals[i]);
      if constexpr (kAdd) load_vec<T, kN>(res_row + static_cast<int64_t>(v) * kN, res[i]);
    }
  }
  float sum_sq = 0.f;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int v = threadIdx.x + i * blockDim.x;
    if (v < num_vecs) {
      if constexpr (kAdd) {
#pragma unroll
        for (int j = 0; j < kN; ++j) vals[i][j] = from_float<T>(to_float(res[i][j]) + to_float(vals[i][j]));
        store_vec<T, kN>(res_row + static_cast<int64_t>(v) * kN, vals[i]);
      }
#pragma unroll
      for (int j = 0; j < kN; ++j) {
        const float f = to_float(vals[i][j]);
        sum_sq += f * f;
      }
    }
  }
  const float total = block_sum(sum_sq, smem);
  const float scale = rsqrtf(total / static_cast<float>(hidden) + eps);
  T* out_row = out + row * out_row_stride;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int v = threadIdx.x + i * blockDim.x;
    if (v < num_vecs) {
      float w[kN];
      if constexpr (kPreloadWeight) {
#pragma unroll
        for (int j = 0; j < kN; ++j) w[j] = to_float(w_pre[i][j]);
      } else {
        load_vec_float<W, kN>(weight + static_cast<int64_t>(v) * kN, w);
      }
      T o[kN];
#pragma unroll
      for (int j = 0; j < kN; ++j) o[j] = norm_times_weight<T>(to_float(vals[i][j]), scale, w[j]);
      store_vec<T, kN>(out_row + static_cast<int64_t>(v) * kN, o);
    }
  }
}

// Any hidden size and alignment: scalar accesses, two passes over the row (the second mostly hits L2).
// Each thread reads back only elements it wrote itself, so no extra synchronisation is needed.
template <typename T, typename W, bool kAdd>
__global__ void __launch_bounds__(1024)
    rms_norm_generic_kernel(const T* x, T* out, T* residual, const W* __restrict__ weight, int64_t hidden,
                            int64_t x_row_stride, int64_t out_row_stride, int64_t residual_row_stride, float eps) {
  __shared__ float smem[32];
  pdl_wait();  // csrc/pdl.cuh: this fallback reads nothing before it
  pdl_launch_dependents();
  const int64_t row = blockIdx.x;
  const T* x_row = x + row * x_row_stride;
  T* res_row = kAdd ? residual + row * residual_row_stride : nullptr;
  float sum_sq = 0.f;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    float f = to_float(x_row[i]);
    if constexpr (kAdd) {
      const T r = from_float<T>(to_float(res_row[i]) + f);
      res_row[i] = r;
      f = to_float(r);
    }
    sum_sq += f * f;
  }
  const float total = block_sum(sum_sq, smem);
  const float scale = rsqrtf(total / static_cast<float>(hidden) + eps);
  T* out_row = out + row * out_row_stride;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float f = to_float(kAdd ? res_row[i] : x_row[i]);
    out_row[i] = norm_times_weight<T>(f, scale, to_float(weight[i]));
  }
}

template <typename T, typename W, int kVecs, bool kAdd>
cudaError_t launch_vec(const T* x, T* out, T* residual, const W* weight, int64_t rows, int64_t hidden,
                       int64_t xs, int64_t os, int64_t rs, float eps, int threads, cudaStream_t stream,
                       bool use_pdl) {
  return launch_pdl(rms_norm_vec_kernel<T, W, kVecs, kAdd>, dim3(static_cast<unsigned int>(rows)), dim3(threads), 0,
                    stream, use_pdl, x, out, residual, weight, hidden, xs, os, rs, eps);
}

template <typename T, typename W, bool kAdd>
cudaError_t launch_rows(const T* x, T* out, T* residual, const W* weight, int64_t rows, int64_t hidden,
                        int64_t xs, int64_t os, int64_t rs, float eps, cudaStream_t stream, bool use_pdl) {
  if (rows == 0 || hidden == 0) return cudaSuccess;
  if (rows > 0x7fffffffLL) return cudaErrorInvalidValue;  // grid.x limit; norm.cpp checks first
  constexpr int kN = 16 / sizeof(T);
  const bool vec_ok = hidden % kN == 0 && xs % kN == 0 && os % kN == 0 && rs % kN == 0 && aligned16(x) &&
                      aligned16(out) && aligned16(weight) && (!kAdd || aligned16(residual));
  const int64_t num_vecs = hidden / kN;
  if (vec_ok && num_vecs <= 8 * row_kernel_max_threads<8>()) {
    // Few rows: wide blocks for latency. Many rows: 256-thread blocks with a few vectors per thread
    // keep several rows per SM in flight.
    const int64_t target = rows >= 1024 ? 256 : 1024;
    const auto threads_ok = [&](int vecs) {
      const int64_t limit = vecs >= 4 ? row_kernel_max_threads<4>() : row_kernel_max_threads<1>();
      return (num_vecs + vecs - 1) / vecs <= (target < limit ? target : limit);
    };
    int vecs = 1;
    while (vecs < 8 && !threads_ok(vecs)) vecs *= 2;
    const int threads = static_cast<int>(((num_vecs + vecs - 1) / vecs + 31) / 32 * 32);
    switch (vecs) {
      case 1: return launch_vec<T, W, 1, kAdd>(x, out, residual, weight, rows, hidden, xs, os, rs, eps, threads, stream, use_pdl);
      case 2: return launch_vec<T, W, 2, kAdd>(x, out, residual, weight, rows, hidden, xs, os, rs, eps, threads, stream, use_pdl);
      case 4: return launch_vec<T, W, 4, kAdd>(x, out, residual, weight, rows, hidden, xs, os, rs, eps, threads, stream, use_pdl);
      default: return launch_vec<T, W, 8, kAdd>(x, out, residual, weight, rows, hidden, xs, os, rs, eps, threads, stream, use_pdl);
    }
  }
  const int threads = static_cast<int>(hidden >= 1024 ? 1024 : (hidden + 31) / 32 * 32);
  return launch_pdl(rms_norm_generic_kernel<T, W, kAdd>, dim3(static_cast<unsigned int>(rows)), dim3(threads), 0,
                    stream, use_pdl, x, out, residual, weight, hidden, xs, os, rs, eps);
}

// ------------------------------------------------------------------------------------------------
// QK-norm + RoPE. An "item" is one (token, head); heads [0, Hq) are q's, [Hq, Hq + Hk) are k's.

struct QkArgs {
  int64_t num_items;  // T * (Hq + Hk)
  int num_q_heads, num_k_heads;
  int64_t num_positions;
  HeadStrides q_strides, k_strides, v_strides;
  int64_t num_cache_rows;
  float eps;
};

template <typename T, typename W, int kD, bool kCache>
__global__ void __launch_bounds__(256)
    qk_norm_rope_kernel(T* q, T* k, const W* __restrict__ q_weight, const W* __restrict__ k_weight,
                        const int64_t* __restrict__ positions, const float* __restrict__ cos_sin, QkArgs a,
                        const T* v, T* k_cache, T* v_cache, const int64_t* __restrict__ cache_rows) {
  constexpr int kHalf = NormRopeLanes<T, kD>::kHalf;  // elements per lane in each half of the head
  constexpr int kLanes = NormRopeLanes<T, kD>::kLanes;
  constexpr int kHalfD = kD / 2;
  const int lane = threadIdx.x % kLanes;
  const int64_t groups_per_block = blockDim.x / kLanes;
  int64_t item = static_cast<int64_t>(blockIdx.x) * groups_per_block + threadIdx.x / kLanes;
  // Items past the end still run the shuffles below (full-warp masks) on clamped, in-bounds
  // addresses; they just store nothing. Poisoned items compute on a clamped position and store NaN.
  const bool in_range = item < a.num_items;
  if (!in_range) item = a.num_items - 1;
  const int num_heads = a.num_q_heads + a.num_k_heads;
  const int64_t token = item / num_heads;
  const int head = static_cast<int>(item - token * num_heads);
  const bool is_q = head < a.num_q_heads;
  const int k_head = head - a.num_q_heads;
  const int64_t off = static_cast<int64_t>(lane) * kHalf;

  // The norm weights are requested first, before the PDL wait (csrc/pdl.cuh: never written in a step):
  // their latency hides behind it. Everything else (q, k, v, the positions and so the cos/sin rows,
  // the cache rows) is produced in the step and read after it.
  const W* weight = is_q ? q_weight : k_weight;
  float w1[kHalf], w2[kHalf];
  load_vec_float<W, kHalf>(weight + off, w1);
  load_vec_float<W, kHalf>(weight + kHalfD + off, w2);
  pdl_wait();
  pdl_launch_dependents();

  int64_t pos = positions[token];
  bool poison = false;
  if (pos < 0 || pos >= a.num_positions) {
    poison = true;
    pos = 0;
  }
  T* base = is_q ? q + token * a.q_strides.token + head * a.q_strides.head
                 : k + token * a.k_strides.token + k_head * a.k_strides.head;
  T x1[kHalf], x2[kHalf];
  load_vec<T, kHalf>(base + off, x1);
  load_vec<T, kHalf>(base + kHalfD + off, x2);
  T v1[kCache ? kHalf : 1], v2[kCache ? kHalf : 1];
  int64_t cache_row = -1;
  bool cache_ok = false;
  if constexpr (kCache) {
    cache_row = cache_rows[token];
    cache_ok = cache_row >= 0 && cache_row < a.num_cache_rows;
    if (is_q && !cache_ok) poison = true;  // no cache row: the token's attention output must be NaN
    if (!is_q) {
      const T* v_head = v + token * a.v_strides.token + k_head * a.v_strides.head;
      load_vec<T, kHalf>(v_head + off, v1);
      load_vec<T, kHalf>(v_head + kHalfD + off, v2);
    }
  }

  // cos/sin (L1/L2-resident) are requested before the reduction, hiding their latency.
  float c[kHalf], s[kHalf];
  if (poison) {  // bad position (the table may even be empty): nothing to read
#pragma unroll
    for (int j = 0; j < kHalf; ++j) c[j] = s[j] = 0.f;
  } else {
    const float* cs_row = cos_sin + pos * kD;
    load_vec<float, kHalf>(cs_row + off, c);
    load_vec<float, kHalf>(cs_row + kHalfD + off, s);
  }

  norm_rope_in_lanes<T, kD>(x1, x2, w1, w2, c, s, a.eps);
  if (!in_range) return;  // no warp-collective operation below
  if (poison) {
#pragma unroll
    for (int j = 0; j < kHalf; ++j) x1[j] = x2[j] = from_float<T>(__int_as_float(0x7fffffff));
  }
  store_vec<T, kHalf>(base + off, x1);
  store_vec<T, kHalf>(base + kHalfD + off, x2);
  if constexpr (kCache) {
    if (!is_q && cache_ok) {
      const int64_t cache_off = (cache_row * a.num_k_heads + k_head) * kD + off;
      store_vec<T, kHalf>(k_cache + cache_off, x1);
      store_vec<T, kHalf>(k_cache + cache_off + kHalfD, x2);
      store_vec<T, kHalf>(v_cache + cache_off, v1);
      store_vec<T, kHalf>(v_cache + cache_off + kHalfD, v2);
    }
  }
}

// Any even head_dim, any alignment: one warp per item, scalar accesses, two passes over the head.
// Lane l owns the pairs (i, i + D/2) with i = l (mod 32) in both passes.
template <typename T, typename W, bool kCache>
__global__ void __launch_bounds__(256)
    qk_norm_rope_generic_kernel(T* q, T* k, const W* __restrict__ q_weight, const W* __restrict__ k_weight,
                                const int64_t* __restrict__ positions, const float* __restrict__ cos_sin,
                                QkArgs a, int64_t head_dim, const T* v, T* k_cache, T* v_cache,
                                const int64_t* __restrict__ cache_rows) {
  pdl_wait();  // csrc/pdl.cuh: this fallback reads nothing before it
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31;
  int64_t item = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const bool in_range = item < a.num_items;
  if (!in_range) item = a.num_items - 1;
  const int num_heads = a.num_q_heads + a.num_k_heads;
  const int64_t token = item / num_heads;
  const int head = static_cast<int>(item - token * num_heads);
  const bool is_q = head < a.num_q_heads;
  const int k_head = head - a.num_q_heads;
  int64_t pos = positions[token];
  bool poison = false;
  if (pos < 0 || pos >= a.num_positions) {
    poison = true;
    pos = 0;
  }
  T* base = is_q ? q + token * a.q_strides.token + head * a.q_strides.head
                 : k + token * a.k_strides.token + k_head * a.k_strides.head;
  const int half = static_cast<int>(head_dim / 2);
  float sum_sq = 0.f;
  for (int i = lane; i < half; i += 32) {
    const float f1 = to_float(base[i]), f2 = to_float(base[i + half]);
    sum_sq += f1 * f1 + f2 * f2;
  }
  sum_sq = warp_sum(sum_sq);
  if (!in_range) return;  // no warp-collective operation below
  const float scale = rsqrtf(sum_sq / static_cast<float>(head_dim) + a.eps);
  const W* weight = is_q ? q_weight : k_weight;
  const float* cs_row = cos_sin + pos * head_dim;
  int64_t cache_row = -1;
  bool cache_ok = false;
  if constexpr (kCache) {
    cache_row = cache_rows[token];
    cache_ok = cache_row >= 0 && cache_row < a.num_cache_rows;
    if (is_q && !cache_ok) poison = true;  // no cache row: the token's attention output must be NaN
  }
  const bool write_cache = kCache && !is_q && cache_ok;
  const int64_t cache_off = (cache_row * a.num_k_heads + k_head) * head_dim;
  const T* v_head = kCache && !is_q ? v + token * a.v_strides.token + k_head * a.v_strides.head : nullptr;
  for (int i = lane; i < half; i += 32) {
    const float y1 = to_float(norm_times_weight<T>(to_float(base[i]), scale, to_float(weight[i])));
    const float y2 = to_float(norm_times_weight<T>(to_float(base[i + half]), scale, to_float(weight[i + half])));
    const float c = poison ? 0.f : cs_row[i], s = poison ? 0.f : cs_row[i + half];
    const float nan = __int_as_float(0x7fffffff);
    const T o1 = from_float<T>(poison ? nan : rope_first(y1, y2, c, s));
    const T o2 = from_float<T>(poison ? nan : rope_second(y1, y2, c, s));
    base[i] = o1;
    base[i + half] = o2;
    if (write_cache) {
      k_cache[cache_off + i] = o1;
      k_cache[cache_off + i + half] = o2;
      v_cache[cache_off + i] = v_head[i];
      v_cache[cache_off + i + half] = v_head[i + half];
    }
  }
}

template <typename T, typename W, int kD, bool kCache>
cudaError_t launch_qk_fast(T* q, T* k, const W* qw, const W* kw, const int64_t* positions, const float* cos_sin,
                           const QkArgs& a, const T* v, T* k_cache, T* v_cache, const int64_t* cache_rows,
                           cudaStream_t stream, bool use_pdl) {
  constexpr int kThreads = 256;
  constexpr int kLanes = kD / (2 * (16 / static_cast<int>(sizeof(T))));
  constexpr int64_t kItemsPerBlock = kThreads / kLanes;
  const int64_t blocks = (a.num_items + kItemsPerBlock - 1) / kItemsPerBlock;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  return launch_pdl(qk_norm_rope_kernel<T, W, kD, kCache>, dim3(static_cast<unsigned int>(blocks)), dim3(kThreads), 0,
                    stream, use_pdl, q, k, qw, kw, positions, cos_sin, a, v, k_cache, v_cache, cache_rows);
}

template <typename T, typename W, bool kCache>
cudaError_t launch_qk(T* q, T* k, const W* qw, const W* kw, const int64_t* positions, const float* cos_sin,
                      const QkArgs& a, int64_t head_dim, const T* v, T* k_cache, T* v_cache,
                      const int64_t* cache_rows, cudaStream_t stream, bool use_pdl) {
  constexpr int64_t kHalf = 16 / sizeof(T);
  const HeadStrides& qs = a.q_strides;
  const HeadStrides& ks = a.k_strides;
  const HeadStrides& vs = a.v_strides;
  bool fast = (head_dim == 64 || head_dim == 128 || head_dim == 256) && aligned16(q) && aligned16(k) &&
              aligned16(qw) && aligned16(kw) && aligned16(cos_sin) && qs.token % kHalf == 0 &&
              qs.head % kHalf == 0 && ks.token % kHalf == 0 && ks.head % kHalf == 0;
  if (kCache)
    fast = fast && aligned16(v) && aligned16(k_cache) && aligned16(v_cache) && vs.token % kHalf == 0 &&
           vs.head % kHalf == 0;
  if (fast) {
    switch (head_dim) {
      case 64: return launch_qk_fast<T, W, 64, kCache>(q, k, qw, kw, positions, cos_sin, a, v, k_cache, v_cache, cache_rows, stream, use_pdl);
      case 128: return launch_qk_fast<T, W, 128, kCache>(q, k, qw, kw, positions, cos_sin, a, v, k_cache, v_cache, cache_rows, stream, use_pdl);
      default: return launch_qk_fast<T, W, 256, kCache>(q, k, qw, kw, positions, cos_sin, a, v, k_cache, v_cache, cache_rows, stream, use_pdl);
    }
  }
  constexpr int kThreads = 256;
  const int64_t blocks = (a.num_items + kThreads / 32 - 1) / (kThreads / 32);
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  return launch_pdl(qk_norm_rope_generic_kernel<T, W, kCache>, dim3(static_cast<unsigned int>(blocks)), dim3(kThreads),
                    0, stream, use_pdl, q, k, qw, kw, positions, cos_sin, a, head_dim, v, k_cache, v_cache, cache_rows);
}

}  // namespace

// The weight is either the activation dtype or fp32 (norm.cpp converts anything else to fp32).
#define DOTS1_NORM_DISPATCH(dtype, weight_dtype, err, CALL)                  \
  DOTS1_DISPATCH_FLOAT_TYPES(dtype, scalar_t, {                              \
    if ((weight_dtype) == (dtype)) {                                         \
      using weight_t = scalar_t;                                             \
      err = CALL;                                                            \
    } else if ((weight_dtype) == DType::kFloat32) {                          \
      using weight_t = float;                                                \
      err = CALL;                                                            \
    }                                                                        \
  })

cudaError_t launch_rms_norm(const void* x, const void* weight, void* out, int64_t rows, int64_t hidden,
                            int64_t x_row_stride, int64_t out_row_stride, float eps, DType dtype,
                            DType weight_dtype, cudaStream_t stream, bool use_pdl) {
  cudaError_t err = cudaErrorInvalidValue;
  DOTS1_NORM_DISPATCH(dtype, weight_dtype, err,
                      (launch_rows<scalar_t, weight_t, false>(
                          static_cast<const scalar_t*>(x), static_cast<scalar_t*>(out), nullptr,
                          static_cast<const weight_t*>(weight), rows, hidden, x_row_stride, out_row_stride, 0, eps,
                          stream, use_pdl)));
  return err;
}

cudaError_t launch_add_rms_norm(void* x, void* residual, const void* weight, int64_t rows, int64_t hidden,
                                int64_t x_row_stride, int64_t residual_row_stride, float eps, DType dtype,
                                DType weight_dtype, cudaStream_t stream, bool use_pdl) {
  cudaError_t err = cudaErrorInvalidValue;
  DOTS1_NORM_DISPATCH(dtype, weight_dtype, err,
                      (launch_rows<scalar_t, weight_t, true>(
                          static_cast<const scalar_t*>(x), static_cast<scalar_t*>(x),
                          static_cast<scalar_t*>(residual), static_cast<const weight_t*>(weight), rows, hidden,
                          x_row_stride, x_row_stride, residual_row_stride, eps, stream, use_pdl)));
  return err;
}

cudaError_t launch_qk_norm_rope(void* q, void* k, const void* q_weight, const void* k_weight,
                                const int64_t* positions, const float* cos_sin_cache, int64_t num_tokens,
                                int64_t num_q_heads, int64_t num_k_heads, int64_t head_dim, int64_t num_positions,
                                HeadStrides q_strides, HeadStrides k_strides, float eps, const void* v,
                                HeadStrides v_strides, void* k_cache, void* v_cache, const int64_t* cache_rows,
                                int64_t num_cache_rows, DType dtype, DType weight_dtype, cudaStream_t stream,
                                bool use_pdl) {
  const int64_t num_heads = num_q_heads + num_k_heads;
  // num_positions == 0: every position is bad; the kernels poison every token and never read the
  // (empty) cos/sin table: a bad position's cos/sin are not loaded.
  if (num_tokens == 0 || num_heads == 0 || head_dim == 0) return cudaSuccess;
  if (head_dim % 2 != 0 || num_heads > 0x7fffffffLL) return cudaErrorInvalidValue;
  QkArgs a;
  a.num_items = num_tokens * num_heads;
  a.num_q_heads = static_cast<int>(num_q_heads);
  a.num_k_heads = static_cast<int>(num_k_heads);
  a.num_positions = num_positions;
  a.q_strides = q_strides;
  a.k_strides = k_strides;
  a.v_strides = v_strides;
  a.num_cache_rows = num_cache_rows;
  a.eps = eps;
  cudaError_t err = cudaErrorInvalidValue;
  // cache_rows, not k_cache, selects the cache variant: an empty cache has no data pointer (every row is
  // then out of range: q is poisoned and nothing is written).
  if (cache_rows != nullptr) {
    DOTS1_NORM_DISPATCH(dtype, weight_dtype, err,
                        (launch_qk<scalar_t, weight_t, true>(
                            static_cast<scalar_t*>(q), static_cast<scalar_t*>(k),
                            static_cast<const weight_t*>(q_weight), static_cast<const weight_t*>(k_weight), positions,
                            cos_sin_cache, a, head_dim, static_cast<const scalar_t*>(v),
                            static_cast<scalar_t*>(k_cache), static_cast<scalar_t*>(v_cache), cache_rows, stream,
                            use_pdl)));
  } else {
    DOTS1_NORM_DISPATCH(dtype, weight_dtype, err,
                        (launch_qk<scalar_t, weight_t, false>(
                            static_cast<scalar_t*>(q), static_cast<scalar_t*>(k),
                            static_cast<const weight_t*>(q_weight), static_cast<const weight_t*>(k_weight), positions,
                            cos_sin_cache, a, head_dim, nullptr, nullptr, nullptr, nullptr, stream, use_pdl)));
  }
  return err;
}

#undef DOTS1_NORM_DISPATCH

}  // namespace dots1
