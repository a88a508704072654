// Skinny GEMM kernels (decode linears, M <= 16): a tensor-core weight-streaming kernel for aligned
// fp16/bf16 and a portable CUDA-core kernel for everything else. See skinny_gemm.h for the contract.
//
// The tensor-core kernel in one paragraph. The weight is the 16-row operand of mma.sync m16n8k16 and
// x the 8-column one (tokens; two 8-token tiles for M > 8), so a single-token decode wastes only
// tensor-core throughput, of which there is 30x more than the weight stream needs. Each lane loads
// 16 bytes of weight row g (= lane / 4) and of row g + 8 at k = 32 s + 8 (lane % 4), and the 16 bytes
// of x token g at the same k: that is exactly the A and B fragments of two mma k16 steps once the 32
// k values of a step are renumbered (a permutation of k inside the step, the same for A and B, which
// a dot product does not see). So the weight goes from global memory straight into mma registers, no
// shared memory and no shuffles. A CTA owns RT 16-row tiles of the weight and its 8 warps split K
// (contiguous step ranges, equal to one step); the partial sums meet in shared memory in a fixed
// order and the epilogue is applied there, in fp32, with one rounding. A CTA reads x once (each warp
// its own K range) and every weight byte once, with 16-byte loads that bypass L1
// (ld.global.nc.L1::no_allocate); each lane keeps U x (2 RT) of them in flight.
//
// Two weight-load mappings of that kernel (skinny_gemm.h SkinnyKernel, DOTS1_EXT_SKINNY_KERNEL):
// - frag (above): a warp load instruction reads 8 rows x 64 bytes. bench/probes/read_patterns.cu,
//   the same streaming structure with only the address pattern varied, read 4238 GB/s that way on the
//   H200, and 4659 GB/s with 2 rows x 256 bytes per instruction: about 10% more bandwidth for a
//   kernel that is bound by it (the reason is the memory system's; only the rate was measured).
// - wide: the 16 A slots of an MMA need not be 16 rows. With P k-parts per row, lo slot g holds row
//   g / P of the fragment at part g % P (hi slot g + 8: the row 8 below, or HF's up row), so lane
//   (g, c) reads 16 bytes at k = 32 P s + 32 (g % P) + 8 c and the 4 P lanes of a row read 64 P
//   contiguous bytes (P = 4: 2 rows x 256 bytes per instruction). B column n then holds token n / P
//   at part n % P (lane (g, c) loads x at the same k), and C[slot, n] is a partial dot product where
//   the parts of slot and column agree; the epilogue sums those P entries per (row, token), in a
//   fixed order, then across warps. The columns needed are P M: P = 4 for M <= 2 and P = 2 for
//   M <= 4 keep one n-tile, so no extra MMAs; M > 4 runs frag (two n-tiles spilled at 128 registers:
//   P = 4 12-20 bytes, P = 2 up to 4 bytes with 1 tile per warp and 8-20 with 2). Per lane: 16 weight
//   vectors in flight as in frag (U = 8 / (RT P) steps of 2 RT P), at least 4 accumulator chains.
//   110-124 registers, no spills. Results equal frag's up to the fp32 summation order.
#include <cstdint>

#include "cuda_utils.cuh"
#include "pdl.cuh"
#include "weight_stream.cuh"
#include "skinny_gemm/skinny_gemm.h"

