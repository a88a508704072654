// sm90a int4 (W4A16) grouped GEMM, cooperative 128x32x64 tiles (32 rows of x), plain product. See grouped_gemm_int4_sm90.cuh.
#include "grouped_gemm/grouped_gemm_int4_sm90.cuh"

DOTS1_SM90_INT4_INSTANTIATE(Int4Cooperative128x32, false)
