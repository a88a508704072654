// grouped_gemm: per-expert x[rows_e] @ weight[e]^T over the permuted rows, optionally with the
// SwiGLU epilogue silu(gate) * up.
//
//   x [S, K] @ weight [E, N, K].mT per expert segment, expert_offsets [E+1] int32
//   -> out [S, N] ("none") or [S, N/2] ("swiglu": gate = the first N/2 weight rows of each expert, HF
//   layout; "swiglu_interleaved": weight rows in 16-row [8 gate | 8 up] blocks, see grouped_gemm.h);
//   rows outside every segment are zero.
//
// CUDA backends (DOTS1_EXT_GEMM_BACKEND = auto | cutlass | decode | torch):
//   decode  - weight-streaming kernel for few rows per expert; correct for any S, fp32 too.
//   cutlass - CUTLASS 3 ptr-array grouped GEMM on sm90a; "swiglu_interleaved" fuses SwiGLU into its
//             epilogue, "swiglu" (HF layout) runs a SiLU-mul kernel after it.
//   torch   - at::_grouped_mm (+ the SiLU-mul kernel), where torch supports the GPU.
//   auto    - decode for S <= DOTS1_EXT_GEMM_DECODE_MAX_ROWS (default 128, about T=21 at top-6; measured on
//             H100: the decode kernel wins at T=8 (48 rows), CUTLASS at T=64 (384 rows)),
//             else cutlass on sm90a, else torch, else decode; a one-time notice on a fallback.
// DOTS1_EXT_GEMM_SM90_CONFIG = auto | coop | pingpong picks the CUTLASS tile configuration.
//
// grouped_gemm_int4: the same product with the weight in the int4 format (docs/design.md §7):
//   x [S, K] bf16, qweight [E, N, K/2] uint8, scales [E, N, K/128] bf16, zeros [E, N, K/128] uint8 or
//   None (zero point 8), K % 128 == 0; epilogue "none" or "swiglu_interleaved"; equal to grouped_gemm
//   on the dequantized weight (bf16((u - z) * s)) to fp32 summation order.
// CUDA backends (DOTS1_EXT_GEMM_INT4_BACKEND = auto | cutlass | dequantize):
//   cutlass    - CUTLASS 3 mixed-input ptr-array grouped GEMM on sm90a (grouped_gemm_int4_sm90.cuh).
//   dequantize - the weight dequantized expert by expert into a bf16 [E, N, K] copy, then grouped_gemm
//                (the CPU kernel's way; memory: the whole bf16 weight).
//   auto       - cutlass where it runs, else dequantize (a one-time notice).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "common.h"

#ifdef DOTS1_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "grouped_gemm/grouped_gemm.h"
#if __has_include(<ATen/ops/_grouped_mm.h>)
#include <ATen/ops/_grouped_mm.h>
#define DOTS1_HAVE_TORCH_GROUPED_MM 1
#endif
#endif