namespace dots1 {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kStepK = 32;  // k values of one warp step: 4 lanes x 8 values per weight row

__device__ __forceinline__ float silu_f(float g) { return g / (1.0f + expf(-g)); }

// Steps per batch: each lane holds U * (2 RT + NT) 16-byte vectors at once (20-24 of them, 80-96
// registers; 128 registers in all for two CTAs per SM), of which U * 2 RT are weight (256 bytes, 192
// for RT = 1, NT = 2). (RT = 4 spilled at U = 2: not offered.)
template <int RT, int NT>
constexpr int batch_steps() {
  return RT == 1 ? (NT == 1 ? 8 : 6) : 4;
}

// Independent accumulator sets: an mma's result feeds the next mma on the same accumulator, so with
// few tiles the chain of 2 U dependent mmas per batch would hold the warp longer than the loads it
// waits for; 4 chains (sets x tiles) keep each chain short. Summed in a fixed order at the end.
template <int RT, int NT>
constexpr int accumulator_sets() {
  return RT * NT >= 4 ? 1 : 4 / (RT * NT);
}

// The accumulators of both tensor-core kernels, [set][A fragment][n-tile][C entry], zeroed.
template <int kSets, int F, int NT>
__device__ __forceinline__ void zero_acc(float (&acc)[kSets][F][NT][4]) {
#pragma unroll
  for (int s = 0; s < kSets; ++s)
#pragma unroll
    for (int f = 0; f < F; ++f)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[s][f][j][i] = 0.0f;
}

// Grid: one CTA per RT tiles of 16 weight rows ("none", "swiglu_interleaved": rows 16 tile .. + 16;
// "swiglu" (HF): gate rows 8 tile .. + 8 then the matching up rows, the interleaved block made on the
// fly). Row g of a tile (g < 8) and row g + 8 land in one lane's accumulators for the same tokens, so
// with SwiGLU the gate and up of feature 8 tile + g meet in one thread.
template <typename T, int RT, int NT, SkinnyEpilogue kEpi>
__global__ void __launch_bounds__(kThreads, 2)
    skinny_gemm_mma_kernel(const T* __restrict__ x, const T* __restrict__ weight, T* __restrict__ out, int M,
                           int64_t N, int64_t K, int64_t x_row_stride, int64_t weight_row_stride) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync m16n8k16 with fp16/bf16 needs sm_80; the launcher never picks this kernel there
#else
  constexpr int U = batch_steps<RT, NT>();
  constexpr int kSets = accumulator_sets<RT, NT>();
  __shared__ float4 partial[kWarps][RT * NT][32];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, c = lane & 3;
  const int64_t N_out = kEpi == SkinnyEpilogue::kNone ? N : N / 2;

  // This lane's weight rows (h = 0: row g of the tile, h = 1: row g + 8) and x rows (token 8 j + g),
  // already offset to its 16 bytes of each step. Rows and tokens past the end are never loaded
  // (their fragments stay zero); their results are not written.
  const T* w_ptr[RT][2];
  bool w_ok[RT][2];
#pragma unroll
  for (int t = 0; t < RT; ++t) {
    const int64_t tile = static_cast<int64_t>(blockIdx.x) * RT + t;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      int64_t row;
      bool ok;
      if constexpr (kEpi == SkinnyEpilogue::kHF) {
        const int64_t f = tile * 8 + g;
        ok = f < N_out;
        row = h == 0 ? f : N_out + f;
      } else {
        row = tile * 16 + g + 8 * h;
        ok = row < N;
      }
      w_ok[t][h] = ok;
      w_ptr[t][h] = weight + (ok ? row : 0) * weight_row_stride + 8 * c;
    }
  }
  const T* x_ptr[NT];
  bool x_ok[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int m = 8 * j + g;
    x_ok[j] = m < M;
    x_ptr[j] = x + (x_ok[j] ? m : 0) * x_row_stride + 8 * c;
  }

  float acc[kSets][RT][NT][4];
  zero_acc(acc);

  // This warp's steps: an equal share (to one step) of the K range, contiguous.
  const int64_t steps = (K + kStepK - 1) / kStepK;
  const int64_t step_begin = steps * warp / kWarps, step_end = steps * (warp + 1) / kWarps;
  const int64_t lane_k = 8 * c;

  // A batch: U steps of weight (wv) and of x (xv). Step s is in range when s < step_end and the
  // lane's vector starts below K (K % 8 == 0: then the whole vector is in range).
  uint4 wv[U][RT][2];
  const auto load_weight_batch = [&](int64_t s0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = (s0 + u) * kStepK;
      const bool k_ok = s0 + u < step_end && k + lane_k < K;
#pragma unroll
      for (int t = 0; t < RT; ++t)
#pragma unroll
        for (int h = 0; h < 2; ++h) wv[u][t][h] = load_weight16(w_ptr[t][h] + k, k_ok && w_ok[t][h]);
    }
  };

  // PDL (csrc/pdl.cuh): the weight is never written in a decode step, so its first batch is requested
  // before the wait, while the previous kernel (the producer of x) may still be running; x only after
  // it (load_act16 is volatile asm, which the compiler keeps after the wait's).
  load_weight_batch(step_begin);
  pdl_wait();
  pdl_launch_dependents();

  for (int64_t s0 = step_begin; s0 < step_end; s0 += U) {
    // The loop body in the order of a batch: its weight (the first batch's is already in flight), its
    // x, then the MMAs; so a warp waits one memory latency per batch.
    if (s0 != step_begin) load_weight_batch(s0);
    uint4 xv[U][NT];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = (s0 + u) * kStepK;
      const bool k_ok = s0 + u < step_end && k + lane_k < K;
#pragma unroll
      for (int j = 0; j < NT; ++j) xv[u][j] = load_act16(x_ptr[j] + k, k_ok && x_ok[j]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      // Words 0-1 of each vector are the first k16 step (A: row g, row g + 8, row g, row g + 8), words 2-3 the second.
      const int set0 = (2 * u) % kSets, set1 = (2 * u + 1) % kSets;
#pragma unroll
      for (int t = 0; t < RT; ++t)
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          mma_16816<T>(acc[set0][t][j], wv[u][t][0].x, wv[u][t][1].x, wv[u][t][0].y, wv[u][t][1].y, xv[u][j].x,
                       xv[u][j].y);
          mma_16816<T>(acc[set1][t][j], wv[u][t][0].z, wv[u][t][1].z, wv[u][t][0].w, wv[u][t][1].w, xv[u][j].z,
                       xv[u][j].w);
        }
    }
  }

