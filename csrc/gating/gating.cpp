// Top-k gating: argument checks, the CPU kernel, and the CUDA implementations that call the
// launchers of gating_kernels.cu. Semantics: dots1_ext.reference.topk_gating; tie and NaN rules in
// gating.h.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/version.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "common.h"
#include "gating/gating.h"

#ifdef DOTS1_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace dots1 {
namespace {

void check_routing_args(int64_t E, int64_t k, int64_t n_group, int64_t topk_group) {
  TORCH_CHECK_VALUE(E >= 1 && E <= kGatingMaxExperts, "dots1_ext: number of experts (logits.shape[1]) must be in [1, ",
                    kGatingMaxExperts, "], got ", E);
  TORCH_CHECK_VALUE(k >= 1 && k <= std::min<int64_t>(E, kGatingMaxTopk), "dots1_ext: k must be in [1, min(num_experts=",
                    E, ", ", kGatingMaxTopk, ")], got ", k);
  TORCH_CHECK_VALUE(n_group >= 1 && E % n_group == 0, "dots1_ext: n_group must be a positive divisor of num_experts=", E,
                    ", got ", n_group);
  TORCH_CHECK_VALUE(topk_group >= 1 && topk_group <= n_group, "dots1_ext: topk_group must be in [1, n_group=", n_group,
                    "], got ", topk_group);
  TORCH_CHECK_VALUE(k <= topk_group * (E / n_group), "dots1_ext: k=", k,
                    " exceeds the experts in the kept groups (topk_group=", topk_group, " x ", E / n_group, ")");
}

void check_topk_gating(const at::Tensor& logits, const at::Tensor& bias, int64_t k, int64_t n_group,
                       int64_t topk_group) {
  check_dtype(logits, "logits", {at::kFloat});
  check_shape(logits, "logits", {-1, -1});
  const int64_t E = logits.size(1);
  check_dtype(bias, "bias", {at::kFloat});
  check_shape(bias, "bias", {E});
  check_same_device(bias, "bias", logits, "logits");
  check_routing_args(E, k, n_group, topk_group);
}

void check_router_topk_gating(const at::Tensor& hidden, const at::Tensor& router_weight, const at::Tensor& bias,
                              int64_t k, int64_t n_group, int64_t topk_group) {
  check_dtype(hidden, "hidden", {at::kFloat, at::kHalf, at::kBFloat16});
  check_shape(hidden, "hidden", {-1, -1});
  check_dtype(router_weight, "router_weight", {at::kFloat, at::kHalf, at::kBFloat16});
  check_shape(router_weight, "router_weight", {-1, hidden.size(1)});
  check_same_device(router_weight, "router_weight", hidden, "hidden");
  const int64_t E = router_weight.size(0);
  check_dtype(bias, "bias", {at::kFloat});
  check_shape(bias, "bias", {E});
  check_same_device(bias, "bias", hidden, "hidden");
  check_routing_args(E, k, n_group, topk_group);
}

// One token on the CPU: the same keys, masks and summation order as the CUDA warp.
void gate_token_cpu(const float* logits, const float* bias, int E, int k, int n_group, int topk_group, bool renormalize,
                    float scale, float* weights_out, int32_t* ids_out, std::vector<float>& score,
                    std::vector<float>& choice, std::vector<uint64_t>& key) {
  for (int e = 0; e < E; ++e) {
    score[e] = 1.0f / (1.0f + std::exp(-logits[e]));
    choice[e] = score[e] + bias[e];
    key[e] = gating_key(choice[e], static_cast<uint32_t>(e));
  }
  if (topk_group < n_group) {
    const int group_size = E / n_group;
    std::vector<uint64_t> group_key(n_group);
    for (int g = 0; g < n_group; ++g) {
      float m1 = -INFINITY, m2 = -INFINITY;
      bool has_nan = false;  // NaN rule (gating.h): a NaN score makes the group score NaN
      for (int j = 0; j < group_size; ++j) {
        const float v = choice[g * group_size + j];
        has_nan |= v != v;
        if (v > m1) {
          m2 = m1;
          m1 = v;
        } else if (v > m2) {
          m2 = v;
        }
      }
      const float gs = has_nan ? NAN : group_size >= 2 ? m1 + m2 : m1;
      group_key[g] = gating_key(gs, static_cast<uint32_t>(g));
    }
    std::vector<char> kept(n_group, 0);
    for (int r = 0; r < topk_group; ++r) {
      int best = 0;
      for (int g = 1; g < n_group; ++g)
        if (group_key[g] > group_key[best]) best = g;
      kept[best] = 1;
      group_key[best] = 0;
    }
    for (int e = 0; e < E; ++e)
      if (!kept[e / group_size]) key[e] = 0;
  }
  float weight_sum = 0.0f;
  for (int j = 0; j < k; ++j) {
    int best = 0;
    for (int e = 1; e < E; ++e)
      if (key[e] > key[best]) best = e;
    key[best] = 0;
    ids_out[j] = best;
    weights_out[j] = score[best];
    weight_sum += score[best];
  }
  for (int j = 0; j < k; ++j) {
    const float w = renormalize ? weights_out[j] / (weight_sum + 1e-20f) : weights_out[j];
    weights_out[j] = w * static_cast<float>(scale);
  }
}

std::tuple<at::Tensor, at::Tensor> topk_gating_from_logits_cpu(const at::Tensor& logits_in, const at::Tensor& bias_in,
                                                               int64_t k, int64_t n_group, int64_t topk_group,
                                                               bool renormalize, double scale) {
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor bias = bias_in.contiguous();
  const int64_t T = logits.size(0);
  const int E = static_cast<int>(logits.size(1));
  at::Tensor weights = at::empty({T, k}, logits.options());
  at::Tensor ids = at::empty({T, k}, logits.options().dtype(at::kInt));
  const float* lp = logits.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* wp = weights.data_ptr<float>();
  int32_t* ip = ids.data_ptr<int32_t>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> score(E), choice(E);
    std::vector<uint64_t> key(E);
    for (int64_t t = begin; t < end; ++t)
      gate_token_cpu(lp + t * E, bp, E, static_cast<int>(k), static_cast<int>(n_group), static_cast<int>(topk_group),
                     renormalize, static_cast<float>(scale), wp + t * k, ip + t * k, score, choice, key);
  });
  return {weights, ids};
}

