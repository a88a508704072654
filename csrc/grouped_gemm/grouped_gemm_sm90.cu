// Entry points of the sm90a grouped GEMM: picks the instantiation for (dtype, config). The
// instantiations themselves live in grouped_gemm_sm90_{coop,pingpong}.cu (heavy CUTLASS templates,
// one file per configuration so they compile in parallel); this file stays light.
#include "cutlass/numeric_types.h"
#include "grouped_gemm/grouped_gemm.h"

namespace dots1 {
namespace sm90 {

struct Cooperative128x256;
struct Pingpong64x256;

template <typename Element, class Config>
size_t workspace_bytes(int64_t E, int sm_count);
template <typename Element, class Config>
int binary_version();
template <typename Element, class Config>
cudaError_t run(const void* x, const void* weight, const int32_t* expert_offsets, void* out, int64_t S, int64_t E,
                int64_t N, int64_t K, void* workspace, size_t workspace_bytes_given, int sm_count,
                cudaStream_t stream);

}  // namespace sm90

// Runs BODY with Element and Config bound; unsupported combinations return cudaErrorInvalidValue.
#define DOTS1_SM90_DISPATCH(dtype, config, ...)                                                     \
  [&]() {                                                                                           \
    auto with_config = [&](auto element_tag) {                                                      \
      using Element = decltype(element_tag);                                                        \
      if (config == Sm90GemmConfig::kCooperative128x256) {                                          \
        using Config = sm90::Cooperative128x256;                                                    \
        __VA_ARGS__;                                                                                \
      } else {                                                                                      \
        using Config = sm90::Pingpong64x256;                                                        \
        __VA_ARGS__;                                                                                \
      }                                                                                             \
    };                                                                                              \
    if (dtype == DType::kBFloat16) return with_config(cutlass::bfloat16_t{});                       \
    if (dtype == DType::kFloat16) return with_config(cutlass::half_t{});                            \
    return decltype(with_config(cutlass::half_t{})){};                                              \
  }()

bool sm90_grouped_gemm_compiled() {
  // 90 only when the sm_90a cubin is in this build and the current device can run it.
  return sm90::binary_version<cutlass::bfloat16_t, sm90::Cooperative128x256>() == 90 &&
         sm90::binary_version<cutlass::bfloat16_t, sm90::Pingpong64x256>() == 90;
}

size_t grouped_gemm_sm90_workspace_bytes(int64_t E, Sm90GemmConfig config, DType dtype, int sm_count) {
  return DOTS1_SM90_DISPATCH(dtype, config, return sm90::workspace_bytes<Element, Config>(E, sm_count));
}

cudaError_t launch_grouped_gemm_sm90(const void* x, const void* weight, const int32_t* expert_offsets, void* out,
                                     int64_t S, int64_t E, int64_t N, int64_t K, Sm90GemmConfig config, DType dtype,
                                     void* workspace, size_t workspace_bytes, int sm_count, cudaStream_t stream) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) return cudaErrorInvalidValue;
  return DOTS1_SM90_DISPATCH(dtype, config,
                             return sm90::run<Element, Config>(x, weight, expert_offsets, out, S, E, N, K, workspace,
                                                               workspace_bytes, sm_count, stream));
}

}  // namespace dots1