#pragma unroll
  for (int t = 0; t < RT; ++t)
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      float4 sum = make_float4(acc[0][t][j][0], acc[0][t][j][1], acc[0][t][j][2], acc[0][t][j][3]);
#pragma unroll
      for (int s = 1; s < kSets; ++s) {
        sum.x += acc[s][t][j][0];
        sum.y += acc[s][t][j][1];
        sum.z += acc[s][t][j][2];
        sum.w += acc[s][t][j][3];
      }
      partial[warp][t * NT + j][lane] = sum;
    }
  __syncthreads();

  // One thread per (tile, token tile, lane) fragment: the warps' partial sums in warp order, then
  // the epilogue. Fragment of lane l: rows g, g + 8 (g = l / 4) x tokens 8 j + 2 (l % 4) + {0, 1}.
  static_assert(RT * NT * 32 <= kThreads, "one fragment per thread");
  if (threadIdx.x < RT * NT * 32) {
    const int tj = threadIdx.x >> 5, l = threadIdx.x & 31;
    const int t = tj / NT, j = tj % NT;
    float4 v = partial[0][tj][l];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      const float4 p = partial[w][tj][l];
      v.x += p.x;
      v.y += p.y;
      v.z += p.z;
      v.w += p.w;
    }
    const int lg = l >> 2;
    const int m0 = 8 * j + 2 * (l & 3), m1 = m0 + 1;
    const int64_t tile = static_cast<int64_t>(blockIdx.x) * RT + t;
    if constexpr (kEpi == SkinnyEpilogue::kNone) {
      const int64_t r0 = tile * 16 + lg, r1 = r0 + 8;
      if (m0 < M) {
        if (r0 < N) out[m0 * N + r0] = from_float<T>(v.x);
        if (r1 < N) out[m0 * N + r1] = from_float<T>(v.z);
      }
      if (m1 < M) {
        if (r0 < N) out[m1 * N + r0] = from_float<T>(v.y);
        if (r1 < N) out[m1 * N + r1] = from_float<T>(v.w);
      }
    } else {
      const int64_t f = tile * 8 + lg;
      if (f < N_out) {
        if (m0 < M) out[m0 * N_out + f] = from_float<T>(silu_f(v.x) * v.z);
        if (m1 < M) out[m1 * N_out + f] = from_float<T>(silu_f(v.y) * v.w);
      }
    }
  }
#endif
}

