// MoE decode kernels: gate_up + SwiGLU and down + combine over the k routed experts of each token
// plus the shared experts, straight from topk_ids (no permute / unpermute).
//
// Fast path (fp16 / bf16, H, I, Is multiples of 8, 16-byte aligned rows): weight streaming on the
// tensor cores. Every CTA first turns topk_ids into a schedule in shared memory: the distinct experts
// (in order of first appearance) and, for each, the (t, j) pairs that chose it, cut into "items" of at
// most 16 pairs (the columns of two m16n8k16 MMA n-tiles); the shared experts are one more item whose
// columns are the tokens. Work "units" are 16 weight rows of one item:
//   gate_up - (item, 8 output features): the 8 gate and 8 up rows of those features; the CTAs take
//             equal contiguous ranges of the unit list, so the grid (one CTA per SM) stays balanced
//             whatever the routing, and each touched weight row is read from HBM once per launch;
//   down    - (16 output rows h, item): each CTA owns at most 2 tiles of 16 output rows and loops over
//             every item for them, keeping one fp32 partial per (pair, row) in shared memory, then
//             combines each token's pairs in the fixed j order, adds the shared experts and the
//             residual and rounds once (no atomics: deterministic).
// Inside a CTA the 8 warps split every unit's K in 64-wide steps, round-robin over the CTA's whole
// step sequence (so no warp gets the remainders of every unit); each warp keeps kLookahead steps of
// weight loads (16-byte, L1-bypassing) in flight across unit boundaries, multiplies them with the
// activations (16-byte loads through L1/L2) on the tensor cores with fp32 accumulators, and at each
// unit's end the warps' partials meet in shared memory and are summed in warp order.
//
// The k permutation: an m16n8k16 A fragment holds, per lane (group g = lane/4, c = lane%4), rows g and
// g+8 at logical k {2c, 2c+1, 2c+8, 2c+9}; the B fragment holds column g at the same logical k. A dot
// product does not care which physical k a logical k is, as long as A and B agree, so each lane loads
// 8 consecutive physical k of its rows (one 16-byte vector) and the same 8 k of its column's
// activation row: words 0-1 feed one MMA, words 2-3 the next.
//
// Fallback (fp32, or shapes / addresses the fast path cannot vector-load): one warp per output
// element pair, scalar loads, the same fp32 math and order. Correct for everything, not fast.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "cuda_utils.cuh"
#include "moe_decode/moe_decode.h"

