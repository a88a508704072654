// Portable grouped-GEMM kernels: the weight-streaming decode kernel (also the any-S fallback), the
// zeroing of rows no expert owns, and the SiLU-times-up epilogue used after an unfused GEMM.
#include <algorithm>

#include "cuda_utils.cuh"
#include "grouped_gemm/grouped_gemm.h"

namespace dots1 {
namespace {

constexpr int kDecodeThreads = 256;
constexpr int kDecodeWarps = kDecodeThreads / 32;
// Weight rows per warp: SwiGLU takes the gate and up rows of features f, f+1 (two outputs; f even, so
// both sit in one 8-row block of the interleaved layout); "none" takes rows n..n+3 (four outputs). Each x vector read from shared memory feeds 4 rows.
constexpr int kRowsPerWarp = 4;
// Shared-memory x tile: kDecodeRowsPerPass rows x kChunkVecs 16-byte vectors of K (32 KiB).
constexpr int kChunkVecs = 256;
constexpr int kMaxGridY = 65535;

__device__ __forceinline__ float silu_f(float g) { return g / (1.0f + expf(-g)); }

template <typename T>
__device__ __forceinline__ void vec_to_float(const Vec16<T>& v, float (&f)[Vec16<T>::kElems]) {
#pragma unroll
  for (int i = 0; i < Vec16<T>::kElems; ++i) f[i] = to_float(v.v[i]);
}

// Weight row of the gate (up = false) or up projection of output feature f.
template <SwiGLULayout kLayout>
__device__ __forceinline__ int64_t swiglu_row(int64_t f, int64_t N, bool up) {
  if constexpr (kLayout == SwiGLULayout::kInterleaved)
    return (f >> 3) * 16 + (up ? 8 : 0) + (f & 7);
  else
    return (up ? N / 2 : 0) + f;
}

// Clamped bounds of expert e: [lo, hi) inside [0, S].
__device__ __forceinline__ void expert_bounds(const int32_t* __restrict__ offsets, int64_t e, int64_t S,
                                              int64_t& lo, int64_t& hi) {
  lo = min(max(static_cast<int64_t>(__ldg(offsets + e)), int64_t{0}), S);
  hi = min(max(static_cast<int64_t>(__ldg(offsets + e + 1)), lo), S);
}

// Finds the work item `item` in the list of (expert, pass) pairs, pass p of expert e covering its
// rows [lo + p*TP, min(hi, lo + (p+1)*TP)). Warp-wide scan over experts, 32 at a time; every lane
// returns the same answer. Returns false when item is past the last pair.
__device__ bool find_work_item(const int32_t* __restrict__ offsets, int64_t E, int64_t S, int64_t item,
                               int64_t& expert, int64_t& pass) {
  const int lane = threadIdx.x & 31;
  int64_t before = 0;  // passes of the experts already scanned
  for (int64_t base = 0; base < E; base += 32) {
    const int64_t e = base + lane;
    int64_t passes = 0;
    if (e < E) {
      int64_t lo, hi;
      expert_bounds(offsets, e, S, lo, hi);
      passes = (hi - lo + kDecodeRowsPerPass - 1) / kDecodeRowsPerPass;
    }
    int64_t incl = passes;  // inclusive prefix over the lanes
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t n = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += n;
    }
    const int64_t total = __shfl_sync(0xffffffffu, incl, 31);
    if (item < before + total) {
      const unsigned hit = __ballot_sync(0xffffffffu, item < before + incl);
      const int src = __ffs(hit) - 1;
      const int64_t incl_src = __shfl_sync(0xffffffffu, incl, src);
      const int64_t passes_src = __shfl_sync(0xffffffffu, passes, src);
      expert = base + src;
      pass = item - (before + incl_src - passes_src);
      return true;
    }
    before += total;
  }
  return false;
}

// One work item: rows [r0, r0 + nrows) (nrows <= TP) of expert e, the kRowsPerWarp weight rows of
// each warp, the whole K. x goes through shared memory chunk by chunk (from global memory directly
// for one or two rows); weights stream from global memory in 16-byte loads, each byte read once for
// all the item's rows.
template <typename T, SwiGLULayout kLayout, int TP>
__device__ void decode_item(const T* __restrict__ x, const T* __restrict__ weight, T* __restrict__ out,
                            Vec16<T> (*x_tile)[kChunkVecs], int64_t e, int64_t r0, int nrows, int64_t N,
                            int64_t K, int64_t N_out, int64_t col0, bool warp_active) {
  constexpr int VE = Vec16<T>::kElems;
  const int lane = threadIdx.x & 31;
  constexpr bool kSwiGLU = kLayout != SwiGLULayout::kNone;
  const int64_t KV = K / VE;  // K is a multiple of 8 (checked on the host), hence of VE

  // Weight rows of this warp (valid only when warp_active).
  const Vec16<T>* wrow[kRowsPerWarp];
  {
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      int64_t row;
      if constexpr (kSwiGLU)
        row = swiglu_row<kLayout>(col0 + (r & 1), N, /*up=*/r >= 2);
      else
        row = col0 + r;
      if (!warp_active) row = 0;
      wrow[r] = reinterpret_cast<const Vec16<T>*>(weight + (e * N + row) * K);
    }
  }

