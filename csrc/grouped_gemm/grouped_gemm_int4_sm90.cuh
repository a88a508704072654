// CUTLASS 3 ptr-array grouped GEMM with int4 weights and bf16 activations (W4A16) for sm90a, one
// expert per group, on CUTLASS's Hopper mixed-input mainloop (register-sourced A: the weights are
// loaded by TMA as packed codes and converted in the consumer warps before each wgmma).
//
//   out[rows_e, :] = x[rows_e, :] @ dq(weight[e])^T      x [S, K] bf16 row-major, the weight in the
//                                                          int4 format of docs/design.md §7
//
// CUTLASS converts only its A operand in registers and its TMA epilogue does not transpose, so the
// product is computed transposed, out^T = dq(W) @ x^T: CUTLASS's (M, N, K) is (weight rows, rows of
// the expert, K); A = the codes [N_w, K] (K-major), B = x's rows (K-major), D = out^T column-major,
// which is out row-major.
//
// Numerics: each code pair is dequantized in bf16x2 with exact steps, the reference's bits: the
// pair's nibbles go into the mantissas of 128.0 (0x4300 | u is the bf16 128 + u), minus 128 + z (an
// integer <= 143, exact in bf16) gives u - z exactly, and one bf16x2 multiply by s rounds (u - z) * s
// once to nearest even, as quant.dequantize_int4 does from fp32 (where the product is exact). Four
// instructions per pair (IMAD, LOP3, HSUB2, HMUL2; ptxas folds the byte extraction into the shared-
// memory byte loads), where CUTLASS's generic path converts each code to fp32, scales it there and
// converts back (~4.5 per code): the mainloop is bound by these conversions in the consumer warps, not
// by its bytes (the 128x32 tile's k-block loop: 243 -> 162 instructions per thread). The hook: the collective's
// TransformA slot (unused by CUTLASS's sm90 mixed-input mainloop) carries the tag ExactInt4Dequant,
// and a partial specialization of CUTLASS's MixedInputUtils for collectives with that tag replaces
// dequantize_A_kblock, inheriting everything else from the untagged collective's MixedInputUtils.
// The codes are read as stored (uint4, element 2j in the low nibble of byte j, which is CUTLASS's
// subbyte order); the scales and zero points are turned per call into [E, K/128, N_w] 32-bit words
// (TMA wants them N-major) holding bf16x2 {s, s} and {128 + z, 128 + z}, a small kernel in the same
// stream. The mainloop's scale type is float only for its 32-bit TMA and shared-memory plumbing:
// nothing but the dequantization reads the words.
//
// Included only by the grouped_gemm_int4_sm90_{none,swiglu}*.cu instantiation files.
#pragma once

#include <cuda_bf16.h>

#include "grouped_gemm/grouped_gemm_sm90.cuh"
// After the CUTLASS headers above, which it needs and which include it only where they use it.
#include "cutlass/detail/collective/mixed_input_utils.hpp"

namespace dots1 {
namespace sm90 {

// The tag in the TransformA slot that selects the exact dequantization.
struct ExactInt4Dequant {};

template <class Collective, class TransformA>
struct WithTransformA;

template <class Policy, class Tile, class EA, class SA, class EB, class SB, class Mma, class GA, class LA, class CA,
          class TA, class GB, class LB, class CB, class TB, class NewTA>
struct WithTransformA<cutlass::gemm::collective::CollectiveMma<Policy, Tile, EA, SA, EB, SB, Mma, GA, LA, CA, TA, GB,
                                                               LB, CB, TB>,
                      NewTA> {
  using type =
      cutlass::gemm::collective::CollectiveMma<Policy, Tile, EA, SA, EB, SB, Mma, GA, LA, CA, NewTA, GB, LB, CB, TB>;
};

// One pair of codes -> bf16x2 (u0 - z) * s, (u1 - z) * s. pair_bits holds u0 in bits 0-3 and u1 in bits
// 16-19 (other bits ignored); scale_pair = bf16x2 {s, s}, biased_zero_pair = bf16x2 {128 + z, 128 + z}.
__device__ __forceinline__ uint32_t dequantize_int4_pair(uint32_t pair_bits, uint32_t scale_pair,
                                                         uint32_t biased_zero_pair) {
  uint32_t biased;  // bf16x2 {128 + u0, 128 + u1}
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(biased) : "r"(pair_bits), "n"(0x000F000F), "n"(0x43004300));
  const __nv_bfloat162 diff = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&biased),
                                      *reinterpret_cast<const __nv_bfloat162*>(&biased_zero_pair));
  const __nv_bfloat162 w = __hmul2(diff, *reinterpret_cast<const __nv_bfloat162*>(&scale_pair));
  return *reinterpret_cast<const uint32_t*>(&w);
}

}  // namespace sm90
}  // namespace dots1