namespace dots1 {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kStepK = 64;       // k per warp step: per weight row, 4 lanes x 2 vectors x 8 elements
constexpr int kLookahead = 6;    // weight steps in flight per warp (6 x 4 x 16 B per lane)
constexpr int kMaxCols = 16;     // pair columns per item: two n-tiles of 8
constexpr int kMaxPairs = kMoeDecodeMaxPairs;
constexpr int kMaxTokens = kMoeDecodeMaxTokens;
// Routed items: sum over experts of ceil(pairs / 16) <= experts + pairs / 16 <= pairs + pairs / 16; + shared.
constexpr int kMaxItems = kMaxPairs + kMaxPairs / kMaxCols + 1;
constexpr int kMaxTilesPerCta = 2;  // down: output row tiles owned by one CTA (their partials live in smem)
constexpr int kRedRegs = 8;          // accumulator registers per lane: 2 n-tiles x 4

static_assert(kMaxTokens <= kMaxCols, "the shared experts' item holds every token of a launch");

__device__ __forceinline__ float silu_f(float g) { return g / (1.0f + expf(-g)); }

// ---------------------------------------------------------------------------------------------
// Loads and the MMA

// Weights are read once per launch: no L1 allocation, a 256-byte L2 fetch (the neighbouring lanes'
// vectors of the same row come next).
__device__ __forceinline__ uint4 ld_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Activations are re-read by every CTA: the default (L1-cached) read-only path.
__device__ __forceinline__ uint4 ld_act(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
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
  int32_t item_ncols[kMaxItems];   // 1 .. kMaxCols
  int32_t num_routed_items;
  int32_t num_items;               // routed items + the shared item (if any)
};

// Every thread of the CTA calls it; ends with a barrier. Returns whether some pair has an id outside
// [0, E) (the same answer in every thread).
__device__ bool build_schedule(Schedule& s, const int32_t* __restrict__ topk_ids, int P, int T, int E,
                               bool has_shared) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int p = tid; p < P; p += kThreads) s.id[p] = __ldg(topk_ids + p);
  __syncthreads();
  int bad = 0;
  // O(P^2) comparisons (P <= 128): no table over E, so any E works.
  for (int p = tid; p < P; p += kThreads) {
    const int id = s.id[p];
    if (id < 0 || id >= E) {
      s.first[p] = -1;
      bad = 1;
      continue;
    }
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
  const bool any_bad = __syncthreads_or(bad) != 0;
  if (warp == 0) {
    // Experts in order of first appearance: prefix sums of their pair counts (columns) and items.
    int cols = 0, items = 0;
    for (int base = 0; base < P; base += 32) {
      const int p = base + lane;
      const bool is_first = p < P && s.first[p] == p;
      const int c = is_first ? s.count[p] : 0;
      const int n = is_first ? (c + kMaxCols - 1) / kMaxCols : 0;
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
          s.item_col0[item0 + i] = col0 + i * kMaxCols;
          s.item_ncols[item0 + i] = min(kMaxCols, c - i * kMaxCols);
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
  for (int p = tid; p < P; p += kThreads) {
    const int first = s.first[p];
    if (first >= 0) s.col_pair[s.col_start[first] + s.rank[p]] = p;
  }
  __syncthreads();
  return any_bad;
}

// ---------------------------------------------------------------------------------------------
// The streaming engine shared by both ops. A Work class describes the CTA's units:
//   int num_units() const; int steps(int u) const (ceil(K / kStepK));
//   void a_rows(int u, int g, const T*& row_g, const T*& row_g8, int64_t& K) const;
//   int ncols(int u) const; const T* b_row(int u, int col) const (col < ncols(u));
//   void reduce(int u, const float (*red)[kRedRegs][32]) const  (after the unit's barrier; any threads)

// Where a warp is in the CTA's step sequence: unit u, step s of it.
struct Cursor {
  int unit;
  int step;
};

template <class Work>
__device__ __forceinline__ void settle(Cursor& c, const Work& w, int num_units) {
  while (c.unit < num_units) {
    const int n = w.steps(c.unit);
    if (c.step < n) break;
    c.step -= n;
    ++c.unit;
  }
}

template <typename T, class Work>
__device__ void stream_units(const Work& work, float (*red)[kWarps][kRedRegs][32]) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, c = lane & 3;
  const int num_units = work.num_units();
  if (num_units == 0) return;  // uniform over the CTA

  // ---- load side: the next steps' weight vectors into the ring ----
  Cursor ld{0, warp};
  settle(ld, work, num_units);
  int ld_unit = -1;
  const T* a_g = nullptr;
  const T* a_g8 = nullptr;
  int64_t a_len = 0;
  uint4 ring[kLookahead][4];  // [row g, chunk 0], [row g+8, chunk 0], [row g, chunk 1], [row g+8, chunk 1]

  auto issue = [&](uint4 (&slot)[4]) {
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    if (ld.unit >= num_units) return;
    if (ld.unit != ld_unit) {
      work.a_rows(ld.unit, g, a_g, a_g8, a_len);
      ld_unit = ld.unit;
    }
    const int64_t k0 = static_cast<int64_t>(ld.step) * kStepK + c * 8;
    const bool in0 = k0 < a_len, in1 = k0 + 32 < a_len;  // K % 8 == 0: a vector is all in or all out
    slot[0] = in0 ? ld_stream(a_g + k0) : zero;
    slot[1] = in0 ? ld_stream(a_g8 + k0) : zero;
    slot[2] = in1 ? ld_stream(a_g + k0 + 32) : zero;
    slot[3] = in1 ? ld_stream(a_g8 + k0 + 32) : zero;
    ld.step += kWarps;
    settle(ld, work, num_units);
  };

  // ---- compute side ----
  Cursor cp{0, warp};
  settle(cp, work, num_units);
  int cur = 0;  // the unit the accumulators belong to
  const T* b_row[2];
  int cur_ncols = 0;
  int64_t cur_len = 0;
  float acc[2][4];

  auto begin_unit = [&](int u) {
    cur_ncols = work.ncols(u);
    b_row[0] = work.b_row(u, min(g, cur_ncols - 1));
    b_row[1] = work.b_row(u, min(8 + g, cur_ncols - 1));
    const T* dummy0;
    const T* dummy1;
    work.a_rows(u, g, dummy0, dummy1, cur_len);
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[n][r] = 0.0f;
  };

  // This warp's partials of unit u (zeros if it had no steps there) meet the others'; the reduction
  // of unit u runs while the ring's loads for later units are in flight.
  auto finish_unit = [&](int u) {
    float (*buf)[kRedRegs][32] = red[u & 1];
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int r = 0; r < 4; ++r) buf[warp][n * 4 + r][lane] = acc[n][r];
    __syncthreads();
    work.reduce(u, buf);
  };

  begin_unit(0);
#pragma unroll
  for (int s = 0; s < kLookahead; ++s) issue(ring[s]);

  bool done = false;
  while (!done) {
#pragma unroll
    for (int s = 0; s < kLookahead; ++s) {
      if (cp.unit >= num_units) {
        done = true;
        break;
      }
      while (cur < cp.unit) {
        finish_unit(cur);
        ++cur;
        begin_unit(cur);
      }
      const int64_t k0 = static_cast<int64_t>(cp.step) * kStepK + c * 8;
      const bool two = cur_ncols > 8;
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int64_t kq = k0 + q * 32;
        const bool in = kq < cur_len;
        const uint4 wg = ring[s][2 * q], wg8 = ring[s][2 * q + 1];
        const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
        const uint4 x0 = in ? ld_act(b_row[0] + kq) : zero;
        mma_16816<T>(acc[0], wg.x, wg8.x, wg.y, wg8.y, x0.x, x0.y);
        mma_16816<T>(acc[0], wg.z, wg8.z, wg.w, wg8.w, x0.z, x0.w);
        if (two) {
          const uint4 x1 = in ? ld_act(b_row[1] + kq) : zero;
          mma_16816<T>(acc[1], wg.x, wg8.x, wg.y, wg8.y, x1.x, x1.y);
          mma_16816<T>(acc[1], wg.z, wg8.z, wg.w, wg8.w, x1.z, x1.w);
        }
      }
      cp.step += kWarps;
      settle(cp, work, num_units);
      issue(ring[s]);
    }
  }
  while (cur < num_units) {
    finish_unit(cur);
    ++cur;
    if (cur < num_units) begin_unit(cur);
  }
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

