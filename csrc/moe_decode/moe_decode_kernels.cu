// MoE decode kernels: gate_up + SwiGLU and down + combine over the k routed experts of each token
// plus the shared experts, straight from topk_ids (no permute / unpermute).
//
// Fast path (fp16 / bf16, H, I, Is multiples of 8, 16-byte aligned rows): weight streaming on the
// tensor cores, the scheme of csrc/skinny_gemm (measured at 0.92-0.98 of copy bandwidth): 16 weight
// rows are the A operand of mma.sync m16n8k16 and up to 8 NT (t, j) pair columns the B operand (NT = 1,
// 2 or 4 n-tiles of 8, picked on the host from the launch's token count: 1 up to 8 tokens, else 2;
// DOTS1_EXT_MOE_DECODE_NT forces one, for benchmarks); the 8 warps of a CTA split K in equal
// CONTIGUOUS ranges; each lane issues a batch of U steps (16 bytes of each of its two weight rows and
// of each of its NT activation columns per step: 256 B of weight for NT = 1, 192 B for NT = 2, 64 B for
// NT = 4) before it multiplies any of them, so a warp waits one memory latency per batch, not per
// step; the warps' partial sums meet once, in shared memory, in warp order. 128 registers, 2 CTAs
// (16 warps) per SM; shared memory is dynamic (up to ~88 KB per CTA, see the Smem structs). (That is
// the frag weight-load mapping; the wide one, below, changes which bytes of which rows a lane reads.)
//
// One launch takes up to kMoeDecodeMaxPairs (t, j) pairs and kMoeDecodeMaxTokens tokens (512 / 64:
// every pair of a 64-token top-6 or top-8 step); the launchers loop over chunks beyond that.
//
// The schedule: the distinct experts of the launch's (t, j) pairs (in order of first appearance) and,
// for each, the pairs that chose it (in pair order), cut into "items" of at most 8 NT pairs (the MMA
// columns): an expert chosen by more pairs than an item holds (a hot expert) becomes several items
// and only it is read more than once; its items are scheduled side by side so that those re-reads
// are L2 hits. Each CTA builds the schedule in shared memory from the P ids with all its threads
// (build_schedule: a hash table of the ids, then one warp ranks the pairs 32 at a time; O(P)); the
// ids are copied to shared memory (cp.async) at the kernel's start, so that the load's latency hides
// behind the shared experts' stream, which never needs the schedule. The shared experts are not
// part of it: their columns are the tokens, in column groups of 8 NT tokens. The down kernel's frag
// launches of at most 32 pairs and 8 tokens (batch-1 decode) instead have every warp build its own copy
// (build_warp_schedule, one __match_any_sync: the same schedule), so that no warp waits for the others
// between its shared and routed streams.
//   gate_up - tiles of (item or shared column group, 8 output features): the 8 gate and 8 up rows of
//             those features over all of H. Persistent CTAs (2 per SM) take tiles b, b + grid, ...:
//             the shared experts' tiles (the column groups of a feature tile side by side), then the
//             schedule, then the routed tiles (per expert: its feature tiles, each over the expert's
//             items side by side); tiles past the launch's real count cost nothing. One barrier per
//             tile (the warps' partials, double-buffered), then 32 NT threads apply SwiGLU to the
//             warp-ordered sums and store.
//   down    - one CTA per 16 output rows h. Its work is the shared experts' rows (K = Is, split over
//             the 8 warps; one pass per column group of tokens, reduced in warp order after a
//             barrier, or in the combine for by-warp launches) and, per routed item, the item's
//             expert's 16 rows (K = I): the routed items are laid end to end (R items x ceil(I / 32)
//             steps) and that sequence is split over the 8 warps in equal contiguous ranges, so every
//             warp streams the same number of steps whatever the routing. A warp's piece of an item it
//             holds whole goes straight to the pair's fp32 partial in shared memory; an item cut by a
//             warp boundary leaves one piece per warp, summed in warp order after a barrier (by the
//             warp of the item's first boundary). Then one thread per (token, row) adds w[t, j] *
//             partial in the j order, the shared term and the residual, rounding once.
// Every touched expert's weight rows are read from HBM once per launch (several tokens that chose an
// expert are the columns of the same MMAs; a hot expert's further items re-read from L2); no float
// atomics: the result is bitwise reproducible (the schedule, hence every summation order, is a
// function of the ids alone).
//
// The k permutation: an m16n8k16 A fragment holds, per lane (group g = lane/4, c = lane%4), rows g and
// g+8 at logical k {2c, 2c+1, 2c+8, 2c+9}; the B fragment holds column g at the same logical k. A dot
// product does not care which physical k a logical k is, as long as A and B agree, so each lane loads
// 8 consecutive physical k of its rows (one 16-byte vector) and the same 8 k of its column's
// activation row: words 0-1 feed one MMA, words 2-3 the next.
//
// Two weight-load mappings of the model-dtype rows (DOTS1_EXT_MOE_DECODE_LOADS, read per call; moe_decode.h
// MoeDecodeLoads: the default wide_all is wide at every token count). frag (above): one warp load
// instruction reads 8 rows x 64 bytes.
// bench/probes/read_patterns.cu (branch next-skinny-wide), the decode kernels' streaming structure with
// only the address pattern varied, read 4238 GB/s that way on the H200 and 4659 GB/s with 2 rows x 256
// bytes per instruction. wide: the 16 A slots of an MMA need not be 16 rows. With P k-parts per row, the
// tile's 16 rows are P fragments; fragment f holds in lo slot g the tile row (8 / P) f + g / P at part
// g % P (hi slot g + 8: that row's hi partner, gate_up's up row of the feature or down's row 8 below), so
// lane (g, c) reads 16 bytes at k = 32 P s + 32 (g % P) + 8 c and the 4 P lanes of a row read 64 P
// contiguous bytes per instruction (P = 4: 2 rows x 256 bytes; P = 2: 4 rows x 128). B column n of an
// n-tile holds (item column n / P, part n % P), loaded at the same k; C[slot, n] is a partial dot product
// where the two parts agree, the other entries cross terms that are never read. The 8 warps of a CTA are
// P fragments x 8 / P K ranges (warp w: fragment w % P over range w / P), so a lane still streams two
// rows with the frag stream's batches, registers and bytes in flight (stream_rows<T, NT, P>); a warp
// step covers 32 P k of 16 / P rows. Each (row, column)'s P partials are summed across lanes in a fixed
// butterfly (wide_sum_parts), then the K ranges in order, where frag sums its 8 warps. An item's columns
// are 8 NT / P, so the launcher takes wide only while they hold every token of the launch (the shared
// experts in one column group, read once, and with distinct ids per token every expert one item, as
// frag at <= 8 tokens): (P, NT) = (4, 1) for 1-2 tokens, (2, 1) for 3-4, (2, 2) for 5-8; frag above
// (8 columns at P = 4 need NT = 8, at P = 2 NT = 4: those accumulators and batches do not fit 128
// registers; P = 4, NT = 2 already spilled in gate_up). Register use (nvcc --resource-usage, sm_90a):
// every dense instantiation 128 (down wide P = 2, NT = 1: 120) registers, no spills; down streams 7
// (P = 4) / 6 (P = 2) steps per batch at NT = 1, where frag's 8 spilled 12-20 bytes there. The int4
// routed weights (Int4Experts) keep their own 128-k group mapping (gate_up's routed int4 tiles through
// shared memory where H allows: stream_rows_int4_staged). Results equal frag's up to the fp32
// summation order; each mapping is bitwise reproducible.
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
#include "phase_stamps.cuh"
#include "weight_stream.cuh"
#include "moe_decode/moe_decode.h"

namespace dots1 {

#ifdef DOTS1_EXT_PHASE_STAMPS
// Probe builds only (setup.py: DOTS1_EXT_PHASE_STAMPS=1 at build time; bench/probes/moe_phase_stamps.py):
// thread 0 of each CTA of the fast kernels records %globaltimer at the phase edges below, per kernel
// (0 gate_up, 1 down), CTA and slot; each launch overwrites the last one's. Compiled out otherwise.
constexpr int kStampKernels = 2, kStampBlocks = 512, kStampSlots = 16;
__device__ unsigned long long g_phase_stamps[kStampKernels][kStampBlocks][kStampSlots];
__device__ __forceinline__ void phase_stamp(int kernel, int slot) {
  if (threadIdx.x == 0 && blockIdx.x < kStampBlocks) g_phase_stamps[kernel][blockIdx.x][slot] = globaltimer_ns();
}
#define DOTS1_PHASE_STAMP(kernel, slot) ::dots1::phase_stamp(kernel, slot)
#else
#define DOTS1_PHASE_STAMP(kernel, slot) ((void)0)
#endif

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kStepK = 32;  // k per warp step: per weight row, 4 lanes x 8 elements (one 16-byte vector)
constexpr int kMaxPairs = kMoeDecodeMaxPairs;
constexpr int kMaxTokens = kMoeDecodeMaxTokens;
// Routed items: sum over experts of ceil(pairs / cols) <= the pairs (every item holds at least one).
constexpr int kMaxItems = kMaxPairs;
// The schedule's hash table of expert ids: a power of two, at least twice the pairs (at most half full).
constexpr int kHashSlots = 2 * kMaxPairs;

static_assert(kMaxTokens * 1 <= kMaxPairs, "a launch of kMaxTokens tokens with k = 1 fits");
static_assert((kHashSlots & (kHashSlots - 1)) == 0 && kHashSlots >= 2 * kMaxPairs, "hash table size");
static_assert(kHashSlots <= 32767 && kMaxPairs <= 32767, "the schedule stores pairs, items and slots as int16");

// Steps per batch and independent accumulator sets (as skinny_gemm's RT = 1): U (2 + NT) 16-byte
// vectors per lane in flight (96 registers for NT = 1 and 2; 48 for NT = 4, where U = 3 already
// spilled in gate_up), and at least 4 MMA chains (sets x NT) so that the dependent MMAs of a batch do
// not hold the warp longer than the loads it waits for.
template <int NT>
constexpr int batch_steps() {
  return NT == 1 ? 8 : NT == 2 ? 6 : 2;
}
template <int NT>
constexpr int accumulator_sets() {
  return NT == 4 ? 1 : 2;
}

__device__ __forceinline__ float silu_f(float g) { return g / (1.0f + expf(-g)); }

// ---------------------------------------------------------------------------------------------
// Loads and the MMA

__device__ __forceinline__ void prefetch_l1(const void* p) { asm volatile("prefetch.global.L1 [%0];" ::"l"(p)); }
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// 4 bytes global -> shared without a register (cp.async, sm_80+), completed by cp_async_wait_all() of
// the same thread (then a barrier makes them visible to the others). Volatile with a memory clobber:
// stays after a PDL wait (csrc/pdl.cuh rule 2).
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  const unsigned int dst = static_cast<unsigned int>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// The same value, opaque to the compiler (a volatile move is not hoisted out of a loop): what is
// computed from it inside a loop is recomputed per iteration instead of held in registers across it.
__device__ __forceinline__ int opaque(int v) {
  int r;
  asm volatile("mov.b32 %0, %1;" : "=r"(r) : "r"(v));
  return r;
}

// PDL (csrc/pdl.cuh), before the wait: the first batch (U steps) of this warp's steps [s_begin, s_end)
// of two weight rows, prefetched into L2 (weights are never written in a step), so that the first
// stream_rows after the wait, over the same rows and steps, finds it there; no register is held across
// the wait. One lane per 4 (c == 0) requests each step's 64 bytes of a row (P > 1, the wide mapping:
// of its row's part g % P, at 32 (g % P) in a step of 32 P).
template <typename T, int NT, int P = 1>
__device__ __forceinline__ void prefetch_first_batch(const T* row_lo, const T* row_hi, int64_t K, int s_begin,
                                                     int s_end) {
  if ((threadIdx.x & 3) != 0) return;
  const int lane_k = kStepK * (((threadIdx.x & 31) >> 2) % P);
#pragma unroll
  for (int u = 0; u < batch_steps<NT>(); ++u) {
    const int64_t k = static_cast<int64_t>(s_begin + u) * kStepK * P + lane_k;
    if (s_begin + u < s_end && k < K) {
      prefetch_l2(row_lo + k);
      prefetch_l2(row_hi + k);
    }
  }
}

// The accumulators of a stream, kSets independent MMA chains per n-tile: zeroed before it, summed in
// set order into res after it.
template <int kSets, int NT>
__device__ __forceinline__ void zero_sets(float (&acc)[kSets][NT][4]) {
#pragma unroll
  for (int s = 0; s < kSets; ++s)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[s][n][r] = 0.0f;
}
template <int kSets, int NT>
__device__ __forceinline__ void sum_sets(const float (&acc)[kSets][NT][4], float (&res)[NT][4]) {
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

// A warp's first batch of weight steps of its next tile (stream_rows' kCarried, moe_gate_up_kernel's
// kCarryTiles): loaded at the end of the current tile's stream, in flight across its reduction, barrier
// and store (where the warp otherwise has no load outstanding), consumed by the next stream as its first
// batch. The same loads of the same bytes, only issued earlier: the same bits.
template <int U>
struct RowsCarry {
  uint4 w[U][2];
};
// Steps [s_begin, s_begin + U) of two rows, as stream_rows<T, NT, P, U> loads its first batch.
template <typename T, int P, int U>
__device__ __forceinline__ void carry_first_batch(const T* row_lo, const T* row_hi, int64_t K, int s_begin, int s_end,
                                                  RowsCarry<U>& c) {
  constexpr int kRowStep = kStepK * P;
  const int lane_k = kStepK * (((threadIdx.x & 31) >> 2) % P) + 8 * (threadIdx.x & 3);
  const int lane_end = min(s_end, (static_cast<int>(K) - lane_k + kRowStep - 1) / kRowStep);
  const int valid = min(lane_end - s_begin, U);
  const int64_t offset0 = static_cast<int64_t>(s_begin) * kRowStep + lane_k;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    c.w[u][0] = load_weight16_now(row_lo + offset0 + u * kRowStep, u < valid);
    c.w[u][1] = load_weight16_now(row_hi + offset0 + u * kRowStep, u < valid);
  }
}

// One warp's share of a 16-row x (8 NT)-column product: steps [s_begin, s_end) of K (32 k each) of
// weight rows row_lo (tile row g) and row_hi (g + 8) against activation rows col[n] (column 8 n + g;
// col_ok false: not loaded, its fragment stays zero). res[n] is the lane's C fragment of n-tile n:
// (row g, col 8n + 2c), (g, 8n + 2c + 1), (g + 8, 8n + 2c), (g + 8, 8n + 2c + 1), summed over the
// accumulator sets in a fixed order. K % 8 == 0: a lane's vector is wholly in range or wholly out.
// P > 1: the wide mapping (below): row_lo / row_hi / col[n] are the lane's row and column of the warp's
// fragment, a step is 32 P k and the lane's 16 bytes lie at 32 (g % P) + 8 c in it.
// kCarried: *carry already holds the first batch's weights (carry_first_batch of these rows and steps),
// and after the last batch the stream loads the first batch of next_lo / next_hi into it (nothing when
// next_lo is null), over the same steps.
template <typename T, int NT, int P = 1, int U = batch_steps<NT>(), bool kCarried = false>
__device__ __forceinline__ void stream_rows(const T* row_lo, const T* row_hi, const T* const (&col)[NT],
                                            const bool (&col_ok)[NT], int64_t K, int s_begin, int s_end,
                                            float (&res)[NT][4], RowsCarry<U>* carry = nullptr,
                                            const T* next_lo = nullptr, const T* next_hi = nullptr) {
  constexpr int kSets = accumulator_sets<NT>();
  RowsCarry<U> own;
  RowsCarry<U>& cw = kCarried ? *carry : own;
  constexpr int kRowStep = kStepK * P;
  float acc[kSets][NT][4];
  zero_sets(acc);

  // Pointers at this lane's 16 bytes of step s_begin, advanced a batch at a time (the steps of a
  // batch are immediate offsets); this lane's steps end where its vector would pass K.
  const int lane_k = kStepK * (((threadIdx.x & 31) >> 2) % P) + 8 * (threadIdx.x & 3);
  // (int: K < 2^30 on the fast path, fast_sizes; a 64-bit bound costs registers.)
  const int lane_end = min(s_end, (static_cast<int>(K) - lane_k + kRowStep - 1) / kRowStep);
  const int64_t offset0 = static_cast<int64_t>(s_begin) * kRowStep + lane_k;
  const T* lo = row_lo + offset0;
  const T* hi = row_hi + offset0;
  const T* x[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) x[n] = col[n] + offset0;

  for (int s0 = s_begin; s0 < s_end; s0 += U) {
    const int valid = min(lane_end - s0, U);  // may be <= 0
    uint4 (&wv)[U][2] = cw.w;
    uint4 xv[U][NT];
    const bool load_w = !kCarried || s0 != s_begin;  // a carried stream's first batch is loaded
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool ok = u < valid;
      if (load_w) {
        wv[u][0] = load_weight16(lo + u * kRowStep, ok);
        wv[u][1] = load_weight16(hi + u * kRowStep, ok);
      }
#pragma unroll
      for (int n = 0; n < NT; ++n) xv[u][n] = load_act16(x[n] + u * kRowStep, ok && col_ok[n]);
    }
    lo += U * kRowStep;
    hi += U * kRowStep;
#pragma unroll
    for (int n = 0; n < NT; ++n) x[n] += U * kRowStep;
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
  if constexpr (kCarried) {
    if (next_lo != nullptr) carry_first_batch<T, P, U>(next_lo, next_hi, K, s_begin, s_end, *carry);
  }
  sum_sets(acc, res);
}

// ---------------------------------------------------------------------------------------------
// The wide-row mapping (DOTS1_EXT_MOE_DECODE_LOADS=wide, model-dtype rows only; the header comment):
// P k-parts per row, warp w streams fragment w % P of the 16 rows (stream_rows<T, NT, P>) over K range
// w / P; below, how a lane's C entries become (row, column) sums.

template <int P>
constexpr bool wide_parts_ok() {
  return P == 2 || P == 4;
}

// The sum over parts of a lane's C entries res[n] (stream_rows<T, NT, P>): out[n][0] for its lo row,
// out[n][1] for its hi row, column wide_col<P>(n); valid on the wide_writer<P>() lanes. Lane (g, c)
// holds C[g | g + 8, 8 n + 2 c + e], e = 0, 1; column 8 n + 2 c + e has part (2 c + e) % P, so the entry
// whose part is the slot's is e = g % 2 (when one is: for P = 4, lanes with (g % 4) / 2 != c % 2 hold
// cross terms only, and only trade them with each other). The butterfly: P = 2, lanes g and g ^ 1 (same
// c); P = 4, then lanes (g, c) and (g ^ 2, c ^ 1). Every participant ends with the same value (a + b ==
// b + a exactly): a function of the data alone. All 32 lanes call it.
template <int P, int NT>
__device__ __forceinline__ void wide_sum_parts(const float (&res)[NT][4], float (&out)[NT][2]) {
  const bool odd = (threadIdx.x & 4) != 0;  // g % 2 (selected, not indexed: no local memory)
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float v = odd ? res[n][2 * h + 1] : res[n][2 * h];
      v += __shfl_xor_sync(0xffffffffu, v, 4);                        // parts (0, 1) | (2, 3)
      if constexpr (P == 4) v += __shfl_xor_sync(0xffffffffu, v, 9);  // (0 + 1) + (2 + 3)
      out[n][h] = v;
    }
}

