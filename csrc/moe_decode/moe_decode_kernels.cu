// MoE decode kernels: gate_up + SwiGLU and down + combine over the k routed experts of each token
// plus the shared experts, straight from topk_ids (no permute / unpermute).
//
// Fast path (fp16 / bf16, H, I, Is multiples of 8, 16-byte aligned rows): weight streaming on the
// tensor cores, the scheme of csrc/skinny_gemm (measured at 0.92-0.98 of copy bandwidth): 16 weight
// rows are the A operand of mma.sync m16n8k16 and up to 16 (t, j) pair columns the B operand (NT = 1
// or 2 n-tiles of 8, picked on the host from the launch's token count); the 8 warps of a CTA split K
// in equal CONTIGUOUS ranges; each lane issues a batch of U steps (16 bytes of each of its two weight
// rows and of each of its NT activation columns per step: 256 B of weight for NT = 1, 192 B for
// NT = 2) before it multiplies any of them, so a warp waits one memory latency per batch, not per
// step; the warps' partial sums meet once, in shared memory, in warp order. 128 registers, 2 CTAs
// (16 warps) per SM.
//
// The schedule: the distinct experts of the launch's (t, j) pairs (in order of first appearance) and,
// for each, the pairs that chose it, cut into "items" of at most 8 NT pairs (the MMA columns); the
// shared experts are one more item whose columns are the tokens. Each CTA builds it in shared memory
// from topk_ids (P <= 128 ids, one per thread, loaded at the kernel's start so that the load's latency
// hides behind the first weight stream, which never needs the schedule: the shared experts come first).
//   gate_up - tiles of (item, 8 output features): the 8 gate and 8 up rows of those features over all
//             of H. Persistent CTAs (2 per SM) take tiles b, b + grid, ...: the shared experts' tiles,
//             then the schedule, then the routed tiles; tiles past the launch's real count cost nothing.
//             One barrier per tile (the warps' partials, double-buffered), then 32 NT threads apply
//             SwiGLU to the warp-ordered sums and store.
//   down    - one CTA per 16 output rows h. Its work is the shared experts' rows (K = Is, split over
//             the 8 warps) and, per routed item, the item's expert's 16 rows (K = I): the routed items
//             are laid end to end (R items x ceil(I / 32) steps) and that sequence is split over the
//             8 warps in equal contiguous ranges, so every warp streams the same number of steps
//             whatever the routing. A warp's piece of an item it holds whole goes straight to the
//             pair's fp32 partial in shared memory; an item cut by a warp boundary leaves one piece per
//             warp, summed in warp order after the only barrier. Then one thread per (token, row) adds
//             w[t, j] * partial in the j order, the shared term and the residual, rounding once.
// Every touched expert's weight rows are read from HBM once per launch (several tokens that chose an
// expert are the columns of the same MMAs); no float atomics: the result is bitwise reproducible.
//
// The k permutation: an m16n8k16 A fragment holds, per lane (group g = lane/4, c = lane%4), rows g and
// g+8 at logical k {2c, 2c+1, 2c+8, 2c+9}; the B fragment holds column g at the same logical k. A dot
// product does not care which physical k a logical k is, as long as A and B agree, so each lane loads
// 8 consecutive physical k of its rows (one 16-byte vector) and the same 8 k of its column's
// activation row: words 0-1 feed one MMA, words 2-3 the next.
//
// Fallback (fp32, or shapes / addresses the fast path cannot vector-load): one warp per output
// element, scalar loads, the same fp32 math and order. Correct for everything, not fast.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "cuda_utils.cuh"
#include "pdl.cuh"
#include "weight_stream.cuh"
#include "moe_decode/moe_decode.h"

