// Permute / unpermute kernels and launchers. Contracts and out-of-range behaviour: dispatch.h.
#include <algorithm>
#include <type_traits>

#include "cuda_utils.cuh"
#include "dispatch/dispatch.h"

namespace dots1 {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kIndexWarps = 32;  // the index kernel is one block of 32 warps
constexpr int kIdsPerRound = 8;  // ids per lane per batch; the next batch is loaded while one is ranked

template <typename T, int N>
struct alignas(sizeof(T) * N) VecN {
  T v[N];
};

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Bin of an expert id: the id itself, or E ("no expert", row_map -1) when it is out of range.
__device__ __forceinline__ int id_bin(int32_t id, int E) { return (id >= 0 && id < E) ? id : E; }

// Bins of the ids [base, base + 32 * kIdsPerRound) of a warp slice ending at `end`; -1 past it.
__device__ __forceinline__ void load_bins(const int32_t* __restrict__ ids, int64_t base, int64_t end, int E, int lane,
                                          int (&bins)[kIdsPerRound]) {
#pragma unroll
  for (int u = 0; u < kIdsPerRound; ++u) {
    const int64_t f = base + 32 * u + lane;
    bins[u] = f < end ? id_bin(ids[f], E) : -1;
  }
}

// Pass 1 over one warp's slice [begin, end) of the flat ids: counts per bin into my_hist (this warp's
// own row of counters). Within a 32-id round, lanes with the same bin are counted once via
// __match_any_sync; the next round's ids are loaded while one is counted.
__device__ __forceinline__ void count_warp_slice(const int32_t* __restrict__ ids, int64_t begin, int64_t end, int E,
                                                 int lane, int32_t* my_hist) {
  const int nb = E + 1;
  int next[kIdsPerRound];
  load_bins(ids, begin, end, E, lane, next);
  for (int64_t base = begin; base < end; base += 32 * kIdsPerRound) {
    int bins[kIdsPerRound];
#pragma unroll
    for (int u = 0; u < kIdsPerRound; ++u) bins[u] = next[u];
    load_bins(ids, base + 32 * kIdsPerRound, end, E, lane, next);
#pragma unroll
    for (int u = 0; u < kIdsPerRound; ++u) {
      const bool active = bins[u] >= 0;
      const unsigned peers = __match_any_sync(kFullMask, active ? bins[u] : nb + lane);
      if (active && lane == __ffs(peers) - 1) my_hist[bins[u]] += __popc(peers);
      __syncwarp();
    }
  }
}

// Pass 2 over the same slice, in order: my_hist holds this warp's first rank per bin (advanced here);
// row_map gets seg_start[bin] + rank, so ranks follow (token, slot) order within each expert.
__device__ __forceinline__ void rank_warp_slice(const int32_t* __restrict__ ids, int64_t begin, int64_t end, int E,
                                                int lane, int32_t* my_hist, const int32_t* seg_start,
                                                int32_t* __restrict__ row_map) {
  const int nb = E + 1;
  const unsigned lanes_below = (1u << lane) - 1u;
  int next[kIdsPerRound];
  load_bins(ids, begin, end, E, lane, next);
  for (int64_t base = begin; base < end; base += 32 * kIdsPerRound) {
    int bins[kIdsPerRound];
#pragma unroll
    for (int u = 0; u < kIdsPerRound; ++u) bins[u] = next[u];
    load_bins(ids, base + 32 * kIdsPerRound, end, E, lane, next);
#pragma unroll
    for (int u = 0; u < kIdsPerRound; ++u) {
      const bool active = bins[u] >= 0;
      const unsigned peers = __match_any_sync(kFullMask, active ? bins[u] : nb + lane);
      const int before = active ? my_hist[bins[u]] : 0;
      __syncwarp();
      if (active && lane == __ffs(peers) - 1) my_hist[bins[u]] = before + __popc(peers);
      __syncwarp();
      // Poison policy (dispatch.h): an out-of-range id (bin E) takes no row.
      if (active) row_map[base + 32 * u + lane] = bins[u] == E ? -1 : seg_start[bins[u]] + before + __popc(peers & lanes_below);
    }
  }
}

// The ids [begin, end) of a block cut into `warps` contiguous slices of whole 32-id rounds.
__device__ __forceinline__ void warp_slice(int64_t begin, int64_t end, int warps, int warp, int64_t& lo, int64_t& hi) {
  const int64_t per_warp = ((end - begin + warps - 1) / warps + 31) / 32 * 32;
  lo = std::min<int64_t>(end, begin + warp * per_warp);
  hi = std::min<int64_t>(end, lo + per_warp);
}

// Exclusive scan of hist[w][b] over the warps w, per bin, plus base[b] (nullptr: 0); returns nothing,
// writes each bin's total to totals[b] when totals is given.
__device__ __forceinline__ void scan_warp_counts(int32_t* hist, int warps, int nb, const int32_t* base,
                                                 int32_t* totals) {
  for (int b = threadIdx.x; b < nb; b += blockDim.x) {
    int run = base != nullptr ? base[b] : 0;
    const int first = run;
    for (int w = 0; w < warps; ++w) {
      const int c = hist[w * nb + b];
      hist[w * nb + b] = run;
      run += c;
    }
    if (totals != nullptr) totals[b] = run - first;
  }
}

// Warp 0: seg[b] (a count per bin, b < nb = E + 1) -> the bin's first row, expert segments padded to
// pad_to rows; seg[nb] = the total. The other warps return at once.
__device__ __forceinline__ void scan_segments(int32_t* seg, int nb, int E, int pad_to) {
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  int carry = 0;
  for (int b0 = 0; b0 < nb; b0 += 32) {
    const int b = b0 + lane;
    const int count = b < nb ? seg[b] : 0;
    const int size = (b < E && pad_to > 1) ? (count + pad_to - 1) / pad_to * pad_to : count;
    int incl = size;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int n = __shfl_up_sync(kFullMask, incl, o);
      if (lane >= o) incl += n;
    }
    if (b < nb) seg[b] = carry + incl - size;
    carry += __shfl_sync(kFullMask, incl, 31);
  }
  if (lane == 0) seg[nb] = carry;
}