// Whether this lane holds (row, column) sums of wide_sum_parts: the part-0 lane of each, lane (g, c)
// with g % P == 0 and 2 c % P == 0. Its lo row in the tile: wide_row<P>(f) for fragment f (hi: + 8);
// its column in n-tile n: wide_col<P>(n). The lane's own row and column are the same formulas for
// every lane (g / P and (8 n + g) / P of the fragment).
template <int P>
__device__ __forceinline__ bool wide_writer() {
  const int lane = threadIdx.x & 31;
  return (lane >> 2) % P == 0 && (2 * (lane & 3)) % P == 0;
}
template <int P>
__device__ __forceinline__ int wide_row(int f) {
  return (8 / P) * f + ((threadIdx.x & 31) >> 2) / P;
}
template <int P>
__device__ __forceinline__ int wide_col(int n) {
  return (8 * n + 2 * (threadIdx.x & 3)) / P;
}

// A thread's K range (warp / P) and lo row of the 16 (its warp's fragment's wide_row), from an opaque
// thread index: recomputed where they are used rather than held in registers across a loop (the down
// kernel spilled holding them).
struct WidePlace {
  int range, row;
};
template <int P>
__device__ __forceinline__ WidePlace wide_place() {
  const int tid = opaque(static_cast<int>(threadIdx.x)), warp = tid >> 5;
  return {warp / P, (8 / P) * (warp % P) + ((tid & 31) >> 2) / P};
}

// ---------------------------------------------------------------------------------------------
// int4 routed experts (W4A16, docs/design.md §7): the weight stream of two rows.
//
// A warp step is one quantization group of 128 k: each lane loads 16 bytes = 32 codes of each of its
// two rows (4 lanes cover the group, so each row needs one scale and one zero point per step) and the
// same 32 k of each activation column (4 16-byte vectors). Each 32-bit word holds 8 codes in the
// format's nibble order (code j in bits 4j .. 4j + 3); the mask-and-or trick below yields the bf16x2
// pairs (code j, code j + 4), so by the k permutation (the header comment) those pairs are the logical
// k (2c, 2c + 1) of an MMA and the activation words are permuted to match: (x_j, x_j+4) from two
// 16-byte halves with one byte permute.

constexpr int kGroupK = 128;  // k per int4 warp step: 4 lanes x 32 codes (16 bytes) = one group

// Steps per batch of the int4 stream: U x 32 bytes of weight per lane in flight (2 rows x 16 bytes),
// plus the scales and zero points; activations are loaded one word ahead inside the batch (L1 hits).
template <int NT>
constexpr int int4_batch_steps() {
  return NT == 4 ? 1 : 4;  // NT = 4 (forced by DOTS1_EXT_MOE_DECODE_NT only): 2 spilled in down
}

// 2 bytes / 1 byte at p (zero-extended) when pred, undefined otherwise (the caller never uses it then): a
// weight's scale or zero point (never written in a step: non-volatile, as load_weight16).
#define DOTS1_LD_IF_PTX(TYPE)              \
  "{\n\t"                                  \
  ".reg .pred p;\n\t"                      \
  "setp.ne.b32 p, %2, 0;\n\t"              \
  "@p ld.global.nc." TYPE " %0, [%1];\n\t" \
  "}"
__device__ __forceinline__ uint32_t load_weight_u16_if(const void* p, bool pred) {
  unsigned short v;
  asm(DOTS1_LD_IF_PTX("u16") : "=h"(v) : "l"(p), "r"(static_cast<int>(pred)));
  return v;
}
__device__ __forceinline__ uint32_t load_weight_u8_if(const void* p, bool pred) {
  unsigned short v;
  asm(DOTS1_LD_IF_PTX("u8") : "=h"(v) : "l"(p), "r"(static_cast<int>(pred)));
  return v;
}
#undef DOTS1_LD_IF_PTX

// The per-step values of an int4 batch besides the codes, one register each per step: both rows'
// scales (lo | hi << 16, bf16 bits) and zero points (lo | hi << 16).
template <int U>
struct Int4BatchMeta {
  uint32_t scale2[U], zero2[U];
};

// Steps [s0, s0 + valid) of rows lo and hi (s_* their K/128 scales, z_* their zero points or nullptr
// for symmetric, z = 8); steps past `valid` are loaded under a false predicate and never used.
template <int U>
__device__ __forceinline__ void load_int4_meta(const __nv_bfloat16* s_lo, const __nv_bfloat16* s_hi,
                                               const uint8_t* z_lo, const uint8_t* z_hi, int s0, int valid,
                                               Int4BatchMeta<U>& m) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const bool ok = u < valid;
    m.scale2[u] = load_weight_u16_if(s_lo + s0 + u, ok) | load_weight_u16_if(s_hi + s0 + u, ok) << 16;
    m.zero2[u] = z_lo == nullptr ? 0x00080008u
                                 : load_weight_u8_if(z_lo + s0 + u, ok) | load_weight_u8_if(z_hi + s0 + u, ok) << 16;
  }
}

// The math of one batch of `valid` (1..U) steps: code(u, r) is this lane's 16 bytes of step u of row
// lo (r = 0) or hi (r = 1), read once per step; x[n] this lane's activations of the batch's first step.
// Each word's activation vectors are loaded one word ahead (volatile loads keep their order with the
// MMAs). The register stream and the shared-memory one (staged) run this same code: the same bits.
// kActSmem (GateUpParams::act_smem): x[n] points into shared memory at a copy of the activations whose
// 8-element chunks are stored as (x0, x4), (x1, x5), (x2, x6), (x3, x7) (moe_gate_up_kernel): the words
// are the MMA's B registers as loaded, no byte permutes (SASS, sm_90a: the gate_up R = 4 batch loop
// 768 -> 691 instructions). Same values in the same order: the same bits.
__device__ __forceinline__ uint4 load_act16_shared(const void* p) {
  uint4 v;
  const unsigned int a = static_cast<unsigned int>(__cvta_generic_to_shared(p));
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a));
  return v;
}
template <bool kActSmem>
__device__ __forceinline__ uint4 load_act16_for(const void* p) {
  if constexpr (kActSmem) return load_act16_shared(p);
  else return load_act16_always(p);
}

template <int NT, int U, int kSets, bool kActSmem = false, typename Code>
__device__ __forceinline__ void int4_batch(Code code, const Int4BatchMeta<U>& m, int valid,
                                           const __nv_bfloat16* const* x, float (&acc)[kSets][NT][4]) {
  using T = __nv_bfloat16;
  uint4 xv[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) xv[n] = load_act16_for<kActSmem>(x[n]);
  uint4 w_lo = {}, w_hi = {};
#pragma unroll
  for (int wi = 0; wi < 4 * U; ++wi) {
    const int u = wi >> 2, i = wi & 3;
    if (u >= valid) break;  // warp-uniform
    if (i == 0) {
      w_lo = code(u, 0);
      w_hi = code(u, 1);
    }
    uint4 xn[NT];
    const int wn = wi + 1;
    // The next word's activations (a step past `valid` re-reads this word: in range, never used).
    const int next = wn < 4 * U && (wn >> 2) < valid ? (wn >> 2) * kGroupK + (wn & 3) * 8 : u * kGroupK + i * 8;
#pragma unroll
    for (int n = 0; n < NT; ++n) xn[n] = load_act16_for<kActSmem>(x[n] + next);
    // bf16x2 (s, s) of each row; -(128 + z) as bf16 (z <= 15 sits in the mantissa's low bits).
    const uint32_t s_lo2 = __byte_perm(m.scale2[u], 0, 0x1010), s_hi2 = __byte_perm(m.scale2[u], 0, 0x3232);
    const uint32_t nz_lo2 = (m.zero2[u] & 0xFFFFu) * 0x00010001u | 0xC300C300u;
    const uint32_t nz_hi2 = (m.zero2[u] >> 16) * 0x00010001u | 0xC300C300u;
    uint32_t dl[4], dh[4];
    dequant8(word_of(w_lo, i), nz_lo2, s_lo2, dl);
    dequant8(word_of(w_hi, i), nz_hi2, s_hi2, dh);
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      // Activation pairs matching the weight pairs (code j, code j + 4): (x0, x4), (x1, x5) | (x2, x6), (x3, x7).
      uint32_t b0, b1, b2, b3;
      if constexpr (kActSmem) {
        b0 = xv[n].x, b1 = xv[n].y, b2 = xv[n].z, b3 = xv[n].w;
      } else {
        b0 = __byte_perm(xv[n].x, xv[n].z, 0x5410), b1 = __byte_perm(xv[n].x, xv[n].z, 0x7632);
        b2 = __byte_perm(xv[n].y, xv[n].w, 0x5410), b3 = __byte_perm(xv[n].y, xv[n].w, 0x7632);
      }
      mma_16816<T>(acc[0][n], dl[0], dh[0], dl[1], dh[1], b0, b1);
      mma_16816<T>(acc[1 % kSets][n], dl[2], dh[2], dl[3], dh[3], b2, b3);
      xv[n] = xn[n];
    }
  }
}