namespace cutlass::gemm::collective::detail {

template <int Stages, class ClusterShape, class Schedule, class Tile, class EA, class SA, class EB, class SB, class Mma,
          class GA, class LA, class CA, class GB, class LB, class CB, class TB>
struct MixedInputUtils<cutlass::gemm::collective::CollectiveMma<
    cutlass::gemm::MainloopSm90ArrayTmaGmmaWarpSpecializedMixedInput<Stages, ClusterShape, Schedule>, Tile, EA, SA, EB,
    SB, Mma, GA, LA, CA, dots1::sm90::ExactInt4Dequant, GB, LB, CB, TB>>
    : MixedInputUtils<cutlass::gemm::collective::CollectiveMma<
          cutlass::gemm::MainloopSm90ArrayTmaGmmaWarpSpecializedMixedInput<Stages, ClusterShape, Schedule>, Tile, EA,
          SA, EB, SB, Mma, GA, LA, CA, cute::identity, GB, LB, CB, TB>> {
  static_assert(dots1::kInt4GroupK % cute::size<2>(Tile{}) == 0,
                "a k tile must lie inside one quantization group (one scale per row per k tile)");

  // k block k_block of the consumer's A fragment: codes (uint4) -> bf16, with the scale and zero words
  // of the same fragment positions (CUTLASS's own partitioning of them, read as bf16x2 pairs).
  template <class EngineIn, class EngineOut, class LayoutIn, class LayoutOut, class... Ts>
  CUTLASS_DEVICE static void dequantize_A_kblock(cute::Tensor<EngineIn, LayoutIn> const& tCrA_load,
                                                 cute::Tensor<EngineOut, LayoutOut>& tCrA_mma,
                                                 cute::tuple<Ts...>& partitioned_extra_info, int const k_block) {
    using namespace cute;
    static_assert(is_rmem<EngineIn>::value && is_rmem<EngineOut>::value, "A is converted in registers");
    static_assert(is_same_v<typename EngineIn::value_type, cutlass::uint4b_t>, "the codes are uint4");
    static_assert(is_same_v<typename EngineOut::value_type, cutlass::bfloat16_t>, "A is converted to bf16");
    static_assert(size_v<LayoutIn> == cosize_v<LayoutIn> && size_v<LayoutOut> == cosize_v<LayoutOut>,
                  "A's register fragments are dense");

    Tensor src = tCrA_load(_, _, k_block);
    Tensor dst = tCrA_mma(_, _, k_block);
    Tensor scales = get<1>(partitioned_extra_info)(_, _, k_block);
    Tensor zeros = get<3>(partitioned_extra_info)(_, _, k_block);
    // Words of 8 codes; a wgmma A register holds two consecutive k of one row, so the 8 codes are 4
    // such pairs, each with one scale and zero (the pair's first element's).
    static_assert(decltype(size(src(_, 0)))::value % 8 == 0 && decltype(size(src(_, 0)) ==
                                                                         cosize(src(_, 0).layout()))::value,
                  "the first mode of A's fragment must be whole contiguous 32-bit words of codes");
    Tensor src_vm = group_modes<1, -1>(zipped_divide(src, Int<8>{}));
    Tensor dst_vm = group_modes<1, -1>(zipped_divide(dst, Int<8>{}));
    Tensor scales_vm = group_modes<1, -1>(zipped_divide(scales, Int<8>{}));
    Tensor zeros_vm = group_modes<1, -1>(zipped_divide(zeros, Int<8>{}));

    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size<1>(dst_vm); ++i) {
      const uint32_t codes = recast<uint32_t>(src_vm(_, i))(0);
      auto&& out = recast<uint32_t>(dst_vm(_, i));
      CUTLASS_PRAGMA_UNROLL
      for (int p = 0; p < 4; ++p) {
        // byte p = codes 2p (low nibble) and 2p + 1: times 0x1001 puts code 2p in bits 0-3 and code
        // 2p + 1 in bits 16-19 (the byte shifted by 12), with no carries between the copies
        const uint32_t pair_bits = ((codes >> (8 * p)) & 0xFFu) * 0x1001u;
        out(p) = dots1::sm90::dequantize_int4_pair(pair_bits, reinterpret_cast<const uint32_t&>(scales_vm(2 * p, i)),
                                                   reinterpret_cast<const uint32_t&>(zeros_vm(2 * p, i)));
      }
    }
  }
};

}  // namespace cutlass::gemm::collective::detail