namespace dots1 {
namespace {

// Which SwiGLU epilogue, if any (the CPU build has no grouped_gemm.h: its own enum).
enum class SwiGLU { kNone, kHF, kInterleaved };

struct GemmShape {
  int64_t S, K, E, N, N_out;
  SwiGLU swiglu;  // kNone: epilogue "none"
};

GemmShape check_grouped_gemm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& expert_offsets,
                             const std::string& epilogue) {
  check_dtype(x, "x", {at::kFloat, at::kHalf, at::kBFloat16});
  check_shape(x, "x", {-1, -1});
  check_dtype(weight, "weight", {x.scalar_type()});
  check_shape(weight, "weight", {-1, -1, x.size(1)});
  check_dtype(expert_offsets, "expert_offsets", {at::kInt});
  check_shape(expert_offsets, "expert_offsets", {weight.size(0) + 1});
  check_same_device(weight, "weight", x, "x");
  check_same_device(expert_offsets, "expert_offsets", x, "x");
  TORCH_CHECK_VALUE(epilogue == "none" || epilogue == "swiglu" || epilogue == "swiglu_interleaved",
                    "dots1_ext: epilogue must be one of ('none', 'swiglu', 'swiglu_interleaved'), got '", epilogue,
                    "'");
  const SwiGLU swiglu = epilogue == "swiglu"               ? SwiGLU::kHF
                        : epilogue == "swiglu_interleaved" ? SwiGLU::kInterleaved
                                                           : SwiGLU::kNone;
  const int64_t N = weight.size(1);
  TORCH_CHECK_VALUE(swiglu != SwiGLU::kHF || N % 2 == 0,
                    "dots1_ext: epilogue 'swiglu' needs an even weight.shape[1] (gate + up rows), got ", N);
  TORCH_CHECK_VALUE(swiglu != SwiGLU::kInterleaved || N % 16 == 0,
                    "dots1_ext: epilogue 'swiglu_interleaved' needs weight.shape[1] (gate + up rows) to be a "
                    "multiple of 16 (whole [8 gate | 8 up] blocks), got ", N);
  if (x.is_cuda()) {
    // 16-byte vectors and TMA need whole 16-byte rows.
    TORCH_CHECK_VALUE(N % 8 == 0, "dots1_ext: weight.shape[1] (N) must be a multiple of 8 on CUDA, got ", N);
    TORCH_CHECK_VALUE(x.size(1) % 8 == 0, "dots1_ext: x.shape[1] (K) must be a multiple of 8 on CUDA, got ",
                      x.size(1));
  }
  // The weight is read where it lies, never copied per call (a copy of every expert's weight, on
  // every call and into every captured CUDA graph): contiguous and 16-byte aligned (vector loads,
  // TMA), which any tensor allocated by torch (and any contiguous expert slice of one) is.
  TORCH_CHECK_VALUE(weight.is_contiguous(), "dots1_ext: weight must be contiguous ([E, N, K] with K contiguous, ",
                    "rows packed), got strides ", weight.strides(), " for shape ", weight.sizes(),
                    "; make it contiguous once, at load (weight.contiguous())");
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 == 0,
                    "dots1_ext: weight must start at a 16-byte aligned address, got an offset of ",
                    reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16,
                    " bytes; copy it once, at load (weight.clone())");
  return {x.size(0), x.size(1), weight.size(0), N, swiglu != SwiGLU::kNone ? N / 2 : N, swiglu};
}

// ---- CPU: per-expert matmul in fp32 ----

at::Tensor grouped_gemm_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& expert_offsets,
                            c10::string_view epilogue_view) {
  const std::string epilogue(epilogue_view);
  const GemmShape g = check_grouped_gemm(x, weight, expert_offsets, epilogue);
  at::Tensor out = at::zeros({g.S, g.N_out}, x.options());
  const at::Tensor offsets = expert_offsets.contiguous();
  const int32_t* off = offsets.data_ptr<int32_t>();
  // On the host the offsets are free to validate, so bad ones are an error, not unspecified output.
  for (int64_t e = 0; e <= g.E; ++e) {
    TORCH_CHECK_INDEX(off[e] >= 0 && off[e] <= g.S, "dots1_ext: expert_offsets must be in [0, ", g.S,
                      "] (rows of x), got expert_offsets[", e, "] = ", off[e]);
    TORCH_CHECK_INDEX(e == 0 || off[e] >= off[e - 1], "dots1_ext: expert_offsets must be non-decreasing, got ",
                      "expert_offsets[", e - 1, "] = ", off[e - 1], " > expert_offsets[", e, "] = ", off[e]);
  }
  for (int64_t e = 0; e < g.E; ++e) {
    const int64_t lo = off[e], rows = off[e + 1] - off[e];
    if (rows == 0) continue;
    at::Tensor y = at::matmul(x.narrow(0, lo, rows).to(at::kFloat), weight.select(0, e).to(at::kFloat).t());
    if (g.swiglu == SwiGLU::kInterleaved) {
      const at::Tensor blocks = y.view({rows, g.N / 16, 2, 8});  // [8 gate | 8 up] per 16 columns
      y = at::silu(blocks.select(2, 0).reshape({rows, g.N_out})) * blocks.select(2, 1).reshape({rows, g.N_out});
    } else if (g.swiglu == SwiGLU::kHF) {
      y = at::silu(y.narrow(1, 0, g.N_out)) * y.narrow(1, g.N_out, g.N_out);
    }
    out.narrow(0, lo, rows).copy_(y);
  }
  return out;
}

// ---- grouped_gemm_int4: checks and the dequantizing path (the CPU kernel, and the CUDA fallback) ----

constexpr int64_t kInt4GroupSize = 128;  // the int4 format's group along K (csrc kInt4GroupK)