// stream_rows for int4 rows (bf16 activations): groups [s_begin, s_end) of rows lo and hi (q_* their
// packed bytes, s_* / z_* as load_int4_meta) against activation rows col[n]; res as stream_rows.
// K % 128 == 0: no tail. Every col[n] must be a readable row, also where !col_ok[n] (the callers point
// those at a real row): the activations are loaded without a predicate, and such a column only feeds
// its own MMA output column, which the callers never store.
template <int NT, bool kActSmem = false>
__device__ __forceinline__ void stream_rows_int4(const uint8_t* q_lo, const uint8_t* q_hi,
                                                 const __nv_bfloat16* s_lo, const __nv_bfloat16* s_hi,
                                                 const uint8_t* z_lo, const uint8_t* z_hi,
                                                 const __nv_bfloat16* const (&col)[NT], const bool (&col_ok)[NT],
                                                 int s_begin, int s_end, float (&res)[NT][4]) {
  using T = __nv_bfloat16;
  constexpr int U = int4_batch_steps<NT>();
  constexpr int kSets = accumulator_sets<NT>();
  float acc[kSets][NT][4];
  zero_sets(acc);

  // This lane's 16 bytes of group s: bytes [64 s + 16 c, + 16) of the row = codes 128 s + 32 c + [0, 32).
  const int c = threadIdx.x & 3;
  const uint8_t* lo = q_lo + static_cast<int64_t>(s_begin) * (kGroupK / 2) + 16 * c;
  const uint8_t* hi = q_hi + static_cast<int64_t>(s_begin) * (kGroupK / 2) + 16 * c;
  const T* x[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) x[n] = col[n] + static_cast<int64_t>(s_begin) * kGroupK + 32 * c;

  for (int s0 = s_begin; s0 < s_end; s0 += U) {
    const int valid = min(s_end - s0, U);  // >= 1
    uint4 wv[U][2];
    Int4BatchMeta<U> m;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool ok = u < valid;
      wv[u][0] = load_weight16_if(lo + u * (kGroupK / 2), ok);
      wv[u][1] = load_weight16_if(hi + u * (kGroupK / 2), ok);
    }
    load_int4_meta(s_lo, s_hi, z_lo, z_hi, s0, valid, m);
    lo += U * (kGroupK / 2);
    hi += U * (kGroupK / 2);
    int4_batch<NT, U, kSets, kActSmem>([&](int u, int r) { return wv[u][r]; }, m, valid, x, acc);
#pragma unroll
    for (int n = 0; n < NT; ++n) x[n] += U * kGroupK;
  }
  sum_sets(acc, res);
}

// The staged int4 stream (gate_up's routed tiles, DOTS1_EXT_MOE_DECODE_INT4_STAGED): a warp's share of a
// tile is at most one batch (H <= 8 warps x U x 128), so between its tiles a warp held no bytes in
// flight (ncu at T = 1, a0f98fa: DRAM 47% busy, long-scoreboard stalls). Instead each thread copies its
// own 16-byte pieces of the NEXT tile into shared memory (cp.async, no registers) before it computes
// the current one from its pieces of the previous copy. A thread reads back only what it copied, so
// its own cp.async.wait_group orders everything; no barrier beyond the tile's. Slots: [2 U][kThreads]
// uint4 per buffer (step u, row r at (2 u + r) kThreads + thread: consecutive threads, consecutive
// 16 bytes), two buffers.
template <int NT>
constexpr int int4_stage_uint4s() {
  return 2 * int4_batch_steps<NT>() * kThreads;
}

// stream_rows_int4 over this thread's staged pieces: `slots` = its buffer + threadIdx.x, steps
// [s_begin, s_end) with s_end - s_begin <= U (what the issue wrote), m their scales and zero points.
template <int NT>
__device__ __forceinline__ void stream_rows_int4_staged(const uint4* slots,
                                                        const Int4BatchMeta<int4_batch_steps<NT>()>& m,
                                                        const __nv_bfloat16* const (&col)[NT], int s_begin, int s_end,
                                                        float (&res)[NT][4]) {
  using T = __nv_bfloat16;
  constexpr int U = int4_batch_steps<NT>();
  constexpr int kSets = accumulator_sets<NT>();
  float acc[kSets][NT][4];
  zero_sets(acc);
  const int c = threadIdx.x & 3;
  const T* x[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) x[n] = col[n] + static_cast<int64_t>(s_begin) * kGroupK + 32 * c;
  const int valid = s_end - s_begin;
  if (valid > 0)
    int4_batch<NT, U, kSets>([&](int u, int r) { return slots[(2 * u + r) * kThreads]; }, m, valid, x, acc);
  sum_sets(acc, res);
}

// ---------------------------------------------------------------------------------------------
// The routed experts' weights [E, N, K] (K the reduction dimension): how a warp streams two rows of
// one expert (stream, steps of kStep k) and what the fallback kernels read per element (value). The
// kernels are templates on these; the shared experts are always in the model dtype (stream_rows).

// In the model dtype: rows of K contiguous elements.
template <typename T>
struct DenseExperts {
  enum : int { kStep = kStepK };  // k per warp step (frag mapping; wide: kStep * P)
  static constexpr bool kFast = !std::is_same_v<T, float>;  // the MMA kernels: fp16 / bf16
  enum : bool { kWideLoads = kFast };                        // stream_wide exists
  enum : bool { kStaged = false };                           // issue_staged / stream_staged exist
  enum : bool { kRowGroups = false };                        // gate_up's routed tiles of 8 R features (R > 1)
  const T* w;  // [E, N, K]
  int64_t N, K;

  __device__ __forceinline__ const T* row(int expert, int64_t r) const {
    return w + (static_cast<int64_t>(expert) * N + r) * K;
  }

  __device__ __forceinline__ float value(int expert, int64_t row, int64_t k) const {
    return to_float(w[(static_cast<int64_t>(expert) * N + row) * K + k]);
  }
  template <int NT>
  __device__ __forceinline__ void stream(int expert, int64_t row_lo, int64_t row_hi, const T* const (&col)[NT],
                                         const bool (&col_ok)[NT], int s_begin, int s_end, float (&res)[NT][4]) const {
    const T* base = w + static_cast<int64_t>(expert) * N * K;
    stream_rows<T, NT>(base + row_lo * K, base + row_hi * K, col, col_ok, K, s_begin, s_end, res);
  }
  // The wide mapping: row_lo / row_hi are the lane's rows of its warp's fragment (stream_rows<T, NT, P>).
  template <int NT, int P, int U>
  __device__ __forceinline__ void stream_wide(int expert, int64_t row_lo, int64_t row_hi, const T* const (&col)[NT],
                                              const bool (&col_ok)[NT], int s_begin, int s_end,
                                              float (&res)[NT][4]) const {
    const T* base = w + static_cast<int64_t>(expert) * N * K;
    stream_rows<T, NT, P, U>(base + row_lo * K, base + row_hi * K, col, col_ok, K, s_begin, s_end, res);
  }
};

// int4 (docs/design.md §7): element = (u - z) * s rounded once to T, exactly dequantize_int4's value.
// K % 128 == 0. The MMA kernels take bf16 activations only (kFast); the fallback any dtype.
template <typename T>
struct Int4Experts {
  enum : int { kStep = kGroupK };  // k per warp step: one group
  static constexpr bool kFast = std::is_same_v<T, __nv_bfloat16>;
  enum : bool { kWideLoads = false };  // one 128-k group per step and lane quad: the frag mapping only
  enum : bool { kStaged = kFast };     // issue_staged / stream_staged (gate_up's routed tiles)
  enum : bool { kRowGroups = kFast };  // gate_up's routed tiles of 8 R features at NT = 1 (GateUpParams)
  const uint8_t* qweight;        // [E, N, K/2]: code 2j in the low nibble of byte j, 2j + 1 in the high
  const __nv_bfloat16* scales;   // [E, N, K/128]
  const uint8_t* zeros;          // [E, N, K/128] or nullptr (symmetric: z = 8)
  int64_t N, K;

  __device__ __forceinline__ float value(int expert, int64_t row, int64_t k) const {
    const int64_t r = static_cast<int64_t>(expert) * N + row, g = r * (K / kGroupK) + k / kGroupK;
    const int u = (__ldg(qweight + r * (K / 2) + k / 2) >> (4 * (k & 1))) & 0xF;
    const int z = zeros == nullptr ? 8 : __ldg(zeros + g);
    // (u - z) * s is exact in fp32 (5-bit integer times an 8-bit significand); one rounding to T.
    return to_float(from_float<T>(static_cast<float>(u - z) * __bfloat162float(scales[g])));
  }
  template <int NT, bool kActSmem = false>
  __device__ __forceinline__ void stream(int expert, int64_t row_lo, int64_t row_hi, const T* const (&col)[NT],
                                         const bool (&col_ok)[NT], int s_begin, int s_end, float (&res)[NT][4]) const {
    static_assert(kFast, "the int4 MMA stream takes bf16 activations");
    const int64_t G = K / kGroupK, r_lo = static_cast<int64_t>(expert) * N + row_lo,
                  r_hi = static_cast<int64_t>(expert) * N + row_hi;
    stream_rows_int4<NT, kActSmem>(qweight + r_lo * (K / 2), qweight + r_hi * (K / 2), scales + r_lo * G,
                                   scales + r_hi * G,
                         zeros == nullptr ? nullptr : zeros + r_lo * G, zeros == nullptr ? nullptr : zeros + r_hi * G,
                         col, col_ok, s_begin, s_end, res);
  }
  // The staged stream's copy (stream_rows_int4_staged): this thread's pieces of steps [s_begin, s_end)
  // (at most U) of rows lo and hi into `slots` (its buffer + threadIdx.x), not committed; their scales
  // and zero points into m (registers: the loads complete while the current tile computes).
  template <int NT>
  __device__ __forceinline__ void issue_staged(int expert, int64_t row_lo, int64_t row_hi, int s_begin, int s_end,
                                               uint4* slots, Int4BatchMeta<int4_batch_steps<NT>()>& m) const {
    constexpr int U = int4_batch_steps<NT>();
    const int64_t G = K / kGroupK, r_lo = static_cast<int64_t>(expert) * N + row_lo,
                  r_hi = static_cast<int64_t>(expert) * N + row_hi;
    const int c = threadIdx.x & 3, valid = s_end - s_begin;
    const uint8_t* lo = qweight + r_lo * (K / 2) + static_cast<int64_t>(s_begin) * (kGroupK / 2) + 16 * c;
    const uint8_t* hi = qweight + r_hi * (K / 2) + static_cast<int64_t>(s_begin) * (kGroupK / 2) + 16 * c;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (u < valid) {
        cp_async16(slots + 2 * u * kThreads, lo + u * (kGroupK / 2));
        cp_async16(slots + (2 * u + 1) * kThreads, hi + u * (kGroupK / 2));
      }
    }
    load_int4_meta(scales + r_lo * G, scales + r_hi * G, zeros == nullptr ? nullptr : zeros + r_lo * G,
                   zeros == nullptr ? nullptr : zeros + r_hi * G, s_begin, valid, m);
  }
};

// ---------------------------------------------------------------------------------------------
// The schedule: distinct experts of the launch's (t, j) pairs and the pairs that chose each.

struct Schedule {
  int32_t pair_id[kMaxPairs];       // topk_ids as read (load_ids_async)
  int32_t slot_key[kHashSlots];     // the expert id a hash slot holds; -1: empty
  int16_t slot_count[kHashSlots];   // how many pairs chose it (a running count while ranking)
  int16_t slot_col0[kHashSlots];    // where its pairs start in col_pair
  int16_t pair_slot[kMaxPairs];     // the slot of the pair's expert; -1: id outside [0, E)
  int16_t pair_rank[kMaxPairs];     // how many earlier pairs have the same id
  int16_t col_pair[kMaxPairs];      // the valid pairs grouped by expert (first-appearance order), in pair order
  int32_t item_expert[kMaxItems];   // expert id
  int16_t item_col0[kMaxItems];     // first column in col_pair
  int16_t item_ncols[kMaxItems];    // 1 .. max_cols
  int16_t item_group0[kMaxItems];   // the first item of the same expert
  int16_t item_groupn[kMaxItems];   // how many items that expert has
  int32_t num_routed_items;
};

// Starts the copy of the launch's P ids into s.pair_id (after the PDL wait: the router wrote them);
// build_schedule completes it.
__device__ __forceinline__ void load_ids_async(Schedule& s, const int32_t* topk_ids, int P) {
  for (int p = threadIdx.x; p < P; p += kThreads) cp_async4(&s.pair_id[p], topk_ids + p);
}

// Every thread of the CTA calls it, after load_ids_async (this thread's cp.async copies, whatever
// they hold, are complete on return); starts and ends with a barrier. Returns whether some pair has
// an id outside [0, E) (the same answer in every thread). Deterministic: every output is a function
// of the ids alone (the hash slots an id lands in depend on the threads' timing, but they are only
// names: ranks, counts and the order of experts come from pair order).
__device__ bool build_schedule(Schedule& s, int P, int E, int max_cols) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int lg = 5;  // a table of 2^lg >= 2P slots (at least 32)
  while ((1 << lg) < 2 * P) ++lg;
  const int slots = 1 << lg;
  cp_async_wait_all();
  for (int i = tid; i < slots; i += kThreads) {
    s.slot_key[i] = -1;
    s.slot_count[i] = 0;
  }
  __syncthreads();
  // 1. Each distinct id claims a slot (open addressing, linear probing, multiplicative hash); every
  //    pair learns its id's slot. The table is at most half full: the probe ends.
  int bad = 0;
  for (int p = tid; p < P; p += kThreads) {
    const int id = s.pair_id[p];
    int slot = -1;
    if (id >= 0 && id < E) {
      slot = static_cast<int>((static_cast<uint32_t>(id) * 2654435761u) >> (32 - lg));
      for (;;) {
        const int prev = atomicCAS(&s.slot_key[slot], -1, id);
        if (prev == -1 || prev == id) break;
        slot = (slot + 1) & (slots - 1);
      }
    } else {
      bad = 1;
    }
    s.pair_slot[p] = static_cast<int16_t>(slot);
  }
  const bool any_bad = __syncthreads_or(bad) != 0;
  if (warp == 0) {
    // 2. Ranks, 32 pairs at a time in pair order: a pair's rank is its expert's running count before
    //    this chunk plus the same-expert lanes below it; the highest such lane advances the count.
    for (int base = 0; base < P; base += 32) {
      const int p = base + lane;
      const int slot = p < P ? s.pair_slot[p] : -1;
      const unsigned int same = __match_any_sync(0xffffffffu, slot >= 0 ? slot : -1 - lane);
      const int before = slot >= 0 ? s.slot_count[slot] : 0;
      __syncwarp();
      if (slot >= 0) {
        s.pair_rank[p] = static_cast<int16_t>(before + __popc(same & ((1u << lane) - 1u)));
        if ((same >> lane) == 1u) s.slot_count[slot] = static_cast<int16_t>(before + __popc(same));
      }
      __syncwarp();
    }
    // 3. Experts in order of first appearance (their rank-0 pairs, in pair order): prefix sums of
    //    their pair counts (columns) and items.
    int cols = 0, items = 0;
    for (int base = 0; base < P; base += 32) {
      const int p = base + lane;
      const int slot = p < P ? s.pair_slot[p] : -1;
      const bool is_first = slot >= 0 && s.pair_rank[p] == 0;
      const int c = is_first ? s.slot_count[slot] : 0;
      const int n = (c + max_cols - 1) / max_cols;
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
        s.slot_col0[slot] = static_cast<int16_t>(col0);
        const int id = s.pair_id[p];
        for (int i = 0; i < n; ++i) {
          s.item_expert[item0 + i] = id;
          s.item_col0[item0 + i] = static_cast<int16_t>(col0 + i * max_cols);
          s.item_ncols[item0 + i] = static_cast<int16_t>(min(max_cols, c - i * max_cols));
          s.item_group0[item0 + i] = static_cast<int16_t>(item0);
          s.item_groupn[item0 + i] = static_cast<int16_t>(n);
        }
      }
      cols += __shfl_sync(0xffffffffu, c_incl, 31);
      items += __shfl_sync(0xffffffffu, n_incl, 31);
    }
    if (lane == 0) s.num_routed_items = items;
  }
  __syncthreads();
  // 4. Every valid pair into its expert's columns.
  for (int p = tid; p < P; p += kThreads) {
    const int slot = s.pair_slot[p];
    if (slot >= 0) s.col_pair[s.slot_col0[slot] + s.pair_rank[p]] = static_cast<int16_t>(p);
  }
  __syncthreads();
  return any_bad;
}