  float acc[kRowsPerWarp][TP];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int t = 0; t < TP; ++t) acc[r][t] = 0.0f;

  if constexpr (TP <= 2) {
    // One or two rows (decode): x straight from global memory (L1/L2-resident, read by every warp),
    // so the weight stream never waits on a shared-memory tile and its barriers.
    if (warp_active) {
      const Vec16<T>* xrow[TP];
#pragma unroll
      for (int t = 0; t < TP; ++t) xrow[t] = reinterpret_cast<const Vec16<T>*>(x + (r0 + min(t, nrows - 1)) * K);
#pragma unroll 4
      for (int64_t v = lane; v < KV; v += 32) {
        float wf[kRowsPerWarp][VE];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const int4 raw = __ldg(reinterpret_cast<const int4*>(wrow[r] + v));
          vec_to_float(*reinterpret_cast<const Vec16<T>*>(&raw), wf[r]);
        }
#pragma unroll
        for (int t = 0; t < TP; ++t) {
          const int4 raw = __ldg(reinterpret_cast<const int4*>(xrow[t] + v));
          float xf[VE];
          vec_to_float(*reinterpret_cast<const Vec16<T>*>(&raw), xf);
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
            for (int j = 0; j < VE; ++j) acc[r][t] = fmaf(wf[r][j], xf[j], acc[r][t]);
        }
      }
    }
  } else {
    for (int64_t k0 = 0; k0 < KV; k0 += kChunkVecs) {
      const int nv = static_cast<int>(min(static_cast<int64_t>(kChunkVecs), KV - k0));
      __syncthreads();  // the previous chunk's x tile has been consumed
      for (int i = threadIdx.x; i < TP * kChunkVecs; i += kDecodeThreads) {
        const int t = i / kChunkVecs, v = i % kChunkVecs;
        Vec16<T> val;
        if (t < nrows && v < nv) {
          val = *reinterpret_cast<const Vec16<T>*>(x + (r0 + t) * K + (k0 + v) * VE);
        } else {
#pragma unroll
          for (int j = 0; j < VE; ++j) val.v[j] = from_float<T>(0.0f);
        }
        x_tile[t][v] = val;
      }
      __syncthreads();
      if (warp_active) {
#pragma unroll 4
        for (int v = lane; v < nv; v += 32) {
          float wf[kRowsPerWarp][VE];
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
            const int4 raw = __ldg(reinterpret_cast<const int4*>(wrow[r] + k0 + v));
            vec_to_float(*reinterpret_cast<const Vec16<T>*>(&raw), wf[r]);
          }
#pragma unroll
          for (int t = 0; t < TP; ++t) {
            float xf[VE];
            vec_to_float(x_tile[t][v], xf);
#pragma unroll
            for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
              for (int j = 0; j < VE; ++j) acc[r][t] = fmaf(wf[r][j], xf[j], acc[r][t]);
          }
        }
      }
    }
  }

  if (!warp_active) return;