template <typename T, MoeGateUpLayout kLayout>
struct GateUpWork {
  const GateUpParams<T>& p;
  const Schedule& s;
  int unit0;      // the CTA's first unit (global index)
  int count;      // its number of units
  int ft_routed;  // feature tiles (of 8) per routed item: ceil(I / 8)

  __device__ int num_units() const { return count; }
  __device__ int steps(int) const { return static_cast<int>((p.H + kStepK - 1) / kStepK); }

  // Global unit -> item and first feature.
  __device__ void locate(int u, int& item, int64_t& f0) const {
    const int gu = unit0 + u;
    const int routed_units = s.num_routed_items * ft_routed;
    if (gu < routed_units) {
      item = gu / ft_routed;
      f0 = static_cast<int64_t>(gu % ft_routed) * 8;
    } else {
      item = s.num_routed_items;  // the shared experts
      f0 = static_cast<int64_t>(gu - routed_units) * 8;
    }
  }

  __device__ void a_rows(int u, int g, const T*& row_gate, const T*& row_up, int64_t& K) const {
    int item;
    int64_t f0;
    locate(u, item, f0);
    const int expert = s.item_expert[item];
    int64_t gate, up;
    const T* base;
    if (expert >= 0) {
      const int64_t f = min(f0 + g, p.I - 1);  // a feature past I (never with I % 8 == 0) reads row I-1
      if constexpr (kLayout == MoeGateUpLayout::kInterleaved) {
        gate = (f >> 3) * 16 + (f & 7);
        up = gate + 8;
      } else {
        gate = f;
        up = p.I + f;
      }
      base = p.gate_up + static_cast<int64_t>(expert) * 2 * p.I * p.H;
    } else {
      const int64_t f = min(f0 + g, p.Is - 1);
      gate = f;
      up = p.Is + f;
      base = p.shared_gate_up;
    }
    row_gate = base + gate * p.H;
    row_up = base + up * p.H;
    K = p.H;
  }