// The schedule of a launch of at most 32 pairs, one warp's copy: the same items, columns and order as
// build_schedule's (lane p holds pair p), built without a CTA barrier.
struct WarpSchedule {
  int32_t pair_id[32];      // topk_ids as read (cp.async by this warp)
  int32_t item_expert[32];
  int16_t item_col0[32];
  int16_t item_ncols[32];
  int16_t col_pair[32];
};

// Every lane of a warp calls it after its lanes p < P started the copy of pair p's id into ws.pair_id
// (this thread's cp.async copies, whatever they hold, are complete on return). Returns the number of
// items; writes pair_slot[p] (0: a valid id, -1: outside [0, E)) when pair_slot is not null.
__device__ int build_warp_schedule(WarpSchedule& ws, int P, int E, int max_cols, int16_t* pair_slot) {
  const int lane = threadIdx.x & 31;
  cp_async_wait_all();
  __syncwarp();
  const int id = lane < P ? ws.pair_id[lane] : -1;
  const bool valid = lane < P && id >= 0 && id < E;
  // Lanes of one expert: the same key; an invalid or absent pair's key (-1 - lane) is its own.
  const unsigned int same = __match_any_sync(0xffffffffu, valid ? id : -1 - lane);
  const int rank = __popc(same & ((1u << lane) - 1u)), count = __popc(same);
  const bool is_first = valid && rank == 0;
  const int c = is_first ? count : 0, n = is_first ? (count + max_cols - 1) / max_cols : 0;
  int c_incl = c, n_incl = n;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int cu = __shfl_up_sync(0xffffffffu, c_incl, o), nu = __shfl_up_sync(0xffffffffu, n_incl, o);
    if (lane >= o) {
      c_incl += cu;
      n_incl += nu;
    }
  }
  const int col0 = c_incl - c, item0 = n_incl - n;
  const int expert_col0 = __shfl_sync(0xffffffffu, col0, __ffs(same) - 1);
  if (valid) ws.col_pair[expert_col0 + rank] = static_cast<int16_t>(lane);
  for (int i = 0; i < n; ++i) {
    ws.item_expert[item0 + i] = id;
    ws.item_col0[item0 + i] = static_cast<int16_t>(col0 + i * max_cols);
    ws.item_ncols[item0 + i] = static_cast<int16_t>(min(max_cols, c - i * max_cols));
  }
  if (pair_slot != nullptr && lane < P) pair_slot[lane] = static_cast<int16_t>(valid ? 0 : -1);
  __syncwarp();
  return __shfl_sync(0xffffffffu, n_incl, 31);
}

// ---------------------------------------------------------------------------------------------
// gate_up + SwiGLU

template <typename T, typename W>
struct GateUpParams {
  const T* hidden;          // [T, H]
  W gate_up;                // the routed experts [E, 2I, H] (DenseExperts or Int4Experts)
  const int32_t* topk_ids;  // [T, k]
  const T* shared_gate_up;  // [2Is, H] or nullptr
  T* act;                   // [T, NA]
  int T_, k, E;
  int64_t H, I, Is, NA;
  bool staged = false;  // W::kStaged: the routed tiles through the staged stream where H allows it
  // hidden was written before the previous launch (launch_moe_decode_gate_up's hidden_settled): each
  // CTA's first shared tile reads it before the PDL wait, which then comes before the routing ids.
  bool hidden_settled = false;
  // W::kRowGroups, frag launches at NT = 1 (up to 8 tokens): R in {1, 2, 4}, the routed tiles' row
  // groups (moe_gate_up_kernel's kRowGroups; host side only, the kernel takes it as a template argument).
  // int64_t, not int: with the 4 bytes shorter struct ptxas (nvcc 13.0, sm_90a) spills 48-68 bytes in
  // the R = 2 / 4 kernels instead of 16 (--resource-usage); the measured kernels are this layout's.
  int64_t row_groups = 1;
  // W::kRowGroups, R = 4, 1 or 3-8 tokens (launch_gate_up_mapped; host side only, as row_groups): the routed
  // tiles read the tokens' activations from a permuted shared-memory copy (int4_batch's kActSmem); same bits.
  bool act_smem = false;
  // W::kWideLoads, wide (P, NT) = (2, 2) launches (host side only): the routed tiles carry the next tile's
  // first weight batch across the current one's reduction and store (moe_gate_up_kernel's kCarryTiles).
  bool carry_tiles = false;
};

template <int NT>
struct GateUpSmem {
  Schedule s;
  // The warps' partials of a tile, double-buffered (one barrier per tile). frag: each lane's C fragments
  // as they are; wide: the part sums, [K range][column][tile row] (8 / P ranges, 8 NT / P columns).
  union {
    float4 frag[2][kWarps][NT][32];
    float wide[2][kWarps][8 * NT][16];
  } red;
};

// One tile = 8 features f0 .. f0 + 7 of one item over all of H: lane rows g -> the gate row of
// feature f0 + g, g + 8 -> its up row (wide, kParts = P > 1: this warp's fragment f, its lo slot g ->
// the gate row of feature f0 + wide_row<P>(f), hi slot that feature's up row); columns = the item's
// pairs (routed, item >= 0: their tokens' hidden rows) or the tokens [kCols sub, kCols (sub + 1))
// (the shared experts, item = -1 - sub), kCols = 8 NT / P. This warp's K range: steps [s_begin, s_end)
// of kStepK P (shared) or [r_begin, r_end) of W::kStep P (routed). Ends with the tile's act stored by
// 32 NT (wide: 8 kCols) threads. kRouted (item >= 0) is a template argument: each of the kernel's two
// tile loops holds only its own weight stream (one inlined stream of each kind in the same loop
// spilled registers).
// The gate and up rows of feature f of a routed expert's [2I, H] weight in either layout.
template <MoeGateUpLayout kLayout>
__device__ __forceinline__ void gate_up_rows(int64_t f, int64_t I, int64_t& gate, int64_t& up) {
  if constexpr (kLayout == MoeGateUpLayout::kInterleaved) {
    gate = (f >> 3) * 16 + (f & 7);
    up = gate + 8;
  } else {
    gate = f;
    up = I + f;
  }
}

// A gate_up tile's columns: a routed item's (ncols of the schedule's columns from col0), or the shared
// experts' column group -1 - item (tokens [col0, col0 + ncols)), which reads no schedule: the shared
// tiles run before it exists.
template <int kCols, bool kRouted>
__device__ __forceinline__ void tile_columns(int tokens, const Schedule& s, int item, int& ncols, int& col0) {
  if constexpr (kRouted) {
    ncols = s.item_ncols[item];
    col0 = s.item_col0[item];
  } else {
    col0 = kCols * (-1 - item);
    ncols = min(kCols, tokens - col0);
  }
}

// The tile's SwiGLU and store (gate_up_tile's end, after its barrier), from the warps' partials in
// sm.red[parity]: apart, so that a tile computed before the PDL wait is stored after it (moe_gate_up_kernel,
// hidden_settled).
template <typename T, MoeGateUpLayout kLayout, int NT, int kParts, bool kRouted, int kRowGroups = 1, typename W>
__device__ __forceinline__ void gate_up_tile_store(const GateUpParams<T, W>& p, const Schedule& s, int item, int f0,
                                                   const GateUpSmem<NT>& sm, int parity) {
  constexpr int kCols = 8 * NT / kParts;
  constexpr int kRanges = kWarps / kParts;  // wide: the K ranges (warp / kParts) of a fragment
  constexpr bool routed = kRouted;
  int ncols, col0;
  tile_columns<kCols, kRouted>(p.T_, s, item, ncols, col0);
  // act's element of the tile's column cidx and feature f: the pair's routed slot, or the token's
  // shared-experts columns after its k routed slots.
  const auto act_index = [&](int cidx, int64_t f) -> int64_t {
    if constexpr (routed) {
      const int pair = s.col_pair[col0 + cidx];
      return static_cast<int64_t>(pair / p.k) * p.NA + static_cast<int64_t>(pair % p.k) * p.I + f;
    } else {
      return static_cast<int64_t>(col0 + cidx) * p.NA + static_cast<int64_t>(p.k) * p.I + f;
    }
  };
  if constexpr (kParts == 1) {
    // Thread (row group rg, n, l): feature f0 + 8 rg + l / 4, columns 8n + 2 (l % 4) + {0, 1}: x, y gate;
    // z, w up; the row group's warps rg, rg + R, ... (its K ranges) summed in order.
    if (threadIdx.x < kRowGroups * NT * 32) {
      const int rg = threadIdx.x / (NT * 32), n = (threadIdx.x >> 5) % NT, l = threadIdx.x & 31;
      float4 v = sm.red.frag[parity][rg][n][l];
#pragma unroll
      for (int w = 1; w < kWarps / kRowGroups; ++w) {
        const float4 q = sm.red.frag[parity][rg + kRowGroups * w][n][l];
        v.x += q.x;
        v.y += q.y;
        v.z += q.z;
        v.w += q.w;
      }
      const int64_t f = f0 + 8 * rg + (l >> 2);
      if (f < (routed ? p.I : p.Is)) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int cidx = 8 * n + 2 * (l & 3) + i;
          if (cidx >= ncols) continue;
          p.act[act_index(cidx, f)] = from_float<T>(silu_f(i == 0 ? v.x : v.y) * (i == 0 ? v.z : v.w));
        }
      }
    }
  } else {
    // Thread (column cidx, feature f0 + i): the gate (row i) and up (row i + 8) sums, K ranges in order.
    if (threadIdx.x < kCols * 8) {
      const int cidx = threadIdx.x >> 3, i = threadIdx.x & 7;
      float gate = sm.red.wide[parity][0][cidx][i], up = sm.red.wide[parity][0][cidx][i + 8];
#pragma unroll
      for (int r = 1; r < kRanges; ++r) {
        gate += sm.red.wide[parity][r][cidx][i];
        up += sm.red.wide[parity][r][cidx][i + 8];
      }
      const int64_t f = f0 + i;
      if (cidx < ncols && f < (routed ? p.I : p.Is)) {
        p.act[act_index(cidx, f)] = from_float<T>(silu_f(gate) * up);
      }
    }
  }
}

// kStagedTile (routed int4 tiles only): the weights come from this thread's staged pieces `slots` with
// their scales and zero points `meta` (stream_rows_int4_staged), copied by the kernel's loop.
// kRowGroups = R (routed tiles, frag mapping): the tile is 8 R features f0 .. f0 + 8 R - 1; warp w
// streams row group w % R (features f0 + 8 (w % R) + g) over K range w / R of 8 / R, and 32 NT R threads
// apply SwiGLU, each summing its row group's ranges in order.
// kStore false: the tile ends at its barrier, the partials in sm.red[parity]; the caller stores it
// (gate_up_tile_store) before the tile after next.
template <typename T, MoeGateUpLayout kLayout, int NT, int kParts, bool kRouted, bool kStagedTile = false,
          int kRowGroups = 1, bool kStore = true, int kActTokens = 0, bool kCarry = false, typename W>
__device__ __forceinline__ void gate_up_tile(const GateUpParams<T, W>& p, const Schedule& s, int item, int f0,
                                             int s_begin, int s_end, int r_begin, int r_end, GateUpSmem<NT>& sm,
                                             int parity, const uint4* slots = nullptr,
                                             const Int4BatchMeta<int4_batch_steps<NT>()>* meta = nullptr,
                                             RowsCarry<batch_steps<NT>()>* carry = nullptr, const T* next_lo = nullptr,
                                             const T* next_hi = nullptr) {
  constexpr int kCols = 8 * NT / kParts;
  static_assert(kRowGroups == 1 || (kRouted && kParts == 1 && kWarps % kRowGroups == 0 &&
                                    32 * NT * kRowGroups <= kThreads),
                "row groups: routed tiles of the frag mapping");
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
  constexpr bool routed = kRouted;
  int ncols, col0;
  tile_columns<kCols, kRouted>(p.T_, s, item, ncols, col0);
  {
    const T* col[NT];
    bool col_ok[NT];
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const int cidx = (8 * n + g) / kParts;
      col_ok[n] = cidx < ncols;
      const int token = !col_ok[n] ? 0 : routed ? s.col_pair[col0 + cidx] / p.k : col0 + cidx;
      col[n] = p.hidden + static_cast<int64_t>(token) * p.H;
    }
    // This lane's feature: f0 + g (frag), f0 + wide_row(warp % P) (wide; the 8 features of a tile are 8
    // consecutive gate rows and 8 consecutive up rows in both layouts: f0 % 8 == 0, one interleaved
    // [8 gate | 8 up] block).
    const int row = kParts == 1 ? g : wide_row<kParts>(warp % kParts);
    float res[NT][4];
    if constexpr (routed) {
      const int row_group = kRowGroups == 1 ? 0 : warp % kRowGroups;
      // I % (8 R) == 0 on this path: always f0 + 8 row_group + row.
      const int64_t f = min(static_cast<int64_t>(f0 + 8 * row_group + row), p.I - 1);
      int64_t gate, up;
      gate_up_rows<kLayout>(f, p.I, gate, up);
      if constexpr (kCarry) {
        const int e = s.item_expert[item];
        stream_rows<T, NT, kParts, batch_steps<NT>(), true>(p.gate_up.row(e, gate), p.gate_up.row(e, up), col, col_ok,
                                                            p.gate_up.K, r_begin, r_end, res, carry, next_lo, next_hi);
      } else if constexpr (kStagedTile) {
        stream_rows_int4_staged<NT>(slots, *meta, col, r_begin, r_end, res);
      } else if constexpr (kActTokens > 0) {
        // The tokens' permuted copy after GateUpSmem (moe_gate_up_kernel), rows as in hidden. (One
        // token: a kernel of its own; the column arithmetic cost it 6-8 bytes of spills.)
        extern __shared__ __align__(16) unsigned char smem_raw[];
        const T* const act = reinterpret_cast<const T*>(smem_raw + sizeof(GateUpSmem<NT>));
        const T* act_col[NT];
#pragma unroll
        for (int n = 0; n < NT; ++n) act_col[n] = kActTokens == 1 ? act : act + (col[n] - p.hidden);
        p.gate_up.template stream<NT, true>(s.item_expert[item], gate, up, act_col, col_ok, r_begin, r_end, res);
      } else if constexpr (kParts == 1)
        p.gate_up.template stream<NT>(s.item_expert[item], gate, up, col, col_ok, r_begin, r_end, res);
      else
        p.gate_up.template stream_wide<NT, kParts, batch_steps<NT>()>(s.item_expert[item], gate, up, col, col_ok,
                                                                      r_begin, r_end, res);
    } else {
      const int64_t f = min(static_cast<int64_t>(f0 + row), p.Is - 1);
      stream_rows<T, NT, kParts>(p.shared_gate_up + f * p.H, p.shared_gate_up + (p.Is + f) * p.H, col, col_ok, p.H,
                                 s_begin, s_end, res);
    }
    if constexpr (kParts == 1) {
#pragma unroll
      for (int n = 0; n < NT; ++n)
        sm.red.frag[parity][warp][n][lane] = make_float4(res[n][0], res[n][1], res[n][2], res[n][3]);
    } else {
      float sum[NT][2];
      wide_sum_parts<kParts, NT>(res, sum);
      if (wide_writer<kParts>()) {
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          sm.red.wide[parity][warp / kParts][wide_col<kParts>(n)][row] = sum[n][0];
          sm.red.wide[parity][warp / kParts][wide_col<kParts>(n)][row + 8] = sum[n][1];
        }
      }
    }
  }
  __syncthreads();
  if constexpr (kStore) gate_up_tile_store<T, kLayout, NT, kParts, kRouted, kRowGroups>(p, s, item, f0, sm, parity);
}

