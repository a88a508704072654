// Entry points of the sm90a grouped GEMM: picks the instantiation for (dtype, config, epilogue). The
// instantiations themselves live in grouped_gemm_sm90_{coop,pingpong}[_swiglu].cu (heavy CUTLASS
// templates, one file per configuration so they compile in parallel); this file stays light.
#include "cutlass/numeric_types.h"
#include "grouped_gemm/grouped_gemm.h"

namespace dots1 {
namespace sm90 {

struct Cooperative128x256;
struct Pingpong64x256;
struct Int4Cooperative128x128;
struct Int4Cooperative128x256;
struct Int4Cooperative128x192;
struct Int4Cooperative128x64;
struct Int4Cooperative128x32;

template <typename Element, class Config, bool kSwiGLU>
size_t workspace_bytes(int64_t E, int sm_count);
template <typename Element, class Config, bool kSwiGLU>
int binary_version();
template <typename Element, class Config, bool kSwiGLU>
cudaError_t run(const void* x, const void* weight, const int32_t* expert_offsets, void* out, int64_t S, int64_t E,
                int64_t N, int64_t K, void* workspace, size_t workspace_bytes_given, int sm_count,
                cudaStream_t stream);

template <class Config, bool kSwiGLU>
size_t int4_workspace_bytes(int64_t E, int64_t N, int64_t K, int sm_count);
template <class Config, bool kSwiGLU>
int int4_binary_version();
template <class Config, bool kSwiGLU>
cudaError_t run_int4(const void* x, const uint8_t* qweight, const void* scales, const uint8_t* zeros,
                     const int32_t* expert_offsets, void* out, int64_t S, int64_t E, int64_t N, int64_t K,
                     void* workspace, size_t workspace_bytes_given, int sm_count, cudaStream_t stream);

// The configurations are only declared here: they travel as tags.
template <class T>
struct Tag {
  using type = T;
};

}  // namespace sm90

// Runs BODY with kSwiGLU bound to whether the epilogue is the SwiGLU one.
#define DOTS1_SM90_WITH_EPILOGUE(epilogue, ...)         \
  if ((epilogue) == Sm90Epilogue::kSwiGLUInterleaved) { \
    constexpr bool kSwiGLU = true;                      \
    __VA_ARGS__;                                        \
  } else {                                              \
    constexpr bool kSwiGLU = false;                     \
    __VA_ARGS__;                                        \
  }

// Runs BODY with Element, Config and kSwiGLU bound; unsupported dtypes return a value-initialised
// result (0 / cudaSuccess is never reached: the callers check the dtype first).
#define DOTS1_SM90_DISPATCH(dtype, config, epilogue, ...)                                           \
  [&]() {                                                                                           \
    auto with_epilogue = [&](auto element_tag, auto config_tag) {                                   \
      using Element = decltype(element_tag);                                                        \
      using Config = typename decltype(config_tag)::type;                                           \
      DOTS1_SM90_WITH_EPILOGUE(epilogue, __VA_ARGS__);                                              \
    };                                                                                              \
    auto with_config = [&](auto element_tag) {                                                      \
      if (config == Sm90GemmConfig::kCooperative128x256)                                            \
        return with_epilogue(element_tag, sm90::Tag<sm90::Cooperative128x256>{});                   \
      return with_epilogue(element_tag, sm90::Tag<sm90::Pingpong64x256>{});                         \
    };                                                                                              \
    if (dtype == DType::kBFloat16) return with_config(cutlass::bfloat16_t{});                       \
    if (dtype == DType::kFloat16) return with_config(cutlass::half_t{});                            \
    return decltype(with_config(cutlass::half_t{})){};                                              \
  }()

bool sm90_grouped_gemm_compiled() {
  // 90 only when the sm_90a cubins are in this build and the current device can run them.
  using BF16 = cutlass::bfloat16_t;
  return sm90::binary_version<BF16, sm90::Cooperative128x256, false>() == 90 &&
         sm90::binary_version<BF16, sm90::Pingpong64x256, false>() == 90 &&
         sm90::binary_version<BF16, sm90::Cooperative128x256, true>() == 90 &&
         sm90::binary_version<BF16, sm90::Pingpong64x256, true>() == 90;
}

size_t grouped_gemm_sm90_workspace_bytes(int64_t E, Sm90GemmConfig config, Sm90Epilogue epilogue, DType dtype,
                                         int sm_count) {
  return DOTS1_SM90_DISPATCH(dtype, config, epilogue,
                             return sm90::workspace_bytes<Element, Config, kSwiGLU>(E, sm_count));
}

cudaError_t launch_grouped_gemm_sm90(const void* x, const void* weight, const int32_t* expert_offsets, void* out,
                                     int64_t S, int64_t E, int64_t N, int64_t K, Sm90GemmConfig config,
                                     Sm90Epilogue epilogue, DType dtype, void* workspace, size_t workspace_bytes,
                                     int sm_count, cudaStream_t stream) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) return cudaErrorInvalidValue;
  return DOTS1_SM90_DISPATCH(dtype, config, epilogue,
                             return sm90::run<Element, Config, kSwiGLU>(x, weight, expert_offsets, out, S, E, N, K,
                                                                        workspace, workspace_bytes, sm_count,
                                                                        stream));
}