namespace dots1 {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kStepK = 32;  // k per warp step: per weight row, 4 lanes x 8 elements (one 16-byte vector)
constexpr int kMaxPairs = kMoeDecodeMaxPairs;
constexpr int kMaxTokens = kMoeDecodeMaxTokens;
// Routed items: sum over experts of ceil(pairs / cols) <= min(pairs, experts + pairs / cols), cols >= 8;
// + the shared item.
constexpr int kMaxItems = kMaxPairs + kMaxPairs / 8 + 1;

static_assert(kMaxTokens <= 16, "the shared experts' item holds every token of a launch");
static_assert(kMaxPairs <= kThreads, "build_schedule: one pair per thread");

// Steps per batch and independent accumulator sets (as skinny_gemm's RT = 1): U (2 + NT) 16-byte
// vectors per lane in flight (96 registers), and 4 MMA chains (sets x NT) so that the dependent MMAs
// of a batch do not hold the warp longer than the loads it waits for.
template <int NT>
constexpr int batch_steps() {
  return NT == 1 ? 8 : 6;
}
template <int NT>
constexpr int accumulator_sets() {
  return NT == 1 ? 2 : 2;
}

__device__ __forceinline__ float silu_f(float g) { return g / (1.0f + expf(-g)); }

// ---------------------------------------------------------------------------------------------
// Loads and the MMA

__device__ __forceinline__ void prefetch_l1(const void* p) { asm volatile("prefetch.global.L1 [%0];" ::"l"(p)); }
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// PDL (csrc/pdl.cuh), before the wait: the first batch (U steps) of this warp's steps [s_begin, s_end)
// of two weight rows, prefetched into L2 (weights are never written in a step), so that the first
// stream_rows after the wait, over the same rows and steps, finds it there; no register is held across
// the wait. One lane per 4 (c == 0) requests each step's 64 bytes of a row.
template <typename T, int NT>
__device__ __forceinline__ void prefetch_first_batch(const T* row_lo, const T* row_hi, int64_t K, int s_begin,
                                                     int s_end) {
  if ((threadIdx.x & 3) != 0) return;
#pragma unroll
  for (int u = 0; u < batch_steps<NT>(); ++u) {
    const int64_t k = static_cast<int64_t>(s_begin + u) * kStepK;
    if (s_begin + u < s_end && k < K) {
      prefetch_l2(row_lo + k);
      prefetch_l2(row_hi + k);
    }
  }
}

// One warp's share of a 16-row x (8 NT)-column product: steps [s_begin, s_end) of K (32 k each) of
// weight rows row_lo (tile row g) and row_hi (g + 8) against activation rows col[n] (column 8 n + g;
// col_ok false: not loaded, its fragment stays zero). res[n] is the lane's C fragment of n-tile n:
// (row g, col 8n + 2c), (g, 8n + 2c + 1), (g + 8, 8n + 2c), (g + 8, 8n + 2c + 1), summed over the
// accumulator sets in a fixed order. K % 8 == 0: a lane's vector is wholly in range or wholly out.
template <typename T, int NT>
__device__ __forceinline__ void stream_rows(const T* row_lo, const T* row_hi, const T* const (&col)[NT],
                                            const bool (&col_ok)[NT], int64_t K, int s_begin, int s_end,
                                            float (&res)[NT][4]) {
  constexpr int U = batch_steps<NT>();
  constexpr int kSets = accumulator_sets<NT>();
  float acc[kSets][NT][4];
#pragma unroll
  for (int s = 0; s < kSets; ++s)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[s][n][r] = 0.0f;

  // Pointers at this lane's 16 bytes of step s_begin, advanced a batch at a time (the steps of a
  // batch are immediate offsets); this lane's steps end where its vector would pass K.
  const int lane_k = 8 * (threadIdx.x & 3);
  const int lane_end = static_cast<int>(min(static_cast<int64_t>(s_end), (K - lane_k + kStepK - 1) / kStepK));
  const int64_t offset0 = static_cast<int64_t>(s_begin) * kStepK + lane_k;
  const T* lo = row_lo + offset0;
  const T* hi = row_hi + offset0;
  const T* x[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) x[n] = col[n] + offset0;

  for (int s0 = s_begin; s0 < s_end; s0 += U) {
    const int valid = min(lane_end - s0, U);  // may be <= 0
    uint4 wv[U][2];
    uint4 xv[U][NT];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool ok = u < valid;
      wv[u][0] = load_weight16(lo + u * kStepK, ok);
      wv[u][1] = load_weight16(hi + u * kStepK, ok);
#pragma unroll
      for (int n = 0; n < NT; ++n) xv[u][n] = load_act16(x[n] + u * kStepK, ok && col_ok[n]);
    }
    lo += U * kStepK;
    hi += U * kStepK;
#pragma unroll
    for (int n = 0; n < NT; ++n) x[n] += U * kStepK;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int set0 = (2 * u) % kSets, set1 = (2 * u + 1) % kSets;
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        mma_16816<T>(acc[set0][n], wv[u][0].x, wv[u][1].x, wv[u][0].y, wv[u][1].y, xv[u][n].x, xv[u][n].y);
        mma_16816<T>(acc[set1][n], wv[u][0].z, wv[u][1].z, wv[u][0].w, wv[u][1].w, xv[u][n].z, xv[u][n].w);
      }
    }
  }
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      float v = acc[0][n][r];
#pragma unroll
      for (int s = 1; s < kSets; ++s) v += acc[s][n][r];
      res[n][r] = v;
    }
}

// ---------------------------------------------------------------------------------------------
// The schedule: distinct experts of the launch's (t, j) pairs and the pairs that chose each.

struct Schedule {
  int32_t id[kMaxPairs];         // topk_ids as read
  int32_t first[kMaxPairs];      // the first pair with the same id (-1: id outside [0, E))
  int32_t rank[kMaxPairs];       // how many earlier pairs have the same id
  int32_t count[kMaxPairs];      // how many pairs have the same id
  int32_t col_start[kMaxPairs];  // at a first pair: where its expert's pairs start in col_pair
  int32_t col_pair[kMaxPairs];   // the valid pairs grouped by expert (first-appearance order), in pair order
  int32_t item_expert[kMaxItems];  // expert id; -1 for the shared experts' item
  int32_t item_col0[kMaxItems];    // first column in col_pair (routed items)
  int32_t item_ncols[kMaxItems];   // 1 .. max_cols
  int32_t num_routed_items;
  int32_t num_items;               // routed items + the shared item (if any)
};