// kParts: k-parts per weight row, 1 for the frag mapping, 2 or 4 for the wide one (W::kWideLoads; warp w
// streams fragment w % kParts of each tile over the K range w / kParts of kWarps / kParts).
// kRowGroups (W::kRowGroups, kParts = 1): the routed tiles' row groups (gate_up_tile); the shared tiles
// keep one. (nvcc --resource-usage, sm_90a, at 128 registers: R = 2 / 4 spill 16 bytes, R = 1 none; the
// NT = 2 / 4 int4 kernels 16 / 36 bytes of reloads.)
template <typename T, MoeGateUpLayout kLayout, int NT, typename W, int kParts, int kRowGroups = 1,
          int kActTokens = 0, bool kCarryTiles = false>
__global__ void __launch_bounds__(kThreads, 2) moe_gate_up_kernel(const GateUpParams<T, W> p) {
  static_assert(kActTokens == 0 || (NT == 1 && kRowGroups > 1), "the permuted activation copy: NT = 1, row groups");
  static_assert(kParts == 1 || (W::kWideLoads && wide_parts_ok<kParts>()), "the wide mapping: model-dtype rows");
  static_assert(kRowGroups == 1 || (W::kRowGroups && kParts == 1), "row groups: int4 routed tiles, frag mapping");
  constexpr int kCols = 8 * NT / kParts;
  constexpr int kRanges = kWarps / kParts;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  GateUpSmem<NT>& sm = *reinterpret_cast<GateUpSmem<NT>*>(smem_raw);
  Schedule& s = sm.s;
  const int warp = threadIdx.x >> 5, range = warp / kParts;

  // Every tile's K is H: this warp's contiguous share of it is the same for all of them.
  const int64_t steps = (p.H + kStepK * kParts - 1) / (kStepK * kParts);
  const int s_begin = static_cast<int>(steps * range / kRanges);
  const int s_end = static_cast<int>(steps * (range + 1) / kRanges);
  // Tile counts in int: < 2^27 shared (Is < 2^30, 8 groups at most) + 2^9 items x 2^21 (I < 2^24).
  // I, Is % 8 == 0; I % (8 kRowGroups) == 0 where kRowGroups > 1 (int4: I % 128 == 0).
  const int ft_shared = static_cast<int>(p.Is / 8), ft_routed = static_cast<int>(p.I / (8 * kRowGroups));
  // The shared experts' tiles: (feature tile, column group of kCols tokens), the groups of a feature
  // tile side by side (CTAs b, b + 1, ...: the same weight rows at the same time, one HBM read).
  const int groups = (p.T_ + kCols - 1) / kCols;
  const int tiles_shared = ft_shared * groups;

  // PDL (csrc/pdl.cuh): the routed experts depend on topk_ids (the router, the previous kernel) and
  // every tile on hidden, so the CTA waits before reading either; before that it prefetches into L2
  // the first batch of its first tile's weight rows when that tile is a shared experts' one (the rows
  // of gate_up_tile below). With hidden_settled, hidden is not the previous kernel's output (pdl.cuh,
  // the exception to rule 1): the CTA's first shared tile streams its weights and hidden and reduces
  // them in shared memory before the wait, beside the router's tail, and stores its act columns after
  // it (no global write before the wait: act may reuse memory the previous kernel still reads).
  if (static_cast<int>(blockIdx.x) < tiles_shared) {
    // (Unsigned lane row for frag: the expression its tuned code was built from.)
    const auto row = kParts == 1 ? (threadIdx.x & 31) / 4 : wide_row<kParts>(warp % kParts);
    const int64_t f = min(static_cast<int64_t>(static_cast<int>(blockIdx.x) / groups * 8 + row), p.Is - 1);
    prefetch_first_batch<T, NT, kParts>(p.shared_gate_up + f * p.H, p.shared_gate_up + (p.Is + f) * p.H, p.H,
                                        s_begin, s_end);
  }
  const int P = p.T_ * p.k;
  bool waited = false;
  const auto wait_for_previous = [&] {
    pdl_wait();
    pdl_launch_dependents();
    // The ids, copied now: their latency passes under the shared experts' tiles.
    load_ids_async(s, p.topk_ids, P);
    waited = true;
  };
  DOTS1_PHASE_STAMP(0, 0);  // resident
  if (!p.hidden_settled) wait_for_previous();
  int parity = 0;
  int tile = blockIdx.x;
  for (; tile < tiles_shared; tile += gridDim.x) {
    // Stored apart (hidden_settled: the first tile's store comes after the wait; one copy of the code).
    gate_up_tile<T, kLayout, NT, kParts, false, false, 1, false>(p, s, -1 - tile % groups, tile / groups * 8, s_begin,
                                                                 s_end, 0, 0, sm, parity);
    if (!waited) {
      DOTS1_PHASE_STAMP(0, 1);  // first shared tile computed before the wait
      wait_for_previous();
      DOTS1_PHASE_STAMP(0, 2);  // wait returned
    }
    gate_up_tile_store<T, kLayout, NT, kParts, false>(p, s, -1 - tile % groups, tile / groups * 8, sm, parity);
    parity ^= 1;
  }
  if (!waited) wait_for_previous();  // no shared tile in this CTA
  DOTS1_PHASE_STAMP(0, 3);  // shared tiles done
  if constexpr (kActTokens > 0) {
    // The tokens' hidden rows into shared memory, each 8-element chunk as (x0, x4), (x1, x5), (x2, x6),
    // (x3, x7): the routed tiles' MMA B words as loaded (int4_batch<kActSmem>). build_schedule's first
    // barrier orders these stores before any routed tile reads them.
    uint4* const dst = reinterpret_cast<uint4*>(smem_raw + sizeof(GateUpSmem<NT>));
    const uint4* const src = reinterpret_cast<const uint4*>(p.hidden);
    for (int64_t i = threadIdx.x; i < (kActTokens == 1 ? 1 : p.T_) * p.H / 8; i += kThreads) {
      const uint4 v = load_act16_always(src + i);
      dst[i] = make_uint4(__byte_perm(v.x, v.z, 0x5410), __byte_perm(v.x, v.z, 0x7632),
                          __byte_perm(v.y, v.w, 0x5410), __byte_perm(v.y, v.w, 0x7632));
    }
  }

  const bool any_bad = build_schedule(s, P, p.E, kCols);
  DOTS1_PHASE_STAMP(0, 4);  // schedule built
  // Pairs with a bad id: NaN in their act columns (grid-stride; usually there are none).
  if (any_bad) {
    const int64_t total = static_cast<int64_t>(P) * p.I;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
         i += static_cast<int64_t>(gridDim.x) * kThreads) {
      const int pair = static_cast<int>(i / p.I);
      if (s.pair_slot[pair] < 0)
        p.act[static_cast<int64_t>(pair / p.k) * p.NA + static_cast<int64_t>(pair % p.k) * p.I + i % p.I] =
            from_float<T>(NAN);
    }
  }
  // The routed tiles, per expert (its items, contiguous in the schedule): (feature tile, item of the
  // expert), the items of a feature tile side by side, so a hot expert's re-reads are L2 hits. A tile
  // rt lies in its expert's range [group0 * ft_routed, (group0 + groupn) * ft_routed), and rt /
  // ft_routed is one of the expert's items.
  const int tiles = tiles_shared + s.num_routed_items * ft_routed;
  // This warp's share of H for the routed rows, in their steps (W::kStep kParts k: 32 kParts in the
  // model dtype, as the shared rows', 128 for int4); computed here, not held across the shared tiles.
  // With row groups, range / R of kRanges / R (the warps of a row group split K among themselves).
  const int64_t r_steps = (p.H + W::kStep * kParts - 1) / (W::kStep * kParts);
  const int r_range = range / kRowGroups;
  constexpr int kRoutedRanges = kRanges / kRowGroups;
  const int r_begin = static_cast<int>(r_steps * r_range / kRoutedRanges);
  const int r_end = static_cast<int>(r_steps * (r_range + 1) / kRoutedRanges);
  // Routed tile t -> (item, first feature).
  const auto routed_tile = [&](int t, int& item, int& f0) {
    const int rt = t - tiles_shared;
    const int any_item = rt / ft_routed;
    const int group0 = s.item_group0[any_item], groupn = s.item_groupn[any_item];
    const int local = rt - group0 * ft_routed;
    item = group0 + local % groupn;
    f0 = local / groupn * 8 * kRowGroups;
  };
  if constexpr (W::kStaged && kParts == 1 && kRowGroups == 1) {
    // The staged int4 stream (stream_rows_int4_staged) where every warp's share of H is one batch:
    // this thread copies its pieces of the tile after the current one while computing the current.
    constexpr int U = int4_batch_steps<NT>();
    if (p.staged && r_steps <= kRanges * U) {
      using Meta = Int4BatchMeta<U>;
      constexpr int kSlots = int4_stage_uint4s<NT>();
      uint4* const stage = reinterpret_cast<uint4*>(smem_raw + sizeof(GateUpSmem<NT>)) + threadIdx.x;
      const auto issue = [&](int t, uint4* slots, Meta& m) {
        int item, f0;
        routed_tile(t, item, f0);
        int64_t gate, up;  // this lane's rows: feature f0 + g (I % 8 == 0 on this path)
        gate_up_rows<kLayout>(f0 + (threadIdx.x & 31) / 4, p.I, gate, up);
        p.gate_up.template issue_staged<NT>(s.item_expert[item], gate, up, r_begin, r_end, slots, m);
      };
      Meta cur = {}, next = {};
      int buf = 0;
      if (tile < tiles) issue(tile, stage, cur);
      cp_async_commit();
      for (int n = 0; tile < tiles; tile += gridDim.x, ++n) {
        if (tile + static_cast<int>(gridDim.x) < tiles) issue(tile + gridDim.x, stage + (buf ^ 1) * kSlots, next);
        cp_async_commit();
        cp_async_wait_group<1>();  // this thread's pieces of `tile` have landed
        int item, f0;
        routed_tile(tile, item, f0);
        gate_up_tile<T, kLayout, NT, kParts, true, true>(p, s, item, f0, 0, 0, r_begin, r_end, sm, parity,
                                                         stage + buf * kSlots, &cur);
        parity ^= 1;
        buf ^= 1;
        cur = next;
        DOTS1_PHASE_STAMP(0, min(5 + n, 14));  // routed tile n done
      }
      cp_async_wait_group<0>();
      DOTS1_PHASE_STAMP(0, 15);  // exit
      return;
    }
  }
  if constexpr (kCarryTiles) {
    // Each tile's stream ends by loading this warp's first batch of the CTA's next tile (RowsCarry), so
    // the tile's reduction, barrier and store pass with loads in flight (wide (2, 2) launches, 5-64 tokens:
    // H200, real shape, gate_up 2-6% faster at 8-64 tokens; bench/results/2026-11-30-h200-10b2424-carry).
    constexpr int U = batch_steps<NT>();
    RowsCarry<U> carry;
    const int lane_row = wide_row<kParts>(warp % kParts);
    const auto rows_of = [&](int t, const T*& lo, const T*& hi) {  // this lane's gate and up rows of tile t
      int item, f0;
      routed_tile(t, item, f0);
      int64_t gate, up;
      gate_up_rows<kLayout>(min(static_cast<int64_t>(f0 + lane_row), p.I - 1), p.I, gate, up);
      lo = p.gate_up.row(s.item_expert[item], gate);
      hi = p.gate_up.row(s.item_expert[item], up);
    };
    if (tile < tiles) {
      const T *lo, *hi;
      rows_of(tile, lo, hi);
      carry_first_batch<T, kParts, U>(lo, hi, p.gate_up.K, r_begin, r_end, carry);
    }
    for (int n = 0; tile < tiles; tile += gridDim.x, ++n) {
      int item, f0;
      routed_tile(tile, item, f0);
      const T *next_lo = nullptr, *next_hi = nullptr;  // none: the last tile loads nothing ahead
      if (tile + static_cast<int>(gridDim.x) < tiles) rows_of(tile + gridDim.x, next_lo, next_hi);
      gate_up_tile<T, kLayout, NT, kParts, true, false, 1, true, 0, true>(p, s, item, f0, 0, 0, r_begin, r_end, sm,
                                                                          parity, nullptr, nullptr, &carry, next_lo,
                                                                          next_hi);
      parity ^= 1;
      DOTS1_PHASE_STAMP(0, min(5 + n, 14));  // routed tile n done
    }
  } else {
    for (int n = 0; tile < tiles; tile += gridDim.x, ++n) {
      int item, f0;
      routed_tile(tile, item, f0);
      gate_up_tile<T, kLayout, NT, kParts, true, false, kRowGroups, true, kActTokens>(p, s, item, f0, 0, 0, r_begin,
                                                                                    r_end, sm, parity);
      parity ^= 1;
      DOTS1_PHASE_STAMP(0, min(5 + n, 14));  // routed tile n done
    }
  }
  DOTS1_PHASE_STAMP(0, 15);  // exit
}