namespace dots1 {
namespace sm90 {

using namespace cute;

// Cooperative 128 (weight rows) x 128 (rows of x) x 64 (k) tiles: the two consumer warpgroups take
// 64 weight rows each and convert them once per k block for all 128 activation rows.
struct Int4Cooperative128x128 : Cooperative<Shape<_128, _128, _64>> {};
// 256 rows of x per tile: each converted k block feeds twice the MMAs (m64n256k16 per warpgroup).
struct Int4Cooperative128x256 : Cooperative<Shape<_128, _256, _64>> {};
// 192 rows of x: an expert of 129-192 rows (balanced routing of a 4096-token prompt over 128 experts
// gives each 192) fills it where 128x256 would run a quarter of its MMAs on padding.
struct Int4Cooperative128x192 : Cooperative<Shape<_128, _192, _64>> {};
// Few rows of x per expert (short prompts, batched decode): a 128-row tile would spend its MMAs on
// padding, so 64 or 32 rows per tile (the weight k block is converted once per tile either way).
struct Int4Cooperative128x64 : Cooperative<Shape<_128, _64, _64>> {};
struct Int4Cooperative128x32 : Cooperative<Shape<_128, _32, _64>> {};

// The SwiGLU epilogue of the transposed product: accumulator rows are weight rows, in 16-row blocks
// [8 gate | 8 up] (the interleaved layout). wgmma gives each thread rows r and r + 8 of every 16-row
// block, i.e. gate and up of one feature, for two adjacent activation rows: silu(gate) * up goes from
// registers to global memory (one bf16 per store: the out row of each activation row is elsewhere).
// No shared memory, no source (RegisterEpilogueBase); D = out^T, column-major: arguments per group its
// first output row and (1, N_w/2, 0).
template <typename Element>
class SwiGLUInterleavedTransposedEpilogue : public RegisterEpilogueBase<Element, cutlass::layout::ColumnMajor> {
  using Base = RegisterEpilogueBase<Element, cutlass::layout::ColumnMajor>;
  using Base::params_;
  using Base::silu;