#pragma unroll
  for (int t = 0; t < TP; ++t) {
    float s[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) s[r] = warp_sum(acc[r][t]);
    if (lane == t && t < nrows) {
      T* o = out + (r0 + t) * N_out;
      if constexpr (kSwiGLU) {
        o[col0] = from_float<T>(silu_f(s[0]) * s[2]);
        o[col0 + 1] = from_float<T>(silu_f(s[1]) * s[3]);
      } else {
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) o[col0 + r] = from_float<T>(s[r]);
      }
    }
  }
}

template <typename T, SwiGLULayout kLayout>
__global__ void __launch_bounds__(kDecodeThreads, 2)
    grouped_gemm_decode_kernel(const T* __restrict__ x, const T* __restrict__ weight,
                               const int32_t* __restrict__ offsets, T* __restrict__ out, int64_t S, int64_t E,
                               int64_t N, int64_t K, int64_t num_items) {
  constexpr bool kSwiGLU = kLayout != SwiGLULayout::kNone;
  constexpr int kColsPerWarp = kSwiGLU ? 2 : kRowsPerWarp;
  __shared__ Vec16<T> x_tile[kDecodeRowsPerPass][kChunkVecs];
  __shared__ int64_t item_info[2];

  const int64_t N_out = kSwiGLU ? N / 2 : N;
  {
    // Rows no expert owns ([0, offsets[0]) and [offsets[E], S)) are zeroed here rather than by a
    // second launch: decode is launch-bound. Usually there are none and this reads two offsets.
    const int64_t first = min(max(static_cast<int64_t>(__ldg(offsets)), int64_t{0}), S);
    const int64_t last = min(max(static_cast<int64_t>(__ldg(offsets + E)), first), S);
    const int64_t total = (first + (S - last)) * N_out;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * gridDim.y * kDecodeThreads;
    for (int64_t i = (static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * kDecodeThreads + threadIdx.x;
         i < total; i += stride) {
      const int64_t u = i / N_out, row = u < first ? u : last + (u - first);
      out[row * N_out + i % N_out] = from_float<T>(0.0f);
    }
  }
  const int warp = threadIdx.x / 32;
  const int64_t col0 = (static_cast<int64_t>(blockIdx.x) * kDecodeWarps + warp) * kColsPerWarp;
  const bool warp_active = col0 < N_out;  // N_out is a multiple of kColsPerWarp (N % 8 == 0)

  for (int64_t item = blockIdx.y; item < num_items; item += gridDim.y) {
    __syncthreads();  // item_info of the previous item has been read by every thread
    if (warp == 0) {
      int64_t e = -1, pass = 0;
      if (!find_work_item(offsets, E, S, item, e, pass)) e = -1;
      if ((threadIdx.x & 31) == 0) {
        item_info[0] = e;
        item_info[1] = pass;
      }
    }
    __syncthreads();
    const int64_t e = item_info[0];
    if (e < 0) return;  // uniform over the block; later items are past the end too
    int64_t lo, hi;
    expert_bounds(offsets, e, S, lo, hi);
    const int64_t r0 = lo + item_info[1] * kDecodeRowsPerPass;
    const int nrows = static_cast<int>(min(static_cast<int64_t>(kDecodeRowsPerPass), hi - r0));
    // Uniform branch over the block: fewer rows, fewer FMAs (decode mostly has 1-2 rows per expert).
    if (nrows <= 1)
      decode_item<T, kLayout, 1>(x, weight, out, x_tile, e, r0, nrows, N, K, N_out, col0, warp_active);
    else if (nrows <= 2)
      decode_item<T, kLayout, 2>(x, weight, out, x_tile, e, r0, nrows, N, K, N_out, col0, warp_active);
    else if (nrows <= 4)
      decode_item<T, kLayout, 4>(x, weight, out, x_tile, e, r0, nrows, N, K, N_out, col0, warp_active);
    else
      decode_item<T, kLayout, kDecodeRowsPerPass>(x, weight, out, x_tile, e, r0, nrows, N, K, N_out, col0,
                                                  warp_active);
  }
}

template <typename T>
__global__ void zero_uncovered_rows_kernel(T* __restrict__ out, const int32_t* __restrict__ offsets, int64_t S,
                                           int64_t E, int64_t row_vecs, bool vectorised, int64_t N_out) {
  const int64_t first = min(max(static_cast<int64_t>(__ldg(offsets)), int64_t{0}), S);
  const int64_t last = min(max(static_cast<int64_t>(__ldg(offsets + E)), first), S);
  // Uncovered rows: [0, first) then [last, S), numbered 0 .. n_rows-1.
  const int64_t n_rows = first + (S - last);
  const int64_t per_row = vectorised ? row_vecs : N_out;
  const int64_t total = n_rows * per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t u = i / per_row, c = i % per_row;
    const int64_t row = u < first ? u : last + (u - first);
    if (vectorised) {
      reinterpret_cast<int4*>(out + row * N_out)[c] = make_int4(0, 0, 0, 0);
    } else {
      out[row * N_out + c] = from_float<T>(0.0f);
    }
  }
}