// ---------------------------------------------------------------------------------------------
// down + combine

template <typename T, typename W>
struct DownParams {
  const T* act;               // [T, NA]: the routed experts' columns [0, k I)
  const T* shared_act;        // [T, *] row stride NS: the shared experts' Is columns (act + k I, or apart)
  W down;                     // the routed experts [E, H, I] (DenseExperts or Int4Experts)
  const int32_t* topk_ids;    // [T, k]
  const float* topk_weights;  // [T, k]
  const T* shared_down;       // [H, Is] or nullptr
  const T* residual;          // [T, H] or nullptr
  T* out;                     // [T, H]
  int T_, k, E;
  int64_t H, I, Is, NA, NS;
  // PDL: each warp loads its first weight batch of the shared experts' first pass before the wait
  // (DOTS1_EXT_MOE_DECODE_DOWN_PRELOAD; shared_down is a weight, pdl.cuh rule 1); the same bits.
  bool preload_shared = false;
};

template <int NT>
struct DownSmem {
  Schedule s;
  float partial[kMaxPairs][16];        // routed term of each pair, the CTA's 16 rows
  union {
    float shared_term[kMaxTokens][16];  // the shared experts' term of each token
    float shared_piece[kWarps][8][16];  // by-warp launches: each warp's piece of it, [warp][token][row]
  };
  WarpSchedule warp_schedule[kWarps];  // by-warp launches: each warp's copy of the schedule
  // Per K range (frag: a warp; wide: the kParts warps of range w / kParts, which hold disjoint rows),
  // 8 NT columns x 16 rows: first the shared passes' pieces ([pass % 2][range]), then the pieces of the
  // range's first ([0][range]) and last ([1][range]) routed item when a range boundary cuts it.
  float piece[2][kWarps][8 * NT][16];
  float weight[kMaxPairs];             // topk_weights
};

// Start of range w of an n-step sequence split in kRanges equal contiguous ranges (8: one per warp; the
// wide mapping's 8 / P). (n < 2^28 on the fast path: fast_sizes.)
template <int kRanges>
__device__ __forceinline__ int range_start(int n, int w) {
  return static_cast<int>(static_cast<int64_t>(n) * w / kRanges);
}

// kParts: k-parts per weight row, 1 for the frag mapping, 2 or 4 for the wide one (W::kWideLoads; warp w
// streams fragment w % kParts of the 16 rows over the K range w / kParts of kWarps / kParts): the
// columns are then 8 NT / kParts, and the lanes that hold a (row, column) sum (wide_writer) store it.
template <typename T, int NT, typename W, int kParts>
__global__ void __launch_bounds__(kThreads, 2) moe_down_kernel(const DownParams<T, W> p) {
  static_assert(kParts == 1 || (W::kWideLoads && wide_parts_ok<kParts>()), "the wide mapping: model-dtype rows");
  constexpr int kCols = 8 * NT / kParts;
  constexpr int kRanges = kWarps / kParts;
  // Steps per batch of the weight streams: the frag ones (batch_steps) but for the wide mapping at NT = 1,
  // where 8 steps (16 weight vectors per lane in flight) spilled registers here (12-20 bytes; gate_up
  // holds 8): 7 for P = 4, 6 for P = 2 (7 still spilled 4 bytes).
  constexpr int kDownU = kParts == 1 || NT > 1 ? batch_steps<NT>() : kParts == 4 ? 7 : 6;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DownSmem<NT>& sm = *reinterpret_cast<DownSmem<NT>*>(smem_raw);
  Schedule& s = sm.s;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  // (int: H < 2^30 on the fast path.)
  const int h0 = static_cast<int>(blockIdx.x) * 16, H = static_cast<int>(p.H);
  // Rows past H (H % 16 != 0) read row H - 1 and are not stored. (The wide mapping's rows: per use,
  // from wide_place; the lane's lo row of the 16 is its fragment's wide_row, the hi row 8 below.)
  const int h_lo = min(h0 + g, H - 1), h_hi = min(h0 + g + 8, H - 1);

  // PDL (csrc/pdl.cuh): act (the previous kernel's output), the ids and weights of the routing and the
  // residual are all read after the wait. (An L2 prefetch of the first shared experts' rows before it
  // made this kernel spill registers: not done.) With preload_shared, the first shared pass's first
  // weight batch is loaded into registers before it (a weight: rule 1), so that the CTAs that become
  // resident while the previous kernel drains have those bytes in flight instead of nothing.
  DOTS1_PHASE_STAMP(1, 0);  // resident
  // The shared experts' pass: its 16 rows and this warp's K range (every pass the same).
  const auto shared_rows = [&](const T*& lo, const T*& hi, int& s_begin, int& s_end) {
    const int steps = opaque(static_cast<int>((p.Is + kStepK * kParts - 1) / (kStepK * kParts)));
    const int hb = opaque(h0);
    const WidePlace place = kParts == 1 ? WidePlace{warp, g} : wide_place<kParts>();
    lo = p.shared_down + min(hb + place.row, H - 1) * p.Is;
    hi = p.shared_down + min(hb + place.row + 8, H - 1) * p.Is;
    s_begin = range_start<kRanges>(steps, place.range);
    s_end = range_start<kRanges>(steps, place.range + 1);
  };
  const bool preload = p.preload_shared && p.Is > 0;
  RowsCarry<kDownU> shared_first;
  if (preload) {
    const T *lo, *hi;
    int s_begin, s_end;
    shared_rows(lo, hi, s_begin, s_end);
    carry_first_batch<T, kParts, kDownU>(lo, hi, p.Is, s_begin, s_end, shared_first);
  }
  pdl_wait();
  pdl_launch_dependents();
  DOTS1_PHASE_STAMP(1, 1);  // wait returned
  const int P = p.T_ * p.k;

  // The ids and the weights first (cp.async into shared memory, no register held), so that their
  // latency passes under the shared experts' stream; the residual (used at the end, written by the
  // previous ops: L2 hits) only prefetched into L1.
  // By-warp launches (NT = 1, at most 32 pairs and 8 tokens: batch-1 decode): no CTA barrier before
  // the tail. Each warp builds its own copy of the schedule (build_warp_schedule) and keeps its piece
  // of the shared experts' term for the combine, so it goes from the shared experts' stream to the
  // routed one without waiting for the slowest warp (the CTA-wide schedule's barriers and the shared
  // pass's one held the warps for ~9% of the kernel's stall samples at T = 1).
  const bool by_warp = kParts == 1 && NT == 1 && P <= 32 && p.T_ <= kCols;
  WarpSchedule& ws = sm.warp_schedule[warp];
  if (by_warp) {
    if (lane < P) cp_async4(&ws.pair_id[lane], p.topk_ids + lane);
  } else {
    load_ids_async(s, p.topk_ids, P);
  }
  for (int i = threadIdx.x; i < P; i += kThreads) cp_async4(&sm.weight[i], p.topk_weights + i);
  if (p.residual != nullptr)
    for (int i = threadIdx.x; i < p.T_ * 16; i += kThreads)
      if (h0 + i % 16 < p.H) prefetch_l1(p.residual + static_cast<int64_t>(i / 16) * p.H + h0 + i % 16);
  // Zero terms where no item covers a pair (I == 0; otherwise the routed stream or the cut-item pass
  // writes every valid pair's term, and by-warp launches have no barrier between this and those writes);
  // bad pairs are never read.
  if (p.I == 0)
    for (int i = threadIdx.x; i < P * 16; i += kThreads) (&sm.partial[0][0])[i] = 0.0f;

  // The shared experts: rows h of shared_down, columns = the tokens, kCols at a time (one pass per
  // column group; a warp re-reads its K range of the 16 rows from L1 / L2), this warp's share of Is;
  // each pass's pieces summed in range order after a barrier (double-buffered: the pass after next
  // writes the buffer only after the next barrier, which follows this sum).
  if (p.Is > 0) {
    const int groups = (p.T_ + kCols - 1) / kCols;
    for (int sub = 0; sub < groups; ++sub) {
      // Everything below derives from per-pass opaque values: the compiler recomputes the (same)
      // rows and ranges each pass instead of holding them in registers across the passes.
      const T *row_lo, *row_hi;
      int s_begin, s_end;
      shared_rows(row_lo, row_hi, s_begin, s_end);
      const WidePlace place = kParts == 1 ? WidePlace{warp, g} : wide_place<kParts>();
      const int range = place.range, row = place.row;
      const int t0 = sub * kCols;
      const T* col[NT];
      bool col_ok[NT];
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const int t = t0 + (8 * n + g) / kParts;
        col_ok[n] = t < p.T_;
        col[n] = p.shared_act + static_cast<int64_t>(col_ok[n] ? t : 0) * p.NS;
      }
      float res[NT][4];
      // One carried stream for every pass: the first pass's first batch was loaded before the wait
      // (preload) or is loaded here; each pass loads the next pass's (the same rows and steps).
      if (sub == 0 && !preload) carry_first_batch<T, kParts, kDownU>(row_lo, row_hi, p.Is, s_begin, s_end, shared_first);
      const bool more = sub + 1 < groups;
      stream_rows<T, NT, kParts, kDownU, true>(row_lo, row_hi, col, col_ok, p.Is, s_begin, s_end, res, &shared_first,
                                               more ? row_lo : nullptr, more ? row_hi : nullptr);
      if constexpr (kParts == 1 && NT == 1) {
        if (by_warp) {  // one pass (T <= kCols); summed in the combine
#pragma unroll
          for (int r = 0; r < 4; ++r) sm.shared_piece[warp][2 * c + (r & 1)][g + (r >> 1) * 8] = res[0][r];
          break;
        }
      }
      float (*mine)[16] = sm.piece[sub & 1][range];
      if constexpr (kParts == 1) {
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int r = 0; r < 4; ++r) mine[8 * n + 2 * c + (r & 1)][g + (r >> 1) * 8] = res[n][r];
      } else {
        float sum[NT][2];
        wide_sum_parts<kParts, NT>(res, sum);
        if (wide_writer<kParts>()) {
#pragma unroll
          for (int n = 0; n < NT; ++n) {
            mine[wide_col<kParts>(n)][row] = sum[n][0];
            mine[wide_col<kParts>(n)][row + 8] = sum[n][1];
          }
        }
      }
      __syncthreads();
      for (int i = threadIdx.x; i < kCols * 16; i += kThreads) {
        const int cidx = i / 16, r = i % 16;
        if (t0 + cidx >= p.T_) continue;
        float v = sm.piece[sub & 1][0][cidx][r];
#pragma unroll
        for (int w = 1; w < kRanges; ++w) v += sm.piece[sub & 1][w][cidx][r];
        sm.shared_term[t0 + cidx][r] = v;
      }
    }
  }

  DOTS1_PHASE_STAMP(1, 2);  // shared experts' stream done (warp 0)
  // The CTA-wide schedule starts with a barrier: the last pass's sums above are done before the routed
  // stream below writes piece[] again.
  int R;
  if (by_warp) {
    R = build_warp_schedule(ws, P, p.E, kCols, warp == 0 ? s.pair_slot : nullptr);
  } else {
    build_schedule(s, P, p.E, kCols);
    R = s.num_routed_items;
  }
  const int32_t* const item_expert = by_warp ? ws.item_expert : s.item_expert;
  const int16_t* const item_col0 = by_warp ? ws.item_col0 : s.item_col0;
  const int16_t* const item_ncols = by_warp ? ws.item_ncols : s.item_ncols;
  const int16_t* const col_pair = by_warp ? ws.col_pair : s.col_pair;

  // The routed items end to end, R x steps_item steps, split over the K ranges.
  const int steps_item = static_cast<int>((p.I + W::kStep * kParts - 1) / (W::kStep * kParts));
  const int S = R * steps_item;  // < 2^28 (fast_sizes)
  const int range = kParts == 1 ? warp : wide_place<kParts>().range;
  const int r_begin = range_start<kRanges>(S, range), r_end = range_start<kRanges>(S, range + 1);
  if (r_begin < r_end) {
    for (int it = r_begin / steps_item; it * steps_item < r_end; ++it) {
      const int u0 = it * steps_item;
      const int a = max(r_begin, u0) - u0, b = min(r_end, u0 + steps_item) - u0;
      const int ncols = item_ncols[it], col0 = item_col0[it];
      const T* col[NT];
      bool col_ok[NT];
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const int cidx = (8 * n + g) / kParts;
        col_ok[n] = cidx < ncols;
        const int pair = col_ok[n] ? col_pair[col0 + cidx] : 0;
        col[n] = p.act + static_cast<int64_t>(pair / p.k) * p.NA + static_cast<int64_t>(pair % p.k) * p.I;
      }
      float res[NT][4];
      if constexpr (kParts == 1) {
        p.down.template stream<NT>(item_expert[it], h_lo, h_hi, col, col_ok, a, b, res);
      } else {
        const int hb = static_cast<int>(blockIdx.x) * 16 + wide_place<kParts>().row;
        p.down.template stream_wide<NT, kParts, kDownU>(item_expert[it], min(hb, H - 1), min(hb + 8, H - 1), col,
                                                        col_ok, a, b, res);
      }
      const bool whole = a == 0 && b == steps_item;
      // Not whole: the range's first item (its range starts inside it) or its last.
      const int which = r_begin >= u0 ? 0 : 1;
      if constexpr (kParts == 1) {
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int cidx = 8 * n + 2 * c + (r & 1), rr = g + (r >> 1) * 8;
            if (cidx >= ncols) continue;
            if (whole)
              sm.partial[col_pair[col0 + cidx]][rr] = res[n][r];
            else
              sm.piece[which][warp][cidx][rr] = res[n][r];
          }
      } else {
        float sum[NT][2];
        wide_sum_parts<kParts, NT>(res, sum);
        if (wide_writer<kParts>()) {
          const WidePlace place = wide_place<kParts>();
#pragma unroll
          for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int cidx = wide_col<kParts>(n), rr = place.row + 8 * h;
              if (cidx >= ncols) continue;
              if (whole)
                sm.partial[col_pair[col0 + cidx]][rr] = sum[n][h];
              else
                sm.piece[which][place.range][cidx][rr] = sum[n][h];
            }
        }
      }
    }
  }
  DOTS1_PHASE_STAMP(1, 3);  // routed stream done (warp 0)
  __syncthreads();

  // Items cut by range boundaries: the pieces in range order. Warp w (1 .. kRanges - 1) takes boundary w:
  // the item it falls strictly inside, unless boundary w - 1 does too; its lanes take the item's (column,
  // row) sums. (Once per warp, not per element: this pass is the kernel's tail, after every load.)
  if (steps_item > 0) {
    const int boundary = range_start<kRanges>(S, warp);
    const int it = boundary / steps_item, u0 = it * steps_item, u1 = u0 + steps_item;
    if (warp >= 1 && warp < kRanges && boundary < S && boundary != u0 && range_start<kRanges>(S, warp - 1) <= u0) {
      const int ncols = item_ncols[it], col0 = item_col0[it];
      for (int i = lane; i < ncols * 16; i += 32) {
        const int cidx = i / 16, r = i % 16;
        // The ranges that overlap the item: warp - 1 (it holds u0) up to the last one starting before u1.
        float sum = 0.0f;
        for (int w2 = warp - 1, lo = range_start<kRanges>(S, w2); w2 < kRanges && lo < u1; ++w2) {
          const int hi = range_start<kRanges>(S, w2 + 1);
          if (lo < hi) sum += sm.piece[lo >= u0 ? 0 : 1][w2][cidx][r];
          lo = hi;
        }
        sm.partial[col_pair[col0 + cidx]][r] = sum;
      }
    }
    __syncthreads();
  }

  // Combine: out[t, h] = sum_j w[t, j] * term(t, j) + shared(t) + residual, in that order, rounded once.
  // (The residual was written by the previous op: an L2 hit, read here rather than held in a register.)
  for (int i = threadIdx.x; i < p.T_ * 16; i += kThreads) {
    const int t = i / 16, r = i % 16;
    if (h0 + r >= p.H) continue;
    float acc = 0.0f;
    bool bad = false;
    for (int j = 0; j < p.k; ++j) {
      const int pair = t * p.k + j;
      if (s.pair_slot[pair] < 0)
        bad = true;
      else
        acc = __fadd_rn(acc, __fmul_rn(sm.weight[pair], sm.partial[pair][r]));
    }
    if (p.Is > 0) {
      float shared = sm.shared_term[t][r];
      if (by_warp) {  // the pieces in range order, as the shared pass sums them
        shared = sm.shared_piece[0][t][r];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) shared += sm.shared_piece[w][t][r];
      }
      acc = __fadd_rn(acc, shared);
    }
    if (p.residual != nullptr) acc = __fadd_rn(acc, to_float(p.residual[static_cast<int64_t>(t) * p.H + h0 + r]));
    p.out[static_cast<int64_t>(t) * p.H + h0 + r] = from_float<T>(bad ? NAN : acc);
  }
  DOTS1_PHASE_STAMP(1, 15);  // exit
}