// One block. The flat ids [N = T*k] are cut into 32 contiguous slices, one per warp. Pass 1 counts
// each slice per bin; a column scan over the slices gives each warp its first rank per bin; a scan
// over bins (padded for pad_to) gives the segment starts; pass 2 walks the slices again in order,
// so that ranks follow (token, slot) order within each expert: the permutation is deterministic.
// The launch of choice for small N (decode, short prompts): one launch, no workspace traffic.
__global__ void __launch_bounds__(kIndexWarps * 32)
    permute_index_kernel(const int32_t* __restrict__ ids, int64_t N, int E, int pad_to,
                         int32_t* __restrict__ expert_offsets, int32_t* __restrict__ row_map,
                         int32_t* __restrict__ expert_counts) {
  extern __shared__ int32_t smem[];
  const int nb = E + 1;
  int32_t* hist = smem;                          // [kIndexWarps][nb]: counts, then next rank per bin
  int32_t* seg_start = smem + kIndexWarps * nb;  // [nb + 1]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  for (int i = tid; i < kIndexWarps * nb; i += blockDim.x) hist[i] = 0;
  __syncthreads();
  int64_t begin, end;
  warp_slice(0, N, kIndexWarps, warp, begin, end);
  count_warp_slice(ids, begin, end, E, lane, hist + warp * nb);
  __syncthreads();
  scan_warp_counts(hist, kIndexWarps, nb, nullptr, seg_start);
  __syncthreads();
  for (int b = tid; b < nb; b += blockDim.x) expert_counts[b] = seg_start[b];
  __syncthreads();  // the counts are read before warp 0 scans them in place
  scan_segments(seg_start, nb, E, pad_to);
  __syncthreads();
  for (int b = tid; b <= E; b += blockDim.x) expert_offsets[b] = seg_start[b];
  rank_warp_slice(ids, begin, end, E, lane, hist + warp * nb, seg_start, row_map);
}