struct Int4GemmShape {
  int64_t S, K, E, N, N_out;
  bool swiglu;  // "swiglu_interleaved"
};

Int4GemmShape check_grouped_gemm_int4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                      const std::optional<at::Tensor>& zeros, const at::Tensor& expert_offsets,
                                      const std::string& epilogue) {
  check_dtype(x, "x", {at::kBFloat16});
  check_shape(x, "x", {-1, -1});
  const int64_t K = x.size(1);
  TORCH_CHECK_VALUE(K > 0 && K % kInt4GroupSize == 0, "dots1_ext: x.shape[1] (K) must be a positive multiple of the "
                    "int4 group size ", kInt4GroupSize, ", got ", K);
  check_dtype(qweight, "qweight", {at::kByte});
  check_shape(qweight, "qweight", {-1, -1, K / 2});
  check_same_device(qweight, "qweight", x, "x");
  const int64_t E = qweight.size(0), N = qweight.size(1), G = K / kInt4GroupSize;
  TORCH_CHECK_VALUE(qweight.is_contiguous(), "dots1_ext: qweight must be contiguous ([E, N, K/2] uint8, two codes "
                    "per byte, rows packed), got strides ", qweight.strides(), " for shape ", qweight.sizes(),
                    "; make it contiguous once, at load");
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16 == 0,
                    "dots1_ext: qweight must start at a 16-byte aligned address, got an offset of ",
                    reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16, " bytes; copy it once, at load (.clone())");
  check_dtype(scales, "scales", {at::kBFloat16});
  check_shape(scales, "scales", {E, N, G});
  check_same_device(scales, "scales", x, "x");
  TORCH_CHECK_VALUE(scales.is_contiguous(), "dots1_ext: scales must be contiguous, got strides ", scales.strides());
  if (zeros.has_value()) {
    check_dtype(*zeros, "zeros", {at::kByte});
    check_shape(*zeros, "zeros", {E, N, G});
    check_same_device(*zeros, "zeros", x, "x");
    TORCH_CHECK_VALUE(zeros->is_contiguous(), "dots1_ext: zeros must be contiguous, got strides ", zeros->strides());
  }
  check_dtype(expert_offsets, "expert_offsets", {at::kInt});
  check_shape(expert_offsets, "expert_offsets", {E + 1});
  check_same_device(expert_offsets, "expert_offsets", x, "x");
  TORCH_CHECK_VALUE(epilogue == "none" || epilogue == "swiglu_interleaved",
                    "dots1_ext: epilogue must be one of ('none', 'swiglu_interleaved'), got '", epilogue, "'");
  const bool swiglu = epilogue == "swiglu_interleaved";
  TORCH_CHECK_VALUE(!swiglu || N % 16 == 0, "dots1_ext: epilogue 'swiglu_interleaved' needs qweight.shape[1] (gate "
                    "+ up rows) to be a multiple of 16 (whole [8 gate | 8 up] blocks), got ", N);
  if (x.is_cuda()) {
    // TMA: whole 16-byte rows of the output and of the per-call fp32 scales.
    TORCH_CHECK_VALUE(N % 8 == 0, "dots1_ext: qweight.shape[1] (N) must be a multiple of 8 on CUDA, got ", N);
  }
  return {x.size(0), K, E, N, swiglu ? N / 2 : N, swiglu};
}

// dequantize_int4 of quant.py: (u - z) * s exactly in fp32, rounded once to bf16; one expert at a
// time so that the fp32 temporaries stay one expert's size.
at::Tensor dequantize_int4_bf16(const at::Tensor& qweight, const at::Tensor& scales,
                                const std::optional<at::Tensor>& zeros) {
  const int64_t E = qweight.size(0), N = qweight.size(1), K = 2 * qweight.size(2), G = K / kInt4GroupSize;
  at::Tensor out = at::empty({E, N, K}, qweight.options().dtype(at::kBFloat16));
  for (int64_t e = 0; e < E; ++e) {
    const at::Tensor q = qweight.select(0, e);
    const at::Tensor codes = at::stack({at::bitwise_and(q, 15), at::bitwise_right_shift(q, 4)}, -1)
                                 .reshape({N, G, kInt4GroupSize})
                                 .to(at::kFloat);
    const at::Tensor s = scales.select(0, e).to(at::kFloat).unsqueeze(-1);
    const at::Tensor z = zeros.has_value() ? zeros->select(0, e).to(at::kFloat).unsqueeze(-1)
                                           : at::full({1}, 8.0, codes.options());
    out.select(0, e).copy_(((codes - z) * s).reshape({N, K}));
  }
  return out;
}