// Every thread of the CTA calls it with its own pair's id (thread p < P holds pair p's, read
// earlier so that the load's latency is already paid); ends with a barrier. Returns whether some
// pair has an id outside [0, E) (the same answer in every thread).
__device__ bool build_schedule(Schedule& s, int32_t my_id, int P, int T, int E, int max_cols,
                               bool has_shared) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid < P) s.id[tid] = my_id;
  __syncthreads();
  int bad = 0;
  // O(P) comparisons per pair (P <= 128, broadcast reads): no table over E, so any E works.
  if (tid < P) {
    const int p = tid, id = my_id;
    if (id < 0 || id >= E) {
      s.first[p] = -1;
      bad = 1;
    } else {
      int first = p, rank = 0, count = 0;
      for (int q = 0; q < P; ++q) {
        if (s.id[q] == id) {
          if (q < p) {
            ++rank;
            first = min(first, q);
          }
          ++count;
        }
      }
      s.first[p] = first;
      s.rank[p] = rank;
      s.count[p] = count;
    }
  }
  const bool any_bad = __syncthreads_or(bad) != 0;
  if (warp == 0) {
    // Experts in order of first appearance: prefix sums of their pair counts (columns) and items.
    int cols = 0, items = 0;
    for (int base = 0; base < P; base += 32) {
      const int p = base + lane;
      const bool is_first = p < P && s.first[p] == p;
      const int c = is_first ? s.count[p] : 0;
      const int n = is_first ? (c + max_cols - 1) / max_cols : 0;
      int c_incl = c, n_incl = n;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int cu = __shfl_up_sync(0xffffffffu, c_incl, o);
        const int nu = __shfl_up_sync(0xffffffffu, n_incl, o);
        if (lane >= o) {
          c_incl += cu;
          n_incl += nu;
        }
      }
      if (is_first) {
        const int col0 = cols + c_incl - c, item0 = items + n_incl - n;
        s.col_start[p] = col0;
        for (int i = 0; i < n; ++i) {
          s.item_expert[item0 + i] = s.id[p];
          s.item_col0[item0 + i] = col0 + i * max_cols;
          s.item_ncols[item0 + i] = min(max_cols, c - i * max_cols);
        }
      }
      cols += __shfl_sync(0xffffffffu, c_incl, 31);
      items += __shfl_sync(0xffffffffu, n_incl, 31);
    }
    if (lane == 0) {
      s.num_routed_items = items;
      if (has_shared) {
        s.item_expert[items] = -1;
        s.item_col0[items] = 0;
        s.item_ncols[items] = T;
      }
      s.num_items = items + (has_shared ? 1 : 0);
    }
  }
  __syncthreads();
  if (tid < P) {
    const int first = s.first[tid];
    if (first >= 0) s.col_pair[s.col_start[first] + s.rank[tid]] = tid;
  }
  __syncthreads();
  return any_bad;
}

// ---------------------------------------------------------------------------------------------
// gate_up + SwiGLU

template <typename T>
struct GateUpParams {
  const T* hidden;          // [T, H]
  const T* gate_up;         // [E, 2I, H]
  const int32_t* topk_ids;  // [T, k]
  const T* shared_gate_up;  // [2Is, H] or nullptr
  T* act;                   // [T, NA]
  int T_, k, E;
  int64_t H, I, Is, NA;
};

// One tile = 8 features f0 .. f0 + 7 of one item: lane rows g -> gate of feature f0 + g, g + 8 -> its
// up row; columns = the item's pairs (routed: their tokens' hidden rows) or the tokens (shared).
// item < 0: the shared experts. Ends with the tile's act stored by 32 NT threads.
template <typename T, MoeGateUpLayout kLayout, int NT>
__device__ __forceinline__ void gate_up_tile(const GateUpParams<T>& p, const Schedule& s, int item, int64_t f0,
                                             int s_begin, int s_end, float4 (*red)[NT][32]) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
  const bool routed = item >= 0;
  int ncols = p.T_, col0 = 0;  // the shared tiles run before the schedule exists: no read of it
  if (routed) {
    ncols = s.item_ncols[item];
    col0 = s.item_col0[item];
  }
  {
    const T* base;
    int64_t gate, up;
    if (routed) {
      const int64_t f = min(f0 + g, p.I - 1);  // I % 8 == 0 on this path: always f0 + g
      if constexpr (kLayout == MoeGateUpLayout::kInterleaved) {
        gate = (f >> 3) * 16 + (f & 7);
        up = gate + 8;
      } else {
        gate = f;
        up = p.I + f;
      }
      base = p.gate_up + static_cast<int64_t>(s.item_expert[item]) * 2 * p.I * p.H;
    } else {
      const int64_t f = min(f0 + g, p.Is - 1);
      gate = f;
      up = p.Is + f;
      base = p.shared_gate_up;
    }
    const T* col[NT];
    bool col_ok[NT];
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const int cidx = 8 * n + g;
      col_ok[n] = cidx < ncols;
      const int token = !col_ok[n] ? 0 : routed ? s.col_pair[col0 + cidx] / p.k : cidx;
      col[n] = p.hidden + static_cast<int64_t>(token) * p.H;
    }
    float res[NT][4];
    stream_rows<T, NT>(base + gate * p.H, base + up * p.H, col, col_ok, p.H, s_begin, s_end, res);