// The same index in three launches over many blocks, for large N, where the single block above runs
// N ids through one SM twice (measured ~0.2 ms at N = 98304 while the GPU idles). Block j takes the ids
// [j * ids_per_block, ...), cut into kMultiWarps warp slices as above:
//   1. permute_block_count_kernel: pass 1; block j's count per bin -> block_counts[j][bin].
//   2. permute_block_scan_kernel (one block): per bin, an exclusive scan over the blocks (block j's first
//      rank in the bin, in place), the totals -> expert_counts, then the segment scan -> expert_offsets.
//   3. permute_block_rank_kernel: pass 1 again, the warp scan on top of block j's first ranks, pass 2.
// Same ranks as the single block (the order of (token, slot) within each expert), so the same row_map.
constexpr int kMultiWarps = 8;
static_assert(sizeof(int32_t) * (kMultiWarps * (kPermuteMaxExperts + 1) + kPermuteMaxExperts) <= 48 * 1024,
              "the multi-block index kernels fit the default 48 KiB of shared memory");

__global__ void __launch_bounds__(kMultiWarps * 32)
    permute_block_count_kernel(const int32_t* __restrict__ ids, int64_t N, int E, int64_t ids_per_block,
                               int32_t* __restrict__ block_counts) {
  extern __shared__ int32_t smem[];
  const int nb = E + 1;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  for (int i = tid; i < kMultiWarps * nb; i += blockDim.x) smem[i] = 0;
  __syncthreads();
  const int64_t block_begin = std::min<int64_t>(N, blockIdx.x * ids_per_block);
  int64_t begin, end;
  warp_slice(block_begin, std::min<int64_t>(N, block_begin + ids_per_block), kMultiWarps, warp, begin, end);
  count_warp_slice(ids, begin, end, E, lane, smem + warp * nb);
  __syncthreads();
  for (int b = tid; b < nb; b += blockDim.x) {
    int total = 0;
    for (int w = 0; w < kMultiWarps; ++w) total += smem[w * nb + b];
    block_counts[static_cast<int64_t>(blockIdx.x) * nb + b] = total;
  }
}

__global__ void __launch_bounds__(1024)
    permute_block_scan_kernel(int32_t* __restrict__ block_counts, int blocks, int E, int pad_to,
                              int32_t* __restrict__ expert_offsets, int32_t* __restrict__ expert_counts) {
  extern __shared__ int32_t seg_start[];  // [nb + 1]
  const int nb = E + 1;
  for (int b = threadIdx.x; b < nb; b += blockDim.x) {
    int run = 0;
    for (int j = 0; j < blocks; ++j) {
      int32_t* c = block_counts + static_cast<int64_t>(j) * nb + b;
      const int n = *c;
      *c = run;
      run += n;
    }
    expert_counts[b] = run;
    seg_start[b] = run;
  }
  __syncthreads();
  scan_segments(seg_start, nb, E, pad_to);
  __syncthreads();
  for (int b = threadIdx.x; b <= E; b += blockDim.x) expert_offsets[b] = seg_start[b];
}