at::Tensor grouped_gemm_int4_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                 const std::optional<at::Tensor>& zeros, const at::Tensor& expert_offsets,
                                 c10::string_view epilogue_view) {
  const std::string epilogue(epilogue_view);
  check_grouped_gemm_int4(x, qweight, scales, zeros, expert_offsets, epilogue);
  return grouped_gemm_cpu(x, dequantize_int4_bf16(qweight, scales, zeros), expert_offsets, epilogue);
}

#ifdef DOTS1_WITH_CUDA

enum class Backend { kAuto, kCutlass, kDecode, kTorch };

SwiGLULayout layout_of(SwiGLU s) {
  return s == SwiGLU::kHF ? SwiGLULayout::kHF : s == SwiGLU::kInterleaved ? SwiGLULayout::kInterleaved : SwiGLULayout::kNone;
}

Backend backend_from_env() {
  const char* v = std::getenv("DOTS1_EXT_GEMM_BACKEND");
  if (v == nullptr || *v == '\0') return Backend::kAuto;
  const std::string s(v);
  if (s == "auto") return Backend::kAuto;
  if (s == "cutlass") return Backend::kCutlass;
  if (s == "decode") return Backend::kDecode;
  if (s == "torch") return Backend::kTorch;
  TORCH_CHECK_VALUE(false, "dots1_ext: DOTS1_EXT_GEMM_BACKEND must be auto, cutlass, decode or torch, got '", s, "'");
}

// A row count read per call: unset or empty gives fallback; anything but a whole non-negative number
// (no sign, no trailing characters) raises ValueError.
int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  errno = 0;
  const long long n = std::strtoll(v, &end, 10);
  TORCH_CHECK_VALUE(end != v && *end == '\0' && errno == 0 && n >= 0 && std::isdigit(static_cast<unsigned char>(*v)),
                    "dots1_ext: ", name, " must be a non-negative integer, got '", v, "'");
  return n;
}

// Per device: whether the sm90a CUTLASS kernels can run there, and its SM count.
struct DeviceInfo {
  bool sm90 = false;
  bool sm90_int4 = false;  // the int4 (W4A16) sm90a kernels too
  int sm_count = 0;
  // Rows per expert from which the bf16 / fp16 CUTLASS GEMM takes cooperative 128x256 tiles instead of
  // ping-pong 64x256 (run_cutlass; DOTS1_EXT_GEMM_COOP_MIN_ROWS overrides).
  int64_t coop_min_rows = 0;
};

// Measured at Dots1 shapes (bench/tune_grouped_gemm.py and the 8-layer model's prefill): on H100 SXM
// ping-pong wins up to ~100 rows per expert, cooperative from 192 (tied balanced, 15% faster Zipf) and
// by 4-27% at 384-768 (bench/results/2026-11-26-h100-tune). On the H200 ping-pong wins at 192 and 384
// rows per expert (gate_up 11% / 8% and down 11% / 5% balanced; down 10% / 5% Zipf, gate_up within 3%)
// and the two tie or trade places at 768; the 8-layer bf16 prefill with ping-pong up to 400 rows took
// 31.75 / 61.49 ms at T = 4096 / 8192 against 32.68 / 64.23 with the H100 bound in the same process
// (bench/results/2026-11-30-h200-0b9cf8b-int4-tile-128x192); re-checked to 1536 rows per expert, the two
// trade places by 1-3% up to ~800 rows and cooperative leads from 1152, and T = 16384 prefill is 1.9%
// faster under this bound than with ping-pong throughout (bench/results/2026-12-01-h200-b0ed974-clusters-dropped).
// The H800 shares the H100's memory system
// and gets its bound; other sm90 parts (GH200, H20), unmeasured, get the H200's.
int64_t default_coop_min_rows(int device) {
  cudaDeviceProp prop{};
  C10_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  const std::string name(prop.name);
  const bool h100_memory = name.find("H100") != std::string::npos || name.find("H800") != std::string::npos;
  return h100_memory ? 128 : 400;
}

