// Gather-in-A probe (issue 15, next lever): can the grouped gate_up GEMM load its A tiles straight from
// the token rows (hidden [T, H]) by row index, so that permute's 0.25 ms row copy at T=16384 (and the
// GEMM's reads of its 805 MB output) go away? At T=16384 the chain is 1.11-1.17x the tuned Triton peer
// against issue 15's 1.15x bar (bench/results/2026-12-01-h200-s30); the copy is 4% of the chain.
// A standalone program (not part of the extension), run on the GPU:
//
//   nvcc -O3 -arch=sm_90a -std=c++17 -o /tmp/gather_a_tiles bench/probes/gather_a_tiles.cu && /tmp/gather_a_tiles
//
// The GEMM's A operand is a 128-row x 64-k bf16 tile (16 KB, 128 B per row) in shared memory with the
// 128-byte swizzle (chunk c of row r at r * 128 + 16 * (c ^ (r % 8)), the layout WGMMA reads). Three
// ways to fill it, each by a producer into a 4-stage ring that one consumer warp drains (it touches one
// 16-byte word per lane and releases the stage; no math):
//   tile      one TMA copy of the tile from the permuted matrix [6T, H] (what the GEMM does today)
//   tma_rows  128 TMA copies of one row each (box 64 x 1, 128-byte swizzle) from hidden, by token id:
//             legal only if a swizzled box may land at a 128-byte (not 1024-byte) aligned address
//   cp_async  four producer warps, a thread per row, eight 16-byte cp.async each into the swizzled
//             slots, completion counted on the stage's mbarrier (cp.async.mbarrier.arrive.noinc); each
//             warp instruction touches 32 rows (s31: 1.05-1.10 tiles per us per SM, TMA's 1.9-2.0)
//   row8_*    the same copies with 8 lanes per row, so a warp instruction reads 4 whole 128-byte rows;
//             one producer warp (what a CUTLASS producer warp could issue) or four
// Each CTA walks its M tiles (grid-stride) and each tile's 64 k chunks, `repeat` times over (the GEMM
// re-reads A once per N tile: gate_up 2816 / 256 = 11 times; later passes mostly hit L2).
// Correctness: the first 16 M tiles' stages are copied out and compared bit for bit with tile's.
// Timing: CUDA events around 20 calls after 3 warm-up calls, median of 5 (probe_util.cuh).
#include <cuda.h>

#include <cstdint>
#include <string>

#include "probe_util.cuh"

constexpr int kT = 16384, kTopK = 6, kE = 128, kH = 4096;
constexpr int64_t kS = int64_t{kT} * kTopK;
constexpr int kBM = 128, kBK = 64;           // A tile: rows x k (bf16: 128 B per row)
constexpr int kTileBytes = kBM * kBK * 2;    // 16 KB
constexpr int kStages = 4;
constexpr int kMTiles = static_cast<int>(kS / kBM), kKTiles = kH / kBK;
constexpr int kDumpMTiles = 16;

enum Mode { kTile = 0, kTmaRows = 1, kCpAsync = 2, kRow8W1 = 3, kRow8W4 = 4 };
__host__ __device__ constexpr bool is_cp_async(int mode) { return mode == kCpAsync || mode == kRow8W1 || mode == kRow8W4; }
__host__ __device__ constexpr int producer_threads(int mode) {
  return mode == kCpAsync || mode == kRow8W4 ? 128 : 32;
}

__device__ __forceinline__ void tma_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

