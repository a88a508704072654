// sm90a grouped GEMM, cooperative 128x256x64 tiles (many rows per expert), plain product. See
// grouped_gemm_sm90.cuh.
#include "grouped_gemm/grouped_gemm_sm90.cuh"

DOTS1_SM90_INSTANTIATE(cutlass::bfloat16_t, Cooperative128x256, false)
DOTS1_SM90_INSTANTIATE(cutlass::half_t, Cooperative128x256, false)