#pragma unroll
    for (int n = 0; n < NT; ++n) red[warp][n][lane] = make_float4(res[n][0], res[n][1], res[n][2], res[n][3]);
  }
  __syncthreads();
  // Thread (n, l): feature f0 + l / 4, columns 8n + 2 (l % 4) + {0, 1}: x, y gate; z, w up.
  if (threadIdx.x < NT * 32) {
    const int n = threadIdx.x >> 5, l = threadIdx.x & 31;
    float4 v = red[0][n][l];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      const float4 q = red[w][n][l];
      v.x += q.x;
      v.y += q.y;
      v.z += q.z;
      v.w += q.w;
    }
    const int64_t f = f0 + (l >> 2);
    if (f < (routed ? p.I : p.Is)) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int cidx = 8 * n + 2 * (l & 3) + i;
        if (cidx >= ncols) continue;
        int64_t dst;
        if (routed) {
          const int pair = s.col_pair[col0 + cidx];
          dst = static_cast<int64_t>(pair / p.k) * p.NA + static_cast<int64_t>(pair % p.k) * p.I + f;
        } else {
          dst = static_cast<int64_t>(cidx) * p.NA + static_cast<int64_t>(p.k) * p.I + f;
        }
        p.act[dst] = from_float<T>(silu_f(i == 0 ? v.x : v.y) * (i == 0 ? v.z : v.w));
      }
    }
  }
}

template <typename T, MoeGateUpLayout kLayout, int NT>
__global__ void __launch_bounds__(kThreads, 2) moe_gate_up_kernel(const GateUpParams<T> p) {
  __shared__ Schedule s;
  __shared__ float4 red[2][kWarps][NT][32];  // double-buffered: one barrier per tile
  const int warp = threadIdx.x >> 5;

  // Every tile's K is H: this warp's contiguous share of it is the same for all of them.
  const int64_t steps = (p.H + kStepK - 1) / kStepK;
  const int s_begin = static_cast<int>(steps * warp / kWarps), s_end = static_cast<int>(steps * (warp + 1) / kWarps);
  const int64_t ft_shared = p.Is / 8, ft_routed = p.I / 8;  // I, Is % 8 == 0 on this path

  // PDL (csrc/pdl.cuh): the routed experts depend on topk_ids (the router, the previous kernel) and
  // every tile on hidden, so the CTA waits before reading either; before that it prefetches into L2
  // the first batch of its first tile's weight rows when that tile is a shared experts' one (the rows
  // of gate_up_tile below).
  if (static_cast<int64_t>(blockIdx.x) < ft_shared) {
    const int64_t f = min(static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x & 31) / 4, p.Is - 1);
    prefetch_first_batch<T, NT>(p.shared_gate_up + f * p.H, p.shared_gate_up + (p.Is + f) * p.H, p.H, s_begin, s_end);
  }
  pdl_wait();
  pdl_launch_dependents();

  const int P = p.T_ * p.k;
  // The ids, read now: their latency passes under the shared experts' tiles.
  const int32_t my_id = threadIdx.x < P ? __ldg(p.topk_ids + threadIdx.x) : 0;
  int parity = 0;
  int64_t tile = blockIdx.x;
  for (; tile < ft_shared; tile += gridDim.x) {
    gate_up_tile<T, kLayout, NT>(p, s, -1, tile * 8, s_begin, s_end, red[parity]);
    parity ^= 1;
  }

  const bool any_bad = build_schedule(s, my_id, P, p.T_, p.E, 8 * NT, p.Is > 0);
  // Pairs with a bad id: NaN in their act columns (grid-stride; usually there are none).
  if (any_bad) {
    const int64_t total = static_cast<int64_t>(P) * p.I;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
         i += static_cast<int64_t>(gridDim.x) * kThreads) {
      const int pair = static_cast<int>(i / p.I);
      if (s.first[pair] < 0)
        p.act[static_cast<int64_t>(pair / p.k) * p.NA + static_cast<int64_t>(pair % p.k) * p.I + i % p.I] =
            from_float<T>(NAN);
    }
  }
  const int64_t tiles = ft_shared + static_cast<int64_t>(s.num_routed_items) * ft_routed;
  for (; tile < tiles; tile += gridDim.x) {
    const int64_t rt = tile - ft_shared;
    gate_up_tile<T, kLayout, NT>(p, s, static_cast<int>(rt / ft_routed), (rt % ft_routed) * 8, s_begin, s_end,
                                 red[parity]);
    parity ^= 1;
  }
}

// ---------------------------------------------------------------------------------------------
// down + combine

template <typename T>
struct DownParams {
  const T* act;               // [T, NA]
  const T* down;              // [E, H, I]
  const int32_t* topk_ids;    // [T, k]
  const float* topk_weights;  // [T, k]
  const T* shared_down;       // [H, Is] or nullptr
  const T* residual;          // [T, H] or nullptr
  T* out;                     // [T, H]
  int T_, k, E;
  int64_t H, I, Is, NA;
};