__global__ void __launch_bounds__(kMultiWarps * 32)
    permute_block_rank_kernel(const int32_t* __restrict__ ids, int64_t N, int E, int64_t ids_per_block,
                              const int32_t* __restrict__ block_first, const int32_t* __restrict__ expert_offsets,
                              int32_t* __restrict__ row_map) {
  extern __shared__ int32_t smem[];
  const int nb = E + 1;
  int32_t* hist = smem;                          // [kMultiWarps][nb]
  int32_t* seg_start = smem + kMultiWarps * nb;  // [E]: bin E takes no row
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  for (int i = tid; i < kMultiWarps * nb; i += blockDim.x) hist[i] = 0;
  for (int b = tid; b < E; b += blockDim.x) seg_start[b] = expert_offsets[b];
  __syncthreads();
  const int64_t block_begin = std::min<int64_t>(N, blockIdx.x * ids_per_block);
  int64_t begin, end;
  warp_slice(block_begin, std::min<int64_t>(N, block_begin + ids_per_block), kMultiWarps, warp, begin, end);
  count_warp_slice(ids, begin, end, E, lane, hist + warp * nb);
  __syncthreads();
  scan_warp_counts(hist, kMultiWarps, nb, block_first + static_cast<int64_t>(blockIdx.x) * nb, nullptr);
  __syncthreads();
  rank_warp_slice(ids, begin, end, E, lane, hist + warp * nb, seg_start, row_map);
}

constexpr int kScatterUnroll = 4;
constexpr int kRowCache = 32;  // row_map / weight entries per token staged in shared memory
constexpr int kDots1TopK = 6;  // dots.llm1's num_experts_per_tok: unpermute has a compile-time form for it

// Blocks [0, T): token t copies hidden[t] to its valid destinations (rows < expert_offsets[E]).
// Blocks [T, T + gap_blocks): expert e zeroes its padding rows [offsets[e] + counts[e], offsets[e+1]).
// The rest zero the rows [offsets[E], S) (rows no valid id uses), grid-stride.
// Every row of permuted is written exactly once; the writes of different blocks never overlap.
template <typename V>
__global__ void permute_scatter_kernel(const V* __restrict__ hidden, const int32_t* __restrict__ row_map,
                                       const int32_t* __restrict__ expert_offsets,
                                       const int32_t* __restrict__ expert_counts, int64_t num_tokens, int k, int E,
                                       int gap_blocks, int tail_blocks, int64_t S, int64_t nvec,
                                       V* __restrict__ permuted) {
  int64_t b = blockIdx.x;
  if (b < num_tokens) {
    __shared__ int32_t dst_s[kRowCache];
    const int32_t valid_end = expert_offsets[E];
    const V* src = hidden + b * nvec;
    for (int j0 = 0; j0 < k; j0 += kRowCache) {
      const int nj = min(kRowCache, k - j0);
      if (threadIdx.x < nj) {
        const int32_t d = row_map[b * k + j0 + threadIdx.x];
        dst_s[threadIdx.x] = (d >= 0 && d < valid_end && d < S) ? d : -1;
      }
      __syncthreads();
      for (int64_t v0 = threadIdx.x; v0 < nvec; v0 += static_cast<int64_t>(blockDim.x) * kScatterUnroll) {
        V val[kScatterUnroll];
#pragma unroll
        for (int u = 0; u < kScatterUnroll; ++u) {
          const int64_t v = v0 + static_cast<int64_t>(u) * blockDim.x;
          if (v < nvec) val[u] = src[v];
        }
        for (int j = 0; j < nj; ++j) {
          const int32_t d = dst_s[j];
          if (d < 0) continue;
          V* dst = permuted + static_cast<int64_t>(d) * nvec;
#pragma unroll
          for (int u = 0; u < kScatterUnroll; ++u) {
            const int64_t v = v0 + static_cast<int64_t>(u) * blockDim.x;
            if (v < nvec) dst[v] = val[u];
          }
        }
      }
      __syncthreads();
    }
    return;
  }
  b -= num_tokens;
  const V zero{};
  auto zero_row = [&](int64_t r) {
    V* dst = permuted + r * nvec;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) dst[v] = zero;
  };
  if (b < gap_blocks) {
    const int e = static_cast<int>(b);
    const int64_t lo = std::max<int64_t>(0, static_cast<int64_t>(expert_offsets[e]) + expert_counts[e]);
    const int64_t hi = std::min<int64_t>(S, expert_offsets[e + 1]);
    for (int64_t r = lo; r < hi; ++r) zero_row(r);
    return;
  }
  b -= gap_blocks;
  for (int64_t r = std::max<int64_t>(0, expert_offsets[E]) + b; r < S; r += tail_blocks) zero_row(r);
}