// The wide-load variant (DOTS1_EXT_SKINNY_KERNEL=wide): the same CTA structure, accumulation and
// epilogues, with P k-parts of one weight row side by side in an A fragment, so that the 4 P lanes
// reading a row cover 64 P contiguous bytes per load instruction (P = 4: 256 bytes, two rows per
// instruction, the pattern that streams ~10% faster than 8 rows x 64 bytes on the H200; see the
// file's header). Lo slot g of a fragment holds tile row (8 / P) fr + g / P at part g % P, hi slot
// g + 8 the row 8 below it (HF: the matching up row); column n of an n-tile holds token n / P at
// part n % P, so lane (g, c) reads 16 bytes at k = 32 P s + 32 (g % P) + 8 c of its row and of its
// token. C[slot, n] is a partial dot product of the slot's row and the column's token when their
// parts agree (the other entries are cross terms, never read). A 16-row tile is P fragments; a step
// advances 32 P k per row.
template <int P>
constexpr bool wide_parts_ok() {
  return P == 2 || P == 4;
}

// Steps per batch: U x 2 RT P weight vectors per lane (16: 256 bytes in flight, as the frag kernel
// keeps) plus U x NT x vectors.
template <int P, int RT>
constexpr int wide_batch_steps() {
  return RT * P >= 8 ? 1 : 8 / (RT * P);
}

// Independent accumulator chains: RT P NT fragments; with fewer than 4, sets as in the frag kernel.
template <int P, int RT, int NT>
constexpr int wide_accumulator_sets() {
  return RT * P * NT >= 4 ? 1 : 4 / (RT * P * NT);
}

// Grid and tiles as in skinny_gemm_mma_kernel: one CTA per RT tiles of 16 weight rows (HF: 8 gate rows
// and their 8 up rows); NT n-tiles of 8 columns carry 8 NT / P tokens.
template <typename T, int P, int RT, int NT, SkinnyEpilogue kEpi>
__global__ void __launch_bounds__(kThreads, 2)
    skinny_gemm_wide_kernel(const T* __restrict__ x, const T* __restrict__ weight, T* __restrict__ out, int M,
                            int64_t N, int64_t K, int64_t x_row_stride, int64_t weight_row_stride) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync m16n8k16 with fp16/bf16 needs sm_80; the launcher never picks this kernel there