std::tuple<at::Tensor, at::Tensor> topk_gating_cpu(const at::Tensor& logits, const at::Tensor& bias, int64_t k,
                                                   int64_t n_group, int64_t topk_group, bool renormalize,
                                                   double scale) {
  check_topk_gating(logits, bias, k, n_group, topk_group);
  return topk_gating_from_logits_cpu(logits, bias, k, n_group, topk_group, renormalize, scale);
}

// The router projection exactly as the reference writes it (fp32 GEMM), so ids match it bit for bit.
at::Tensor router_logits(const at::Tensor& hidden, const at::Tensor& router_weight) {
  return at::matmul(hidden.to(at::kFloat), router_weight.to(at::kFloat).t());
}

std::tuple<at::Tensor, at::Tensor> router_topk_gating_cpu(const at::Tensor& hidden, const at::Tensor& router_weight,
                                                          const at::Tensor& bias, int64_t k, int64_t n_group,
                                                          int64_t topk_group, bool renormalize, double scale) {
  check_router_topk_gating(hidden, router_weight, bias, k, n_group, topk_group);
  return topk_gating_from_logits_cpu(router_logits(hidden, router_weight), bias, k, n_group, topk_group, renormalize,
                                     scale);
}

#ifdef DOTS1_WITH_CUDA