// kTopK > 0: k is that compile-time constant, the slot loop unrolls and the bf16 kernel needs 39
// registers (6 blocks of 256 resident per SM) where the runtime-k form needs 48 (5). At T=16384 the old
// kernel (64 registers, 4 blocks) moved its bytes at ~0.67 of copy bandwidth on the H200, while the same
// mapping at 40 registers in bench/probes/unpermute_variants.cu reached ~1.0. kTopK == 0: any k.
template <typename T, int kV, int kTopK>
__global__ void unpermute_kernel(const T* __restrict__ expert_out, const int32_t* __restrict__ row_map,
                                 const float* __restrict__ topk_weights, const T* __restrict__ shared_out,
                                 const T* __restrict__ residual, int runtime_k, int64_t S, int64_t nvec,
                                 T* __restrict__ out) {
  static_assert(kTopK <= kRowCache, "a compile-time top-k is staged whole in shared memory");
  using Vec = VecN<T, kV>;
  const int k = kTopK > 0 ? kTopK : runtime_k;
  __shared__ int32_t src_s[kRowCache];
  __shared__ float w_s[kRowCache];
  const int64_t t = blockIdx.x;
  if (threadIdx.x < min(k, kRowCache)) {
    const int32_t r = row_map[t * k + threadIdx.x];
    src_s[threadIdx.x] = (r >= 0 && r < S) ? r : -1;
    w_s[threadIdx.x] = topk_weights[t * k + threadIdx.x];
  }
  __syncthreads();
  auto slot = [&](int j, int32_t& r, float& w) {
    if (kTopK > 0 || j < kRowCache) {
      r = src_s[j];
      w = w_s[j];
    } else {
      r = row_map[t * k + j];
      r = (r >= 0 && r < S) ? r : -1;
      w = topk_weights[t * k + j];
    }
  };
  // Rows are loaded as raw words: loaded as Vec (an array of T), nvcc 13 held each bf16 lane in a register
  // of its own (58 registers for top-6 where 39 do, so 4 blocks per SM instead of 6).
  using Raw = std::conditional_t<sizeof(Vec) == 16, uint4, Vec>;
  const Raw* rows = reinterpret_cast<const Raw*>(expert_out);
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
    float acc[kV];
#pragma unroll
    for (int i = 0; i < kV; ++i) acc[i] = 0.0f;
    // Loads of four slots are issued together (eight, all of top-6 at once, measured 3-6% slower at
    // T=16384 on the H200); the sums still run in slot order, and the product and the sum are rounded
    // separately (__fmul_rn/__fadd_rn forbid FMA contraction) exactly as the eager reference computes them.
    constexpr int kGroup = 4;
    bool poison = false;  // a row_map entry outside [0, S): the whole output row is NaN (dispatch.h)
#pragma unroll
    for (int j0 = 0; j0 < k; j0 += kGroup) {
      Raw x[kGroup];
      float w[kGroup];
      int32_t r[kGroup];
#pragma unroll
      for (int u = 0; u < kGroup; ++u) {
        r[u] = -1;
        w[u] = 0.0f;
        if (j0 + u < k) {
          slot(j0 + u, r[u], w[u]);
          poison |= r[u] < 0;
        }
        if (r[u] >= 0) x[u] = rows[static_cast<int64_t>(r[u]) * nvec + v];
      }
#pragma unroll
      for (int u = 0; u < kGroup; ++u) {
        if (r[u] < 0) continue;
        const T* xe = reinterpret_cast<const T*>(&x[u]);
#pragma unroll
        for (int i = 0; i < kV; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(w[u], to_float(xe[i])));
      }
    }
    if (shared_out != nullptr) {
      const Vec s = reinterpret_cast<const Vec*>(shared_out)[t * nvec + v];
#pragma unroll
      for (int i = 0; i < kV; ++i) acc[i] = __fadd_rn(acc[i], to_float(s.v[i]));
    }
    if (residual != nullptr) {
      const Vec s = reinterpret_cast<const Vec*>(residual)[t * nvec + v];
#pragma unroll
      for (int i = 0; i < kV; ++i) acc[i] = __fadd_rn(acc[i], to_float(s.v[i]));
    }
    Vec o;
#pragma unroll
    for (int i = 0; i < kV; ++i) o.v[i] = from_float<T>(poison ? __int_as_float(0x7fffffff) : acc[i]);
    reinterpret_cast<Vec*>(out)[t * nvec + v] = o;
  }
}