// ---------------------------------------------------------------------------------------------
// Fallback kernels: one warp per output (gate_up: an act element; down: an out element).

template <typename T, MoeGateUpLayout kLayout, typename W>
__global__ void __launch_bounds__(kThreads) moe_gate_up_simple_kernel(const GateUpParams<T, W> p) {
  pdl_wait();  // csrc/pdl.cuh: this fallback reads nothing before it
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31;
  const int64_t total = static_cast<int64_t>(p.T_) * p.NA;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t o = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); o < total; o += warps) {
    const int64_t t = o / p.NA, col = o % p.NA;
    const T* x = p.hidden + t * p.H;
    float gate = 0.0f, up = 0.0f;
    if (col < p.k * p.I) {
      const int64_t j = col / p.I, f = col % p.I;
      const int expert = __ldg(p.topk_ids + t * p.k + j);
      if (expert < 0 || expert >= p.E) {
        if (lane == 0) p.act[o] = from_float<T>(NAN);
        continue;
      }
      const int64_t row_gate = kLayout == MoeGateUpLayout::kInterleaved ? (f >> 3) * 16 + (f & 7) : f;
      const int64_t row_up = kLayout == MoeGateUpLayout::kInterleaved ? row_gate + 8 : p.I + f;
      for (int64_t h = lane; h < p.H; h += 32) {
        const float xv = to_float(x[h]);
        gate = fmaf(p.gate_up.value(expert, row_gate, h), xv, gate);
        up = fmaf(p.gate_up.value(expert, row_up, h), xv, up);
      }
    } else {
      const int64_t f = col - p.k * p.I;
      const T* row_gate = p.shared_gate_up + f * p.H;
      const T* row_up = p.shared_gate_up + (p.Is + f) * p.H;
      for (int64_t h = lane; h < p.H; h += 32) {
        const float xv = to_float(x[h]);
        gate = fmaf(to_float(row_gate[h]), xv, gate);
        up = fmaf(to_float(row_up[h]), xv, up);
      }
    }
    gate = warp_sum(gate);
    up = warp_sum(up);
    if (lane == 0) p.act[o] = from_float<T>(silu_f(gate) * up);
  }
}

template <typename T, typename W>
__global__ void __launch_bounds__(kThreads) moe_down_simple_kernel(const DownParams<T, W> p) {
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
      const T* a = p.act + t * p.NA + static_cast<int64_t>(j) * p.I;
      float dot = 0.0f;
      for (int64_t i = lane; i < p.I; i += 32) dot = fmaf(p.down.value(expert, h, i), to_float(a[i]), dot);
      dot = warp_sum(dot);
      acc = __fadd_rn(acc, __fmul_rn(__ldg(p.topk_weights + t * p.k + j), dot));
    }
    if (p.Is > 0) {
      const T* w = p.shared_down + h * p.Is;
      const T* a = p.shared_act + t * p.NS;
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

// The fast kernels count K steps and rows in int, and the down kernel its items' steps end to end:
// at most kMaxPairs x ceil(I / 32) < 2^9 x 2^19 = 2^28 with I < 2^24.
bool fast_sizes(int64_t H, int64_t I, int64_t Is) {
  return std::max(H, Is) < (int64_t{1} << 30) && I < (int64_t{1} << 24);
}

// Tokens per launch of the fast kernels: every pair of the launch in the schedule.
int64_t fast_chunk(int64_t k) { return k == 0 ? kMaxTokens : std::min<int64_t>(kMaxTokens, kMaxPairs / k); }

// n-tiles of 8 columns per MMA for a launch of `tokens` tokens: 1 when every item fits in one n-tile
// (at most 8 tokens and distinct ids per token), which halves the activation registers and loads;
// else 2 (an expert chosen by more than 16 pairs becomes several items). n_tiles (1, 2 or 4: from
// DOTS1_EXT_MOE_DECODE_NT, checked in moe_decode.cpp) overrides it; 0: by token count.
int pick_nt(int64_t tokens, int n_tiles) { return n_tiles != 0 ? n_tiles : tokens <= 8 ? 1 : 2; }

// A fast launch's weight-load mapping: parts (P) k-parts per row (1: frag) and n-tiles per MMA.
struct Mapping {
  int parts, nt;
};

// The wide mapping (loads == kWide, model-dtype rows) takes launches of up to kWideMaxTokens tokens, with
// P and NT such that the 8 NT / P columns of an item hold every token: the shared experts are one
// column group (read once, as frag's at T <= 8) and, with distinct ids per token, every expert one
// item. P = 4, NT = 1 (2 columns) up to 2 tokens; P = 2, NT = 1 (4 columns) up to 4; P = 2, NT = 2 (8
// columns) up to 8: no more MMAs per weight byte than frag's NT = 1 below 5 tokens, twice as many above
// (tensor-core time is not what limits these kernels). Above 8 tokens frag: a wide item of 8 columns
// needs P = 2, NT = 4 or P = 4, NT = 8, whose accumulators and batches do not fit in 128 registers.
// n_tiles (DOTS1_EXT_MOE_DECODE_NT) applies to the frag launches only. kWideAll (the default) keeps
// P = 2, NT = 2 above 8 tokens: items of 8 pairs, so the shared experts run T / 8 column groups and
// an expert with more than 8 pairs several items, their re-reads side by side (L2), against frag's 16.
constexpr int kWideMaxTokens = 8;
template <typename W>
Mapping pick_mapping(int64_t tokens, int n_tiles, MoeDecodeLoads loads) {
  const bool wide_all = loads == MoeDecodeLoads::kWideAll;
  if (W::kWideLoads && (loads == MoeDecodeLoads::kWide || wide_all) && (tokens <= kWideMaxTokens || wide_all))
    return tokens <= 2 ? Mapping{4, 1} : tokens <= 4 ? Mapping{2, 1} : Mapping{2, 2};
  return {1, pick_nt(tokens, n_tiles)};
}

unsigned int simple_blocks(int64_t outputs, int sm_count) {
  const int64_t blocks = (outputs + kWarps - 1) / kWarps;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t{sm_count} * 32)));
}

// Launches a fast kernel with `bytes` of dynamic shared memory, of at most `max_bytes` for any launch of
// this kernel. Past the default 48 KB, once per device (host-side function attributes, not stream
// operations): raises the kernel's limit to `max_bytes` and asks for a shared-memory carveout that holds
// 2 CTAs per SM (the kernels' __launch_bounds__ occupancy; every size here fits twice in an H200 SM's
// 228 KB, the rest stays L1).
template <auto Kernel, typename Params>
cudaError_t launch_fast(dim3 grid, size_t bytes, size_t max_bytes, cudaStream_t stream, bool use_pdl,
                        const Params& p) {
  if (max_bytes > 48 * 1024) {
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    static PerDeviceOnce<cudaError_t> raised;
    err = raised.get(device, [max_bytes, device] {
      cudaError_t e =
          cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(max_bytes));
      int per_sm = 0, reserved = 0;
      if (e == cudaSuccess) e = cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
      if (e == cudaSuccess) e = cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, device);
      if (e == cudaSuccess && per_sm > 0) {
        const int64_t need = 2 * (static_cast<int64_t>(max_bytes) + reserved);
        const int percent = static_cast<int>(std::min<int64_t>(100, (100 * need + per_sm - 1) / per_sm));
        e = cudaFuncSetAttribute(Kernel, cudaFuncAttributePreferredSharedMemoryCarveout, percent);
      }
      return e;
    });
    if (err != cudaSuccess) return err;
  }
  return launch_pdl(Kernel, grid, dim3(kThreads), bytes, stream, use_pdl, p);
}

// The permuted activation copy (GateUpParams::act_smem): one token up to H = 8192 (16 KB: the launch stays
// under 48 KB, the default carveout; with the 64 KB maximum's carveout the one-token kernel ran 7% slower),
// 3-8 tokens up to T H = 32768 (64 KB). H200, real shape (bench/results/2026-11-30-h200-1b2a918-act-smem):
// gate_up at T = 1 / 3 / 4 / 8 -3% / 0 / -1-2% / -4%, the pair -2% / -3.5% / -5% / -3%; at T = 2 the copy
// lost (gate_up +3%, the pair +2.5%), so 2 tokens read hidden from global memory.
constexpr int64_t kActSmemMaxElemsOne = 8192, kActSmemMaxElems = 32768;

template <typename T, MoeGateUpLayout kLayout, int NT, typename W, int P, int kRowGroups = 1, int kActTokens = 0>
cudaError_t launch_gate_up(dim3 grid, cudaStream_t stream, bool use_pdl, const GateUpParams<T, W>& p) {
  // W::kStaged: two buffers of the staged int4 stream after GateUpSmem, allocated when p.staged (the
  // kernel stages only with one row group).
  constexpr size_t kStageBytes = W::kStaged && kRowGroups == 1 ? 2 * int4_stage_uint4s<NT>() * sizeof(uint4) : 0;
  constexpr size_t kBytes = sizeof(GateUpSmem<NT>);
  if constexpr (kActTokens > 0) {
    return launch_fast<moe_gate_up_kernel<T, kLayout, NT, W, P, kRowGroups, kActTokens>>(
        grid, kBytes + static_cast<size_t>(p.T_ * p.H) * sizeof(T),
        kBytes + (kActTokens == 1 ? kActSmemMaxElemsOne : kActSmemMaxElems) * sizeof(T), stream, use_pdl, p);
  }
  if constexpr (W::kWideLoads && kRowGroups == 1 && P == 2 && NT == 2) {
    if (p.carry_tiles)
      return launch_fast<moe_gate_up_kernel<T, kLayout, NT, W, P, 1, 0, true>>(grid, kBytes, kBytes, stream, use_pdl, p);
  }
  return launch_fast<moe_gate_up_kernel<T, kLayout, NT, W, P, kRowGroups>>(
      grid, kBytes + (p.staged ? kStageBytes : 0), kBytes + kStageBytes, stream, use_pdl, p);
}

template <typename T, int NT, typename W, int P>
cudaError_t launch_down(dim3 grid, cudaStream_t stream, bool use_pdl, const DownParams<T, W>& p) {
  return launch_fast<moe_down_kernel<T, NT, W, P>>(grid, sizeof(DownSmem<NT>), sizeof(DownSmem<NT>), stream,
                                                     use_pdl, p);
}