const DeviceInfo& device_info(int device) {
  static std::mutex mu;
  static std::vector<std::unique_ptr<DeviceInfo>> cache(64);
  std::lock_guard<std::mutex> lock(mu);
  TORCH_CHECK(device >= 0 && device < static_cast<int>(cache.size()), "dots1_ext: device index ", device,
              " out of range");
  if (!cache[device]) {
    auto info = std::make_unique<DeviceInfo>();
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info->sm_count, cudaDevAttrMultiProcessorCount, device));
    info->coop_min_rows = default_coop_min_rows(device);
    // sm90_grouped_gemm_compiled() clears the error of a failed kernel-image query; an error still
    // pending from an earlier launch is reported here instead of being cleared with it.
    C10_CUDA_CHECK(cudaPeekAtLastError());
    info->sm90 = major == 9 && minor == 0 && sm90_grouped_gemm_compiled();
    info->sm90_int4 = major == 9 && minor == 0 && sm90_grouped_gemm_int4_compiled();
    cache[device] = std::move(info);
  }
  return *cache[device];
}

// A pointer usable by 16-byte vector loads and TMA; otherwise a fresh (aligned) copy. For the
// activations only: the weight is required to be so already (check_grouped_gemm).
at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

void run_decode(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& offsets, at::Tensor& out,
                const GemmShape& g, cudaStream_t stream) {
  const DType dt = to_dtype(x.scalar_type());
  // The decode kernel also zeroes the rows no expert owns.
  C10_CUDA_CHECK(launch_grouped_gemm_decode(x.data_ptr(), weight.data_ptr(), offsets.data_ptr<int32_t>(),
                                            out.data_ptr(), g.S, g.E, g.N, g.K, layout_of(g.swiglu), dt, stream));
}

// The epilogue after a backend that wrote the plain product into `full` ([S, N]).
void finish_unfused(const at::Tensor& full, const at::Tensor& offsets, at::Tensor& out, const GemmShape& g,
                    cudaStream_t stream) {
  const DType dt = to_dtype(out.scalar_type());
  if (g.swiglu != SwiGLU::kNone)
    C10_CUDA_CHECK(launch_silu_mul(full.data_ptr(), out.data_ptr(), g.S, g.N, layout_of(g.swiglu), dt, stream));
  C10_CUDA_CHECK(launch_zero_uncovered_rows(out.data_ptr(), offsets.data_ptr<int32_t>(), g.S, g.E, g.N_out, dt, stream));
}

void run_cutlass(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& offsets, at::Tensor& out,
                 const GemmShape& g, const DeviceInfo& info, cudaStream_t stream) {
  const DType dt = to_dtype(x.scalar_type());
  Sm90GemmConfig config;
  const char* cfg = std::getenv("DOTS1_EXT_GEMM_SM90_CONFIG");
  const std::string cfg_s = cfg != nullptr && *cfg != '\0' ? cfg : "auto";
  if (cfg_s == "coop") {
    config = Sm90GemmConfig::kCooperative128x256;
  } else if (cfg_s == "pingpong") {
    config = Sm90GemmConfig::kPingpong64x256;
  } else {
    TORCH_CHECK_VALUE(cfg_s == "auto", "dots1_ext: DOTS1_EXT_GEMM_SM90_CONFIG must be auto, coop or pingpong, got '",
                      cfg_s, "'");
    // Rows per expert on average (host-known, no data read); the bound per device: default_coop_min_rows.
    const int64_t rows_per_expert = g.S / std::max<int64_t>(g.E, 1);
    config = rows_per_expert >= env_int("DOTS1_EXT_GEMM_COOP_MIN_ROWS", info.coop_min_rows)
                 ? Sm90GemmConfig::kCooperative128x256
                 : Sm90GemmConfig::kPingpong64x256;
  }
  // The interleaved layout fuses SwiGLU into the epilogue; the HF layout's gate and up columns are
  // N/2 apart (different tiles), so it writes the product and runs the SiLU-mul kernel after.
  const bool fused = g.swiglu == SwiGLU::kInterleaved;
  const Sm90Epilogue epilogue = fused ? Sm90Epilogue::kSwiGLUInterleaved : Sm90Epilogue::kNone;
  const size_t ws_bytes = grouped_gemm_sm90_workspace_bytes(g.E, config, epilogue, dt, info.sm_count);
  // +256: the launcher wants a 256-byte aligned start.
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes + 256)}, x.options().dtype(at::kByte));
  char* ws = static_cast<char*>(workspace.data_ptr());
  const uintptr_t mis = reinterpret_cast<uintptr_t>(ws) % 256;
  if (mis) ws += 256 - mis;
  // The fused epilogue writes `out` itself; otherwise the plain product goes to `full` first.
  at::Tensor full = g.swiglu == SwiGLU::kHF ? at::empty({g.S, g.N}, x.options()) : out;
  C10_CUDA_CHECK(launch_grouped_gemm_sm90(x.data_ptr(), weight.data_ptr(), offsets.data_ptr<int32_t>(),
                                          full.data_ptr(), g.S, g.E, g.N, g.K, config, epilogue, dt, ws, ws_bytes,
                                          info.sm_count, stream));
  if (fused)
    C10_CUDA_CHECK(launch_zero_uncovered_rows(out.data_ptr(), offsets.data_ptr<int32_t>(), g.S, g.E, g.N_out, dt,
                                              stream));
  else
    finish_unfused(full, offsets, out, g, stream);
}