  __device__ int ncols(int u) const {
    int item;
    int64_t f0;
    locate(u, item, f0);
    return s.item_ncols[item];
  }

  __device__ const T* b_row(int u, int col) const {
    int item;
    int64_t f0;
    locate(u, item, f0);
    const int token = s.item_expert[item] >= 0 ? s.col_pair[s.item_col0[item] + col] / p.k : col;
    return p.hidden + static_cast<int64_t>(token) * p.H;
  }

  // 128 threads: (n-tile, i, lane) -> feature f0 + g, column n*8 + 2c + i; gate in register i, up in 2 + i.
  __device__ void reduce(int u, const float (*buf)[kRedRegs][32]) const {
    const int tid = threadIdx.x;
    if (tid >= 128) return;
    const int n = tid >> 6, i = (tid >> 5) & 1, lane = tid & 31;
    const int g = lane >> 2, c = lane & 3;
    int item;
    int64_t f0;
    locate(u, item, f0);
    const int col = n * 8 + 2 * c + i;
    const int expert = s.item_expert[item];
    const int64_t f = f0 + g;
    if (col >= s.item_ncols[item] || f >= (expert >= 0 ? p.I : p.Is)) return;
    float gate = 0.0f, up = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      gate += buf[w][n * 4 + i][lane];
      up += buf[w][n * 4 + 2 + i][lane];
    }
    int64_t dst;
    if (expert >= 0) {
      const int pair = s.col_pair[s.item_col0[item] + col];
      dst = static_cast<int64_t>(pair / p.k) * p.NA + static_cast<int64_t>(pair % p.k) * p.I + f;
    } else {
      dst = static_cast<int64_t>(col) * p.NA + static_cast<int64_t>(p.k) * p.I + f;
    }
    p.act[dst] = from_float<T>(silu_f(gate) * up);
  }
};

template <typename T, MoeGateUpLayout kLayout>
__global__ void __launch_bounds__(kThreads, 1) moe_gate_up_kernel(const GateUpParams<T> p) {
  __shared__ Schedule s;
  __shared__ float red[2][kWarps][kRedRegs][32];
  const int P = p.T_ * p.k;
  const bool any_bad = build_schedule(s, p.topk_ids, P, p.T_, p.E, p.Is > 0);

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

  const int ft_routed = static_cast<int>((p.I + 7) / 8);
  const int ft_shared = static_cast<int>((p.Is + 7) / 8);
  const int64_t units = static_cast<int64_t>(s.num_routed_items) * ft_routed + ft_shared;
  const int64_t lo = units * blockIdx.x / gridDim.x, hi = units * (blockIdx.x + 1) / gridDim.x;
  const GateUpWork<T, kLayout> work{p, s, static_cast<int>(lo), static_cast<int>(hi - lo), ft_routed};
  stream_units<T>(work, red);
}

// ---------------------------------------------------------------------------------------------
// down + combine

