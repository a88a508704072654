// Top-k gating kernels: one warp per token, fp32 end to end, exact expf (no fast math), ties to the
// lower id, NaN ranked highest (gating_key in gating.h). Kernels and launchers only; Tensor code is in gating.cpp.
#include <cooperative_groups.h>

#include "cuda_utils.cuh"
#include "gating/gating.h"

namespace dots1 {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ uint64_t warp_max_key(uint64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t other = __shfl_xor_sync(kFullMask, v, o);
    v = other > v ? other : v;
  }
  return v;
}

// Routes one token with the whole warp. Expert e lives in lane e % 32, slot e / 32 (coalesced
// loads). kVPL = slots per lane = ceil(E / 32). logits_row may point to global or shared memory.
// choice_smem: 32 * kVPL floats private to this warp (read only when kGrouped).
template <int kVPL, bool kGrouped>
__device__ __forceinline__ void gate_token(const float* logits_row, const float* __restrict__ bias, int E, int k,
                                           int n_group, int topk_group, bool renormalize, float scale,
                                           float* choice_smem, float* __restrict__ weights_out,
                                           int32_t* __restrict__ ids_out, int lane) {
  uint64_t key[kVPL];
  float score[kVPL];
#pragma unroll
  for (int i = 0; i < kVPL; ++i) {
    const int e = lane + 32 * i;
    key[i] = 0;
    score[i] = 0.0f;
    if (e < E) {
      // Exact expf and an IEEE division: the same sigmoid as torch's CUDA kernel, so the chosen
      // experts do not move with an approximation.
      const float s = 1.0f / (1.0f + expf(-logits_row[e]));
      const float c = s + __ldg(bias + e);
      score[i] = s;
      key[i] = gating_key(c, static_cast<uint32_t>(e));
      if constexpr (kGrouped) choice_smem[e] = c;
    }
  }

  if constexpr (kGrouped) {
    __syncwarp();
    const int group_size = E / n_group;
    // Group score = sum of the group's two best biased scores (one when groups have one expert).
    uint64_t group_key[kVPL];
#pragma unroll
    for (int i = 0; i < kVPL; ++i) {
      const int g = lane + 32 * i;
      group_key[i] = 0;
      if (g < n_group) {
        float m1 = -INFINITY, m2 = -INFINITY;
        bool has_nan = false;
        const float* grp = choice_smem + g * group_size;
        for (int j = 0; j < group_size; ++j) {
          const float v = grp[j];
          has_nan |= v != v;
          if (v > m1) {
            m2 = m1;
            m1 = v;
          } else if (v > m2) {
            m2 = v;
          }
        }
        // NaN rule (gating.h): a group holding a NaN score has a NaN score, which ranks first.
        const float gs = has_nan ? __int_as_float(0x7fffffff) : group_size >= 2 ? m1 + m2 : m1;
        group_key[i] = gating_key(gs, static_cast<uint32_t>(g));
      }
    }
    int expert_group[kVPL];
#pragma unroll
    for (int i = 0; i < kVPL; ++i) expert_group[i] = (lane + 32 * i) / group_size;
    unsigned kept = 0;  // bit i: slot i's expert is in a kept group
    for (int r = 0; r < topk_group; ++r) {
      uint64_t best = 0;
#pragma unroll
      for (int i = 0; i < kVPL; ++i) best = group_key[i] > best ? group_key[i] : best;
      best = warp_max_key(best);
      const int g = static_cast<int>(gating_key_index(best));
#pragma unroll
      for (int i = 0; i < kVPL; ++i) {
        if (lane + 32 * i == g) group_key[i] = 0;
        if (expert_group[i] == g) kept |= 1u << i;
      }
    }
#pragma unroll
    for (int i = 0; i < kVPL; ++i)
      if (!((kept >> i) & 1u)) key[i] = 0;
    __syncwarp();  // choice_smem is rewritten by this warp's next token
  }

  float my_weight = 0.0f;
  int32_t my_id = 0;
  float weight_sum = 0.0f;
  for (int j = 0; j < k; ++j) {
    uint64_t best = 0;
#pragma unroll
    for (int i = 0; i < kVPL; ++i) best = key[i] > best ? key[i] : best;
    best = warp_max_key(best);
    const int idx = static_cast<int>(gating_key_index(best));
    float w = 0.0f;
#pragma unroll
    for (int i = 0; i < kVPL; ++i) {
      if (lane + 32 * i == idx) {
        w = score[i];
        key[i] = 0;
      }
    }
    w = __shfl_sync(kFullMask, w, idx & 31);
    weight_sum += w;  // slot order, identical in every lane
    if (lane == j) {
      my_weight = w;
      my_id = idx;
    }
  }
  if (lane < k) {
    float w = renormalize ? my_weight / (weight_sum + 1e-20f) : my_weight;
    weights_out[lane] = w * scale;
    ids_out[lane] = my_id;
  }
}