// Start of warp w's range of an n-step sequence split in 8 equal contiguous ranges.
__device__ __forceinline__ int64_t range_start(int64_t n, int w) { return n * w / kWarps; }

template <typename T, int NT>
__global__ void __launch_bounds__(kThreads, 2) moe_down_kernel(const DownParams<T> p) {
  constexpr int kCols = 8 * NT;
  __shared__ Schedule s;
  __shared__ float partial[kMaxPairs][16];             // routed term of each pair, the tile's 16 rows
  __shared__ float shared_piece[kWarps][kMaxTokens][16];  // each warp's K range of the shared term
  __shared__ float cut_piece[kWarps][2][kCols][16];    // a warp's first / last item when a warp boundary cuts it
  __shared__ float weight[kMaxPairs];                  // topk_weights
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int64_t h0 = static_cast<int64_t>(blockIdx.x) * 16;
  // Rows past H (H % 16 != 0) read row H - 1 and are not stored.
  const int64_t h_lo = min(h0 + g, p.H - 1), h_hi = min(h0 + g + 8, p.H - 1);

  // PDL (csrc/pdl.cuh): act (the previous kernel's output), the ids and weights of the routing and the
  // residual are all read after the wait. (An L2 prefetch of the first shared experts' rows before it
  // made this kernel spill registers: not done.)
  pdl_wait();
  pdl_launch_dependents();
  const int P = p.T_ * p.k;

  // The ids first, so that their latency passes under the shared experts' stream; the weights and
  // the residual (used at the end, written by the previous ops: L2 hits) only prefetched into L1,
  // which holds no register.
  const int32_t my_id = threadIdx.x < P ? __ldg(p.topk_ids + threadIdx.x) : 0;
  if (threadIdx.x < P) prefetch_l1(p.topk_weights + threadIdx.x);
  if (p.residual != nullptr && threadIdx.x / 16 < p.T_ && h0 + threadIdx.x % 16 < p.H)
    prefetch_l1(p.residual + static_cast<int64_t>(threadIdx.x / 16) * p.H + h0 + threadIdx.x % 16);
  // Zero terms for pairs no item covers (I == 0); bad pairs are never read.
  for (int i = threadIdx.x; i < P * 16; i += kThreads) (&partial[0][0])[i] = 0.0f;

  // The shared experts: rows h of shared_down, columns = the tokens, this warp's share of Is.
  if (p.Is > 0) {
    const int64_t steps = (p.Is + kStepK - 1) / kStepK;
    const T* col[NT];
    bool col_ok[NT];
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const int t = 8 * n + g;
      col_ok[n] = t < p.T_;
      col[n] = p.act + static_cast<int64_t>(col_ok[n] ? t : 0) * p.NA + static_cast<int64_t>(p.k) * p.I;
    }
    float res[NT][4];
    stream_rows<T, NT>(p.shared_down + h_lo * p.Is, p.shared_down + h_hi * p.Is, col, col_ok, p.Is,
                       static_cast<int>(range_start(steps, warp)), static_cast<int>(range_start(steps, warp + 1)), res);
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int r = 0; r < 4; ++r) shared_piece[warp][8 * n + 2 * c + (r & 1)][g + (r >> 1) * 8] = res[n][r];
  }

  build_schedule(s, my_id, P, p.T_, p.E, kCols, p.Is > 0);

  // The routed items end to end, R x steps_item steps, split over the warps.
  const int R = s.num_routed_items;
  const int64_t steps_item = (p.I + kStepK - 1) / kStepK;
  const int64_t S = R * steps_item;
  const int64_t r_begin = range_start(S, warp), r_end = range_start(S, warp + 1);
  if (r_begin < r_end) {
    for (int64_t item = r_begin / steps_item; item * steps_item < r_end; ++item) {
      const int64_t u0 = item * steps_item;
      const int64_t a = max(r_begin, u0) - u0, b = min(r_end, u0 + steps_item) - u0;
      const int it = static_cast<int>(item);
      const int ncols = s.item_ncols[it], col0 = s.item_col0[it];
      const T* base = p.down + static_cast<int64_t>(s.item_expert[it]) * p.H * p.I;
      const T* col[NT];
      bool col_ok[NT];
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const int cidx = 8 * n + g;
        col_ok[n] = cidx < ncols;
        const int pair = col_ok[n] ? s.col_pair[col0 + cidx] : 0;
        col[n] = p.act + static_cast<int64_t>(pair / p.k) * p.NA + static_cast<int64_t>(pair % p.k) * p.I;
      }
      float res[NT][4];
      stream_rows<T, NT>(base + h_lo * p.I, base + h_hi * p.I, col, col_ok, p.I, static_cast<int>(a), static_cast<int>(b),
                         res);
      const bool whole = a == 0 && b == steps_item;
      // Not whole: the warp's first item (its range starts inside it) or its last.
      float (*cut)[16] = cut_piece[warp][r_begin >= u0 ? 0 : 1];
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int cidx = 8 * n + 2 * c + (r & 1), row = g + (r >> 1) * 8;
          if (cidx >= ncols) continue;
          if (whole)
            partial[s.col_pair[col0 + cidx]][row] = res[n][r];
          else
            cut[cidx][row] = res[n][r];
        }
    }
  }
  if (threadIdx.x < P) weight[threadIdx.x] = __ldg(p.topk_weights + threadIdx.x);
  __syncthreads();

  // Items cut by warp boundaries: the pieces in warp order. Boundary w (1..7) handles the item it
  // falls strictly inside, unless boundary w - 1 does too.
  if (steps_item > 0) {
    for (int i = threadIdx.x; i < (kWarps - 1) * kCols * 16; i += kThreads) {
      const int w = 1 + i / (kCols * 16), cidx = (i / 16) % kCols, row = i % 16;
      const int64_t boundary = range_start(S, w);
      if (boundary >= S) continue;
      const int64_t item = boundary / steps_item, u0 = item * steps_item;
      if (boundary == u0 || range_start(S, w - 1) > u0) continue;
      const int it = static_cast<int>(item);
      if (cidx >= s.item_ncols[it]) continue;
      float sum = 0.0f;
      for (int w2 = 0; w2 < kWarps; ++w2) {
        const int64_t lo = range_start(S, w2), hi = range_start(S, w2 + 1);
        if (lo < hi && lo < u0 + steps_item && hi > u0) sum += cut_piece[w2][lo >= u0 ? 0 : 1][cidx][row];
      }
      partial[s.col_pair[s.item_col0[it] + cidx]][row] = sum;
    }
    __syncthreads();
  }

  // Combine: out[t, h] = sum_j w[t, j] * term(t, j) + shared(t) + residual, in that order, rounded once.
  // (The residual was written by the previous op: an L2 hit, read here rather than held in a register.)
  const int t = threadIdx.x / 16, row = threadIdx.x % 16;
  if (t < p.T_ && h0 + row < p.H) {
    float acc = 0.0f;
    bool bad = false;
    for (int j = 0; j < p.k; ++j) {
      const int pair = t * p.k + j;
      if (s.first[pair] < 0)
        bad = true;
      else
        acc = __fadd_rn(acc, __fmul_rn(weight[pair], partial[pair][row]));
    }
    if (p.Is > 0) {
      float shared = shared_piece[0][t][row];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) shared += shared_piece[w][t][row];
      acc = __fadd_rn(acc, shared);
    }
    if (p.residual != nullptr) acc = __fadd_rn(acc, to_float(p.residual[static_cast<int64_t>(t) * p.H + h0 + row]));
    p.out[static_cast<int64_t>(t) * p.H + h0 + row] = from_float<T>(bad ? NAN : acc);
  }
}