 public:
  CUTLASS_HOST_DEVICE explicit SwiGLUInterleavedTransposedEpilogue(typename Base::Params const& params)
      : Base(params) {}

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
            class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
                                 BlockCoordMNKL blk_coord_mnkl, cute::Tensor<FrgEngine, FrgLayout> const& acc,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    // Fragment of one wgmma tile: ((2 adjacent columns, 2 rows 8 apart, N/8 column blocks), MMA_M,
    // MMA_N); rows 8 apart are gate (r = 0) and up (r = 1) of one feature.
    static_assert(is_static<FrgLayout>::value, "accumulator layout must be static");
    static_assert(rank<0>(FrgLayout{}) == 3 && size<0, 0>(FrgLayout{}) == 2 && size<0, 1>(FrgLayout{}) == 2,
                  "expected the sm90 wgmma accumulator layout");
    static_assert(size<0>(BlockShapeMNK{}) % 16 == 0, "tile M must hold whole [8 gate | 8 up] row blocks");

    const int M = get<0>(problem_shape_mnkl);  // gate + up rows; a multiple of 16
    const int N = get<1>(problem_shape_mnkl);  // rows of x of this expert
    const auto l = get<3>(blk_coord_mnkl);
    Element* d = params_.ptr_D[l];
    const int64_t ldd = get<1>(params_.dD[l]);

    Tensor thr_coords = Base::thread_coords(M, N, blk_shape_mnk, blk_coord_mnkl, tiled_mma, thread_idx);
    CUTE_STATIC_ASSERT_V(size(thr_coords) == size(acc));

    CUTLASS_PRAGMA_UNROLL
    for (int mi = 0; mi < size<1>(FrgLayout{}); ++mi) {
      CUTLASS_PRAGMA_UNROLL
      for (int ni = 0; ni < size<2>(FrgLayout{}); ++ni) {
        CUTLASS_PRAGMA_UNROLL
        for (int b = 0; b < size<0, 2>(FrgLayout{}); ++b) {
          CUTLASS_PRAGMA_UNROLL
          for (int c = 0; c < 2; ++c) {
            const auto gate = make_coord(make_coord(c, 0, b), mi, ni);
            const auto up = make_coord(make_coord(c, 1, b), mi, ni);
            const int m = get<0>(thr_coords(gate));  // m % 16 < 8: a gate row
            const int n = get<1>(thr_coords(gate));
            if (m < M && n < N) {
              const int64_t feature = static_cast<int64_t>(m >> 4) * 8 + (m & 7);
              d[n * ldd + feature] = static_cast<Element>(silu(acc(gate)) * acc(up));
            }
          }
        }
      }
    }
  }
};

// CUTLASS 4.2's ptr-array mixed-input mainloop, in its scale-and-zero mode, sets up and updates only
// the zero term's TMA descriptor: its tensormap functions handle the scale's in the scale-only mode
// alone (an if / else-if on the conversion mode), so the scale loads run on an uninitialized descriptor
// (an illegal instruction on the H200, caught by compute-sanitizer at the scale's TMA load). This
// mainloop is CUTLASS's with those four functions completed: each calls CUTLASS's, then does the
// same for the scale's descriptor (the kernel calls them on this type, so CUTLASS's are not reached
// directly).
template <class Base>
struct MixedInputScaleAndZeroMainloop : Base {
  using typename Base::Params;
  using typename Base::TensorMapStorage;
  using NonVoidElementScale = typename Base::NonVoidElementScale;
  static_assert(Base::KernelConversionMode == Base::ConversionMode::ConvertAndScaleWithZero,
                "only the scale-and-zero mode lacks the scale descriptor");

  CUTLASS_DEVICE auto tensormaps_init(Params const& params, TensorMapStorage& smem, int32_t sm_count,
                                      int32_t sm_idx) {
    auto maps = Base::tensormaps_init(params, smem, sm_count, sm_idx);  // (A, B, scale, zero) in gmem
    Tensor p_scale = make_tensor(params.tma_load_scale.get_tma_descriptor(), Int<1>{}, Int<1>{});
    Tensor s_scale = make_tensor(make_smem_ptr(&smem.smem_tensormap_scale), Int<1>{}, Int<1>{});
    if (cute::elect_one_sync()) copy(recast<uint128_t>(p_scale), recast<uint128_t>(s_scale));
    __syncwarp();
    return maps;
  }