template <int kVPL, bool kGrouped>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    topk_gating_kernel(const float* __restrict__ logits, const float* __restrict__ bias, int64_t num_tokens, int E,
                       int k, int n_group, int topk_group, bool renormalize, float scale,
                       float* __restrict__ weights, int32_t* __restrict__ ids) {
  __shared__ float choice_smem[kGrouped ? kWarpsPerBlock * 32 * kVPL : 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= num_tokens) return;  // whole warp leaves; no block-wide barrier follows
  gate_token<kVPL, kGrouped>(logits + t * E, bias, E, k, n_group, topk_group, renormalize, scale,
                             choice_smem + warp * 32 * kVPL, weights + t * k, ids + t * k, lane);
}

// ---- fused router projection + gating (sm_90 thread-block cluster) ----

constexpr int kRouterWarps = 8;
constexpr int kRouterUnroll = 8;  // 16-byte weight loads in flight per lane
static_assert(kRouterUnroll >= 1, "kRouterUnroll");

template <typename T>
__device__ __forceinline__ void load16_as_float(const T* p, float (&out)[16 / sizeof(T)]) {
  const Vec16<T> v = *reinterpret_cast<const Vec16<T>*>(p);
#pragma unroll
  for (int i = 0; i < Vec16<T>::kElems; ++i) out[i] = to_float(v.v[i]);
}

template <int kVPL, bool kGrouped, typename T>
__global__ void __launch_bounds__(kRouterWarps * 32)
    router_gating_cluster_kernel(const T* __restrict__ hidden, const T* __restrict__ weight,
                                 const float* __restrict__ bias, int num_tokens, int E, int H, int k, int n_group,
                                 int topk_group, bool renormalize, float scale, bool vectorized,
                                 float* __restrict__ weights_out, int32_t* __restrict__ ids_out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  constexpr int kRow = 32 * kVPL;
  // Each block writes the logits of its experts here; block 0 then pulls the others' entries
  // (distributed shared memory) into the same positions of its own copy.
  __shared__ float logits_smem[kRouterFusedMaxTokens * kRow];
  __shared__ float choice_smem[kGrouped ? kRouterWarps * kRow : 1];
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int nblocks = static_cast<int>(cluster.num_blocks());
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  constexpr int kV = Vec16<T>::kElems;
  for (int e = rank * kRouterWarps + warp; e < E; e += nblocks * kRouterWarps) {
    float acc[kRouterFusedMaxTokens];
#pragma unroll
    for (int t = 0; t < kRouterFusedMaxTokens; ++t) acc[t] = 0.0f;
    const T* wrow = weight + static_cast<int64_t>(e) * H;
    if (vectorized) {
      const int nvec = H / kV;
      for (int c0 = lane; c0 < nvec; c0 += 32 * kRouterUnroll) {
        float wv[kRouterUnroll][kV];
#pragma unroll
        for (int u = 0; u < kRouterUnroll; ++u) {
          const int c = c0 + 32 * u;
          if (c < nvec) {
            load16_as_float(wrow + static_cast<int64_t>(c) * kV, wv[u]);
          } else {
#pragma unroll
            for (int i = 0; i < kV; ++i) wv[u][i] = 0.0f;
          }
        }
#pragma unroll
        for (int u = 0; u < kRouterUnroll; ++u) {
          const int c = c0 + 32 * u;
          if (c >= nvec) break;
#pragma unroll
          for (int t = 0; t < kRouterFusedMaxTokens; ++t) {
            if (t < num_tokens) {
              float hv[kV];
              load16_as_float(hidden + static_cast<int64_t>(t) * H + static_cast<int64_t>(c) * kV, hv);
#pragma unroll
              for (int i = 0; i < kV; ++i) acc[t] = fmaf(hv[i], wv[u][i], acc[t]);
            }
          }
        }
      }
    } else {
      for (int h = lane; h < H; h += 32) {
        const float wv = to_float(wrow[h]);
#pragma unroll
        for (int t = 0; t < kRouterFusedMaxTokens; ++t)
          if (t < num_tokens) acc[t] = fmaf(to_float(hidden[static_cast<int64_t>(t) * H + h]), wv, acc[t]);
      }
    }
#pragma unroll
    for (int t = 0; t < kRouterFusedMaxTokens; ++t) {
      if (t < num_tokens) {
        const float s = warp_sum(acc[t]);
        if (lane == 0) logits_smem[t * kRow + e] = s;
      }
    }
  }
  // Release/acquire at cluster scope: every block's logits are visible to block 0, and every block
  // has started (a precondition of distributed shared memory access).
  cluster.sync();
  if (rank == 0) {
    for (int i = threadIdx.x; i < num_tokens * kRow; i += blockDim.x) {
      const int e = i % kRow;
      const int owner = (e / kRouterWarps) % nblocks;  // inverse of the expert loop above
      if (e < E && owner != 0) logits_smem[i] = cluster.map_shared_rank(logits_smem, owner)[i];
    }
  }
  // Block 0 has finished reading the others' shared memory (they may exit now) and its copy
  // loop is complete (the cluster barrier is also a block barrier).
  cluster.sync();
  if (rank != 0) return;
  for (int t = warp; t < num_tokens; t += kRouterWarps) {
    gate_token<kVPL, kGrouped>(logits_smem + t * kRow, bias, E, k, n_group, topk_group, renormalize, scale,
                               choice_smem + warp * kRow, weights_out + static_cast<int64_t>(t) * k,
                               ids_out + static_cast<int64_t>(t) * k, lane);
  }
#endif
}