// ---------------------------------------------------------------------------------------------
// Fallback kernels: one warp per output (gate_up: an act element; down: an out element).

template <typename T, MoeGateUpLayout kLayout>
__global__ void __launch_bounds__(kThreads) moe_gate_up_simple_kernel(const GateUpParams<T> p) {
  pdl_wait();  // csrc/pdl.cuh: this fallback reads nothing before it
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31;
  const int64_t total = static_cast<int64_t>(p.T_) * p.NA;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); o < total; o += warps) {
    const int64_t t = o / p.NA, col = o % p.NA;
    const T* row_gate;
    const T* row_up;
    if (col < p.k * p.I) {
      const int64_t j = col / p.I, f = col % p.I;
      const int expert = __ldg(p.topk_ids + t * p.k + j);
      if (expert < 0 || expert >= p.E) {
        if (lane == 0) p.act[o] = from_float<T>(NAN);
        continue;
      }
      const T* base = p.gate_up + static_cast<int64_t>(expert) * 2 * p.I * p.H;
      const int64_t gate = kLayout == MoeGateUpLayout::kInterleaved ? (f >> 3) * 16 + (f & 7) : f;
      const int64_t up = kLayout == MoeGateUpLayout::kInterleaved ? gate + 8 : p.I + f;
      row_gate = base + gate * p.H;
      row_up = base + up * p.H;
    } else {
      const int64_t f = col - p.k * p.I;
      row_gate = p.shared_gate_up + f * p.H;
      row_up = p.shared_gate_up + (p.Is + f) * p.H;
    }
    const T* x = p.hidden + t * p.H;
    float gate = 0.0f, up = 0.0f;
    for (int64_t h = lane; h < p.H; h += 32) {
      const float xv = to_float(x[h]);
      gate = fmaf(to_float(row_gate[h]), xv, gate);
      up = fmaf(to_float(row_up[h]), xv, up);
    }
    gate = warp_sum(gate);
    up = warp_sum(up);
    if (lane == 0) p.act[o] = from_float<T>(silu_f(gate) * up);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) moe_down_simple_kernel(const DownParams<T> p) {
  pdl_wait();  // csrc/pdl.cuh: this fallback reads nothing before it
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31;
  const int64_t total = static_cast<int64_t>(p.T_) * p.H;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); o < total; o += warps) {
    const int64_t t = o / p.H, h = o % p.H;
    float acc = 0.0f;
    bool bad = false;
    for (int j = 0; j < p.k; ++j) {
      const int expert = __ldg(p.topk_ids + t * p.k + j);
      if (expert < 0 || expert >= p.E) {
        bad = true;
        continue;
      }
      const T* w = p.down + (static_cast<int64_t>(expert) * p.H + h) * p.I;
      const T* a = p.act + t * p.NA + static_cast<int64_t>(j) * p.I;
      float dot = 0.0f;
      for (int64_t i = lane; i < p.I; i += 32) dot = fmaf(to_float(w[i]), to_float(a[i]), dot);
      dot = warp_sum(dot);
      acc = __fadd_rn(acc, __fmul_rn(__ldg(p.topk_weights + t * p.k + j), dot));
    }
    if (p.Is > 0) {
      const T* w = p.shared_down + h * p.Is;
      const T* a = p.act + t * p.NA + static_cast<int64_t>(p.k) * p.I;
      float dot = 0.0f;
      for (int64_t i = lane; i < p.Is; i += 32) dot = fmaf(to_float(w[i]), to_float(a[i]), dot);
      acc = __fadd_rn(acc, warp_sum(dot));
    }
    if (p.residual != nullptr) acc = __fadd_rn(acc, to_float(p.residual[o]));
    if (lane == 0) p.out[o] = from_float<T>(bad ? NAN : acc);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// DOTS1_EXT_MOE_DECODE_KERNEL=simple forces the fallback kernels (tests compare the two paths).
bool moe_decode_force_simple() {
  const char* v = std::getenv("DOTS1_EXT_MOE_DECODE_KERNEL");
  return v != nullptr && std::string(v) == "simple";
}

// The fast kernels count K steps (and the down kernel its items' steps end to end) in int.
bool fast_sizes(int64_t H, int64_t I, int64_t Is) { return std::max({H, I, Is}) < (int64_t{1} << 30); }

// Tokens per launch of the fast kernels: every pair of the launch in the schedule.
int64_t fast_chunk(int64_t k) { return k == 0 ? kMaxTokens : std::min<int64_t>(kMaxTokens, kMaxPairs / k); }

unsigned int simple_blocks(int64_t outputs, int sm_count) {
  const int64_t blocks = (outputs + kWarps - 1) / kWarps;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t{sm_count} * 32)));
}

