// EXPERIMENT, not built into the extension (issue 15; measured by gather_gemm.cu in this folder):
// the gate_up grouped GEMM reading its A rows straight from the token rows. Row r of the expert-sorted
// order is hidden[row_token[r]], so permute's [6T, H] row copy (0.25 ms at T=16384, write bound) and
// the GEMM's re-read of it would go away. It computes the same bits as permute + GEMM, but at
// T=16384 it runs at 6.38 ms against 3.93 for the GEMM over permuted rows (s31, H200; the forms
// tried and their times: bench/results/2026-12-01-h200-s31/summary.md). It lives here, next to its
// probe, until it wins; then it moves to csrc/grouped_gemm with an op, tests and a benchmark.
//
// CUTLASS's ptr-array TMA mainloop with one change in its producer warp: B (the expert's weight tile)
// still comes by TMA, A by cp.async, 8 lanes per row (one warp instruction reads 4 whole 128-byte
// rows), into the same 128-byte-swizzled stage the TMA would have filled. A stage's full barrier
// counts 33 arrivals: the leader's arrive.expect_tx of B's bytes, and each lane's
// cp.async.mbarrier.arrive.noinc, which lands once that lane's copies have (so the warp never waits
// for its own copies and every stage of the ring can be in flight). Alone, one warp gathers 2.2-2.3
// tiles of 128 x 64 per us per SM this way (gather_a_tiles.cu), twice what the GEMM consumes; inside
// the GEMM it does not keep up, and why is the open question (next: ncu's stall sampling on the
// producer warp). As in CUTLASS's own cp.async + wgmma mainloops, the consumers read the stage after
// the barrier with no proxy fence.
//
// Rows past the group's end read its last row (their products are never stored). A row_token outside
// [0, T) reads a row of NaNs, so that row's output is NaN: an unmissable poison, never another token.
#pragma once

#include "grouped_gemm/grouped_gemm_sm90.cuh"

namespace dots1 {
namespace sm90 {

// 64 bf16 / fp16 NaNs (one k chunk of a row), the source of a poisoned row.
__device__ __align__(128) const uint16_t kNaNRow[64] = {
#define DOTS1_NAN8 0x7fff, 0x7fff, 0x7fff, 0x7fff, 0x7fff, 0x7fff, 0x7fff, 0x7fff
    DOTS1_NAN8, DOTS1_NAN8, DOTS1_NAN8, DOTS1_NAN8, DOTS1_NAN8, DOTS1_NAN8, DOTS1_NAN8, DOTS1_NAN8
#undef DOTS1_NAN8
};

// The dispatch policy of the two-warp form: CUTLASS's, flagged to run the auxiliary producer warp.
template <class BasePolicy>
struct GatherAPolicy : BasePolicy {};

}  // namespace sm90
}  // namespace dots1

// CUTLASS's ptr-array kernels run their auxiliary mainloop warp (load_auxiliary) for policies with
// this trait.
template <class BasePolicy>
struct cutlass::gemm::kernel::detail::HasAuxiliaryLoad<dots1::sm90::GatherAPolicy<BasePolicy>> : cute::true_type {};

namespace dots1 {
namespace sm90 {

template <class Base, int kGatherWarps = 1>
struct GatherAMainloop : Base {
  static_assert(kGatherWarps == 1 || kGatherWarps == 2, "the gather runs on CUTLASS's mainloop warp, or on it and the auxiliary one");
  using DispatchPolicy =
      cute::conditional_t<kGatherWarps == 2, GatherAPolicy<typename Base::DispatchPolicy>, typename Base::DispatchPolicy>;
  using typename Base::ElementA;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::SmemLayoutA;
  using typename Base::TensorStorage;
  using typename Base::TileShape;
  using Base::IsGroupedGemmKernel;