  template <class... TMs, class ProblemShapeMNKL>
  CUTLASS_DEVICE void tensormaps_perform_update(TensorMapStorage& smem, Params const& params,
                                                cute::tuple<TMs...> const& maps, ProblemShapeMNKL problem_shape_mnkl,
                                                int32_t next_group) {
    Base::tensormaps_perform_update(smem, params, maps, problem_shape_mnkl, next_group);
    if (cute::elect_one_sync()) {
      cute::tma_descriptor_replace_addr_in_shared_mem(smem.smem_tensormap_scale, params.ptr_S[next_group]);
      if constexpr (Base::IsGroupedGemmKernel) {
        // A (the weight) is the converted operand: M is the weight rows (no swap of A and B).
        const uint32_t M = get<0>(problem_shape_mnkl);
        const uint32_t K = get<2>(problem_shape_mnkl);
        cute::array<uint32_t, 5> shape = {1, 1, 1, 1, 1};
        cute::array<uint64_t, 5> stride = {0, 0, 0, 0, 0};
        Tensor scale = make_tensor(cutlass::gemm::collective::detail::get_logical_ptr(
                                       static_cast<NonVoidElementScale const*>(nullptr)),
                                   make_shape(M, ceil_div(K, params.chunk_size), Int<1>{}), params.dS[next_group]);
        cute::detail::fill_tma_gmem_shape_stride(params.tma_load_scale, scale, shape, stride);
        for (uint64_t& st : stride) st = st * cutlass::sizeof_bits_v<NonVoidElementScale> / 8;
        cute::tma_descriptor_replace_dims_strides_in_shared_mem(smem.smem_tensormap_scale, shape, stride);
      }
    }
  }

  template <class... TMs>
  CUTLASS_DEVICE void tensormaps_cp_fence_release(TensorMapStorage& smem, cute::tuple<TMs...> const& maps) {
    Base::tensormaps_cp_fence_release(smem, maps);  // waits for all descriptor updates, then A, B, zero
    tma_descriptor_cp_fence_release(get<2>(maps), smem.smem_tensormap_scale);
  }

  template <class... TMs>
  CUTLASS_DEVICE void tensormaps_fence_acquire(cute::tuple<TMs...> const& maps) {
    Base::tensormaps_fence_acquire(maps);
    cute::tma_descriptor_fence_acquire(get<2>(maps));
  }
};

// The plain product: CUTLASS's TMA store of D = out^T, column-major.
template <class Config, bool kSwiGLU>
struct Int4EpilogueFor : EpilogueFor<cutlass::bfloat16_t, Config, false, cutlass::layout::ColumnMajor> {};

template <class Config>
struct Int4EpilogueFor<Config, true> {
  using CollectiveOp = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<
      SwiGLUInterleavedTransposedEpilogue<cutlass::bfloat16_t>>;
};

template <class Config, bool kSwiGLU>
struct GroupedGemmInt4 {
  using Element = cutlass::bfloat16_t;         // activations and output
  using ElementCode = cutlass::uint4b_t;       // the stored codes u in [0, 15]
  // 32-bit words bf16x2 {s, s} and {128 + z, 128 + z}, typed float only for the mainloop's TMA and
  // shared-memory plumbing (see the numerics note at the top).
  using ElementScale = float;
  using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (N_w, rows_e, K)
  using UnderlyingShape = typename ProblemShape::UnderlyingProblemShape;
  using LayoutW = cutlass::layout::RowMajor;     // A = the codes [N_w, K], K contiguous
  using LayoutX = cutlass::layout::ColumnMajor;  // B = x's rows [rows_e, K], K contiguous
  static constexpr int kAlignW = 128 / cutlass::sizeof_bits<ElementCode>::value;  // 32 codes = 16 bytes
  static constexpr int kAlignX = 128 / cutlass::sizeof_bits<Element>::value;

  using CollectiveEpilogue = typename Int4EpilogueFor<Config, kSwiGLU>::CollectiveOp;