// One thread per VE consecutive features; VE divides 8, so they share one [8 gate | 8 up] block of
// the interleaved layout.
template <typename T, SwiGLULayout kLayout, bool kVectorised>
__global__ void silu_mul_kernel(const T* __restrict__ gate_up, T* __restrict__ out, int64_t S, int64_t N) {
  constexpr int VE = kVectorised ? Vec16<T>::kElems : 1;
  const int64_t half = N / 2;
  const int64_t per_row = half / VE;
  const int64_t total = S * per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / per_row, c = (i % per_row) * VE;
    const T* g = gate_up + row * N + swiglu_row<kLayout>(c, N, /*up=*/false);
    const T* u = gate_up + row * N + swiglu_row<kLayout>(c, N, /*up=*/true);
    if constexpr (kVectorised) {
      const Vec16<T> gv = *reinterpret_cast<const Vec16<T>*>(g);
      const Vec16<T> uv = *reinterpret_cast<const Vec16<T>*>(u);
      Vec16<T> o;
#pragma unroll
      for (int j = 0; j < VE; ++j) o.v[j] = from_float<T>(silu_f(to_float(gv.v[j])) * to_float(uv.v[j]));
      *reinterpret_cast<Vec16<T>*>(out + row * half + c) = o;
    } else {
      out[row * half + c] = from_float<T>(silu_f(to_float(g[0])) * to_float(u[0]));
    }
  }
}

unsigned int elementwise_blocks(int64_t work, int threads, int sm_count) {
  // Grid-stride loops: enough blocks to fill the GPU (16 per SM) several times over, no more.
  const int64_t most = static_cast<int64_t>(std::max(sm_count, 1)) * 16;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, most)));
}

}  // namespace

cudaError_t launch_grouped_gemm_decode(const void* x, const void* weight, const int32_t* expert_offsets, void* out,
                                       int64_t S, int64_t E, int64_t N, int64_t K, SwiGLULayout swiglu_layout,
                                       DType dtype, cudaStream_t stream) {
  // K == 0 needs no special case: the K loop is empty and the covered rows get exact zeros.
  if (S == 0 || N == 0) return cudaSuccess;
  if (N % 8 != 0 || K % 8 != 0) return cudaErrorInvalidValue;
  if (swiglu_layout == SwiGLULayout::kInterleaved && N % 16 != 0) return cudaErrorInvalidValue;
  const bool swiglu = swiglu_layout != SwiGLULayout::kNone;
  const int64_t N_out = swiglu ? N / 2 : N;
  if (E == 0) return launch_zero_uncovered_rows(out, expert_offsets, S, E, N_out, dtype, stream);
  const int64_t cols_per_block = static_cast<int64_t>(kDecodeWarps) * (swiglu ? 2 : kRowsPerWarp);
  const int64_t grid_x = (N_out + cols_per_block - 1) / cols_per_block;
  // Upper bound of the (expert, pass) pairs: sum over experts of ceil(rows/TP) <= S/TP + min(E, S).
  const int64_t num_items = (S + kDecodeRowsPerPass - 1) / kDecodeRowsPerPass + std::min(E, S);
  if (grid_x > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned int>(grid_x), static_cast<unsigned int>(std::min<int64_t>(num_items, kMaxGridY)));
  DOTS1_DISPATCH_FLOAT_TYPES(dtype, scalar_t, {
    const auto* xp = static_cast<const scalar_t*>(x);
    const auto* wp = static_cast<const scalar_t*>(weight);
    auto* op = static_cast<scalar_t*>(out);
    if (swiglu_layout == SwiGLULayout::kHF)
      grouped_gemm_decode_kernel<scalar_t, SwiGLULayout::kHF>
          <<<grid, kDecodeThreads, 0, stream>>>(xp, wp, expert_offsets, op, S, E, N, K, num_items);
    else if (swiglu_layout == SwiGLULayout::kInterleaved)
      grouped_gemm_decode_kernel<scalar_t, SwiGLULayout::kInterleaved>
          <<<grid, kDecodeThreads, 0, stream>>>(xp, wp, expert_offsets, op, S, E, N, K, num_items);
    else
      grouped_gemm_decode_kernel<scalar_t, SwiGLULayout::kNone>
          <<<grid, kDecodeThreads, 0, stream>>>(xp, wp, expert_offsets, op, S, E, N, K, num_items);
  });
  return cudaGetLastError();
}