// dump != nullptr: every stage of the first kDumpMTiles M tiles is copied out to dump[(m * kKTiles + k)].
// (No __launch_bounds__: with 64 threads as the bound, nvcc 13 held the kernel to 32 registers and spilled.)
template <int kMode>
__global__ void load_a_tiles(const __grid_constant__ CUtensorMap permuted_map, const __grid_constant__ CUtensorMap hidden_map,
                 const uint16_t* __restrict__ hidden, const int32_t* __restrict__ row_token, int repeat,
                 uint4* __restrict__ dump, unsigned* __restrict__ sink) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // The ring starts at a 1024-byte boundary (the 128-byte swizzle's period).
  unsigned char* ring = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  __shared__ __align__(8) uint64_t full[kStages], empty[kStages];
  constexpr int kProducers = producer_threads(kMode);
  const int lane = threadIdx.x & 31;
  if (threadIdx.x < kStages) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(&full[threadIdx.x])),
                 "r"(is_cp_async(kMode) ? kProducers : 1)
                 : "memory");
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_addr(&empty[threadIdx.x])) : "memory");
  }
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  __syncthreads();
  const int steps_per_tile = kKTiles * repeat;
  if (threadIdx.x < kProducers) {
    int step = 0;
    for (int m = blockIdx.x; m < kMTiles; m += gridDim.x) {
      // tma_rows: lane l copies rows 4l .. 4l + 3; cp_async: thread t copies row t.
      // row8 (8 lanes per row, each lane one 16-byte chunk, so a warp instruction reads 4 whole rows):
      // thread t copies chunk t % 8 of rows j * (kProducers / 8) + t / 8, j < kRow8Rows.
      constexpr int kRow8Rows = kBM * 8 / kProducers;
      int32_t tok[kMode == kRow8W1 || kMode == kRow8W4 ? kRow8Rows : 4];
      if constexpr (kMode == kRow8W1 || kMode == kRow8W4) {
#pragma unroll
        for (int j = 0; j < kRow8Rows; ++j) tok[j] = row_token[int64_t{m} * kBM + j * (kProducers / 8) + threadIdx.x / 8];
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i)
          tok[i] = kMode == kTmaRows ? row_token[int64_t{m} * kBM + lane * 4 + i]
                                     : (kMode == kCpAsync && i == 0 ? row_token[int64_t{m} * kBM + threadIdx.x] : 0);
      }
      for (int s = 0; s < steps_per_tile; ++s, ++step) {
        const int k = s % kKTiles, slot = step % kStages;
        if (step >= kStages) mbar_wait(smem_addr(&empty[slot]), ((step / kStages) - 1) & 1);
        const uint32_t bar = smem_addr(&full[slot]), dst = smem_addr(ring + slot * kTileBytes);
        if constexpr (kMode == kCpAsync) {
          const int r = threadIdx.x;
          const uint16_t* src = hidden + int64_t{tok[0]} * kH + k * kBK;
#pragma unroll
          for (int c = 0; c < 8; ++c)
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst + r * 128 + 16 * (c ^ (r & 7))),
                         "l"(src + c * 8)
                         : "memory");
          asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
        } else if constexpr (kMode == kRow8W1 || kMode == kRow8W4) {
          const int c = threadIdx.x % 8;
#pragma unroll
          for (int j = 0; j < kRow8Rows; ++j) {
            const int r = j * (kProducers / 8) + threadIdx.x / 8;
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst + r * 128 + 16 * (c ^ (r & 7))),
                         "l"(hidden + int64_t{tok[j]} * kH + k * kBK + c * 8)
                         : "memory");
          }
          asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
        } else {
          if (lane == 0)
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(kTileBytes)
                         : "memory");
          __syncwarp();
          if constexpr (kMode == kTile) {
            if (lane == 0) tma_2d(dst, &permuted_map, k * kBK, m * kBM, bar);
          } else {
#pragma unroll
            for (int i = 0; i < 4; ++i) tma_2d(dst + (lane * 4 + i) * 128, &hidden_map, k * kBK, tok[i], bar);
          }
        }
      }
    }
    return;
  }
  if (threadIdx.x >= kProducers + 32) return;
  unsigned acc = 0;
  int step = 0;
  for (int m = blockIdx.x; m < kMTiles; m += gridDim.x) {
    for (int s = 0; s < steps_per_tile; ++s, ++step) {
      const int slot = step % kStages;
      mbar_wait(smem_addr(&full[slot]), (step / kStages) & 1);
      const uint4* stage = reinterpret_cast<const uint4*>(ring + slot * kTileBytes);
      if (dump != nullptr && m < kDumpMTiles && s < kKTiles) {
        for (int i = lane; i < kTileBytes / 16; i += 32) dump[(int64_t{m} * kKTiles + s) * (kTileBytes / 16) + i] = stage[i];
      } else {
        const uint4 v = stage[lane * 32 + (step & 31)];
        acc ^= v.x ^ v.w;
      }
      __syncwarp();
      if (lane == 0) asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(&empty[slot])) : "memory");
    }
  }
  if (acc == 0x12345678u) sink[0] = acc;
}

// permuted[r] = hidden[row_token[r]] (the permute the tile mode reads from).
__global__ void gather_rows(const uint4* __restrict__ hidden, const int32_t* __restrict__ row_token,
                            uint4* __restrict__ permuted) {
  constexpr int kVecs = kH / 8;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < kS * kVecs; i += int64_t{gridDim.x} * blockDim.x)
    permuted[i] = hidden[int64_t{row_token[i / kVecs]} * kVecs + i % kVecs];
}

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// A 2D bf16 map over [rows, kH] with a box of box_rows x 64 and the 128-byte swizzle.
int make_map(EncodeTiled encode, CUtensorMap* map, void* base, int64_t rows, int box_rows) {
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(kH), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(kH) * 2};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(kBK), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, base, dims, strides, box, elem_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) std::printf("cuTensorMapEncodeTiled failed (%d) for a box of %d rows\n", static_cast<int>(r), box_rows);
  return r == CUDA_SUCCESS ? 0 : 1;
}

