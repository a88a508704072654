// Probe: where the decode router's ~14 µs go in the step. The grid router (csrc/gating/gating_kernels.cu
// router_gating_grid_kernel: 8 column slices x 16 groups of 8 experts = 128 CTAs; weights and bias read
// before the PDL wait) rebuilt here with %globaltimer stamps at its phase edges, in a PDL chain like the
// decode step's: a norm-like kernel that writes hidden -> the router -> a gate_up-like kernel that
// streams its first tiles (1 per CTA, 131 KB, 2 CTAs per SM) before its own wait, as gate_up does with
// hidden_settled, so the router runs beside a full-bandwidth stream. A standalone program (not part of
// the extension), run on the GPU:
//
//   nvcc -O3 -arch=sm_90a -Icsrc -o /tmp/router_phases bench/probes/router_phases.cu && /tmp/router_phases
//
// The same chain also runs the extension's own kernel (csrc/gating/gating_kernels.cu, compiled in
// here, launched through launch_router_topk_gating_grid as the op launches it): for both routers the
// stream kernel stamps when its PDL wait returns (the router grid complete and flushed), so the rebuild
// and the real kernel compare on the same edge.
//
// Reported (median over kIters chains; per-CTA phases: median over the 128 CTAs), µs, from the norm
// kernel's end (its last write, fenced): the router CTAs' return from the wait; hidden staged; partial
// sums stored and fenced; arrival; the last arrival; in the last block the partial sums loaded and the
// routing done (top-6 of 128, sigmoid + bias, as gate_token); with the stream, when its PDL wait returned
// (the router grid complete and flushed) and its last CTA's end. Rows: the rebuild without and with the
// stream beside, the real kernel with it (two rounds).
#include <cuda_bf16.h>

#include <cstdint>
#include <utility>

#include "gating/gating_kernels.cu"  // the real router (-Icsrc)
#include "probe_util.cuh"

constexpr int kE = 128, kH = 4096, kTopK = 6;
constexpr int kSlices = 8, kGroups = 16, kWarps = 8, kThreads = 256;
constexpr int kSliceElems = kH / kSlices;  // 512 bf16 = 1 KB per expert row and CTA
constexpr int kCtas = kSlices * kGroups;
constexpr int kPhases = 8;
constexpr int kIters = 20;
constexpr int kStreamTileBytes = 131072;  // one shared-expert tile of gate_up (16 rows x 4096 x bf16)

__device__ __forceinline__ unsigned long long now_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
__device__ __forceinline__ void pdl_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The norm: one CTA writes hidden (x scaled by its rms), then stamps its end.
__global__ void __launch_bounds__(kThreads) norm_kernel(const __nv_bfloat16* x, __nv_bfloat16* hidden,
                                                        unsigned long long* norm_end) {
  pdl_wait();
  pdl_launch_dependents();
  __shared__ float red[kWarps];
  float ss = 0.f;
  for (int i = threadIdx.x; i < kH; i += kThreads) ss += __bfloat162float(x[i]) * __bfloat162float(x[i]);
  ss = warp_sum(ss);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = ss;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kWarps; ++w) total += red[w];
  const float r = rsqrtf(total / kH + 1e-6f);
  for (int i = threadIdx.x; i < kH; i += kThreads) hidden[i] = __float2bfloat16(__bfloat162float(x[i]) * r);
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) *norm_end = now_ns();
}