cudaError_t launch_zero_uncovered_rows(void* out, const int32_t* expert_offsets, int64_t S, int64_t E, int64_t N_out,
                                       DType dtype, cudaStream_t stream) {
  if (S == 0 || N_out == 0) return cudaSuccess;
  int sm_count = 0;
  const cudaError_t err = current_sm_count(&sm_count);
  if (err != cudaSuccess) return err;
  DOTS1_DISPATCH_FLOAT_TYPES(dtype, scalar_t, {
    constexpr int VE = Vec16<scalar_t>::kElems;
    const bool vectorised = N_out % VE == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
    const int64_t row_vecs = N_out / VE;
    // The grid cannot depend on the offsets (no host read): size it for the worst case, capped.
    const int64_t work = S * (vectorised ? row_vecs : N_out);
    zero_uncovered_rows_kernel<scalar_t><<<std::min(elementwise_blocks(work, 256, sm_count), 2u * sm_count), 256, 0, stream>>>(
        static_cast<scalar_t*>(out), expert_offsets, S, E, row_vecs, vectorised, N_out);
  });
  return cudaGetLastError();
}

cudaError_t launch_silu_mul(const void* gate_up, void* out, int64_t S, int64_t N, SwiGLULayout layout, DType dtype,
                            cudaStream_t stream) {
  if (S == 0 || N == 0) return cudaSuccess;
  if (layout == SwiGLULayout::kNone || (layout == SwiGLULayout::kInterleaved && N % 16 != 0))
    return cudaErrorInvalidValue;
  int sm_count = 0;
  const cudaError_t err = current_sm_count(&sm_count);
  if (err != cudaSuccess) return err;
  DOTS1_DISPATCH_FLOAT_TYPES(dtype, scalar_t, {
    constexpr int VE = Vec16<scalar_t>::kElems;
    const int64_t half = N / 2;
    const bool vectorised = half % VE == 0 && reinterpret_cast<uintptr_t>(gate_up) % 16 == 0 &&
                            reinterpret_cast<uintptr_t>(out) % 16 == 0;
    const auto* gp = static_cast<const scalar_t*>(gate_up);
    auto* op = static_cast<scalar_t*>(out);
    const unsigned vec_blocks = elementwise_blocks(S * (half / VE), 256, sm_count),
                   blocks = elementwise_blocks(S * half, 256, sm_count);
    if (layout == SwiGLULayout::kInterleaved) {
      if (vectorised)
        silu_mul_kernel<scalar_t, SwiGLULayout::kInterleaved, true><<<vec_blocks, 256, 0, stream>>>(gp, op, S, N);
      else
        silu_mul_kernel<scalar_t, SwiGLULayout::kInterleaved, false><<<blocks, 256, 0, stream>>>(gp, op, S, N);
    } else {
      if (vectorised)
        silu_mul_kernel<scalar_t, SwiGLULayout::kHF, true><<<vec_blocks, 256, 0, stream>>>(gp, op, S, N);
      else
        silu_mul_kernel<scalar_t, SwiGLULayout::kHF, false><<<blocks, 256, 0, stream>>>(gp, op, S, N);
    }
  });
  return cudaGetLastError();
}

}  // namespace dots1