bool torch_grouped_mm_available() {
#ifdef DOTS1_HAVE_TORCH_GROUPED_MM
  return true;
#else
  return false;
#endif
}

// at::_grouped_mm; returns false (nothing launched) where torch does not support this GPU/dtype.
bool try_run_torch(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& offsets, at::Tensor& out,
                   const GemmShape& g, cudaStream_t stream, bool must) {
#ifdef DOTS1_HAVE_TORCH_GROUPED_MM
  // torch's groups are [offs[e-1], offs[e]) from 0: clamp into [0, S] and make them non-decreasing
  // so that no group can reach outside x; rows before off[0] and after off[E] are zeroed below.
  const at::Tensor offs = std::get<0>(at::cummax(offsets.narrow(0, 1, g.E).clamp(0, g.S), 0)).to(at::kInt);
  at::Tensor full;
  try {
    full = at::_grouped_mm(x, weight.transpose(1, 2), offs);
  } catch (const c10::Error& err) {
    if (must) throw;
    return false;
  }
  if (g.swiglu == SwiGLU::kNone) out = full;  // the product is the result: hand torch's buffer back instead of copying
  finish_unfused(full, offsets, out, g, stream);
  return true;
#else
  TORCH_CHECK(!must, "dots1_ext: DOTS1_EXT_GEMM_BACKEND=torch but this torch has no _grouped_mm");
  return false;
#endif
}

at::Tensor grouped_gemm_cuda(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& offsets_in,
                             c10::string_view epilogue_view) {
  const std::string epilogue(epilogue_view);
  const GemmShape g = check_grouped_gemm(x_in, weight_in, offsets_in, epilogue);
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor out = at::empty({g.S, g.N_out}, x_in.options());
  if (g.S == 0 || g.N_out == 0) return out;
  if (g.E == 0) return out.zero_();  // no expert owns any row
  const at::Tensor x = aligned_contiguous(x_in);
  const at::Tensor& weight = weight_in;  // contiguous and aligned: checked, never copied
  const at::Tensor offsets = offsets_in.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const Backend requested = backend_from_env();
  const bool half = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  const DeviceInfo& info = device_info(x.get_device());
  const bool cutlass_ok = info.sm90 && half && g.K > 0 && g.S <= INT32_MAX;

  switch (requested) {
    case Backend::kDecode:
      run_decode(x, weight, offsets, out, g, stream);
      return out;
    case Backend::kCutlass:
      TORCH_CHECK(cutlass_ok, "dots1_ext: DOTS1_EXT_GEMM_BACKEND=cutlass needs an sm90 GPU (compute capability 9.0), "
                  "a build with the sm_90a target, fp16/bf16 and K > 0 (device sm90 kernels usable: ", info.sm90,
                  ", dtype ", x.scalar_type(), ", K ", g.K, ")");
      run_cutlass(x, weight, offsets, out, g, info, stream);
      return out;
    case Backend::kTorch:
      try_run_torch(x, weight, offsets, out, g, stream, /*must=*/true);
      return out;
    case Backend::kAuto:
      break;
  }
  if (g.S <= env_int("DOTS1_EXT_GEMM_DECODE_MAX_ROWS", 128) || g.K == 0) {
    run_decode(x, weight, offsets, out, g, stream);
    return out;
  }
  if (cutlass_ok) {
    run_cutlass(x, weight, offsets, out, g, info, stream);
    return out;
  }
  if (half && torch_grouped_mm_available() && try_run_torch(x, weight, offsets, out, g, stream, /*must=*/false)) {
    TORCH_WARN_ONCE("dots1_ext: grouped_gemm has no sm90a kernel for this GPU/build; using torch._grouped_mm");
    return out;
  }
  TORCH_WARN_ONCE("dots1_ext: grouped_gemm has no fast kernel for this GPU/dtype (no sm90a, no usable "
                  "torch._grouped_mm); using the portable weight-streaming kernel, correct but slow for many rows");
  run_decode(x, weight, offsets, out, g, stream);
  return out;
}