// The instantiations: frag at NT = 1, 2, 4; wide (model-dtype rows) at (P, NT) = (4, 1), (2, 1), (2, 2).
template <typename T, MoeGateUpLayout kLayout, typename W>
cudaError_t launch_gate_up_mapped(Mapping m, dim3 grid, cudaStream_t stream, bool use_pdl,
                                  const GateUpParams<T, W>& p) {
  if constexpr (W::kWideLoads) {
    if (m.parts == 4 && m.nt == 1) return launch_gate_up<T, kLayout, 1, W, 4>(grid, stream, use_pdl, p);
    if (m.parts == 2 && m.nt == 1) return launch_gate_up<T, kLayout, 1, W, 2>(grid, stream, use_pdl, p);
    if (m.parts == 2 && m.nt == 2) return launch_gate_up<T, kLayout, 2, W, 2>(grid, stream, use_pdl, p);
  }
  if (m.parts != 1) return cudaErrorInvalidValue;
  if constexpr (W::kRowGroups) {
    if (m.nt == 1 && p.row_groups == 4 && p.act_smem) {
      if (p.T_ == 1 && p.H <= kActSmemMaxElemsOne) return launch_gate_up<T, kLayout, 1, W, 1, 4, 1>(grid, stream, use_pdl, p);
      if (p.T_ >= 3 && p.T_ * p.H <= kActSmemMaxElems) return launch_gate_up<T, kLayout, 1, W, 1, 4, 8>(grid, stream, use_pdl, p);
    }
    if (m.nt == 1 && p.row_groups == 2) return launch_gate_up<T, kLayout, 1, W, 1, 2>(grid, stream, use_pdl, p);
    if (m.nt == 1 && p.row_groups == 4) return launch_gate_up<T, kLayout, 1, W, 1, 4>(grid, stream, use_pdl, p);
  }
  switch (m.nt) {
    case 1: return launch_gate_up<T, kLayout, 1, W, 1>(grid, stream, use_pdl, p);
    case 2: return launch_gate_up<T, kLayout, 2, W, 1>(grid, stream, use_pdl, p);
    case 4: return launch_gate_up<T, kLayout, 4, W, 1>(grid, stream, use_pdl, p);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, typename W>
cudaError_t launch_down_mapped(Mapping m, dim3 grid, cudaStream_t stream, bool use_pdl, const DownParams<T, W>& p) {
  if constexpr (W::kWideLoads) {
    if (m.parts == 4 && m.nt == 1) return launch_down<T, 1, W, 4>(grid, stream, use_pdl, p);
    if (m.parts == 2 && m.nt == 1) return launch_down<T, 1, W, 2>(grid, stream, use_pdl, p);
    if (m.parts == 2 && m.nt == 2) return launch_down<T, 2, W, 2>(grid, stream, use_pdl, p);
  }
  if (m.parts != 1) return cudaErrorInvalidValue;
  switch (m.nt) {
    case 1: return launch_down<T, 1, W, 1>(grid, stream, use_pdl, p);
    case 2: return launch_down<T, 2, W, 1>(grid, stream, use_pdl, p);
    case 4: return launch_down<T, 4, W, 1>(grid, stream, use_pdl, p);
    default: return cudaErrorInvalidValue;
  }
}

// The fast path over token chunks (only for W::kFast dtypes: fp16 / bf16 dense, bf16 int4).
template <typename T, typename W>
cudaError_t gate_up_fast(GateUpParams<T, W> p, int64_t T_total, MoeGateUpLayout layout, int n_tiles,
                         MoeDecodeLoads loads, int sm_count, cudaStream_t stream, bool use_pdl) {
  if constexpr (!W::kFast) {
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
      const Mapping m = pick_mapping<W>(tc, n_tiles, loads);
      const int64_t cols = 8 * m.nt / m.parts;  // per item / column group
      // Tiles of 8 features: the shared experts' (Is / 8 per column group of `cols` tokens) plus I / 8
      // per routed item, of which there are at most min(pairs, E + pairs / cols). Persistent CTAs
      // (2 per SM) stride over them; the real count is only known on the device.
      const int64_t pairs = tc * p.k;
      const int64_t max_items = std::min<int64_t>(pairs, p.E + pairs / cols);
      // (Routed tiles of 8 R features with R row groups: W::kRowGroups, frag at NT = 1.)
      const int64_t rg = W::kRowGroups && m.parts == 1 && m.nt == 1 ? p.row_groups : 1;
      const int64_t max_tiles = p.Is / 8 * ((tc + cols - 1) / cols) + max_items * (p.I / (8 * rg));
      const dim3 grid(
          static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(2 * int64_t{sm_count}, max_tiles))));
      const cudaError_t err = layout == MoeGateUpLayout::kInterleaved
                                  ? launch_gate_up_mapped<T, MoeGateUpLayout::kInterleaved>(m, grid, stream, use_pdl, p)
                                  : launch_gate_up_mapped<T, MoeGateUpLayout::kHF>(m, grid, stream, use_pdl, p);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
}

template <typename T, typename W>
cudaError_t down_fast(DownParams<T, W> p, int64_t T_total, int n_tiles, MoeDecodeLoads loads, cudaStream_t stream,
                      bool use_pdl) {
  if constexpr (!W::kFast) {
    return cudaErrorInvalidValue;
  } else {
    const T* act = p.act;
    const T* shared_act = p.shared_act;
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
      p.shared_act = shared_act + t0 * p.NS;
      p.topk_ids = ids + t0 * p.k;
      p.topk_weights = weights + t0 * p.k;
      p.residual = residual != nullptr ? residual + t0 * p.H : nullptr;
      p.out = out + t0 * p.H;
      const cudaError_t err = launch_down_mapped<T>(pick_mapping<W>(tc, n_tiles, loads),
                                                    dim3(static_cast<unsigned int>(grid)), stream, use_pdl, p);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
}

// One gate_up launch sequence: the fast kernels when `fast`, else the fallback.
template <typename T, typename W>
cudaError_t gate_up_launch(const GateUpParams<T, W>& p, bool fast, MoeGateUpLayout layout, int n_tiles,
                           MoeDecodeLoads loads, int sm_count, cudaStream_t stream, bool use_pdl) {
  if (fast) return gate_up_fast<T, W>(p, p.T_, layout, n_tiles, loads, sm_count, stream, use_pdl);
  const dim3 blocks(simple_blocks(static_cast<int64_t>(p.T_) * p.NA, sm_count));
  if (layout == MoeGateUpLayout::kInterleaved)
    return launch_pdl(moe_gate_up_simple_kernel<T, MoeGateUpLayout::kInterleaved, W>, blocks, dim3(kThreads), 0, stream,
                      use_pdl, p);
  return launch_pdl(moe_gate_up_simple_kernel<T, MoeGateUpLayout::kHF, W>, blocks, dim3(kThreads), 0, stream, use_pdl,
                    p);
}

template <typename T, typename W>
cudaError_t down_launch(const DownParams<T, W>& p, bool fast, int n_tiles, MoeDecodeLoads loads, int sm_count,
                        cudaStream_t stream, bool use_pdl) {
  if (fast) return down_fast<T, W>(p, p.T_, n_tiles, loads, stream, use_pdl);
  return launch_pdl(moe_down_simple_kernel<T, W>, dim3(simple_blocks(static_cast<int64_t>(p.T_) * p.H, sm_count)),
                    dim3(kThreads), 0, stream, use_pdl, p);
}

}  // namespace

cudaError_t launch_moe_decode_gate_up(const void* hidden, const void* gate_up, const int32_t* topk_ids,
                                      const void* shared_gate_up, void* act, int64_t T, int64_t H, int64_t E,
                                      int64_t k, int64_t I, int64_t Is, MoeGateUpLayout layout, DType dtype,
                                      int n_tiles, MoeDecodeLoads loads, cudaStream_t stream, bool use_pdl,
                                      bool hidden_settled, bool carry_tiles) {
  const int64_t NA = k * I + Is;
  if (T == 0 || NA == 0) return cudaSuccess;
  if (E > 0x7fffffff || k > 0x7fffffff || T > 0x7fffffff) return cudaErrorInvalidValue;
  int sm_count = 0;
  const cudaError_t err = current_sm_count(&sm_count);
  if (err != cudaSuccess) return err;
  const bool fast = dtype != DType::kFloat32 && H % 8 == 0 && I % 8 == 0 && Is % 8 == 0 && k <= kMaxPairs &&
                    fast_sizes(H, I, Is) && aligned16(hidden) && aligned16(gate_up) && aligned16(shared_gate_up) &&
                    aligned16(act) && !moe_decode_force_simple();
  DOTS1_DISPATCH_FLOAT_TYPES(dtype, scalar_t, {
    const DenseExperts<scalar_t> experts{static_cast<const scalar_t*>(gate_up), 2 * I, H};
    const GateUpParams<scalar_t, DenseExperts<scalar_t>> p{
        static_cast<const scalar_t*>(hidden), experts, topk_ids, static_cast<const scalar_t*>(shared_gate_up),
        static_cast<scalar_t*>(act), static_cast<int>(T), static_cast<int>(k), static_cast<int>(E), H, I, Is, NA,
        false, hidden_settled && use_pdl};
    GateUpParams<scalar_t, DenseExperts<scalar_t>> pc = p;
    pc.carry_tiles = carry_tiles;
    return gate_up_launch(pc, fast, layout, n_tiles, loads, sm_count, stream, use_pdl);
  });
  return cudaErrorInvalidValue;  // not reached: every dtype returns above
}

cudaError_t launch_moe_decode_down(const void* act, const void* shared_act, const void* down, const int32_t* topk_ids,
                                   const float* topk_weights, const void* shared_down, const void* residual, void* out,
                                   int64_t T, int64_t H, int64_t E, int64_t k, int64_t I, int64_t Is, DType dtype,
                                   int n_tiles, MoeDecodeLoads loads, cudaStream_t stream, bool use_pdl,
                                   bool preload_shared) {
  if (T == 0 || H == 0) return cudaSuccess;
  if (E > 0x7fffffff || k > 0x7fffffff || T > 0x7fffffff) return cudaErrorInvalidValue;
  const int64_t NA = shared_act != nullptr ? k * I : k * I + Is;
  const int64_t NS = shared_act != nullptr ? Is : NA;
  int sm_count = 0;
  const cudaError_t err = current_sm_count(&sm_count);
  if (err != cudaSuccess) return err;
  const bool fast = dtype != DType::kFloat32 && H % 8 == 0 && I % 8 == 0 && Is % 8 == 0 && k <= kMaxPairs &&
                    fast_sizes(H, I, Is) && aligned16(act) && aligned16(shared_act) && aligned16(down) &&
                    aligned16(shared_down) && !moe_decode_force_simple();
  DOTS1_DISPATCH_FLOAT_TYPES(dtype, scalar_t, {
    const DenseExperts<scalar_t> experts{static_cast<const scalar_t*>(down), H, I};
    const scalar_t* a = static_cast<const scalar_t*>(act);
    DownParams<scalar_t, DenseExperts<scalar_t>> p{
        a, shared_act != nullptr ? static_cast<const scalar_t*>(shared_act) : a + k * I, experts, topk_ids,
        topk_weights, static_cast<const scalar_t*>(shared_down), static_cast<const scalar_t*>(residual),
        static_cast<scalar_t*>(out), static_cast<int>(T), static_cast<int>(k), static_cast<int>(E), H, I, Is, NA, NS};
    p.preload_shared = preload_shared && use_pdl;
    return down_launch(p, fast, n_tiles, loads, sm_count, stream, use_pdl);
  });
  return cudaErrorInvalidValue;  // not reached: every dtype returns above
}

// int4 routed experts: the same kernels with Int4Experts; the MMA kernels for bf16 activations (H and I
// are multiples of 128 by the format), the fallback for fp16 / fp32 and the shapes the fast path refuses.
cudaError_t launch_moe_decode_int4_gate_up(const void* hidden, const uint8_t* qweight, const void* scales,
                                           const uint8_t* zeros, const int32_t* topk_ids, const void* shared_gate_up,
                                           void* act, int64_t T, int64_t H, int64_t E, int64_t k, int64_t I,
                                           int64_t Is, MoeGateUpLayout layout, DType dtype, int n_tiles,
                                           cudaStream_t stream, bool use_pdl, bool staged, int row_groups,
                                           bool act_smem, bool hidden_settled) {
  const int64_t NA = k * I + Is;
  if (row_groups != 1 && row_groups != 2 && row_groups != 4) return cudaErrorInvalidValue;
  if (T == 0 || NA == 0) return cudaSuccess;
  if (E > 0x7fffffff || k > 0x7fffffff || T > 0x7fffffff) return cudaErrorInvalidValue;
  if (H % kGroupK != 0 || I % kGroupK != 0) return cudaErrorInvalidValue;  // the format's groups
  int sm_count = 0;
  const cudaError_t err = current_sm_count(&sm_count);
  if (err != cudaSuccess) return err;
  const bool fast = dtype == DType::kBFloat16 && Is % 8 == 0 && k <= kMaxPairs && fast_sizes(H, I, Is) &&
                    aligned16(hidden) && aligned16(qweight) && aligned16(shared_gate_up) && aligned16(act) &&
                    !moe_decode_force_simple();
  DOTS1_DISPATCH_FLOAT_TYPES(dtype, scalar_t, {
    const Int4Experts<scalar_t> experts{qweight, static_cast<const __nv_bfloat16*>(scales), zeros, 2 * I, H};
    const GateUpParams<scalar_t, Int4Experts<scalar_t>> p{
        static_cast<const scalar_t*>(hidden), experts, topk_ids, static_cast<const scalar_t*>(shared_gate_up),
        static_cast<scalar_t*>(act), static_cast<int>(T), static_cast<int>(k), static_cast<int>(E), H, I, Is, NA,
        staged, hidden_settled && use_pdl, row_groups, act_smem};
    return gate_up_launch(p, fast, layout, n_tiles, MoeDecodeLoads::kFrag, sm_count, stream, use_pdl);
  });
  return cudaErrorInvalidValue;  // not reached: every dtype returns above
}

cudaError_t launch_moe_decode_int4_down(const void* act, const void* shared_act, const uint8_t* qweight,
                                        const void* scales, const uint8_t* zeros, const int32_t* topk_ids,
                                        const float* topk_weights, const void* shared_down, const void* residual,
                                        void* out, int64_t T, int64_t H, int64_t E, int64_t k, int64_t I, int64_t Is,
                                        DType dtype, int n_tiles, cudaStream_t stream, bool use_pdl,
                                        bool preload_shared) {
  if (T == 0 || H == 0) return cudaSuccess;
  if (E > 0x7fffffff || k > 0x7fffffff || T > 0x7fffffff) return cudaErrorInvalidValue;
  if (I % kGroupK != 0) return cudaErrorInvalidValue;  // the format's groups
  const int64_t NA = shared_act != nullptr ? k * I : k * I + Is;
  const int64_t NS = shared_act != nullptr ? Is : NA;
  int sm_count = 0;
  const cudaError_t err = current_sm_count(&sm_count);
  if (err != cudaSuccess) return err;
  const bool fast = dtype == DType::kBFloat16 && H % 8 == 0 && Is % 8 == 0 && k <= kMaxPairs &&
                    fast_sizes(H, I, Is) && aligned16(act) && aligned16(shared_act) && aligned16(qweight) &&
                    aligned16(shared_down) && !moe_decode_force_simple();
  DOTS1_DISPATCH_FLOAT_TYPES(dtype, scalar_t, {
    const Int4Experts<scalar_t> experts{qweight, static_cast<const __nv_bfloat16*>(scales), zeros, H, I};
    const scalar_t* a = static_cast<const scalar_t*>(act);
    DownParams<scalar_t, Int4Experts<scalar_t>> p{
        a, shared_act != nullptr ? static_cast<const scalar_t*>(shared_act) : a + k * I, experts, topk_ids,
        topk_weights, static_cast<const scalar_t*>(shared_down), static_cast<const scalar_t*>(residual),
        static_cast<scalar_t*>(out), static_cast<int>(T), static_cast<int>(k), static_cast<int>(E), H, I, Is, NA, NS};
    p.preload_shared = preload_shared && use_pdl;
    return down_launch(p, fast, n_tiles, MoeDecodeLoads::kFrag, sm_count, stream, use_pdl);
  });
  return cudaErrorInvalidValue;  // not reached: every dtype returns above
}

#ifdef DOTS1_EXT_PHASE_STAMPS
// The probe's reader (bench/probes/moe_phase_stamps.py, through ctypes): the stamps of the last launch
// of each kernel, [2][512][16] uint64 ns (copy_phase_stamps).
extern "C" __attribute__((visibility("default"))) int dots1_phase_stamps_copy(void* dst, int clear) {
  return copy_phase_stamps(g_phase_stamps, dst, clear);
}
#endif

}  // namespace dots1
