// CUTLASS 3 ptr-array grouped GEMM for sm90a (TMA, warp-specialised, wgmma), one expert per group,
// with the per-group problem shapes, pointers and strides built on the device from expert_offsets.
//
//   out[rows_e, :] = x[rows_e, :] @ weight[e]^T      x [S, K] row-major, weight [E, N, K] (K contiguous,
//                                                     i.e. CUTLASS's column-major B), out [S, N] row-major
//
// kSwiGLU instantiations take weight rows in the interleaved gate/up layout (grouped_gemm.h) and write
// silu(gate) * up, [S, N/2], straight from the accumulator registers (SwiGLUInterleavedEpilogue).
//
// Each configuration is instantiated in its own .cu file (grouped_gemm_sm90_<config>.cu) so the
// expensive template instantiations compile in parallel. Included only by those files.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

// CUTLASS's sm100 headers (pulled in by the collective builders) capture `this` implicitly, which
// C++20 deprecates; the warning is theirs, not ours.
#pragma nv_diag_suppress 2908

// Device-side assert() in cute becomes a function call inside the wgmma pipeline, which makes ptxas
// serialise the wgmmas (warning C7510) and costs most of the speed. CUTLASS's release builds define
// NDEBUG; these files hold only CUTLASS code, so define it here.
#ifndef NDEBUG
#define NDEBUG
#endif

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/detail.hpp"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "grouped_gemm/grouped_gemm.h"

namespace dots1 {
namespace sm90 {

using namespace cute;

// The cooperative schedule (two consumer warpgroups on one tile) with tiles of TileShape_, no cluster.
// (2x1 clusters multicasting the weight tile to two row tiles of one expert measured slower on the H200
// at every T but 16384 balanced, where ping-pong gained 1.6%: bench/results/2026-12-01-h200-b0ed974-clusters-dropped.)
template <class TileShape_>
struct Cooperative {
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
  using TileShape = TileShape_;
  using ClusterShape = Shape<_1, _1, _1>;
};

struct Cooperative128x256 : Cooperative<Shape<_128, _256, _64>> {};

struct Pingpong64x256 {
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
  using TileShape = Shape<_64, _256, _64>;
  using ClusterShape = Shape<_1, _1, _1>;
};

// What the epilogues that store straight from the accumulator registers (SwiGLUInterleavedEpilogue
// below, SwiGLUInterleavedTransposedEpilogue in grouped_gemm_int4_sm90.cuh) share: CUTLASS's
// interface of a ptr-array epilogue with no shared memory (the mainloop gets the stages back) and no
// source; the arguments are the per-group output pointers and strides (D in LayoutD). The derived
// class writes the tile in its operator().
template <typename Element, class LayoutD>
class RegisterEpilogueBase {
 public:
  using EpilogueSchedule = cutlass::epilogue::PtrArrayNoSmemWarpSpecialized;
  using DispatchPolicy = EpilogueSchedule;
  // Only for the types the kernel and adapter read from it (ElementAccumulator); never called.
  using ThreadEpilogueOp = cutlass::epilogue::thread::LinearCombination<Element, 1, float, float>;
  using ElementAccumulator = float;
  using ElementC = Element;  // no source is read
  using ElementD = Element;
  using StrideC = cutlass::detail::TagToStrideC_t<LayoutD*>;
  using StrideD = StrideC;
  using InternalStrideC = cute::remove_pointer_t<StrideC>;
  using InternalStrideD = cute::remove_pointer_t<StrideD>;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;
  struct SharedStorage {};
  using TensorMapStorage = SharedStorage;

  struct Arguments {
    Element** ptr_D = nullptr;  // per group: its first output row
    StrideD dD = nullptr;       // per group: the output's strides
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&, int) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.ptr_D != nullptr && args.dD != nullptr;
  }

  CUTLASS_HOST_DEVICE explicit RegisterEpilogueBase(Params const& params) : params_(params) {}

 protected:
  CUTLASS_DEVICE static float silu(float g) { return g / (1.0f + __expf(-g)); }

