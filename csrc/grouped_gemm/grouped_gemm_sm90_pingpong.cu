// sm90a grouped GEMM, ping-pong 64x256x64 tiles (fewer rows per expert), plain product. See
// grouped_gemm_sm90.cuh.
#include "grouped_gemm/grouped_gemm_sm90.cuh"

DOTS1_SM90_INSTANTIATE(cutlass::bfloat16_t, Pingpong64x256, false)
DOTS1_SM90_INSTANTIATE(cutlass::half_t, Pingpong64x256, false)