#else
  static_assert(wide_parts_ok<P>(), "P k-parts per row: 2 or 4");
  constexpr int kRowsPerFrag = 8 / P;  // lo rows (and as many hi rows) of one A fragment
  constexpr int kFrags = RT * P;       // A fragments of the CTA's RT tiles
  constexpr int kWideStepK = kStepK * P;
  constexpr int kTokens = 8 * NT / P;  // tokens the n-tiles carry
  constexpr int U = wide_batch_steps<P, RT>();
  constexpr int kSets = wide_accumulator_sets<P, RT, NT>();
  constexpr int kRows = 16 * RT;  // weight rows of the CTA, tile-major: [tile][lo 0..7 | hi 8..15]
  // Per warp, the useful C entries only: its partial sum of (row, token, part).
  __shared__ float partial[kWarps][kRows][kTokens][P];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, c = lane & 3;
  const int part = g % P;
  const int64_t N_out = kEpi == SkinnyEpilogue::kNone ? N : N / 2;
  const int64_t lane_k = kStepK * part + 8 * c;

  // This lane's weight rows: in fragment f, lo slot g is row frag_row(f) + lane_row of the CTA's
  // first tile (HF: that feature's gate row) and hi slot g + 8 the row 8 below (HF: its up row).
  // Kept as one pointer per half plus compile-time row offsets rather than a pointer per fragment:
  // 2 RT P 64-bit pointers would not fit beside the batch in 128 registers (P = 4 spilled).
  // Missing rows are never loaded (their fragments stay zero) and their results not written.
  constexpr int kTileRows = kEpi == SkinnyEpilogue::kHF ? 8 : 16;  // lo rows (features) a tile advances
  const auto frag_row = [](int f) { return (f / P) * kTileRows + (f % P) * kRowsPerFrag; };
  const int64_t lane_row = static_cast<int64_t>(blockIdx.x) * RT * kTileRows + g / P;
  const int64_t rows_left = (kEpi == SkinnyEpilogue::kHF ? N_out : N) - lane_row;  // lo rows from lane_row on
  const int64_t hi_rows = kEpi == SkinnyEpilogue::kHF ? N_out : 8;                // hi row - lo row
  const int64_t lane_offset = lane_row * weight_row_stride + lane_k;  // a pointer only where the row exists
  const auto weight_ptr = [&](int f, int h, int64_t k, bool& ok) {
    // HF: gate and up of a feature are both present when the feature is; "none": the hi row 8 below.
    ok = frag_row(f) + (kEpi == SkinnyEpilogue::kHF ? 0 : 8 * h) < rows_left;
    return ok ? weight + lane_offset + (frag_row(f) + h * hi_rows) * weight_row_stride + k : weight;
  };
  const T* x_ptr[NT];
  bool x_ok[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int m = (8 * j + g) / P;
    x_ok[j] = m < M;
    x_ptr[j] = x + (x_ok[j] ? m : 0) * x_row_stride + lane_k;
  }

  float acc[kSets][kFrags][NT][4];
  zero_acc(acc);

  const int64_t steps = (K + kWideStepK - 1) / kWideStepK;
  const int64_t step_begin = steps * warp / kWarps, step_end = steps * (warp + 1) / kWarps;

  // The K loop below is the frag kernel's over kFrags fragments. It stays written out in both kernels:
  // as one shared function it compiled to other machine code (register assignment, operand order).
  uint4 wv[U][kFrags][2];
  const auto load_weight_batch = [&](int64_t s0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = (s0 + u) * kWideStepK;
      const bool k_ok = s0 + u < step_end && k + lane_k < K;
#pragma unroll
      for (int f = 0; f < kFrags; ++f)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          bool row_ok;
          const T* p = weight_ptr(f, h, k, row_ok);
          wv[u][f][h] = load_weight16(p, k_ok && row_ok);
        }
    }
  };

  // PDL as in the frag kernel: the first weight batch before the wait, x only after it.
  load_weight_batch(step_begin);
  pdl_wait();
  pdl_launch_dependents();

  for (int64_t s0 = step_begin; s0 < step_end; s0 += U) {
    if (s0 != step_begin) load_weight_batch(s0);
    uint4 xv[U][NT];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = (s0 + u) * kWideStepK;
      const bool k_ok = s0 + u < step_end && k + lane_k < K;
#pragma unroll
      for (int j = 0; j < NT; ++j) xv[u][j] = load_act16(x_ptr[j] + k, k_ok && x_ok[j]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int set0 = (2 * u) % kSets, set1 = (2 * u + 1) % kSets;
#pragma unroll
      for (int f = 0; f < kFrags; ++f)
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          mma_16816<T>(acc[set0][f][j], wv[u][f][0].x, wv[u][f][1].x, wv[u][f][0].y, wv[u][f][1].y, xv[u][j].x,
                       xv[u][j].y);
          mma_16816<T>(acc[set1][f][j], wv[u][f][0].z, wv[u][f][1].z, wv[u][f][0].w, wv[u][f][1].w, xv[u][j].z,
                       xv[u][j].w);
        }
    }
  }

  // Lane (g, c) holds C[g | g + 8, 8 j + 2 c + e] (e = 0, 1); it keeps the entries whose column part
  // is its slot part. Every (row, token, part) of partial[warp] is written by exactly one lane.