  static constexpr int kBM = cute::size<0>(TileShape{});
  static constexpr int kBK = cute::size<2>(TileShape{});
  static constexpr int kStages = cute::size<2>(SmemLayoutA{});
  static constexpr int kChunkElems = 16 / static_cast<int>(sizeof(ElementA));  // elements per 16-byte copy
  static constexpr int kChunksPerRow = kBK / kChunkElems;                       // 8
  static constexpr int kRowsPerInstr = 32 / kChunksPerRow;                      // 4 rows per warp instruction
  static constexpr int kRowsPerWarp = kBM / kGatherWarps;
  static constexpr int kRowsPerLane = kRowsPerWarp / kRowsPerInstr;             // 32 (BM 128, one warp) ...
  static constexpr uint32_t kABytes = kBM * kBK * sizeof(ElementA);
  // The full barrier's arrivals per stage: the leader's (with B's transaction bytes) and one per lane.
  static constexpr int NumProducerThreadEvents = 1 + 32 * kGatherWarps;
  static constexpr int kTokenBatch = 8;               // rows whose tokens a lane fetches at once
  static constexpr int kTokensPerLane = kRowsPerWarp / 32;  // a warp's tokens, spread over its lanes
  static_assert(kRowsPerLane % kTokenBatch == 0 && kRowsPerLane % kTokensPerLane == 0 && kRowsPerWarp % 32 == 0,
                "whole batches of rows per lane");
  static constexpr uint32_t kBBytes = Base::TmaTransactionBytes - kABytes;
  static_assert(sizeof(ElementA) == 2 && kBK * sizeof(ElementA) == 128, "one 128-byte swizzle row per k chunk");
  static_assert(kChunksPerRow == 8 && kRowsPerWarp % kRowsPerInstr == 0, "8 lanes per row");
  static_assert(IsGroupedGemmKernel, "the gather mainloop is for the grouped (ptr-array) kernel");
  // A's stages are K-major 128-byte-swizzle atoms (8 rows x 128 bytes) stacked along M, stage after
  // stage: row r, chunk c of stage s sits at s * kABytes + r * 128 + 16 * c, swizzled on the address.
  static_assert(cute::is_same_v<typename Base::SmemLayoutAtomA, decltype(cute::GMMA::Layout_K_SW128_Atom<ElementA>{})>,
                "A's shared layout must be the K-major 128-byte swizzle");
  static_assert(cute::cosize(SmemLayoutA{}) == kBM * kBK * kStages, "A's stages must be dense");

  struct Arguments : Base::Arguments {
    const ElementA* hidden = nullptr;          // [T, K] the token rows
    const int32_t* row_token = nullptr;        // [S] the token of each row of the expert-sorted order
    const int32_t* expert_offsets = nullptr;   // [E + 1]
    int64_t num_tokens = 0;                    // T
    int64_t num_rows = 0;                      // S
    int k_dim = 0;                             // K (hidden's row length)
  };

  struct Params : Base::Params {
    const ElementA* hidden;
    const int32_t* row_token;
    const int32_t* expert_offsets;
    int64_t num_tokens;
    int64_t num_rows;
    int k_dim;
  };

  // The rows of the group a producer works on: [begin, begin + rows) of the expert-sorted order.
  struct GatherGroup {
    int64_t begin = 0;
    int rows = 0;
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape shapes, Arguments const& args, void* workspace) {
    Params params{Base::to_underlying_arguments(shapes, args, workspace), args.hidden, args.row_token,
                  args.expert_offsets, args.num_tokens, args.num_rows, args.k_dim};
    params.tma_transaction_bytes = kBBytes;  // the barrier's transactions: B's TMA only
    return params;
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape shapes, Arguments const& args) {
    return Base::can_implement(shapes, args) && args.hidden != nullptr && args.row_token != nullptr &&
           args.expert_offsets != nullptr && args.k_dim % kChunkElems == 0 &&
           reinterpret_cast<uintptr_t>(args.hidden) % 16 == 0;
  }

  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL, Params const& params) const {
    auto tensors = Base::load_init(problem_shape_MNKL, params);
    return cute::make_tuple(cute::get<0>(tensors), cute::get<1>(tensors), GatherGroup{});
  }