template <typename T>
struct DownParams {
  const T* act;             // [T, NA]
  const T* down;            // [E, H, I]
  const int32_t* topk_ids;  // [T, k]
  const float* topk_weights;  // [T, k]
  const T* shared_down;     // [H, Is] or nullptr
  const T* residual;        // [T, H] or nullptr
  T* out;                   // [T, H]
  int T_, k, E;
  int64_t H, I, Is, NA;
};

constexpr int kMaxSlots = kMaxPairs + kMaxTokens;  // one fp32 partial per pair, then per token (shared)

template <typename T>
struct DownWork {
  const DownParams<T>& p;
  const Schedule& s;
  float (*partial)[kMaxSlots][16];  // [tile of the CTA][slot][row of the tile]
  int64_t tile0;                    // the CTA's first 16-row tile
  int tiles;                        // its number of tiles (<= kMaxTilesPerCta)

  __device__ int num_units() const { return tiles * s.num_items; }
  __device__ int steps(int u) const {
    const int item = u % s.num_items;
    const int64_t K = s.item_expert[item] >= 0 ? p.I : p.Is;
    return static_cast<int>((K + kStepK - 1) / kStepK);
  }

  __device__ void a_rows(int u, int g, const T*& row_lo, const T*& row_hi, int64_t& K) const {
    const int item = u % s.num_items;
    const int64_t h0 = (tile0 + u / s.num_items) * 16;
    const int64_t h_lo = min(h0 + g, p.H - 1), h_hi = min(h0 + g + 8, p.H - 1);  // rows past H: not stored
    const int expert = s.item_expert[item];
    if (expert >= 0) {
      const T* base = p.down + static_cast<int64_t>(expert) * p.H * p.I;
      row_lo = base + h_lo * p.I;
      row_hi = base + h_hi * p.I;
      K = p.I;
    } else {
      row_lo = p.shared_down + h_lo * p.Is;
      row_hi = p.shared_down + h_hi * p.Is;
      K = p.Is;
    }
  }

  __device__ int ncols(int u) const { return s.item_ncols[u % s.num_items]; }

  __device__ const T* b_row(int u, int col) const {
    const int item = u % s.num_items;
    if (s.item_expert[item] >= 0) {
      const int pair = s.col_pair[s.item_col0[item] + col];
      return p.act + static_cast<int64_t>(pair / p.k) * p.NA + static_cast<int64_t>(pair % p.k) * p.I;
    }
    return p.act + static_cast<int64_t>(col) * p.NA + static_cast<int64_t>(p.k) * p.I;
  }

