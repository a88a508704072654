// skinny_gemm: the decode linears, x @ weight^T for few rows of x, optionally with a SwiGLU epilogue.
//
//   x [M, K] (any strides; copied only where the kernel needs it), weight [N, K] (last dim contiguous,
//   any row stride, never copied) -> out [M, N] ("none") or [M, N/2] ("swiglu": gate = weight rows
//   [0, N/2), up = rows [N/2, N), N even; "swiglu_interleaved": 16-row [8 gate | 8 up] blocks,
//   N % 16 == 0), new and contiguous.
//
// Numerics (every backend, as dots1_ext.reference.skinny_gemm): the product in fp32, the SwiGLU
// epilogue silu(gate) * up in fp32 on the unrounded sums, one rounding to x's dtype.
//
// CUDA: M <= 16 runs the weight-streaming kernels of skinny_gemm.h (tensor cores for aligned
// fp16/bf16, a portable kernel otherwise); M > 16 runs cuBLAS (at::mm, with an fp32 output for the
// SwiGLU epilogues so that they round once) and the epilogue in ATen: correct, not tuned.
// DOTS1_EXT_SKINNY_TILES = 1 | 2 forces the tensor-core kernel's 16-row tiles per warp (default: chosen
// from the shape; for tuning runs). DOTS1_EXT_SKINNY_KERNEL = frag | wide picks the tensor-core kernel's
// weight-load mapping (skinny_gemm.h SkinnyKernel; default wide, measured faster on the H200). Both
// are read at every launch, so one process (a benchmark) can time each. DOTS1_EXT_PDL=0 launches
// without programmatic dependent launch (csrc/pdl.cuh; the weight is read where it lies, never
// produced per call, so PDL is always safe here).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "common.h"
#include "skinny_gemm/skinny_gemm.h"