  // The problem coordinates (m, n) of this thread's accumulator entries of the tile at blk_coord_mnkl,
  // in the accumulator fragment's layout.
  template <class BlockShapeMNK, class BlockCoordMNKL, class TiledMma>
  CUTLASS_DEVICE static auto thread_coords(int M, int N, BlockShapeMNK blk_shape_mnk, BlockCoordMNKL blk_coord_mnkl,
                                           TiledMma tiled_mma, int thread_idx) {
    Tensor coords = local_tile(make_identity_tensor(make_shape(M, N)), take<0, 2>(blk_shape_mnk),
                               make_coord(get<0>(blk_coord_mnkl), get<1>(blk_coord_mnkl)));
    return tiled_mma.get_thread_slice(thread_idx).partition_C(coords);
  }

  Params params_;
};

// Epilogue of the gate_up GEMM over interleaved weights: accumulator columns come in 16-column
// blocks [8 gate | 8 up] of the same 8 features. wgmma's accumulator layout gives every thread the
// same two adjacent columns of each 8-column block, so one thread holds gate and up of the features
// it writes: silu(gate) * up goes from registers to global memory, 2 outputs (4 bytes) per store, and
// the [S, N] product never exists. Arguments: per group its first output row and (N/2, 1, 0).
template <typename Element>
class SwiGLUInterleavedEpilogue : public RegisterEpilogueBase<Element, cutlass::layout::RowMajor> {
  using Base = RegisterEpilogueBase<Element, cutlass::layout::RowMajor>;
  using Base::params_;
  using Base::silu;

 public:
  CUTLASS_HOST_DEVICE explicit SwiGLUInterleavedEpilogue(typename Base::Params const& params) : Base(params) {}

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
            class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_mnk,
                                 BlockCoordMNKL blk_coord_mnkl, cute::Tensor<FrgEngine, FrgLayout> const& acc,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    // The fragment of one wgmma tile is ((2 adjacent columns, 2 rows 8 apart, N/8 column blocks),
    // MMA_M, MMA_N); gate block b (even) and up block b + 1 are 8 columns apart.
    static_assert(is_static<FrgLayout>::value, "accumulator layout must be static");
    static_assert(rank<0>(FrgLayout{}) == 3 && size<0, 0>(FrgLayout{}) == 2 && size<0, 1>(FrgLayout{}) == 2 &&
                      size<0, 2>(FrgLayout{}) % 2 == 0,
                  "expected the sm90 wgmma accumulator layout");
    static_assert(size<1>(BlockShapeMNK{}) % 16 == 0, "tile N must hold whole [8 gate | 8 up] blocks");

    const int M = get<0>(problem_shape_mnkl);
    const int N = get<1>(problem_shape_mnkl);  // gate + up columns; a multiple of 16
    const auto l = get<3>(blk_coord_mnkl);
    Element* d = params_.ptr_D[l];
    const int64_t ldd = get<0>(params_.dD[l]);

    Tensor thr_coords = Base::thread_coords(M, N, blk_shape_mnk, blk_coord_mnkl, tiled_mma, thread_idx);
    CUTE_STATIC_ASSERT_V(size(thr_coords) == size(acc));

    CUTLASS_PRAGMA_UNROLL
    for (int mi = 0; mi < size<1>(FrgLayout{}); ++mi) {
      CUTLASS_PRAGMA_UNROLL
      for (int ni = 0; ni < size<2>(FrgLayout{}); ++ni) {
        CUTLASS_PRAGMA_UNROLL
        for (int b = 0; b < size<0, 2>(FrgLayout{}); b += 2) {
          CUTLASS_PRAGMA_UNROLL
          for (int r = 0; r < 2; ++r) {
            const auto gate = make_coord(make_coord(0, r, b), mi, ni);
            const auto gate_next = make_coord(make_coord(1, r, b), mi, ni);
            const auto up = make_coord(make_coord(0, r, b + 1), mi, ni);
            const auto up_next = make_coord(make_coord(1, r, b + 1), mi, ni);
            const int m = get<0>(thr_coords(gate));
            const int n = get<1>(thr_coords(gate));  // n % 16 < 8: a gate column
            if (m < M && n < N) {
              cutlass::Array<Element, 2> out;
              out[0] = static_cast<Element>(silu(acc(gate)) * acc(up));
              out[1] = static_cast<Element>(silu(acc(gate_next)) * acc(up_next));
              const int64_t col = static_cast<int64_t>(n >> 4) * 8 + (n & 7);
              *reinterpret_cast<cutlass::Array<Element, 2>*>(d + m * ldd + col) = out;
            }
          }
        }
      }
    }
  }
};