template <typename F>
cudaError_t dispatch_vpl(int E, F&& f) {
  if (E <= 32) return f(std::integral_constant<int, 1>{});
  if (E <= 64) return f(std::integral_constant<int, 2>{});
  if (E <= 128) return f(std::integral_constant<int, 4>{});
  if (E <= 256) return f(std::integral_constant<int, 8>{});
  if (E <= 512) return f(std::integral_constant<int, 16>{});
  return cudaErrorInvalidValue;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Cluster size for `kernel` on `device` (the current device): 16 where the GPU takes non-portable
// clusters, else 8; 0 when no cluster launch is possible. Host-only queries, run once per (device,
// kernel instantiation) by the caller's PerDeviceOnce. The caller has checked that no earlier error
// was pending, so the cudaGetLastError() calls here clear only what a failed probe call just set.
template <typename Kernel>
int query_cluster_size(Kernel kernel, int device) {
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    (void)cudaGetLastError();  // the failed query's own error
    return 0;
  }
  if (major < 9) return 0;
  for (int size : {16, 8}) {
    if (size > 8 && cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess) {
      (void)cudaGetLastError();  // the failed attribute call's own error
      continue;
    }
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(size);
    config.blockDim = dim3(kRouterWarps * 32);
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = size;
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    config.attrs = &attr;
    config.numAttrs = 1;
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) == cudaSuccess && clusters > 0) return size;
    (void)cudaGetLastError();  // the failed occupancy query's own error (if it failed)
  }
  return 0;
}

}  // namespace