// Which kernel computes router_topk_gating for T <= kRouterFusedMaxTokens: "grid" (default: the
// weight read by the whole GPU, one launch), "cluster" (one thread-block cluster, sm_90; falls back
// to "gemm" elsewhere) or "gemm" (cuBLAS logits + the gating kernel, two launches). For tests and
// benchmarks; every path gives the same semantics.
enum class RouterKernel { kGrid, kCluster, kGemm };

RouterKernel router_kernel_from_env() {
  const char* v = std::getenv("DOTS1_EXT_ROUTER_KERNEL");
  if (v == nullptr || *v == '\0') return RouterKernel::kGrid;
  const std::string s(v);
  if (s == "auto" || s == "grid") return RouterKernel::kGrid;
  if (s == "cluster") return RouterKernel::kCluster;
  if (s == "gemm") return RouterKernel::kGemm;
  TORCH_CHECK_VALUE(false, "dots1_ext: DOTS1_EXT_ROUTER_KERNEL must be auto, grid, cluster or gemm, got '", s, "'");
}

// Whether the grid router's last block routes by ranks (route_by_rank, "1", the default) or with
// gate_token's rounds ("0"); the same outputs. For tests and benchmarks.
bool router_rank_from_env() {
  const char* v = std::getenv("DOTS1_EXT_ROUTER_RANK");
  if (v == nullptr || *v == '\0') return true;
  const std::string s(v);
  if (s == "1") return true;
  if (s == "0") return false;
  TORCH_CHECK_VALUE(false, "dots1_ext: DOTS1_EXT_ROUTER_RANK must be 1 or 0, got '", s, "'");
}

std::tuple<at::Tensor, at::Tensor> topk_gating_from_logits_cuda(const at::Tensor& logits_in, const at::Tensor& bias_in,
                                                                int64_t k, int64_t n_group, int64_t topk_group,
                                                                bool renormalize, double scale) {
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor bias = bias_in.contiguous();
  const int64_t T = logits.size(0);
  at::Tensor weights = at::empty({T, k}, logits.options());
  at::Tensor ids = at::empty({T, k}, logits.options().dtype(at::kInt));
  C10_CUDA_CHECK(launch_topk_gating(logits.data_ptr<float>(), bias.data_ptr<float>(), T,
                                    static_cast<int>(logits.size(1)), static_cast<int>(k), static_cast<int>(n_group),
                                    static_cast<int>(topk_group), renormalize, static_cast<float>(scale),
                                    weights.data_ptr<float>(), ids.data_ptr<int32_t>(),
                                    c10::cuda::getCurrentCUDAStream()));
  return {weights, ids};
}

std::tuple<at::Tensor, at::Tensor> topk_gating_cuda(const at::Tensor& logits, const at::Tensor& bias, int64_t k,
                                                    int64_t n_group, int64_t topk_group, bool renormalize,
                                                    double scale) {
  check_topk_gating(logits, bias, k, n_group, topk_group);
  c10::cuda::CUDAGuard guard(logits.device());
  return topk_gating_from_logits_cuda(logits, bias, k, n_group, topk_group, renormalize, scale);
}