enum class Int4Backend { kAuto, kCutlass, kDequantize };

Int4Backend int4_backend_from_env() {
  const char* v = std::getenv("DOTS1_EXT_GEMM_INT4_BACKEND");
  if (v == nullptr || *v == '\0') return Int4Backend::kAuto;
  const std::string s(v);
  if (s == "auto") return Int4Backend::kAuto;
  if (s == "cutlass") return Int4Backend::kCutlass;
  if (s == "dequantize") return Int4Backend::kDequantize;
  TORCH_CHECK_VALUE(false, "dots1_ext: DOTS1_EXT_GEMM_INT4_BACKEND must be auto, cutlass or dequantize, got '", s, "'");
}

// The auto tile's bounds on the mean rows of x per expert r = ceil(S / E). H200, real shape, the
// gate_up + down pair (bench/results/2026-11-30-h200-d328cf8-int4-exact-dequant and
// 2026-11-30-h200-0b9cf8b-int4-tile-128x192): the kernel's time grows with the tiles it runs, and a
// tile's MMAs run over its padding too, so the narrowest tile that holds an expert's rows wins.
// Balanced routing: 128x32 best to r = 24, 128x64 at r = 48, 128x128 at r = 96, 128x192 at r = 144,
// 288 and 576, 128x256 at r = 192 (whose experts' 160-230 rows spill out of one 192-row tile), 384
// and 768. Skewed routing (Zipf 1.2, and the 8-layer random model's prefill, which agree): 128x64 from
// r = 24, 128x128 at r = 96-144 (by 7-14% over 128x256, which wastes its width on the many small
// experts), 128x192 level with it at 192 (the models' prefill 0.7-2.3% faster in four runs) and ahead at 288-384,
// 128x256 from 576. The bounds follow the skewed case, as real batches are.
constexpr int64_t kInt4Tile32MaxRows = 16;
constexpr int64_t kInt4Tile64MaxRows = 64;
constexpr int64_t kInt4Tile128MaxRows = 160;
constexpr int64_t kInt4Tile192MaxRows = 384;

// DOTS1_EXT_GEMM_INT4_TILE (read per call): the CUTLASS int4 kernels' tile, (weight rows) x (rows of x).
// Unset, empty or auto: by the mean rows of x per expert, S / E (host shapes only, no sync): a tile's
// MMAs run over all its rows, padding included, while each weight k block is converted once per tile,
// so few rows want a narrow tile and many rows a wide one (H200 measurements: above). Any other value
// raises ValueError.
Int4Sm90Tile int4_tile_for(int64_t S, int64_t E) {
  const char* v = std::getenv("DOTS1_EXT_GEMM_INT4_TILE");
  const std::string s(v == nullptr ? "" : v);
  if (s == "128x32") return Int4Sm90Tile::k128x32;
  if (s == "128x64") return Int4Sm90Tile::k128x64;
  if (s == "128x128") return Int4Sm90Tile::k128x128;
  if (s == "128x192") return Int4Sm90Tile::k128x192;
  if (s == "128x256") return Int4Sm90Tile::k128x256;
  TORCH_CHECK_VALUE(s.empty() || s == "auto", "dots1_ext: DOTS1_EXT_GEMM_INT4_TILE must be auto, 128x32, 128x64, "
                    "128x128, 128x192 or 128x256, got '", s, "'");
  const int64_t rows_per_expert = E > 0 ? (S + E - 1) / E : S;
  if (rows_per_expert <= kInt4Tile32MaxRows) return Int4Sm90Tile::k128x32;
  if (rows_per_expert <= kInt4Tile64MaxRows) return Int4Sm90Tile::k128x64;
  if (rows_per_expert <= kInt4Tile128MaxRows) return Int4Sm90Tile::k128x128;
  if (rows_per_expert <= kInt4Tile192MaxRows) return Int4Sm90Tile::k128x192;
  return Int4Sm90Tile::k128x256;
}