#ifdef DOTS1_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace dots1 {
namespace {

struct SkinnyShape {
  int64_t M, K, N, N_out;
  SkinnyEpilogue epilogue;
};

SkinnyShape check_skinny_gemm(const at::Tensor& x, const at::Tensor& weight, const std::string& epilogue) {
  check_dtype(x, "x", {at::kFloat, at::kHalf, at::kBFloat16});
  check_shape(x, "x", {-1, -1});
  check_dtype(weight, "weight", {x.scalar_type()});
  check_shape(weight, "weight", {-1, x.size(1)});
  check_same_device(weight, "weight", x, "x");
  TORCH_CHECK_VALUE(epilogue == "none" || epilogue == "swiglu" || epilogue == "swiglu_interleaved",
                    "dots1_ext: epilogue must be one of ('none', 'swiglu', 'swiglu_interleaved'), got '", epilogue,
                    "'");
  const SkinnyEpilogue epi = epilogue == "swiglu"               ? SkinnyEpilogue::kHF
                             : epilogue == "swiglu_interleaved" ? SkinnyEpilogue::kInterleaved
                                                                : SkinnyEpilogue::kNone;
  const int64_t N = weight.size(0);
  TORCH_CHECK_VALUE(epi != SkinnyEpilogue::kHF || N % 2 == 0,
                    "dots1_ext: epilogue 'swiglu' needs an even weight.shape[0] (gate rows then up rows), got ", N);
  TORCH_CHECK_VALUE(epi != SkinnyEpilogue::kInterleaved || N % 16 == 0,
                    "dots1_ext: epilogue 'swiglu_interleaved' needs weight.shape[0] (gate + up rows) to be a multiple "
                    "of 16 (whole [8 gate | 8 up] blocks), got ", N);
  // The weight is streamed where it lies: a per-call copy would cost more than the product itself.
  TORCH_CHECK_VALUE(weight.size(1) <= 1 || weight.stride(1) == 1,
                    "dots1_ext: weight must have a contiguous last dimension (it is never copied per call), got "
                    "strides ", weight.strides(), " for shape ", weight.sizes(),
                    "; make it contiguous once, at load (weight.contiguous())");
  return {x.size(0), x.size(1), N, epi == SkinnyEpilogue::kNone ? N : N / 2, epi};
}

// y [M, N] fp32 contiguous -> silu(gate) * up [M, N/2] fp32, gate and up columns per the layout.
at::Tensor swiglu_fp32(const at::Tensor& y, const SkinnyShape& s) {
  if (s.epilogue == SkinnyEpilogue::kHF) return at::silu(y.narrow(1, 0, s.N_out)) * y.narrow(1, s.N_out, s.N_out);
  const at::Tensor blocks = y.view({s.M, s.N / 16, 2, 8});  // [8 gate | 8 up] per 16 columns
  return at::silu(blocks.select(2, 0).reshape({s.M, s.N_out})) * blocks.select(2, 1).reshape({s.M, s.N_out});
}

// ---- CPU: the product in fp32 (ATen), then the epilogue in fp32, one rounding ----
at::Tensor skinny_gemm_cpu(const at::Tensor& x, const at::Tensor& weight, c10::string_view epilogue_view) {
  const SkinnyShape s = check_skinny_gemm(x, weight, std::string(epilogue_view));
  at::Tensor out = at::empty({s.M, s.N_out}, x.options());
  if (s.M == 0 || s.N_out == 0) return out;
  at::Tensor y = at::matmul(x.to(at::kFloat), weight.to(at::kFloat).t()).contiguous();
  if (s.epilogue != SkinnyEpilogue::kNone) y = swiglu_fp32(y, s);
  out.copy_(y);
  return out;
}

#ifdef DOTS1_WITH_CUDA

int tiles_from_env() {
  const char* v = std::getenv("DOTS1_EXT_SKINNY_TILES");
  if (v == nullptr || *v == '\0') return 0;
  const std::string s(v);
  if (s == "auto") return 0;
  TORCH_CHECK_VALUE(s == "1" || s == "2", "dots1_ext: DOTS1_EXT_SKINNY_TILES must be auto, 1 or 2, got '", s, "'");
  return s == "1" ? 1 : 2;
}

SkinnyKernel kernel_from_env() {
  const char* v = std::getenv("DOTS1_EXT_SKINNY_KERNEL");
  // Default wide: measured on the H200 at 48bd321, M <= 4, 1.12-1.16x the fragment kernel on the
  // Dots1 dense shapes and the 8-layer B=1 step 1.52 -> 1.35 ms together with the MoE's wide loads.
  if (v == nullptr || *v == '\0') return SkinnyKernel::kWide;
  const std::string s(v);
  TORCH_CHECK_VALUE(s == "frag" || s == "wide", "dots1_ext: DOTS1_EXT_SKINNY_KERNEL must be frag or wide, got '", s,
                    "'");
  return s == "wide" ? SkinnyKernel::kWide : SkinnyKernel::kFrag;
}

// The stride of a dim of size <= 1 is never used to step: report the row length so it never spoils
// an alignment test.
int64_t row_stride(const at::Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

// M > 16 (prefill-sized): cuBLAS. With SwiGLU the product is taken in fp32 (bf16/fp16 inputs, fp32
// accumulate and output) so that the epilogue rounds once, as everywhere else.
void skinny_gemm_cublas(const at::Tensor& x, const at::Tensor& weight, const SkinnyShape& s, at::Tensor& out) {
  if (s.epilogue == SkinnyEpilogue::kNone) {
    at::mm_out(out, x, weight.t());
    return;
  }
  const at::Tensor y = x.scalar_type() == at::kFloat ? at::mm(x, weight.t()) : at::mm(x, weight.t(), at::kFloat);
  out.copy_(swiglu_fp32(y.contiguous(), s));
}

at::Tensor skinny_gemm_cuda(const at::Tensor& x_in, const at::Tensor& weight, c10::string_view epilogue_view) {
  const SkinnyShape s = check_skinny_gemm(x_in, weight, std::string(epilogue_view));
  const SkinnyKernel variant = kernel_from_env();  // a bad value raises whichever path the shape takes
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor out = at::empty({s.M, s.N_out}, x_in.options());
  if (s.M == 0 || s.N_out == 0) return out;
  if (s.M > kSkinnyMaxRows) {
    skinny_gemm_cublas(x_in, weight, s, out);
    return out;
  }
  const DType dt = to_dtype(x_in.scalar_type());
  at::Tensor x = (s.K > 1 && x_in.stride(1) != 1) ? x_in.contiguous() : x_in;
  const int64_t w_stride = row_stride(weight);
  // x is a few KiB: when only its alignment keeps the weight off the tensor-core kernel, a fresh
  // (aligned, contiguous) copy of it is worth the extra launch.
  const bool weight_vectorisable = dt != DType::kFloat32 && s.K % 8 == 0 && w_stride % 8 == 0 &&
                                   reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 == 0;
  if (weight_vectorisable &&
      skinny_gemm_kernel_kind(x.data_ptr(), weight.data_ptr(), s.M, s.N, s.K, row_stride(x), w_stride, dt) != 1)
    x = at::empty({s.M, s.K}, x.options()).copy_(x);  // fresh allocations are 16-byte aligned
  C10_CUDA_CHECK(launch_skinny_gemm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), s.M, s.N, s.K, row_stride(x),
                                    w_stride, s.epilogue, dt, tiles_from_env(), variant,
                                    c10::cuda::getCurrentCUDAStream(), pdl_enabled()));
  return out;
}

#endif  // DOTS1_WITH_CUDA

}  // namespace
}  // namespace dots1

TORCH_LIBRARY_IMPL(dots1_ext, CPU, m) { m.impl("skinny_gemm", &dots1::skinny_gemm_cpu); }

#ifdef DOTS1_WITH_CUDA
TORCH_LIBRARY_IMPL(dots1_ext, CUDA, m) { m.impl("skinny_gemm", &dots1::skinny_gemm_cuda); }
#endif