int main() {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  void* encode_fn = nullptr;
  cudaDriverEntryPointQueryResult found{};
  CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &encode_fn, 12000, cudaEnableDefault, &found));
  if (encode_fn == nullptr || found != cudaDriverEntryPointSuccess) {
    std::printf("cuTensorMapEncodeTiled not found\n");
    return 1;
  }
  const auto encode = reinterpret_cast<EncodeTiled>(encode_fn);

  std::mt19937 rng(0);
  const std::vector<int32_t> row_map = balanced_row_map(kT, kTopK, kE, rng);
  std::vector<int32_t> row_token(kS);
  for (int64_t f = 0; f < kS; ++f) row_token[row_map[f]] = static_cast<int32_t>(f / kTopK);
  std::vector<uint32_t> hidden_host(static_cast<size_t>(kT) * kH / 2);
  for (size_t i = 0; i < hidden_host.size(); ++i) hidden_host[i] = static_cast<uint32_t>(i * 2654435761u);

  const uint16_t* hidden = reinterpret_cast<const uint16_t*>(to_device(hidden_host));
  const int32_t* token_d = to_device(row_token);
  if (hidden == nullptr || token_d == nullptr) CHECK(cudaErrorMemoryAllocation);
  uint4 *permuted = nullptr, *dump = nullptr, *dump_ref = nullptr;
  unsigned* sink = nullptr;
  const size_t permuted_bytes = static_cast<size_t>(kS) * kH * 2;
  const size_t dump_bytes = static_cast<size_t>(kDumpMTiles) * kKTiles * kTileBytes;
  CHECK(cudaMalloc(&permuted, permuted_bytes));
  CHECK(cudaMalloc(&dump, dump_bytes));
  CHECK(cudaMalloc(&dump_ref, dump_bytes));
  CHECK(cudaMalloc(&sink, 64));
  gather_rows<<<8 * sms, 512>>>(reinterpret_cast<const uint4*>(hidden), token_d, permuted);
  CHECK(cudaDeviceSynchronize());
  CUtensorMap permuted_map, hidden_map;
  if (make_map(encode, &permuted_map, permuted, kS, kBM) || make_map(encode, &hidden_map, const_cast<uint16_t*>(hidden), kT, 1))
    return 1;

  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  const double copy_gbs = copy_bandwidth_gbs(a, b);
  std::printf("T=%d top-%d H=%d bf16, E=%d balanced: %d M tiles x %d k chunks of 128 x 64 (16 KB); copy bandwidth "
              "%.0f GB/s\n\n",
              kT, kTopK, kH, kE, kMTiles, kKTiles, copy_gbs);
  std::printf("| mode | CTAs per SM | repeat | ms | A bytes / ms (GB/s) | tiles per us per SM | stages vs tile |\n"
              "| --- | --- | --- | --- | --- | --- | --- |\n");

  const int smem = kStages * kTileBytes + 1024;
  auto run = [&](const char* name, auto kernel, int threads, int ctas_per_sm, int repeat) -> int {
    CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const int grid = ctas_per_sm * sms;
    CHECK(cudaMemset(dump, 0xff, dump_bytes));
    kernel<<<grid, threads, smem>>>(permuted_map, hidden_map, hidden, token_d, 1, dump, sink);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    const char* same = "(reference)";
    if (std::string(name) == "tile") {
      CHECK(cudaMemcpy(dump_ref, dump, dump_bytes, cudaMemcpyDeviceToDevice));
    } else {
      std::vector<unsigned char> got(dump_bytes), want(dump_bytes);
      CHECK(cudaMemcpy(got.data(), dump, dump_bytes, cudaMemcpyDeviceToHost));
      CHECK(cudaMemcpy(want.data(), dump_ref, dump_bytes, cudaMemcpyDeviceToHost));
      same = std::memcmp(got.data(), want.data(), dump_bytes) == 0 ? "equal" : "DIFFER";
    }
    const float ms = time_ms(
        [&](int) { kernel<<<grid, threads, smem>>>(permuted_map, hidden_map, hidden, token_d, repeat, nullptr, sink); },
        a, b);
    const double tiles = static_cast<double>(kMTiles) * kKTiles * repeat;
    std::printf("| %s | %d | %d | %.4f | %.0f | %.2f | %s |\n", name, ctas_per_sm, repeat, ms,
                tiles * kTileBytes / (ms * 1e6), tiles / (ms * 1e3) / sms, same);
    return 0;
  };
  // tma_rows last: if a swizzled box may not land at a 128-byte aligned address, its launch faults and
  // the context is lost, so the other modes' rows come first.
  const int shapes[4][2] = {{1, 1}, {2, 1}, {1, 11}, {2, 11}};  // CTAs per SM, repeat
  for (const auto& sh : shapes) {
    if (run("tile", load_a_tiles<kTile>, 64, sh[0], sh[1])) return 1;
    if (run("cp_async", load_a_tiles<kCpAsync>, 160, sh[0], sh[1])) return 1;
    if (run("row8_1warp", load_a_tiles<kRow8W1>, 64, sh[0], sh[1])) return 1;
    if (run("row8_4warps", load_a_tiles<kRow8W4>, 160, sh[0], sh[1])) return 1;
  }
  for (const auto& sh : shapes)
    if (run("tma_rows", load_a_tiles<kTmaRows>, 64, sh[0], sh[1])) return 1;
  return 0;
}