// The collective epilogue of each instantiation: CUTLASS's TMA store of the plain product (D in
// LayoutD; the int4 GEMM stores out^T column-major), or the fused SwiGLU above.
template <typename Element, class Config, bool kSwiGLU, class LayoutD = cutlass::layout::RowMajor>
struct EpilogueFor;

template <typename Element, class Config, class LayoutD>
struct EpilogueFor<Element, Config, false, LayoutD> {
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;
  using CollectiveOp = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Config::TileShape, typename Config::ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD*, kAlign,  // no source C: D = acc
      Element, LayoutD*, kAlign, typename Config::EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<Element, float, void, float>>::CollectiveOp;
};

template <typename Element, class Config>
struct EpilogueFor<Element, Config, true, cutlass::layout::RowMajor> {
  using CollectiveOp =
      cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<SwiGLUInterleavedEpilogue<Element>>;
};

// ---- The workspace, the arguments and the run, shared with the int4 GEMM (grouped_gemm_int4_sm90.cuh) ----

// Offsets of consecutive pieces of a workspace, each 256-byte aligned.
struct WorkspaceCarver {
  size_t at = 0;  // the end so far: the total once every piece is taken
  size_t take(size_t bytes) {
    const size_t here = at;
    at = (at + bytes + 255) / 256 * 256;
    return here;
  }
};

// The arguments of a ptr-array grouped GEMM, but for the mainloop's (the caller sets those): E groups
// whose problem shapes, output pointers and output strides are arrays in the workspace. Problem
// shapes live only on the device (host_problem_shapes = nullptr): no host read of the offsets, so the
// launch captures in a CUDA graph.
template <class Gemm, bool kSwiGLU, class UnderlyingShape, typename Element, class StrideD>
typename Gemm::Arguments grouped_arguments(int64_t E, UnderlyingShape* shapes, Element** ptr_d, StrideD* stride_d,
                                           int sm_count) {
  cutlass::KernelHardwareInfo hw_info;
  hw_info.device_id = 0;  // only informative: sm_count is given
  hw_info.sm_count = sm_count;
  typename Gemm::Arguments args;
  args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  args.problem_shape = {static_cast<int>(E), shapes, nullptr};
  if constexpr (kSwiGLU) {
    args.epilogue = {ptr_d, stride_d};
  } else {
    decltype(args.epilogue.thread) fusion{};
    fusion.alpha = 1.0f;
    fusion.beta = 0.0f;
    args.epilogue = {fusion, nullptr, nullptr, ptr_d, stride_d};
  }
  args.hw_info = hw_info;
  return args;
}

// G's workspace layout and GEMM arguments for E groups at ws (nullptr: for the size only). CUTLASS's
// own workspace comes last and its size depends on the arguments, which point into the layout: a
// probe without it first. layout_args: G::layout's arguments between E and CUTLASS's bytes.
template <class G, class... LayoutArgs>
std::pair<typename G::Layout, typename G::Gemm::Arguments> plan_workspace(int64_t E, char* ws, int sm_count,
                                                                          LayoutArgs... layout_args) {
  const typename G::Layout probe = G::layout(E, layout_args..., 0);
  const size_t cutlass_bytes = G::Gemm::get_workspace_size(G::arguments(E, probe, ws, sm_count));
  const typename G::Layout l = G::layout(E, layout_args..., cutlass_bytes);
  return {l, G::arguments(E, l, ws, sm_count)};
}

// The caller's workspace: at least the bytes the layout needs, 256-byte aligned.
inline bool workspace_ok(const void* workspace, size_t bytes_given, size_t bytes_needed) {
  return bytes_given >= bytes_needed && reinterpret_cast<uintptr_t>(workspace) % 256 == 0;
}

// CUTLASS's part of a run, once the argument arrays are being filled in `stream`: checks, initializes
// its workspace, launches.
template <class Gemm>
cudaError_t run_gemm(const typename Gemm::Arguments& args, void* cutlass_workspace, cudaStream_t stream) {
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
  if (gemm.initialize(args, cutlass_workspace, stream) != cutlass::Status::kSuccess) return cudaErrorUnknown;
  if (gemm.run(stream) != cutlass::Status::kSuccess) {
    const cudaError_t err = cudaGetLastError();
    return err != cudaSuccess ? err : cudaErrorUnknown;
  }
  return cudaGetLastError();
}