__global__ void __launch_bounds__(kThreads) router_kernel(const __nv_bfloat16* hidden, const __nv_bfloat16* weight,
                                                          const float* bias, float* partial, unsigned int* arrivals,
                                                          int* ids_out, float* weights_out,
                                                          unsigned long long* stamps /* [kCtas][kPhases] */) {
  __shared__ __align__(16) __nv_bfloat16 hs[kSliceElems];
  __shared__ float logits[kE];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slice = blockIdx.x, e = blockIdx.y * kWarps + warp, cta = blockIdx.y * kSlices + blockIdx.x;
  const uint4* wrow = reinterpret_cast<const uint4*>(weight + static_cast<int64_t>(e) * kH + slice * kSliceElems);
  const uint4 w0 = wrow[lane], w1 = wrow[lane + 32];  // 64 vectors of 8 bf16 per row slice
  float b[kE / 32];
#pragma unroll
  for (int i = 0; i < kE / 32; ++i) b[i] = __ldg(bias + lane + 32 * i);
  unsigned long long* st = stamps + cta * kPhases;
  if (threadIdx.x == 0) st[0] = now_ns();  // resident
  pdl_wait();
  pdl_launch_dependents();
  if (threadIdx.x == 0) st[1] = now_ns();  // the wait returned
  if (threadIdx.x < kSliceElems / 8)
    reinterpret_cast<uint4*>(hs)[threadIdx.x] = reinterpret_cast<const uint4*>(hidden + slice * kSliceElems)[threadIdx.x];
  __syncthreads();
  if (threadIdx.x == 0) st[2] = now_ns();  // hidden staged
  float acc = 0.f;
  const uint4 wv[2] = {w0, w1};
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const uint4 hv = reinterpret_cast<const uint4*>(hs)[lane + 32 * u];
    const __nv_bfloat16* hp = reinterpret_cast<const __nv_bfloat16*>(&hv);
    const __nv_bfloat16* wp = reinterpret_cast<const __nv_bfloat16*>(&wv[u]);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc = fmaf(__bfloat162float(hp[i]), __bfloat162float(wp[i]), acc);
  }
  acc = warp_sum(acc);
  if (lane == 0) partial[slice * kE + e] = acc;
  __threadfence();
  __syncthreads();
  int is_last = 0;
  if (threadIdx.x == 0) {
    st[3] = now_ns();  // partial sums stored and fenced
    is_last = atomicInc(arrivals, kCtas - 1) == kCtas - 1;
    st[4] = now_ns();  // arrived
  }
  if (!__syncthreads_or(is_last)) return;
  __threadfence();
  if (threadIdx.x < kE) {
    float s = 0.f;
#pragma unroll
    for (int sl = 0; sl < kSlices; ++sl) s += __ldcg(partial + sl * kE + threadIdx.x);
    logits[threadIdx.x] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) st[5] = now_ns();  // the last block: logits summed
  if (warp == 0) {
    float score[kE / 32], key[kE / 32];
#pragma unroll
    for (int i = 0; i < kE / 32; ++i) {
      score[i] = 1.f / (1.f + expf(-logits[lane + 32 * i]));
      key[i] = score[i] + b[i];
    }
    for (int j = 0; j < kTopK; ++j) {
      float best = -INFINITY;
      int best_e = 0;
#pragma unroll
      for (int i = 0; i < kE / 32; ++i)
        if (key[i] > best) best = key[i], best_e = lane + 32 * i;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float ob = __shfl_xor_sync(0xffffffffu, best, o);
        const int oe = __shfl_xor_sync(0xffffffffu, best_e, o);
        if (ob > best || (ob == best && oe < best_e)) best = ob, best_e = oe;
      }
      if (lane == best_e % 32) key[best_e / 32] = -INFINITY;
      if (lane == 0) {
        ids_out[j] = best_e;
        weights_out[j] = best;
      }
    }
    __syncwarp();
    if (lane == 0) st[6] = now_ns();  // routed
  }
}

// gate_up's shared tiles under hidden_settled: each CTA streams one 131 KB tile before its wait.
__global__ void __launch_bounds__(kThreads, 2) stream_kernel(const uint4* weights, int tiles, float* sink,
                                                             unsigned long long* stream_end,
                                                             unsigned long long* released) {
  const uint4* tile = weights + static_cast<int64_t>(blockIdx.x % tiles) * (kStreamTileBytes / 16);
  float acc = 0.f;
  for (int base = 0; base < kStreamTileBytes / 16; base += kThreads * 8) {
    uint4 v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u)
      asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                   : "=r"(v[u].x), "=r"(v[u].y), "=r"(v[u].z), "=r"(v[u].w)
                   : "l"(tile + base + u * kThreads + threadIdx.x));