// The fast path over token chunks (fp16 / bf16 only: fp32 never instantiates the MMA kernels).
template <typename T>
cudaError_t gate_up_fast(GateUpParams<T> p, int64_t T_total, MoeGateUpLayout layout, int sm_count,
                         cudaStream_t stream, bool use_pdl) {
  if constexpr (std::is_same_v<T, float>) {
    return cudaErrorInvalidValue;
  } else {
    const T* hidden = p.hidden;
    const int32_t* ids = p.topk_ids;
    T* act = p.act;
    const int64_t chunk = fast_chunk(p.k);
    for (int64_t t0 = 0; t0 < T_total; t0 += chunk) {
      const int64_t tc = std::min(chunk, T_total - t0);
      p.T_ = static_cast<int>(tc);
      p.hidden = hidden + t0 * p.H;
      p.topk_ids = ids + t0 * p.k;
      p.act = act + t0 * p.NA;
      // 8 NT columns per item: NT = 1 when every item fits in one n-tile of 8 (a token count of at
      // most 8 and distinct ids per token), which halves the activation registers and loads.
      const int nt = tc <= 8 ? 1 : 2;
      // Tiles of 8 features: the shared experts' plus I / 8 per routed item, of which there are at
      // most min(pairs, E + pairs / (8 NT)). Persistent CTAs (2 per SM) stride over them; the real
      // count is only known on the device.
      const int64_t pairs = tc * p.k;
      const int64_t max_items = std::min<int64_t>(pairs, p.E + pairs / (8 * nt));
      const int64_t max_tiles = p.Is / 8 + max_items * (p.I / 8);
      const dim3 grid(
          static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(2 * int64_t{sm_count}, max_tiles))));
      const auto kernel = layout == MoeGateUpLayout::kInterleaved
                              ? (nt == 1 ? moe_gate_up_kernel<T, MoeGateUpLayout::kInterleaved, 1>
                                         : moe_gate_up_kernel<T, MoeGateUpLayout::kInterleaved, 2>)
                              : (nt == 1 ? moe_gate_up_kernel<T, MoeGateUpLayout::kHF, 1>
                                         : moe_gate_up_kernel<T, MoeGateUpLayout::kHF, 2>);
      const cudaError_t err = launch_pdl(kernel, grid, dim3(kThreads), 0, stream, use_pdl, p);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
}