unsigned threads_for(int64_t work_per_row) {
  const int64_t t = (work_per_row + 31) / 32 * 32;
  return static_cast<unsigned>(std::clamp<int64_t>(t, 32, 256));
}

template <typename V>
cudaError_t launch_scatter(const void* hidden, const int32_t* row_map, const int32_t* expert_offsets,
                           const int32_t* expert_counts, int64_t T, int k, int E, int pad_to, int64_t S,
                           int64_t row_bytes, void* permuted, cudaStream_t stream) {
  const int64_t nvec = row_bytes / static_cast<int64_t>(sizeof(V));
  const int gap_blocks = pad_to > 1 ? E : 0;
  const int tail_blocks = static_cast<int>(std::clamp<int64_t>((S + 63) / 64, 1, 256));
  const int64_t blocks = T + gap_blocks + tail_blocks;
  permute_scatter_kernel<V><<<static_cast<unsigned>(blocks), threads_for((nvec + kScatterUnroll - 1) / kScatterUnroll),
                              0, stream>>>(static_cast<const V*>(hidden), row_map, expert_offsets, expert_counts, T,
                                           k, E, gap_blocks, tail_blocks, S, nvec, static_cast<V*>(permuted));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_permute(const void* hidden, const int32_t* topk_ids, int64_t num_tokens, int k,
                           int64_t hidden_size, int element_size, int num_experts, int pad_to, int64_t permuted_rows,
                           int index_blocks, void* permuted, int32_t* expert_offsets, int32_t* row_map,
                           int32_t* expert_counts_ws, cudaStream_t stream) {
  if (num_tokens < 0 || k < 0 || num_experts < 1 || num_experts > kPermuteMaxExperts || pad_to < 1 ||
      (element_size != 2 && element_size != 4) || index_blocks < 0 || index_blocks > kPermuteMaxIndexBlocks)
    return cudaErrorInvalidValue;
  const int64_t N = num_tokens * k;
  cudaError_t err = cudaSuccess;
  if (index_blocks <= 1) {
    const size_t smem = sizeof(int32_t) * (static_cast<size_t>(kIndexWarps) * (num_experts + 1) + num_experts + 2);
    if (smem > 48 * 1024) {
      // Raised once per device to the largest size (host-side attribute; done on the first call, under
      // std::call_once: concurrent first calls from several threads are safe).
      int device = 0;
      if ((err = cudaGetDevice(&device)) != cudaSuccess) return err;
      static PerDeviceOnce<cudaError_t> raised;
      err = raised.get(device, [] {
        const size_t most = sizeof(int32_t) * (static_cast<size_t>(kIndexWarps) * (kPermuteMaxExperts + 1) +
                                               kPermuteMaxExperts + 2);
        return cudaFuncSetAttribute(permute_index_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(most));
      });
      if (err != cudaSuccess) return err;
    }
    permute_index_kernel<<<1, kIndexWarps * 32, smem, stream>>>(topk_ids, N, num_experts, pad_to, expert_offsets,
                                                                 row_map, expert_counts_ws);
  } else {
    const int nb = num_experts + 1;
    const int64_t ids_per_block = permute_ids_per_block(N, index_blocks);
    int32_t* block_counts = expert_counts_ws + nb;
    const size_t count_smem = sizeof(int32_t) * kMultiWarps * nb;
    const size_t rank_smem = count_smem + sizeof(int32_t) * num_experts;
    permute_block_count_kernel<<<index_blocks, kMultiWarps * 32, count_smem, stream>>>(topk_ids, N, num_experts,
                                                                                      ids_per_block, block_counts);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    permute_block_scan_kernel<<<1, 1024, sizeof(int32_t) * (nb + 1), stream>>>(block_counts, index_blocks, num_experts,
                                                                              pad_to, expert_offsets, expert_counts_ws);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    permute_block_rank_kernel<<<index_blocks, kMultiWarps * 32, rank_smem, stream>>>(
        topk_ids, N, num_experts, ids_per_block, block_counts, expert_offsets, row_map);
  }
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (permuted_rows == 0 || hidden_size == 0) return cudaSuccess;
  const int64_t row_bytes = hidden_size * element_size;
  if (row_bytes % 16 == 0 && aligned16(hidden) && aligned16(permuted))
    return launch_scatter<uint4>(hidden, row_map, expert_offsets, expert_counts_ws, num_tokens, k, num_experts, pad_to,
                                 permuted_rows, row_bytes, permuted, stream);
  if (element_size == 4)
    return launch_scatter<uint32_t>(hidden, row_map, expert_offsets, expert_counts_ws, num_tokens, k, num_experts,
                                    pad_to, permuted_rows, row_bytes, permuted, stream);
  return launch_scatter<uint16_t>(hidden, row_map, expert_offsets, expert_counts_ws, num_tokens, k, num_experts,
                                  pad_to, permuted_rows, row_bytes, permuted, stream);
}

cudaError_t launch_unpermute(const void* expert_out, const int32_t* row_map, const float* topk_weights,
                             const void* shared_out, const void* residual, DType dtype, int64_t num_tokens, int k,
                             int64_t hidden_size, int64_t expert_rows, void* out, cudaStream_t stream) {
  if (num_tokens <= 0 || hidden_size <= 0) return cudaSuccess;
  if (k < 0) return cudaErrorInvalidValue;
  DOTS1_DISPATCH_FLOAT_TYPES(dtype, scalar_t, {
    constexpr int kV = 16 / static_cast<int>(sizeof(scalar_t));
    const bool vectorized = hidden_size % kV == 0 && aligned16(expert_out) && aligned16(out) &&
                            (shared_out == nullptr || aligned16(shared_out)) &&
                            (residual == nullptr || aligned16(residual));
    const auto* eo = static_cast<const scalar_t*>(expert_out);
    const auto* so = static_cast<const scalar_t*>(shared_out);
    const auto* re = static_cast<const scalar_t*>(residual);
    auto* o = static_cast<scalar_t*>(out);
    if (vectorized) {
      const int64_t nvec = hidden_size / kV;
      const unsigned threads = threads_for((nvec + 1) / 2);
      if (k == kDots1TopK)
        unpermute_kernel<scalar_t, kV, kDots1TopK><<<static_cast<unsigned>(num_tokens), threads, 0, stream>>>(
            eo, row_map, topk_weights, so, re, k, expert_rows, nvec, o);
      else
        unpermute_kernel<scalar_t, kV, 0><<<static_cast<unsigned>(num_tokens), threads, 0, stream>>>(
            eo, row_map, topk_weights, so, re, k, expert_rows, nvec, o);
    } else {
      unpermute_kernel<scalar_t, 1, 0><<<static_cast<unsigned>(num_tokens), threads_for((hidden_size + 1) / 2), 0,
                                      stream>>>(eo, row_map, topk_weights, so, re, k, expert_rows, hidden_size, o);
    }
  });
  return cudaGetLastError();
}

}  // namespace dots1