  // 256 threads: (n-tile, register, lane) -> row g (+8 for registers 2, 3), column n*8 + 2c + (r & 1).
  __device__ void reduce(int u, const float (*buf)[kRedRegs][32]) const {
    const int tid = threadIdx.x;
    const int n = tid >> 7, r = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, c = lane & 3;
    const int item = u % s.num_items;
    const int col = n * 8 + 2 * c + (r & 1);
    if (col >= s.item_ncols[item]) return;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += buf[w][n * 4 + r][lane];
    const int slot = s.item_expert[item] >= 0 ? s.col_pair[s.item_col0[item] + col] : p.T_ * p.k + col;
    partial[u / s.num_items][slot][g + (r >= 2 ? 8 : 0)] = sum;
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) moe_down_kernel(const DownParams<T> p) {
  __shared__ Schedule s;
  __shared__ float red[2][kWarps][kRedRegs][32];
  __shared__ float partial[kMaxTilesPerCta][kMaxSlots][16];
  const int P = p.T_ * p.k;
  build_schedule(s, p.topk_ids, P, p.T_, p.E, p.Is > 0);

  const int64_t num_tiles = (p.H + 15) / 16;
  const int64_t lo = num_tiles * blockIdx.x / gridDim.x, hi = num_tiles * (blockIdx.x + 1) / gridDim.x;
  const int tiles = static_cast<int>(hi - lo);  // <= kMaxTilesPerCta (grid sized so on the host)
  const DownWork<T> work{p, s, partial, lo, tiles};
  stream_units<T>(work, red);
  __syncthreads();  // every unit's partials are in shared memory

  // Combine: token t, row h = sum_j w[t, j] * partial(t, j) + shared(t) + residual, in that order.
  for (int i = threadIdx.x; i < tiles * p.T_ * 16; i += kThreads) {
    const int tile = i / (p.T_ * 16), t = (i / 16) % p.T_, row = i % 16;
    const int64_t h = (lo + tile) * 16 + row;
    if (h >= p.H) continue;
    float acc = 0.0f;
    bool bad = false;
    for (int j = 0; j < p.k; ++j) {
      const int pair = t * p.k + j;
      if (s.first[pair] < 0) {
        bad = true;
      } else {
        acc = __fadd_rn(acc, __fmul_rn(__ldg(p.topk_weights + pair), partial[tile][pair][row]));
      }
    }
    if (p.Is > 0) acc = __fadd_rn(acc, partial[tile][P + t][row]);
    if (p.residual != nullptr) acc = __fadd_rn(acc, to_float(p.residual[static_cast<int64_t>(t) * p.H + h]));
    p.out[static_cast<int64_t>(t) * p.H + h] = from_float<T>(bad ? NAN : acc);
  }
}

// ---------------------------------------------------------------------------------------------
// Fallback kernels: one warp per output (gate_up: an act element; down: an out element).

template <typename T, MoeGateUpLayout kLayout>
__global__ void __launch_bounds__(kThreads) moe_gate_up_simple_kernel(const GateUpParams<T> p) {
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

// Tokens per launch of the fast kernels: every pair of the launch in the schedule.
int64_t fast_chunk(int64_t k) { return k == 0 ? kMaxTokens : std::min<int64_t>(kMaxTokens, kMaxPairs / k); }

unsigned int simple_blocks(int64_t outputs, int sm_count) {
  const int64_t blocks = (outputs + kWarps - 1) / kWarps;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t{sm_count} * 32)));
}

// The fast path over token chunks (fp16 / bf16 only: fp32 never instantiates the MMA kernels).
template <typename T>
cudaError_t gate_up_fast(GateUpParams<T> p, int64_t T_total, MoeGateUpLayout layout, int sm_count,
                         cudaStream_t stream) {
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
      // Units: at most one routed item per pair (I / 8 feature tiles each) plus the shared tiles.
      const int64_t max_units = tc * p.k * ((p.I + 7) / 8) + (p.Is + 7) / 8;
      const unsigned int grid =
          static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(sm_count, max_units)));
      if (layout == MoeGateUpLayout::kInterleaved)
        moe_gate_up_kernel<T, MoeGateUpLayout::kInterleaved><<<grid, kThreads, 0, stream>>>(p);
      else
        moe_gate_up_kernel<T, MoeGateUpLayout::kHF><<<grid, kThreads, 0, stream>>>(p);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
}

template <typename T>
cudaError_t down_fast(DownParams<T> p, int64_t T_total, int sm_count, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    return cudaErrorInvalidValue;
  } else {
    const T* act = p.act;
    const int32_t* ids = p.topk_ids;
    const float* weights = p.topk_weights;
    const T* residual = p.residual;
    T* out = p.out;
    const int64_t chunk = fast_chunk(p.k);
    const int64_t tiles = (p.H + 15) / 16;
    // One CTA per SM, at most kMaxTilesPerCta tiles each (their partials live in shared memory).
    const int64_t grid = std::max<int64_t>(std::min<int64_t>(sm_count, tiles),
                                           (tiles + kMaxTilesPerCta - 1) / kMaxTilesPerCta);
    if (grid > 0x7fffffff) return cudaErrorInvalidValue;
    for (int64_t t0 = 0; t0 < T_total; t0 += chunk) {
      const int64_t tc = std::min(chunk, T_total - t0);
      p.T_ = static_cast<int>(tc);
      p.act = act + t0 * p.NA;
      p.topk_ids = ids + t0 * p.k;
      p.topk_weights = weights + t0 * p.k;
      p.residual = residual != nullptr ? residual + t0 * p.H : nullptr;
      p.out = out + t0 * p.H;
      moe_down_kernel<T><<<static_cast<unsigned int>(grid), kThreads, 0, stream>>>(p);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
}

}  // namespace