template <typename T>
cudaError_t down_fast(DownParams<T> p, int64_t T_total, cudaStream_t stream, bool use_pdl) {
  if constexpr (std::is_same_v<T, float>) {
    return cudaErrorInvalidValue;
  } else {
    const T* act = p.act;
    const int32_t* ids = p.topk_ids;
    const float* weights = p.topk_weights;
    const T* residual = p.residual;
    T* out = p.out;
    const int64_t chunk = fast_chunk(p.k);
    // One CTA per 16 output rows (256 at H = 4096: about one wave of 2 CTAs per SM, every CTA with
    // the same work).
    const int64_t grid = (p.H + 15) / 16;
    if (grid > 0x7fffffff) return cudaErrorInvalidValue;
    for (int64_t t0 = 0; t0 < T_total; t0 += chunk) {
      const int64_t tc = std::min(chunk, T_total - t0);
      p.T_ = static_cast<int>(tc);
      p.act = act + t0 * p.NA;
      p.topk_ids = ids + t0 * p.k;
      p.topk_weights = weights + t0 * p.k;
      p.residual = residual != nullptr ? residual + t0 * p.H : nullptr;
      p.out = out + t0 * p.H;
      const auto kernel = tc <= 8 ? moe_down_kernel<T, 1> : moe_down_kernel<T, 2>;
      const cudaError_t err =
          launch_pdl(kernel, dim3(static_cast<unsigned int>(grid)), dim3(kThreads), 0, stream, use_pdl, p);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
}

}  // namespace

cudaError_t launch_moe_decode_gate_up(const void* hidden, const void* gate_up, const int32_t* topk_ids,
                                      const void* shared_gate_up, void* act, int64_t T, int64_t H, int64_t E,
                                      int64_t k, int64_t I, int64_t Is, MoeGateUpLayout layout, DType dtype,
                                      cudaStream_t stream, bool use_pdl) {
  const int64_t NA = k * I + Is;
  if (T == 0 || NA == 0) return cudaSuccess;
  if (E > 0x7fffffff || k > 0x7fffffff || T > 0x7fffffff) return cudaErrorInvalidValue;
  int sm_count = 0;
  const cudaError_t err = current_sm_count(&sm_count);
  if (err != cudaSuccess) return err;
  const bool fast = dtype != DType::kFloat32 && H % 8 == 0 && I % 8 == 0 && Is % 8 == 0 && k <= kMaxPairs &&
                    fast_sizes(H, I, Is) && aligned16(hidden) && aligned16(gate_up) && aligned16(shared_gate_up) && aligned16(act) &&
                    !moe_decode_force_simple();
  DOTS1_DISPATCH_FLOAT_TYPES(dtype, scalar_t, {
    const GateUpParams<scalar_t> p{static_cast<const scalar_t*>(hidden), static_cast<const scalar_t*>(gate_up),
                                   topk_ids, static_cast<const scalar_t*>(shared_gate_up),
                                   static_cast<scalar_t*>(act), static_cast<int>(T), static_cast<int>(k),
                                   static_cast<int>(E), H, I, Is, NA};
    if (fast) return gate_up_fast<scalar_t>(p, T, layout, sm_count, stream, use_pdl);
    const dim3 blocks(simple_blocks(T * NA, sm_count));
    if (layout == MoeGateUpLayout::kInterleaved)
      return launch_pdl(moe_gate_up_simple_kernel<scalar_t, MoeGateUpLayout::kInterleaved>, blocks, dim3(kThreads), 0,
                        stream, use_pdl, p);
    return launch_pdl(moe_gate_up_simple_kernel<scalar_t, MoeGateUpLayout::kHF>, blocks, dim3(kThreads), 0, stream,
                      use_pdl, p);
  });
  return cudaErrorInvalidValue;  // not reached: every dtype returns above
}

cudaError_t launch_moe_decode_down(const void* act, const void* down, const int32_t* topk_ids,
                                   const float* topk_weights, const void* shared_down, const void* residual, void* out,
                                   int64_t T, int64_t H, int64_t E, int64_t k, int64_t I, int64_t Is, DType dtype,
                                   cudaStream_t stream, bool use_pdl) {
  if (T == 0 || H == 0) return cudaSuccess;
  if (E > 0x7fffffff || k > 0x7fffffff || T > 0x7fffffff) return cudaErrorInvalidValue;
  const int64_t NA = k * I + Is;
  int sm_count = 0;
  const cudaError_t err = current_sm_count(&sm_count);
  if (err != cudaSuccess) return err;
  const bool fast = dtype != DType::kFloat32 && H % 8 == 0 && I % 8 == 0 && Is % 8 == 0 && k <= kMaxPairs &&
                    fast_sizes(H, I, Is) && aligned16(act) && aligned16(down) && aligned16(shared_down) && !moe_decode_force_simple();
  DOTS1_DISPATCH_FLOAT_TYPES(dtype, scalar_t, {
    const DownParams<scalar_t> p{static_cast<const scalar_t*>(act), static_cast<const scalar_t*>(down), topk_ids,
                                 topk_weights, static_cast<const scalar_t*>(shared_down),
                                 static_cast<const scalar_t*>(residual), static_cast<scalar_t*>(out),
                                 static_cast<int>(T), static_cast<int>(k), static_cast<int>(E), H, I, Is, NA};
    if (fast) return down_fast<scalar_t>(p, T, stream, use_pdl);
    return launch_pdl(moe_down_simple_kernel<scalar_t>, dim3(simple_blocks(T * H, sm_count)), dim3(kThreads), 0, stream,
                      use_pdl, p);
  });
  return cudaErrorInvalidValue;  // not reached: every dtype returns above
}

}  // namespace dots1