// ---- int4 (W4A16): grouped_gemm_int4_sm90_{none,swiglu}[_n256|_n192|_n64|_n32].cu, five tiles ----

// Runs BODY (which returns) with Config and kSwiGLU bound to the tile's and the epilogue's.
#define DOTS1_SM90_INT4_DISPATCH(tile, epilogue, ...)                                       \
  [&]() {                                                                                   \
    auto with_epilogue = [&](auto config_tag) {                                             \
      using Config = typename decltype(config_tag)::type;                                   \
      DOTS1_SM90_WITH_EPILOGUE(epilogue, __VA_ARGS__);                                      \
    };                                                                                      \
    if (tile == Int4Sm90Tile::k128x256) return with_epilogue(sm90::Tag<sm90::Int4Cooperative128x256>{}); \
    if (tile == Int4Sm90Tile::k128x192) return with_epilogue(sm90::Tag<sm90::Int4Cooperative128x192>{}); \
    if (tile == Int4Sm90Tile::k128x64) return with_epilogue(sm90::Tag<sm90::Int4Cooperative128x64>{});   \
    if (tile == Int4Sm90Tile::k128x32) return with_epilogue(sm90::Tag<sm90::Int4Cooperative128x32>{});   \
    return with_epilogue(sm90::Tag<sm90::Int4Cooperative128x128>{});                        \
  }()

bool sm90_grouped_gemm_int4_compiled() {
  return sm90::int4_binary_version<sm90::Int4Cooperative128x128, false>() == 90 &&
         sm90::int4_binary_version<sm90::Int4Cooperative128x128, true>() == 90 &&
         sm90::int4_binary_version<sm90::Int4Cooperative128x256, false>() == 90 &&
         sm90::int4_binary_version<sm90::Int4Cooperative128x256, true>() == 90 &&
         sm90::int4_binary_version<sm90::Int4Cooperative128x192, false>() == 90 &&
         sm90::int4_binary_version<sm90::Int4Cooperative128x192, true>() == 90 &&
         sm90::int4_binary_version<sm90::Int4Cooperative128x64, false>() == 90 &&
         sm90::int4_binary_version<sm90::Int4Cooperative128x64, true>() == 90 &&
         sm90::int4_binary_version<sm90::Int4Cooperative128x32, false>() == 90 &&
         sm90::int4_binary_version<sm90::Int4Cooperative128x32, true>() == 90;
}

size_t grouped_gemm_int4_sm90_workspace_bytes(int64_t E, int64_t N, int64_t K, Int4Sm90Tile tile, Sm90Epilogue epilogue,
                                              int sm_count) {
  return DOTS1_SM90_INT4_DISPATCH(tile, epilogue,
                                  return sm90::int4_workspace_bytes<Config, kSwiGLU>(E, N, K, sm_count));
}

cudaError_t launch_grouped_gemm_int4_sm90(const void* x, const uint8_t* qweight, const void* scales,
                                          const uint8_t* zeros, const int32_t* expert_offsets, void* out, int64_t S,
                                          int64_t E, int64_t N, int64_t K, Int4Sm90Tile tile, Sm90Epilogue epilogue,
                                          void* workspace, size_t workspace_bytes, int sm_count, cudaStream_t stream) {
  return DOTS1_SM90_INT4_DISPATCH(tile, epilogue,
                                  return sm90::run_int4<Config, kSwiGLU>(x, qweight, scales, zeros, expert_offsets, out, S, E,
                                                                  N, K, workspace, workspace_bytes, sm_count, stream));
}

}  // namespace dots1