#pragma unroll
    for (int u = 0; u < 8; ++u) acc += __uint_as_float(v[u].x ^ v[u].w);
  }
  pdl_wait();
  pdl_launch_dependents();
  if (threadIdx.x == 0) atomicMin(released, now_ns());  // the router grid complete and flushed
  if (acc == 1.2345f) sink[0] = acc;  // keeps the loads
  __syncthreads();
  if (threadIdx.x == 0) atomicMax(stream_end, now_ns());
}

template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, dim3 grid, int threads, bool pdl, Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(threads);
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attr;
  config.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

static double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

int main() {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int stream_ctas = 2 * sms;
  const int stream_tiles = 1024;  // 134 MB of tiles, cycled per chain: L2 (50 MB) serves none
  __nv_bfloat16 *x, *hidden, *weight;
  float *bias, *partial, *weights_out, *sink;
  int* ids;
  unsigned int* arrivals;
  unsigned long long *stamps, *norm_end, *stream_end;
  uint4* tiles;
  CHECK(cudaMalloc(&x, kH * 2));
  CHECK(cudaMalloc(&hidden, kH * 2));
  CHECK(cudaMalloc(&weight, size_t{kE} * kH * 2));
  CHECK(cudaMalloc(&bias, kE * 4));
  CHECK(cudaMalloc(&partial, kSlices * kE * 4));
  CHECK(cudaMalloc(&weights_out, kTopK * 4));
  CHECK(cudaMalloc(&sink, 4));
  CHECK(cudaMalloc(&ids, kTopK * 4));
  CHECK(cudaMalloc(&arrivals, 4));
  CHECK(cudaMalloc(&stamps, size_t{kIters} * kCtas * kPhases * 8));
  CHECK(cudaMalloc(&norm_end, kIters * 8));
  CHECK(cudaMalloc(&stream_end, kIters * 8));
  CHECK(cudaMalloc(&tiles, size_t{stream_tiles} * kStreamTileBytes));
  CHECK(cudaMemset(x, 0x3f, kH * 2));
  CHECK(cudaMemset(weight, 0x3c, size_t{kE} * kH * 2));
  CHECK(cudaMemset(bias, 0, kE * 4));
  CHECK(cudaMemset(arrivals, 0, 4));
  CHECK(cudaMemset(tiles, 0x11, size_t{stream_tiles} * kStreamTileBytes));
  std::printf("router_phases: %d SMs; router %d CTAs x %d threads; stream beside it: %d CTAs x 131 KB; "
              "%d chains per row; us from the norm's end (medians)\n", sms, kCtas, kThreads, stream_ctas, kIters);
  float* real_workspace = nullptr;
  CHECK(cudaMalloc(&real_workspace, dots1::router_grid_workspace_floats(1, kE, kH, dots1::DType::kBFloat16) * 4));
  unsigned long long* released = nullptr;
  CHECK(cudaMalloc(&released, kIters * 8));
  // Rows: (router, stream beside): the rebuild alone and with the stream, the real kernel with it; twice.
  const std::pair<bool, bool> rows[] = {{false, false}, {false, true}, {true, true},
                                        {false, false}, {false, true}, {true, true}};
  for (const auto& [real, with_stream] : rows) {
    CHECK(cudaMemset(stamps, 0, size_t{kIters} * kCtas * kPhases * 8));
    CHECK(cudaMemset(stream_end, 0, kIters * 8));
    CHECK(cudaMemset(released, 0xff, kIters * 8));
    CHECK(cudaDeviceSynchronize());
    for (int it = 0; it < kIters; ++it) {  // back to back, PDL between every pair, as in a decode step
      CHECK(launch(norm_kernel, dim3(1), kThreads, it > 0, x, hidden, norm_end + it));
      if (real) {
        CHECK(dots1::launch_router_topk_gating_grid(hidden, weight, dots1::DType::kBFloat16, bias, 1, kE, kH, kTopK,
                                                    1, 1, true, 1.0f, real_workspace, weights_out, ids, nullptr,
                                                    true));
      } else {
        CHECK(launch(router_kernel, dim3(kSlices, kGroups), kThreads, true, hidden, weight, bias, partial, arrivals,
                     ids, weights_out, stamps + static_cast<size_t>(it) * kCtas * kPhases));
      }
      if (with_stream) {
        const uint4* first =
            tiles + static_cast<size_t>((it * stream_ctas) % (stream_tiles - stream_ctas)) * (kStreamTileBytes / 16);
        CHECK(launch(stream_kernel, dim3(stream_ctas), kThreads, true, first, stream_ctas, sink, stream_end + it,
                     released + it));
      }
    }
    CHECK(cudaDeviceSynchronize());
    std::vector<unsigned long long> h(size_t{kIters} * kCtas * kPhases), ne(kIters), se(kIters), rel(kIters);
    CHECK(cudaMemcpy(h.data(), stamps, h.size() * 8, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(ne.data(), norm_end, kIters * 8, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(se.data(), stream_end, kIters * 8, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(rel.data(), released, kIters * 8, cudaMemcpyDeviceToHost));
    // Per chain: the CTAs' medians of each phase edge, the last arrival, the last block's phases.
    std::vector<double> resident, waited, staged, stored, arrived, last_arrival, summed, routed, stream_done, freed;
    for (int it = 1; it < kIters; ++it) {  // the first chain has no PDL into its norm
      const double t0 = static_cast<double>(ne[it]);
      if (with_stream) {
        stream_done.push_back((static_cast<double>(se[it]) - t0) / 1000.0);
        freed.push_back((static_cast<double>(rel[it]) - t0) / 1000.0);
      }
      if (real) continue;  // the real kernel has no stamps
      std::vector<double> p[5];
      double last = 0, s5 = 0, s6 = 0;
      for (int c = 0; c < kCtas; ++c) {
        const unsigned long long* st = h.data() + (static_cast<size_t>(it) * kCtas + c) * kPhases;
        for (int k = 0; k < 5; ++k) p[k].push_back((static_cast<double>(st[k]) - t0) / 1000.0);
        last = std::max(last, (static_cast<double>(st[4]) - t0) / 1000.0);
        if (st[6] != 0) {
          s5 = (static_cast<double>(st[5]) - t0) / 1000.0;
          s6 = (static_cast<double>(st[6]) - t0) / 1000.0;
        }
      }
      resident.push_back(median(p[0]));
      waited.push_back(median(p[1]));
      staged.push_back(median(p[2]));
      stored.push_back(median(p[3]));
      arrived.push_back(median(p[4]));
      last_arrival.push_back(last);
      summed.push_back(s5);
      routed.push_back(s6);
    }
    std::printf("%-8s %-12s", real ? "real" : "rebuilt", with_stream ? "with stream" : "alone");
    if (!real)
      std::printf(" resident %+6.2f  wait returned %+6.2f  hidden staged %+6.2f  partials stored %+6.2f  "
                  "arrived %+6.2f  last arrival %+6.2f  logits summed %+6.2f  routed %+6.2f",
                  median(resident), median(waited), median(staged), median(stored), median(arrived),
                  median(last_arrival), median(summed), median(routed));
    if (with_stream)
      std::printf("  | stream's wait returned %+6.2f  stream's last CTA %+6.2f", median(freed), median(stream_done));
    std::printf("\n");
  }
  return 0;
}