std::tuple<at::Tensor, at::Tensor> router_topk_gating_cuda(const at::Tensor& hidden_in,
                                                           const at::Tensor& router_weight_in, const at::Tensor& bias_in,
                                                           int64_t k, int64_t n_group, int64_t topk_group,
                                                           bool renormalize, double scale) {
  check_router_topk_gating(hidden_in, router_weight_in, bias_in, k, n_group, topk_group);
  c10::cuda::CUDAGuard guard(hidden_in.device());
  const int64_t T = hidden_in.size(0);
  const int64_t H = hidden_in.size(1);
  // Decode: one launch computes the projection and the routing.
  const RouterKernel kernel = router_kernel_from_env();
  if (kernel != RouterKernel::kGemm && T >= 1 && T <= kRouterFusedMaxTokens &&
      hidden_in.scalar_type() == router_weight_in.scalar_type() && H <= std::numeric_limits<int>::max()) {
    const at::Tensor hidden = hidden_in.contiguous();
    const at::Tensor router_weight = router_weight_in.contiguous();
    const at::Tensor bias = bias_in.contiguous();
    const int E = static_cast<int>(router_weight.size(0));
    const DType dtype = to_dtype(hidden.scalar_type());
    // PDL (csrc/pdl.cuh) unless the weight or the bias was just copied here: the kernels read them
    // before their wait.
    const bool use_pdl = pdl_enabled() && router_weight.is_same(router_weight_in) && bias.is_same(bias_in);
    at::Tensor weights = at::empty({T, k}, hidden.options().dtype(at::kFloat));
    at::Tensor ids = at::empty({T, k}, hidden.options().dtype(at::kInt));
    cudaError_t err;
    if (kernel == RouterKernel::kGrid) {
      // Partial logits, [slices, T, E] fp32: 32 KB for Dots1 at T=1. No initialisation needed.
      at::Tensor workspace = at::empty({router_grid_workspace_floats(T, E, static_cast<int>(H), dtype)},
                                       hidden.options().dtype(at::kFloat));
      err = launch_router_topk_gating_grid(hidden.data_ptr(), router_weight.data_ptr(), dtype, bias.data_ptr<float>(),
                                           T, E, static_cast<int>(H), static_cast<int>(k), static_cast<int>(n_group),
                                           static_cast<int>(topk_group), renormalize, static_cast<float>(scale),
                                           workspace.data_ptr<float>(), weights.data_ptr<float>(),
                                           ids.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream(), use_pdl,
                                           router_rank_from_env());
    } else {
      err = launch_router_topk_gating_fused(hidden.data_ptr(), router_weight.data_ptr(), dtype, bias.data_ptr<float>(),
                                            T, E, static_cast<int>(H), static_cast<int>(k), static_cast<int>(n_group),
                                            static_cast<int>(topk_group), renormalize, static_cast<float>(scale),
                                            weights.data_ptr<float>(), ids.data_ptr<int32_t>(),
                                            c10::cuda::getCurrentCUDAStream(), use_pdl);
    }
    if (err != cudaErrorNotSupported) {
      C10_CUDA_CHECK(err);
      return {weights, ids};
    }
  }
  // Prefill (or no cluster support): one cuBLAS GEMM through ATen, then the gating kernel. For 16-bit
  // inputs the GEMM runs on tensor cores with an fp32 output: the bf16 x bf16 products are exact in
  // fp32 and are summed in fp32, as in the reference's fp32 GEMM (only the summation order differs),
  // at a tenth of the fp32 GEMM's time.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  const bool half = hidden_in.scalar_type() == at::kBFloat16 || hidden_in.scalar_type() == at::kHalf;
  if (half && router_weight_in.scalar_type() == hidden_in.scalar_type()) {
    return topk_gating_from_logits_cuda(at::mm(hidden_in, router_weight_in.t(), at::kFloat), bias_in, k, n_group,
                                        topk_group, renormalize, scale);
  }
#endif
  return topk_gating_from_logits_cuda(router_logits(hidden_in, router_weight_in), bias_in, k, n_group, topk_group,
                                      renormalize, scale);
}

#endif  // DOTS1_WITH_CUDA

}  // namespace
}  // namespace dots1

TORCH_LIBRARY_IMPL(dots1_ext, CPU, m) {
  m.impl("topk_gating", &dots1::topk_gating_cpu);
  m.impl("router_topk_gating", &dots1::router_topk_gating_cpu);
}

#ifdef DOTS1_WITH_CUDA
TORCH_LIBRARY_IMPL(dots1_ext, CUDA, m) {
  m.impl("topk_gating", &dots1::topk_gating_cuda);
  m.impl("router_topk_gating", &dots1::router_topk_gating_cuda);
}
#endif