  using BuiltMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cute::tuple<ElementCode, ElementScale, ElementScale>,
      LayoutW*, kAlignW, Element, LayoutX*, kAlignX, float, typename Config::TileShape, typename Config::ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Config::KernelSchedule>::CollectiveOp;
  // The builder's collective is completed first: the tagged collective's MixedInputUtils derives from
  // its MixedInputUtils, which CUTLASS instantiates from inside the collective's definition.
  static_assert(sizeof(BuiltMainloop) > 0);
  using CollectiveMainloop =
      MixedInputScaleAndZeroMainloop<typename WithTransformA<BuiltMainloop, ExactInt4Dequant>::type>;
  static_assert(CollectiveMainloop::KernelConversionMode ==
                    CollectiveMainloop::ConversionMode::ConvertAndScaleWithZero,
                "expected the scale-and-zero conversion");

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  using StrideW = typename Kernel::InternalStrideA;
  using StrideX = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using StrideScale = typename CollectiveMainloop::StrideScale;
  static_assert(cute::is_same_v<cute::remove_cvref_t<decltype(get<1>(StrideW{}))>, _1>);
  static_assert(cute::is_same_v<cute::remove_cvref_t<decltype(get<1>(StrideX{}))>, _1>);
  static_assert(cute::is_same_v<cute::remove_cvref_t<decltype(get<0>(StrideD{}))>, _1>);

  // Argument arrays, then the scale and zero-point pair words [E, K/128, N_w], then CUTLASS's workspace;
  // each 256-byte aligned.
  struct Layout {
    size_t shapes, ptr_w, ptr_x, ptr_s, ptr_z, ptr_d, stride_w, stride_x, stride_s, stride_d, scales, zeros, cutlass,
        total;
  };
  static Layout layout(int64_t E, int64_t scale_elements, size_t cutlass_bytes) {
    WorkspaceCarver w;
    Layout l{};
    l.shapes = w.take(E * sizeof(UnderlyingShape));
    l.ptr_w = w.take(E * sizeof(void*));
    l.ptr_x = w.take(E * sizeof(void*));
    l.ptr_s = w.take(E * sizeof(void*));
    l.ptr_z = w.take(E * sizeof(void*));
    l.ptr_d = w.take(E * sizeof(void*));
    l.stride_w = w.take(E * sizeof(StrideW));
    l.stride_x = w.take(E * sizeof(StrideX));
    l.stride_s = w.take(E * sizeof(StrideScale));
    l.stride_d = w.take(E * sizeof(StrideD));
    l.scales = w.take(scale_elements * sizeof(float));
    l.zeros = w.take(scale_elements * sizeof(float));
    l.cutlass = w.take(cutlass_bytes);
    l.total = w.at;
    return l;
  }