at::Tensor grouped_gemm_int4_cuda(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales,
                                  const std::optional<at::Tensor>& zeros, const at::Tensor& offsets_in,
                                  c10::string_view epilogue_view) {
  const std::string epilogue(epilogue_view);
  const Int4GemmShape g = check_grouped_gemm_int4(x_in, qweight, scales, zeros, offsets_in, epilogue);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Int4Backend requested = int4_backend_from_env();
  const Int4Sm90Tile tile = int4_tile_for(g.S, g.E);
  const DeviceInfo& info = device_info(x_in.get_device());
  const bool cutlass_ok = info.sm90_int4 && g.S <= INT32_MAX && g.N <= INT32_MAX && g.K <= INT32_MAX;
  TORCH_CHECK(requested != Int4Backend::kCutlass || cutlass_ok, "dots1_ext: DOTS1_EXT_GEMM_INT4_BACKEND=cutlass "
              "needs an sm90 GPU (compute capability 9.0) and a build with the sm_90a target (device int4 sm90 "
              "kernels usable: ", info.sm90_int4, ")");
  if (requested == Int4Backend::kDequantize || !cutlass_ok) {
    if (requested == Int4Backend::kAuto) {
      TORCH_WARN_ONCE("dots1_ext: grouped_gemm_int4 has no sm90a kernel for this GPU/build; dequantizing the "
                      "weight into a bf16 copy and running grouped_gemm (correct, memory-hungry)");
    }
    return grouped_gemm_cuda(x_in, dequantize_int4_bf16(qweight, scales, zeros), offsets_in, epilogue);
  }
  at::Tensor out = at::empty({g.S, g.N_out}, x_in.options());
  if (g.S == 0 || g.N_out == 0) return out;
  if (g.E == 0) return out.zero_();  // no expert owns any row
  const at::Tensor x = aligned_contiguous(x_in);
  const at::Tensor offsets = offsets_in.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Sm90Epilogue ep = g.swiglu ? Sm90Epilogue::kSwiGLUInterleaved : Sm90Epilogue::kNone;
  const size_t ws_bytes = grouped_gemm_int4_sm90_workspace_bytes(g.E, g.N, g.K, tile, ep, info.sm_count);
  // +256: the launcher wants a 256-byte aligned start. From torch's caching allocator: CUDA-graph safe.
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes + 256)}, x.options().dtype(at::kByte));
  char* ws = static_cast<char*>(workspace.data_ptr());
  const uintptr_t mis = reinterpret_cast<uintptr_t>(ws) % 256;
  if (mis) ws += 256 - mis;
  const uint8_t* zp = zeros.has_value() ? zeros->data_ptr<uint8_t>() : nullptr;
  C10_CUDA_CHECK(launch_grouped_gemm_int4_sm90(x.data_ptr(), qweight.data_ptr<uint8_t>(), scales.data_ptr(), zp,
                                               offsets.data_ptr<int32_t>(), out.data_ptr(), g.S, g.E, g.N, g.K, tile, ep,
                                               ws, ws_bytes, info.sm_count, stream));
  C10_CUDA_CHECK(launch_zero_uncovered_rows(out.data_ptr(), offsets.data_ptr<int32_t>(), g.S, g.E, g.N_out,
                                            DType::kBFloat16, stream));
  return out;
}

#endif  // DOTS1_WITH_CUDA

}  // namespace
}  // namespace dots1

TORCH_LIBRARY_IMPL(dots1_ext, CPU, m) {
  m.impl("grouped_gemm", &dots1::grouped_gemm_cpu);
  m.impl("grouped_gemm_int4", &dots1::grouped_gemm_int4_cpu);
}

#ifdef DOTS1_WITH_CUDA
TORCH_LIBRARY_IMPL(dots1_ext, CUDA, m) {
  m.impl("grouped_gemm", &dots1::grouped_gemm_cuda);
  m.impl("grouped_gemm_int4", &dots1::grouped_gemm_int4_cuda);
}
#endif