#pragma unroll
  for (int f = 0; f < kFrags; ++f)
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      float lo0 = acc[0][f][j][0], lo1 = acc[0][f][j][1], hi0 = acc[0][f][j][2], hi1 = acc[0][f][j][3];
#pragma unroll
      for (int s = 1; s < kSets; ++s) {
        lo0 += acc[s][f][j][0];
        lo1 += acc[s][f][j][1];
        hi0 += acc[s][f][j][2];
        hi1 += acc[s][f][j][3];
      }
      const int row = (f / P) * 16 + (f % P) * kRowsPerFrag + g / P;  // lo row; its hi row is + 8
      const int n0 = 8 * j + 2 * c;
      if (n0 % P == part) {
        partial[warp][row][n0 / P][part] = lo0;
        partial[warp][row + 8][n0 / P][part] = hi0;
      }
      if ((n0 + 1) % P == part) {
        partial[warp][row][(n0 + 1) / P][part] = lo1;
        partial[warp][row + 8][(n0 + 1) / P][part] = hi1;
      }
    }
  __syncthreads();

  // One thread per output (row or feature, token): warps in order, parts in order within each warp,
  // then the epilogue in fp32.
  const auto sum_row = [&](int row, int m) {
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w)
#pragma unroll
      for (int p = 0; p < P; ++p) v += partial[w][row][m][p];
    return v;
  };
  if constexpr (kEpi == SkinnyEpilogue::kNone) {
    for (int i = threadIdx.x; i < kRows * kTokens; i += kThreads) {
      const int row = i % kRows, m = i / kRows;
      const int64_t r = static_cast<int64_t>(blockIdx.x) * kRows + row;
      if (m < M && r < N) out[m * N + r] = from_float<T>(sum_row(row, m));
    }
  } else {
    for (int i = threadIdx.x; i < 8 * RT * kTokens; i += kThreads) {
      const int feature = i % (8 * RT), m = i / (8 * RT);
      const int row = (feature / 8) * 16 + feature % 8;  // the gate row; up is 8 below
      const int64_t f = static_cast<int64_t>(blockIdx.x) * 8 * RT + feature;
      if (m < M && f < N_out) out[m * N_out + f] = from_float<T>(silu_f(sum_row(row, m)) * sum_row(row + 8, m));
    }
  }
#endif
}