  static typename Gemm::Arguments arguments(int64_t E, const Layout& l, char* ws, int sm_count) {
    typename Gemm::Arguments args = grouped_arguments<Gemm, kSwiGLU>(
        E, reinterpret_cast<UnderlyingShape*>(ws + l.shapes), reinterpret_cast<Element**>(ws + l.ptr_d),
        reinterpret_cast<StrideD*>(ws + l.stride_d), sm_count);
    args.mainloop.ptr_A = reinterpret_cast<const ElementCode**>(ws + l.ptr_w);
    args.mainloop.dA = reinterpret_cast<StrideW*>(ws + l.stride_w);
    args.mainloop.ptr_B = reinterpret_cast<const Element**>(ws + l.ptr_x);
    args.mainloop.dB = reinterpret_cast<StrideX*>(ws + l.stride_x);
    args.mainloop.ptr_S = reinterpret_cast<const ElementScale**>(ws + l.ptr_s);
    args.mainloop.dS = reinterpret_cast<const StrideScale*>(ws + l.stride_s);
    args.mainloop.chunk_size = kInt4GroupK;
    args.mainloop.ptr_Z = reinterpret_cast<const ElementScale**>(ws + l.ptr_z);
    return args;
  }
};

// scales [E, N, G] bf16, zeros [E, N, G] uint8 or null (zero point 8) -> scale_pairs [E, G, N] =
// bf16x2 {s, s} and biased_zero_pairs [E, G, N] = bf16x2 {128 + z, 128 + z} (exact: z <= 15). One
// thread per weight row: it reads its row's G groups in order (cache lines reused through L1) and
// writes each with its neighbours' (coalesced).
// (A template only for its linkage: this header is included by every instantiation file.)
template <typename ScaleBits>
__global__ void int4_scale_pairs_kernel(const ScaleBits* __restrict__ scales, const uint8_t* __restrict__ zeros,
                                        int64_t E, int64_t N, int64_t G, uint32_t* __restrict__ scale_pairs,
                                        uint32_t* __restrict__ biased_zero_pairs) {
  const int64_t rows = E * N;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = r / N, n = r - e * N;
    for (int64_t g = 0; g < G; ++g) {
      static_assert(sizeof(ScaleBits) == 2, "bf16 scale bits");
      const uint32_t s = scales[r * G + g];
      const uint32_t z = zeros ? zeros[r * G + g] : 8u;
      const uint32_t biased_zero = __bfloat16_as_ushort(__float2bfloat16_rn(128.0f + static_cast<float>(z)));
      const int64_t at = (e * G + g) * N + n;
      scale_pairs[at] = s * 0x10001u;
      biased_zero_pairs[at] = biased_zero * 0x10001u;
    }
  }
}

// Group e's problem (N_w, M_e, K), pointers and strides from the offsets (clamped into [0, S], so no
// group reaches outside x or out).
template <class G>
__global__ void build_int4_group_arguments_kernel(
    const int32_t* __restrict__ offsets, int64_t S, int64_t E, int N_w, int K, int N_out,
    const cutlass::bfloat16_t* x, const uint8_t* qweight, const float* scales_t, const float* zeros_t,
    cutlass::bfloat16_t* out, typename G::UnderlyingShape* shapes, const typename G::ElementCode** ptr_w,
    const cutlass::bfloat16_t** ptr_x, const float** ptr_s, const float** ptr_z, cutlass::bfloat16_t** ptr_d,
    typename G::StrideW* stride_w, typename G::StrideX* stride_x, typename G::StrideScale* stride_s,
    typename G::StrideD* stride_d) {
  const int64_t groups = K / kInt4GroupK;
  for_each_group(offsets, S, E, [&](int64_t e, int64_t lo, int64_t hi) {
    shapes[e] = typename G::UnderlyingShape(N_w, static_cast<int>(hi - lo), K);
    ptr_w[e] = reinterpret_cast<const typename G::ElementCode*>(qweight + e * static_cast<int64_t>(N_w) * (K / 2));
    ptr_x[e] = x + lo * K;
    ptr_s[e] = scales_t + e * groups * N_w;
    ptr_z[e] = zeros_t + e * groups * N_w;
    ptr_d[e] = out + lo * N_out;
    typename G::StrideW sw{};
    typename G::StrideX sx{};
    typename G::StrideScale ss{};
    typename G::StrideD sd{};
    get<0>(sw) = K;
    get<0>(sx) = K;
    get<1>(ss) = N_w;
    get<2>(ss) = groups * N_w;
    get<1>(sd) = N_out;
    stride_w[e] = sw;
    stride_x[e] = sx;
    stride_s[e] = ss;
    stride_d[e] = sd;
  });
}

template <class Config, bool kSwiGLU>
size_t int4_workspace_bytes(int64_t E, int64_t N, int64_t K, int sm_count) {
  const int64_t scale_elements = E * N * (K / kInt4GroupK);
  return plan_workspace<GroupedGemmInt4<Config, kSwiGLU>>(E, nullptr, sm_count, scale_elements).first.total;
}

