// sm90a grouped GEMM, cooperative 128x256x64 tiles, fused SwiGLU over interleaved gate/up weights.
// See grouped_gemm_sm90.cuh.
#include "grouped_gemm/grouped_gemm_sm90.cuh"

DOTS1_SM90_INSTANTIATE(cutlass::bfloat16_t, Cooperative128x256, true)
DOTS1_SM90_INSTANTIATE(cutlass::half_t, Cooperative128x256, true)