// Portable kernel: any dtype, K, strides and alignment; scalar loads on CUDA cores. One warp per
// item: "none" rows 2i and 2i + 1; SwiGLU feature i (its gate row and its up row). Tokens in chunks
// of 8 (one pass over the item's weight rows per chunk). Lanes stride over K; warp sums in a fixed
// shuffle order.
template <typename T, SkinnyEpilogue kEpi>
__global__ void __launch_bounds__(kThreads)
    skinny_gemm_portable_kernel(const T* __restrict__ x, const T* __restrict__ weight, T* __restrict__ out, int M,
                                int64_t N, int64_t K, int64_t x_row_stride, int64_t weight_row_stride) {
  // PDL (csrc/pdl.cuh): this kernel (fp32, misaligned views) only waits, before anything else.
  pdl_wait();
  pdl_launch_dependents();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t N_out = kEpi == SkinnyEpilogue::kNone ? N : N / 2;
  const int64_t items = kEpi == SkinnyEpilogue::kNone ? (N + 1) / 2 : N_out;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (item >= items) return;  // uniform over the warp; no block-wide barrier below

  int64_t row0, row1;
  if constexpr (kEpi == SkinnyEpilogue::kNone) {
    row0 = 2 * item;
    row1 = 2 * item + 1;
  } else if constexpr (kEpi == SkinnyEpilogue::kHF) {
    row0 = item;
    row1 = N_out + item;
  } else {
    row0 = (item >> 3) * 16 + (item & 7);
    row1 = row0 + 8;
  }
  const bool row1_ok = row1 < N;
  const T* w0 = weight + row0 * weight_row_stride;
  const T* w1 = weight + (row1_ok ? row1 : row0) * weight_row_stride;

  for (int m_base = 0; m_base < M; m_base += 8) {
    float acc[2][8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[0][i] = acc[1][i] = 0.0f;
    for (int64_t k = lane; k < K; k += 32) {
      const float a = to_float(w0[k]), b = to_float(w1[k]);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if (m_base + i < M) {
          const float xv = to_float(x[(m_base + i) * x_row_stride + k]);
          acc[0][i] = fmaf(a, xv, acc[0][i]);
          acc[1][i] = fmaf(b, xv, acc[1][i]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float s0 = warp_sum(acc[0][i]), s1 = warp_sum(acc[1][i]);
      const int64_t m = m_base + i;
      if (lane == 0 && m < M) {
        if constexpr (kEpi == SkinnyEpilogue::kNone) {
          out[m * N + row0] = from_float<T>(s0);
          if (row1_ok) out[m * N + row1] = from_float<T>(s1);
        } else {
          out[m * N_out + item] = from_float<T>(silu_f(s0) * s1);
        }
      }
    }
  }
}

// The tensor-core kernel's tiles per warp when the caller leaves it to us. Two tiles per warp halve
// the CTAs: each lives twice as long (half the CTA turnover per byte) and reads x (M K elements, from
// L2: M / (16 RT) of the weight's traffic) for twice the rows; but fewer, longer CTAs leave a coarser
// tail. So two tiles where the grid still fills every SM's two CTA slots twice over, or once over when
// M > 4 makes the x traffic worth saving; else one.
int auto_tiles_per_warp(int64_t M, int64_t tiles, int sm_count) {
  const int64_t slots = 2 * static_cast<int64_t>(sm_count);
  const int64_t ctas = (tiles + 1) / 2;
  return ctas >= 2 * slots || (M > 4 && ctas >= slots) ? 2 : 1;
}

template <typename T>
using SkinnyKernelFn = void (*)(const T*, const T*, T*, int, int64_t, int64_t, int64_t, int64_t);

template <typename T, int RT, int NT>
SkinnyKernelFn<T> frag_kernel(SkinnyEpilogue epi) {
  switch (epi) {
    case SkinnyEpilogue::kNone: return skinny_gemm_mma_kernel<T, RT, NT, SkinnyEpilogue::kNone>;
    case SkinnyEpilogue::kHF: return skinny_gemm_mma_kernel<T, RT, NT, SkinnyEpilogue::kHF>;
    case SkinnyEpilogue::kInterleaved: return skinny_gemm_mma_kernel<T, RT, NT, SkinnyEpilogue::kInterleaved>;
  }
  return nullptr;
}

template <typename T, int P, int RT, int NT>
SkinnyKernelFn<T> wide_kernel(SkinnyEpilogue epi) {
  switch (epi) {
    case SkinnyEpilogue::kNone: return skinny_gemm_wide_kernel<T, P, RT, NT, SkinnyEpilogue::kNone>;
    case SkinnyEpilogue::kHF: return skinny_gemm_wide_kernel<T, P, RT, NT, SkinnyEpilogue::kHF>;
    case SkinnyEpilogue::kInterleaved: return skinny_gemm_wide_kernel<T, P, RT, NT, SkinnyEpilogue::kInterleaved>;
  }
  return nullptr;
}

// The one place that maps (variant, M, tiles per warp, epilogue) to a tensor-core kernel instantiation.
// Wide: P k-parts per row and NT n-tiles cover P M columns, so P = 4 up to 2 tokens (one n-tile, the
// frag kernel's MMA count) and P = 2 up to 4 (one n-tile); larger M takes the frag kernel, whose
// 8-row loads serve 8 or 16 tokens per n-tile at no extra MMAs (register counts: the .cu header).
template <typename T>
SkinnyKernelFn<T> tensor_core_kernel(SkinnyKernel variant, int M, int rt, SkinnyEpilogue epi) {
  if (variant == SkinnyKernel::kWide && M <= 2)
    return rt == 2 ? wide_kernel<T, 4, 2, 1>(epi) : wide_kernel<T, 4, 1, 1>(epi);
  if (variant == SkinnyKernel::kWide && M <= 4)
    return rt == 2 ? wide_kernel<T, 2, 2, 1>(epi) : wide_kernel<T, 2, 1, 1>(epi);
  if (M <= 8) return rt == 2 ? frag_kernel<T, 2, 1>(epi) : frag_kernel<T, 1, 1>(epi);
  return rt == 2 ? frag_kernel<T, 2, 2>(epi) : frag_kernel<T, 1, 2>(epi);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

int skinny_gemm_kernel_kind(const void* x, const void* weight, int64_t M, int64_t N, int64_t K, int64_t x_row_stride,
                            int64_t weight_row_stride, DType dtype) {
  if (M <= 0 || N <= 0) return 0;
  // 16-byte vectors of 8 elements: every row start must be 16-byte aligned.
  const bool vectorisable = dtype != DType::kFloat32 && K % 8 == 0 && aligned16(x) && aligned16(weight) &&
                            x_row_stride % 8 == 0 && weight_row_stride % 8 == 0;
  return vectorisable && M <= kSkinnyMaxRows ? 1 : 2;
}

cudaError_t launch_skinny_gemm(const void* x, const void* weight, void* out, int64_t M, int64_t N, int64_t K,
                               int64_t x_row_stride, int64_t weight_row_stride, SkinnyEpilogue epilogue, DType dtype,
                               int tiles_per_warp, SkinnyKernel variant, cudaStream_t stream, bool use_pdl) {
  if (M < 0 || M > kSkinnyMaxRows || N < 0 || K < 0) return cudaErrorInvalidValue;
  if (epilogue == SkinnyEpilogue::kHF && N % 2 != 0) return cudaErrorInvalidValue;
  if (epilogue == SkinnyEpilogue::kInterleaved && N % 16 != 0) return cudaErrorInvalidValue;
  const int64_t N_out = epilogue == SkinnyEpilogue::kNone ? N : N / 2;
  if (M == 0 || N_out == 0) return cudaSuccess;
  const int kind = skinny_gemm_kernel_kind(x, weight, M, N, K, x_row_stride, weight_row_stride, dtype);
  const int m = static_cast<int>(M);

  if (kind == 1) {
    // 16-row weight tiles: "none" / interleaved 16 rows each; HF 8 features (8 gate + 8 up rows).
    const int64_t tiles = epilogue == SkinnyEpilogue::kHF ? (N_out + 7) / 8 : (N + 15) / 16;
    int rt = tiles_per_warp;
    if (rt == 0) {
      int sm_count = 0;
      const cudaError_t err = current_sm_count(&sm_count);
      if (err != cudaSuccess) return err;
      rt = auto_tiles_per_warp(M, tiles, sm_count);
    }
    if (rt != 1 && rt != 2) return cudaErrorInvalidValue;
    if ((tiles + rt - 1) / rt > 0x7fffffff) return cudaErrorInvalidValue;
    DOTS1_DISPATCH_HALF_TYPES(dtype, scalar_t, {
      // Both variants: one CTA per rt 16-row tiles.
      const SkinnyKernelFn<scalar_t> kernel = tensor_core_kernel<scalar_t>(variant, m, rt, epilogue);
      if (kernel == nullptr) return cudaErrorInvalidValue;
      return launch_pdl(kernel, dim3(ceil_div(tiles, rt)), kThreads, 0, stream, use_pdl,
                        static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(weight),
                        static_cast<scalar_t*>(out), m, N, K, x_row_stride, weight_row_stride);
    });
    return cudaErrorInvalidValue;  // not reached: the dispatch returns (fp32 never takes this kernel)
  }

  const int64_t items = epilogue == SkinnyEpilogue::kNone ? (N + 1) / 2 : N_out;
  const int64_t blocks = (items + kWarps - 1) / kWarps;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  cudaError_t err = cudaErrorInvalidValue;
  DOTS1_DISPATCH_FLOAT_TYPES(dtype, scalar_t, {
    const auto* xp = static_cast<const scalar_t*>(x);
    const auto* wp = static_cast<const scalar_t*>(weight);
    auto* op = static_cast<scalar_t*>(out);
    const dim3 grid(static_cast<unsigned int>(blocks));
    switch (epilogue) {
      case SkinnyEpilogue::kNone:
        err = launch_pdl(skinny_gemm_portable_kernel<scalar_t, SkinnyEpilogue::kNone>, grid, kThreads, 0, stream,
                         use_pdl, xp, wp, op, m, N, K, x_row_stride, weight_row_stride);
        break;
      case SkinnyEpilogue::kHF:
        err = launch_pdl(skinny_gemm_portable_kernel<scalar_t, SkinnyEpilogue::kHF>, grid, kThreads, 0, stream,
                         use_pdl, xp, wp, op, m, N, K, x_row_stride, weight_row_stride);
        break;
      case SkinnyEpilogue::kInterleaved:
        err = launch_pdl(skinny_gemm_portable_kernel<scalar_t, SkinnyEpilogue::kInterleaved>, grid, kThreads, 0,
                         stream, use_pdl, xp, wp, op, m, N, K, x_row_stride, weight_row_stride);
        break;
    }
  });
  return err;
}

}  // namespace dots1