template <class Config, bool kSwiGLU>
cudaError_t run_int4(const void* x, const uint8_t* qweight, const void* scales, const uint8_t* zeros,
                     const int32_t* expert_offsets, void* out, int64_t S, int64_t E, int64_t N, int64_t K,
                     void* workspace, size_t workspace_bytes_given, int sm_count, cudaStream_t stream) {
  using G = GroupedGemmInt4<Config, kSwiGLU>;
  if (E == 0 || S == 0) return cudaSuccess;
  if ((kSwiGLU && N % 16 != 0) || N % 8 != 0 || K % kInt4GroupK != 0 || N > INT32_MAX || K > INT32_MAX ||
      S > INT32_MAX)
    return cudaErrorInvalidValue;
  const int64_t groups = K / kInt4GroupK;
  const int64_t scale_elements = E * N * groups;
  char* ws = static_cast<char*>(workspace);
  const auto [l, args] = plan_workspace<G>(E, ws, sm_count, scale_elements);
  if (!workspace_ok(workspace, workspace_bytes_given, l.total)) return cudaErrorInvalidValue;

  auto* scales_t = reinterpret_cast<float*>(ws + l.scales);
  auto* zeros_t = reinterpret_cast<float*>(ws + l.zeros);
  const int threads = 256;
  const unsigned scale_blocks = static_cast<unsigned>(std::min<int64_t>((E * N + threads - 1) / threads, 4096));
  int4_scale_pairs_kernel<uint16_t><<<scale_blocks, threads, 0, stream>>>(
      static_cast<const uint16_t*>(scales), zeros, E, N, groups, reinterpret_cast<uint32_t*>(scales_t),
      reinterpret_cast<uint32_t*>(zeros_t));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((E + 127) / 128, 1024));
  build_int4_group_arguments_kernel<G><<<blocks, 128, 0, stream>>>(
      expert_offsets, S, E, static_cast<int>(N), static_cast<int>(K), static_cast<int>(kSwiGLU ? N / 2 : N),
      static_cast<const cutlass::bfloat16_t*>(x), qweight, scales_t, zeros_t, static_cast<cutlass::bfloat16_t*>(out),
      reinterpret_cast<typename G::UnderlyingShape*>(ws + l.shapes),
      reinterpret_cast<const typename G::ElementCode**>(ws + l.ptr_w),
      reinterpret_cast<const cutlass::bfloat16_t**>(ws + l.ptr_x), reinterpret_cast<const float**>(ws + l.ptr_s),
      reinterpret_cast<const float**>(ws + l.ptr_z), reinterpret_cast<cutlass::bfloat16_t**>(ws + l.ptr_d),
      reinterpret_cast<typename G::StrideW*>(ws + l.stride_w), reinterpret_cast<typename G::StrideX*>(ws + l.stride_x),
      reinterpret_cast<typename G::StrideScale*>(ws + l.stride_s),
      reinterpret_cast<typename G::StrideD*>(ws + l.stride_d));
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return run_gemm<typename G::Gemm>(args, ws + l.cutlass, stream);
}

template <class Config, bool kSwiGLU>
int int4_binary_version() {
  return kernel_binary_version<typename GroupedGemmInt4<Config, kSwiGLU>::Kernel>();
}

}  // namespace sm90
}  // namespace dots1

#define DOTS1_SM90_INT4_INSTANTIATE(Config, kSwiGLU)                                                          \
  template size_t dots1::sm90::int4_workspace_bytes<dots1::sm90::Config, kSwiGLU>(int64_t, int64_t, int64_t,  \
                                                                                  int);                      \
  template int dots1::sm90::int4_binary_version<dots1::sm90::Config, kSwiGLU>();                             \
  template cudaError_t dots1::sm90::run_int4<dots1::sm90::Config, kSwiGLU>(                                   \
      const void*, const uint8_t*, const void*, const uint8_t*, const int32_t*, void*, int64_t, int64_t, int64_t, \
      int64_t, void*, size_t, int, cudaStream_t);