// PTX/SASS version of Kernel as the runtime would launch it on the current device (90 when the sm_90a
// cubin is there; 80 when only the portable sm_80 build could be loaded), 0 if none.
template <class Kernel>
int kernel_binary_version() {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, cutlass::device_kernel<Kernel>) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return attr.binaryVersion;
}

// Calls f(e, lo, hi) for the groups e of this thread (a grid-stride loop over E), with rows [lo, hi)
// of group e: its offsets clamped into [0, S], so that no group reaches outside x or out.
template <class F>
__device__ __forceinline__ void for_each_group(const int32_t* __restrict__ offsets, int64_t S, int64_t E,
                                               const F& f) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < E;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t lo = min(max(static_cast<int64_t>(offsets[e]), int64_t{0}), S);
    const int64_t hi = min(max(static_cast<int64_t>(offsets[e + 1]), lo), S);
    f(e, lo, hi);
  }
}

// ---- The bf16 / fp16 GEMM ----

template <typename Element, class Config, bool kSwiGLU>
struct GroupedGemm {
  using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (M, N, K) per group
  using UnderlyingShape = typename ProblemShape::UnderlyingProblemShape;
  using LayoutA = cutlass::layout::RowMajor;     // x rows
  using LayoutB = cutlass::layout::ColumnMajor;  // weight[e] is [N, K] with K contiguous
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;  // 16-byte TMA alignment

  using CollectiveEpilogue = typename EpilogueFor<Element, Config, kSwiGLU>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlign, Element, LayoutB*, kAlign, float,
      typename Config::TileShape, typename Config::ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Config::KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  // Every stride is (leading dimension, 1, 0): only the leading dimension is set below.
  static_assert(cute::is_same_v<cute::remove_cvref_t<decltype(get<1>(StrideA{}))>, _1>);
  static_assert(cute::is_same_v<cute::remove_cvref_t<decltype(get<1>(StrideB{}))>, _1>);
  static_assert(cute::is_same_v<cute::remove_cvref_t<decltype(get<1>(StrideD{}))>, _1>);

  // The argument arrays at the front of the workspace, each 256-byte aligned; CUTLASS's own
  // workspace follows.
  struct Layout {
    size_t shapes, ptr_a, ptr_b, ptr_d, stride_a, stride_b, stride_d, cutlass, total;
  };
  static Layout layout(int64_t E, size_t cutlass_bytes) {
    WorkspaceCarver w;
    Layout l{};
    l.shapes = w.take(E * sizeof(UnderlyingShape));
    l.ptr_a = w.take(E * sizeof(void*));
    l.ptr_b = w.take(E * sizeof(void*));
    l.ptr_d = w.take(E * sizeof(void*));
    l.stride_a = w.take(E * sizeof(StrideA));
    l.stride_b = w.take(E * sizeof(StrideB));
    l.stride_d = w.take(E * sizeof(StrideD));
    l.cutlass = w.take(cutlass_bytes);
    l.total = w.at;
    return l;
  }

  static typename Gemm::Arguments arguments(int64_t E, const Layout& l, char* ws, int sm_count) {
    typename Gemm::Arguments args = grouped_arguments<Gemm, kSwiGLU>(
        E, reinterpret_cast<UnderlyingShape*>(ws + l.shapes), reinterpret_cast<Element**>(ws + l.ptr_d),
        reinterpret_cast<StrideD*>(ws + l.stride_d), sm_count);
    args.mainloop = {reinterpret_cast<const Element**>(ws + l.ptr_a), reinterpret_cast<StrideA*>(ws + l.stride_a),
                     reinterpret_cast<const Element**>(ws + l.ptr_b), reinterpret_cast<StrideB*>(ws + l.stride_b)};
    return args;
  }
};