cudaError_t launch_topk_gating(const float* logits, const float* bias, int64_t num_tokens, int num_experts, int k,
                               int n_group, int topk_group, bool renormalize, float scale, float* topk_weights,
                               int32_t* topk_ids, cudaStream_t stream) {
  if (num_tokens <= 0) return cudaSuccess;
  if (num_experts < 1 || num_experts > kGatingMaxExperts || k < 1 || k > kGatingMaxTopk || k > num_experts ||
      n_group < 1 || num_experts % n_group != 0 || topk_group < 1 || topk_group > n_group)
    return cudaErrorInvalidValue;
  const bool grouped = topk_group < n_group;
  const dim3 grid(ceil_div(num_tokens, kWarpsPerBlock));
  const dim3 block(kWarpsPerBlock * 32);
  return dispatch_vpl(num_experts, [&](auto vpl) {
    constexpr int kVPL = decltype(vpl)::value;
    if (grouped)
      topk_gating_kernel<kVPL, true><<<grid, block, 0, stream>>>(logits, bias, num_tokens, num_experts, k, n_group,
                                                                 topk_group, renormalize, scale, topk_weights,
                                                                 topk_ids);
    else
      topk_gating_kernel<kVPL, false><<<grid, block, 0, stream>>>(logits, bias, num_tokens, num_experts, k, n_group,
                                                                  topk_group, renormalize, scale, topk_weights,
                                                                  topk_ids);
    return cudaGetLastError();
  });
}

namespace {

template <int kVPL, bool kGrouped, typename T>
cudaError_t launch_router_cluster(const T* hidden, const T* weight, const float* bias, int num_tokens, int E, int H,
                                  int k, int n_group, int topk_group, bool renormalize, float scale,
                                  float* weights_out, int32_t* ids_out, cudaStream_t stream) {
  auto kernel = router_gating_cluster_kernel<kVPL, kGrouped, T>;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  // An error still pending belongs to an earlier launch: report it here rather than let the probe
  // below clear it.
  err = cudaPeekAtLastError();
  if (err != cudaSuccess) return err;
  static PerDeviceOnce<int> cluster_sizes;  // one per template instantiation (kernel)
  const int cluster = cluster_sizes.get(device, [&] { return query_cluster_size(kernel, device); });
  if (cluster == 0) return cudaErrorNotSupported;
  const bool vectorized = (H % Vec16<T>::kElems) == 0 && aligned16(hidden) && aligned16(weight);
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(cluster);
  config.blockDim = dim3(kRouterWarps * 32);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = cluster;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  config.attrs = &attr;
  config.numAttrs = 1;
  err = cudaLaunchKernelEx(&config, kernel, hidden, weight, bias, num_tokens, E, H, k, n_group, topk_group,
                           renormalize, scale, vectorized, weights_out, ids_out);
  const cudaError_t last = cudaGetLastError();  // this launch's error state, consumed (reported below)
  return err != cudaSuccess ? err : last;
}

}  // namespace

cudaError_t launch_router_topk_gating_fused(const void* hidden, const void* router_weight, DType dtype,
                                            const float* bias, int64_t num_tokens, int num_experts,
                                            int hidden_size, int k, int n_group, int topk_group, bool renormalize,
                                            float scale, float* topk_weights, int32_t* topk_ids,
                                            cudaStream_t stream) {
  if (num_tokens <= 0) return cudaSuccess;
  if (num_tokens > kRouterFusedMaxTokens) return cudaErrorNotSupported;
  if (num_experts < 1 || num_experts > kGatingMaxExperts || k < 1 || k > kGatingMaxTopk || k > num_experts ||
      n_group < 1 || num_experts % n_group != 0 || topk_group < 1 || topk_group > n_group || hidden_size < 0)
    return cudaErrorInvalidValue;
  const bool grouped = topk_group < n_group;
  cudaError_t err = cudaErrorInvalidValue;
  DOTS1_DISPATCH_FLOAT_TYPES(dtype, scalar_t, {
    err = dispatch_vpl(num_experts, [&](auto vpl) {
      constexpr int kVPL = decltype(vpl)::value;
      const auto* h = static_cast<const scalar_t*>(hidden);
      const auto* w = static_cast<const scalar_t*>(router_weight);
      const int T = static_cast<int>(num_tokens);
      if (grouped)
        return launch_router_cluster<kVPL, true, scalar_t>(h, w, bias, T, num_experts, hidden_size, k, n_group,
                                                           topk_group, renormalize, scale, topk_weights, topk_ids,
                                                           stream);
      return launch_router_cluster<kVPL, false, scalar_t>(h, w, bias, T, num_experts, hidden_size, k, n_group,
                                                          topk_group, renormalize, scale, topk_weights, topk_ids,
                                                          stream);
    });
  });
  return err;
}

}  // namespace dots1
