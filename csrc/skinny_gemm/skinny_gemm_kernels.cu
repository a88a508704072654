// Filled in by the skinny_gemm/skinny_gemm op family.