// Builds group e's problem shape (M_e, N, K), its pointers and its strides from the offsets; out
// has N_out columns (N, or N/2 for the SwiGLU epilogue). Offsets are clamped into [0, S] so that no
// group reaches outside x or out.
template <class G, typename Element>
__global__ void build_group_arguments_kernel(const int32_t* __restrict__ offsets, int64_t S, int64_t E, int N, int K,
                                             int N_out,
                                             const Element* x, const Element* weight, Element* out,
                                             typename G::UnderlyingShape* shapes, const Element** ptr_a,
                                             const Element** ptr_b, Element** ptr_d, typename G::StrideA* stride_a,
                                             typename G::StrideB* stride_b, typename G::StrideD* stride_d) {
  for_each_group(offsets, S, E, [&](int64_t e, int64_t lo, int64_t hi) {
    shapes[e] = typename G::UnderlyingShape(static_cast<int>(hi - lo), N, K);
    ptr_a[e] = x + lo * K;
    ptr_b[e] = weight + e * static_cast<int64_t>(N) * K;
    ptr_d[e] = out + lo * N_out;
    typename G::StrideA sa{};
    typename G::StrideB sb{};
    typename G::StrideD sd{};
    get<0>(sa) = K;
    get<0>(sb) = K;
    get<0>(sd) = N_out;
    stride_a[e] = sa;
    stride_b[e] = sb;
    stride_d[e] = sd;
  });
}

template <typename Element, class Config, bool kSwiGLU>
size_t workspace_bytes(int64_t E, int sm_count) {
  return plan_workspace<GroupedGemm<Element, Config, kSwiGLU>>(E, nullptr, sm_count).first.total;
}

template <typename Element, class Config, bool kSwiGLU>
cudaError_t run(const void* x, const void* weight, const int32_t* expert_offsets, void* out, int64_t S, int64_t E,
                int64_t N, int64_t K, void* workspace, size_t workspace_bytes_given, int sm_count,
                cudaStream_t stream) {
  using G = GroupedGemm<Element, Config, kSwiGLU>;
  if (E == 0 || S == 0) return cudaSuccess;
  if ((kSwiGLU && N % 16 != 0) || N % G::kAlign != 0 || K % G::kAlign != 0 || N > INT32_MAX || K > INT32_MAX || S > INT32_MAX)
    return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  const auto [l, args] = plan_workspace<G>(E, ws, sm_count);
  if (!workspace_ok(workspace, workspace_bytes_given, l.total)) return cudaErrorInvalidValue;

  const auto* xp = static_cast<const Element*>(x);
  const auto* wp = static_cast<const Element*>(weight);
  auto* op = static_cast<Element*>(out);
  const int threads = 128;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((E + threads - 1) / threads, 1024));
  build_group_arguments_kernel<G, Element><<<blocks, threads, 0, stream>>>(
      expert_offsets, S, E, static_cast<int>(N), static_cast<int>(K), static_cast<int>(kSwiGLU ? N / 2 : N), xp, wp,
      op,
      reinterpret_cast<typename G::UnderlyingShape*>(ws + l.shapes), reinterpret_cast<const Element**>(ws + l.ptr_a),
      reinterpret_cast<const Element**>(ws + l.ptr_b), reinterpret_cast<Element**>(ws + l.ptr_d),
      reinterpret_cast<typename G::StrideA*>(ws + l.stride_a), reinterpret_cast<typename G::StrideB*>(ws + l.stride_b),
      reinterpret_cast<typename G::StrideD*>(ws + l.stride_d));
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return run_gemm<typename G::Gemm>(args, ws + l.cutlass, stream);
}

template <typename Element, class Config, bool kSwiGLU>
int binary_version() {
  return kernel_binary_version<typename GroupedGemm<Element, Config, kSwiGLU>::Kernel>();
}

}  // namespace sm90
}  // namespace dots1

// Instantiation helper for the per-config .cu files.
#define DOTS1_SM90_INSTANTIATE(Element, Config, kSwiGLU)                                                         \
  template size_t dots1::sm90::workspace_bytes<Element, dots1::sm90::Config, kSwiGLU>(int64_t, int);            \
  template int dots1::sm90::binary_version<Element, dots1::sm90::Config, kSwiGLU>();                           \
  template cudaError_t dots1::sm90::run<Element, dots1::sm90::Config, kSwiGLU>(                                 \
      const void*, const void*, const int32_t*, void*, int64_t, int64_t, int64_t, int64_t, void*, size_t, int, \
      cudaStream_t);