  // Called by the kernel whenever the producer moves to another group: remembers the group's rows.
  template <class InputTensors, class ProblemShape_MNKL>
  CUTLASS_DEVICE InputTensors tensors_perform_update(InputTensors const& input_tensors, Params const& params,
                                                     ProblemShape_MNKL problem_shape_mnkl, int32_t next_batch) {
    InputTensors updated = input_tensors;
    // The same clamp as build_group_arguments_kernel: the group's first row within [0, S].
    const int64_t begin = static_cast<int64_t>(params.expert_offsets[next_batch]);
    cute::get<2>(updated) = GatherGroup{begin < 0 ? 0 : (begin > params.num_rows ? params.num_rows : begin),
                                        static_cast<int>(cute::get<0>(problem_shape_mnkl))};
    return updated;
  }

  // Producer warp 0 (CUTLASS's mainloop warp): B by TMA, and the first kGatherWarps-th of A's rows.
  template <class TensorA, class TensorB, class TensorMapA, class TensorMapB, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           cute::tuple<TensorA, TensorB, GatherGroup> const& load_inputs,
                           cute::tuple<TensorMapA, TensorMapB> const& input_tensormaps, BlockCoord const& blk_coord,
                           KTileIterator k_tile_iter, int k_tile_count, int thread_idx, uint32_t block_rank_in_cluster,
                           TensorStorage& shared_tensors) {
    using namespace cute;
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), typename Base::SmemLayoutB{});
    Tensor gB_nkl = get<1>(load_inputs);
    auto block_tma_b = params.tma_load_b.get_slice(0);  // no cluster
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
    Tensor tBgB = block_tma_b.partition_S(gB_nkl(_, _, n_coord, _, l_coord));  // (TMA,TMA_N,TMA_K,k)
    Tensor tBsB = block_tma_b.partition_D(sB);                                 // (TMA,TMA_N,TMA_K,PIPE)
    const bool leader = cute::elect_one_sync();
    gather_a(params, pipeline, smem_pipe_write, get<2>(load_inputs), static_cast<int>(m_coord), k_tile_iter,
             k_tile_count, thread_idx % 32, 0, shared_tensors,
             [&](typename MainloopPipeline::ProducerBarrierType* barrier, int k_tile, int stage) {
               if (leader) {
                 copy(params.tma_load_b.with(get<1>(input_tensormaps), *barrier, uint16_t{0}), tBgB(_, _, _, k_tile),
                      tBsB(_, _, _, stage));
               }
             });
  }

  // Producer warp 1 (CUTLASS's auxiliary mainloop warp, run when HasAuxiliaryLoad): the second half.
  template <class TensorA, class TensorB, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load_auxiliary(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                                     cute::tuple<TensorA, TensorB, GatherGroup> const& load_inputs,
                                     BlockCoord const& blk_coord, KTileIterator k_tile_iter, int k_tile_count,
                                     int thread_idx, uint32_t block_rank_in_cluster, TensorStorage& shared_tensors) {
    if constexpr (kGatherWarps == 2) {
      gather_a(params, pipeline, smem_pipe_write, cute::get<2>(load_inputs), static_cast<int>(cute::get<0>(blk_coord)),
               k_tile_iter, k_tile_count, thread_idx % 32, 1, shared_tensors,
               [](typename MainloopPipeline::ProducerBarrierType*, int, int) {});
    }
  }

 private:
  // Warp `warp` of the gatherers, over k_tile_count stages of tile row m_tile: waits for each stage to
  // be free (the leader, in warp 0, also arrives on it expecting B's bytes), issue_b(barrier, k_tile,
  // stage), copies this warp's rows of A and arrives on the stage's full barrier per lane.
  template <class KTileIterator, class IssueB>
  CUTLASS_DEVICE void gather_a(Params const& params, MainloopPipeline& pipeline, PipelineState smem_pipe_write,
                               GatherGroup group, int m_tile, KTileIterator k_tile_iter, int k_tile_count, int lane,
                               int warp, TensorStorage& shared_tensors, IssueB const& issue_b) {
    const uint32_t smem_a = cute::cast_smem_ptr_to_uint(shared_tensors.smem_A.data());
    // This lane copies chunk `chunk` of the tile rows first_row + j, j < kRowsPerLane; warp instruction
    // j covers rows first_row + j for the four row groups (4 whole rows).
    const int chunk = lane % kChunksPerRow;
    const int warp_row0 = warp * kRowsPerWarp;
    const int first_row = warp_row0 + (lane / kChunksPerRow) * kRowsPerLane;
    const int tile_row0 = m_tile * kBM;
    const auto* hidden = reinterpret_cast<const uint16_t*>(params.hidden);
    const int K = params.k_dim;
    // This warp's tokens, once per tile: lane l holds those of rows warp_row0 + l * kTokensPerLane + i
    // (-1: out of [0, T), read as NaNs). Rows past the group's end take its last row's token.
    int32_t my_tokens[kTokensPerLane];
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kTokensPerLane; ++i) {
      const int m = min(tile_row0 + warp_row0 + lane * kTokensPerLane + i, group.rows - 1);
      const int32_t token = __ldg(params.row_token + group.begin + m);
      my_tokens[i] = token >= 0 && token < params.num_tokens ? token : -1;
    }

    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count) {
      pipeline.producer_acquire(smem_pipe_write);
      auto* full_barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int write_stage = smem_pipe_write.index();
      const int k_tile = static_cast<int>(*k_tile_iter);
      issue_b(full_barrier, k_tile, write_stage);
      const int col = k_tile * kBK + chunk * kChunkElems;
      const bool col_in = col < K;  // past K: zero-filled, as TMA fills out-of-bounds boxes
      const uint32_t stage_base = smem_a + static_cast<uint32_t>(write_stage) * kABytes;
      // The tokens come from the holder lanes by shuffle, a batch at a time before the batch's copies:
      // no memory access between copies (s31: a token load per copy ran the GEMM at half speed, loads
      // of 8 at a time at 0.4x: a load queues behind the warp's outstanding copies).
      CUTLASS_PRAGMA_UNROLL
      for (int j0 = 0; j0 < kRowsPerLane; j0 += kTokenBatch) {
        int32_t token[kTokenBatch];
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < kTokenBatch; ++i) {
          const int r = first_row - warp_row0 + j0 + i;  // (j0 + i) % kTokensPerLane is the same for every lane
          token[i] = __shfl_sync(0xffffffffu, my_tokens[(j0 + i) % kTokensPerLane], r / kTokensPerLane);
        }
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < kTokenBatch; ++i) {
          const int r = first_row + j0 + i;
          const uint16_t* src = token[i] >= 0 ? hidden + static_cast<int64_t>(token[i]) * K + col
                                              : kNaNRow + chunk * kChunkElems;
          // The 128-byte swizzle on the shared address: 16-byte chunk bits [4, 7) ^= row bits [7, 10).
          uint32_t dst = stage_base + static_cast<uint32_t>(r) * 128 + static_cast<uint32_t>(chunk) * 16;
          dst ^= ((dst >> 7) & 7) << 4;
          asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(col_in ? src : hidden),
                       "r"(col_in ? 16 : 0)
                       : "memory");
        }
      }
      // Arrives on the stage's full barrier once this lane's copies have landed.
      asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(
                       cute::cast_smem_ptr_to_uint(full_barrier))
                   : "memory");
      ++k_tile_iter;
      ++smem_pipe_write;
    }
  }
};

}  // namespace sm90
}  // namespace dots1

