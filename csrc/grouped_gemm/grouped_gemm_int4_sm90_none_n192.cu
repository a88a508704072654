// sm90a int4 (W4A16) grouped GEMM, cooperative 128x192x64 tiles (192 rows of x), plain product. See grouped_gemm_int4_sm90.cuh.
#include "grouped_gemm/grouped_gemm_int4_sm90.cuh"

DOTS1_SM90_INT4_INSTANTIATE(Int4Cooperative128x192, false)