cudaError_t launch_moe_decode_gate_up(const void* hidden, const void* gate_up, const int32_t* topk_ids,
                                      const void* shared_gate_up, void* act, int64_t T, int64_t H, int64_t E,
                                      int64_t k, int64_t I, int64_t Is, MoeGateUpLayout layout, DType dtype,
                                      cudaStream_t stream) {
  const int64_t NA = k * I + Is;
  if (T == 0 || NA == 0) return cudaSuccess;
  if (E > 0x7fffffff || k > 0x7fffffff || T > 0x7fffffff) return cudaErrorInvalidValue;
  int sm_count = 0;
  const cudaError_t err = current_sm_count(&sm_count);
  if (err != cudaSuccess) return err;
  const bool fast = dtype != DType::kFloat32 && H % 8 == 0 && I % 8 == 0 && Is % 8 == 0 && k <= kMaxPairs &&
                    aligned16(hidden) && aligned16(gate_up) && aligned16(shared_gate_up) && aligned16(act) &&
                    !moe_decode_force_simple();
  DOTS1_DISPATCH_FLOAT_TYPES(dtype, scalar_t, {
    const GateUpParams<scalar_t> p{static_cast<const scalar_t*>(hidden), static_cast<const scalar_t*>(gate_up),
                                   topk_ids, static_cast<const scalar_t*>(shared_gate_up),
                                   static_cast<scalar_t*>(act), static_cast<int>(T), static_cast<int>(k),
                                   static_cast<int>(E), H, I, Is, NA};
    if (fast) return gate_up_fast<scalar_t>(p, T, layout, sm_count, stream);
    const unsigned int blocks = simple_blocks(T * NA, sm_count);
    if (layout == MoeGateUpLayout::kInterleaved)
      moe_gate_up_simple_kernel<scalar_t, MoeGateUpLayout::kInterleaved><<<blocks, kThreads, 0, stream>>>(p);
    else
      moe_gate_up_simple_kernel<scalar_t, MoeGateUpLayout::kHF><<<blocks, kThreads, 0, stream>>>(p);
  });
  return cudaGetLastError();
}

cudaError_t launch_moe_decode_down(const void* act, const void* down, const int32_t* topk_ids,
                                   const float* topk_weights, const void* shared_down, const void* residual, void* out,
                                   int64_t T, int64_t H, int64_t E, int64_t k, int64_t I, int64_t Is, DType dtype,
                                   cudaStream_t stream) {
  if (T == 0 || H == 0) return cudaSuccess;
  if (E > 0x7fffffff || k > 0x7fffffff || T > 0x7fffffff) return cudaErrorInvalidValue;
  const int64_t NA = k * I + Is;
  int sm_count = 0;
  const cudaError_t err = current_sm_count(&sm_count);
  if (err != cudaSuccess) return err;
  const bool fast = dtype != DType::kFloat32 && H % 8 == 0 && I % 8 == 0 && Is % 8 == 0 && k <= kMaxPairs &&
                    aligned16(act) && aligned16(down) && aligned16(shared_down) && !moe_decode_force_simple();
  DOTS1_DISPATCH_FLOAT_TYPES(dtype, scalar_t, {
    const DownParams<scalar_t> p{static_cast<const scalar_t*>(act), static_cast<const scalar_t*>(down), topk_ids,
                                 topk_weights, static_cast<const scalar_t*>(shared_down),
                                 static_cast<const scalar_t*>(residual), static_cast<scalar_t*>(out),
                                 static_cast<int>(T), static_cast<int>(k), static_cast<int>(E), H, I, Is, NA};
    if (fast) return down_fast<scalar_t>(p, T, sm_count, stream);
    moe_down_simple_kernel<scalar_t><<<simple_blocks(T * H, sm_count), kThreads, 0, stream>>>(p);
  });
  return cudaGetLastError();
}

}  // namespace dots1