namespace dots1 {
namespace sm90 {

// The SwiGLU gate_up GEMM of GroupedGemm<Element, Config, true> with the gather mainloop: the same
// workspace layout and argument arrays (ptr_A is set but never read: A comes by row_token).
template <typename Element, class Config, int kGatherWarps>
struct GroupedGemmGatherA {
  using Plain = GroupedGemm<Element, Config, true>;
  using ProblemShape = typename Plain::ProblemShape;
  using UnderlyingShape = typename Plain::UnderlyingShape;
  using StrideA = typename Plain::StrideA;
  using StrideB = typename Plain::StrideB;
  using StrideD = typename Plain::StrideD;
  using Layout = typename Plain::Layout;
  static constexpr int kAlign = Plain::kAlign;
  using CollectiveMainloop = GatherAMainloop<typename Plain::CollectiveMainloop, kGatherWarps>;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, typename Plain::CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static Layout layout(int64_t E, size_t cutlass_bytes) { return Plain::layout(E, cutlass_bytes); }

  static typename Gemm::Arguments arguments(int64_t E, const Layout& l, char* ws, int sm_count) {
    typename Gemm::Arguments args = grouped_arguments<Gemm, true>(
        E, reinterpret_cast<UnderlyingShape*>(ws + l.shapes), reinterpret_cast<Element**>(ws + l.ptr_d),
        reinterpret_cast<StrideD*>(ws + l.stride_d), sm_count);
    args.mainloop.ptr_A = reinterpret_cast<const Element**>(ws + l.ptr_a);
    args.mainloop.dA = reinterpret_cast<StrideA*>(ws + l.stride_a);
    args.mainloop.ptr_B = reinterpret_cast<const Element**>(ws + l.ptr_b);
    args.mainloop.dB = reinterpret_cast<StrideB*>(ws + l.stride_b);
    return args;
  }
};

template <typename Element, class Config, int kGatherWarps>
size_t gather_workspace_bytes(int64_t E, int sm_count) {
  return plan_workspace<GroupedGemmGatherA<Element, Config, kGatherWarps>>(E, nullptr, sm_count).first.total;
}

// out[r] = SwiGLU(hidden[row_token[r]] @ weight[e]^T) for the rows r of each expert e (expert_offsets),
// hidden [T, K], row_token [S], weight [E, N, K] interleaved gate/up, out [S, N/2].
template <typename Element, class Config, int kGatherWarps>
cudaError_t run_gather(const void* hidden, const int32_t* row_token, int64_t T, const void* weight,
                       const int32_t* expert_offsets, void* out, int64_t S, int64_t E, int64_t N, int64_t K,
                       void* workspace, size_t workspace_bytes_given, int sm_count, cudaStream_t stream) {
  using G = GroupedGemmGatherA<Element, Config, kGatherWarps>;
  using UnderlyingShape = typename G::UnderlyingShape;
  using StrideA = typename G::StrideA;
  using StrideB = typename G::StrideB;
  using StrideD = typename G::StrideD;
  if (E == 0 || S == 0) return cudaSuccess;
  if (N % 16 != 0 || K % G::kAlign != 0 || N > INT32_MAX || K > INT32_MAX || S > INT32_MAX || T > INT32_MAX)
    return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  auto [l, args] = plan_workspace<G>(E, ws, sm_count);
  if (!workspace_ok(workspace, workspace_bytes_given, l.total)) return cudaErrorInvalidValue;
  args.mainloop.hidden = static_cast<const Element*>(hidden);
  args.mainloop.row_token = row_token;
  args.mainloop.expert_offsets = expert_offsets;
  args.mainloop.num_tokens = T;
  args.mainloop.num_rows = S;
  args.mainloop.k_dim = static_cast<int>(K);

  const int threads = 128;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((E + threads - 1) / threads, 1024));
  build_group_arguments_kernel<G, Element><<<blocks, threads, 0, stream>>>(
      expert_offsets, S, E, static_cast<int>(N), static_cast<int>(K), static_cast<int>(N / 2),
      static_cast<const Element*>(hidden), static_cast<const Element*>(weight), static_cast<Element*>(out),
      reinterpret_cast<UnderlyingShape*>(ws + l.shapes), reinterpret_cast<const Element**>(ws + l.ptr_a),
      reinterpret_cast<const Element**>(ws + l.ptr_b), reinterpret_cast<Element**>(ws + l.ptr_d),
      reinterpret_cast<StrideA*>(ws + l.stride_a), reinterpret_cast<StrideB*>(ws + l.stride_b),
      reinterpret_cast<StrideD*>(ws + l.stride_d));
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return run_gemm<typename G::Gemm>(args, ws + l.cutlass, stream);
}

}  // namespace sm90
}  // namespace dots1
