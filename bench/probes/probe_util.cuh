// Shared by the standalone probes in this folder (each is compiled on its own with nvcc).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#define CHECK(x)                                                                          \
  do {                                                                                    \
    cudaError_t e = (x);                                                                  \
    if (e != cudaSuccess) {                                                               \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__); \
      return 1;                                                                           \
    }                                                                                     \
  } while (0)

// Median ms per call of launch(i): CUDA events around 20 calls (i = 0..19) after 3 warm-up calls, the
// median of 5 repetitions.
template <typename Launch>
float time_ms(Launch launch, cudaEvent_t a, cudaEvent_t b) {
  for (int i = 0; i < 3; ++i) launch(i);
  std::vector<float> reps;
  for (int r = 0; r < 5; ++r) {
    cudaEventRecord(a);
    for (int i = 0; i < 20; ++i) launch(i);
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    reps.push_back(ms / 20);
  }
  std::sort(reps.begin(), reps.end());
  return reps[reps.size() / 2];
}

// The benches' "copy bandwidth": cudaMemcpy device to device over 1 GB, read + write bytes over the
// time_ms median, in GB/s; 0 when the buffers cannot be allocated (the caller reports it).
inline double copy_bandwidth_gbs(cudaEvent_t a, cudaEvent_t b) {
  const size_t bytes = size_t{1} << 30;
  char *src = nullptr, *dst = nullptr;
  if (cudaMalloc(&src, bytes) != cudaSuccess || cudaMalloc(&dst, bytes) != cudaSuccess ||
      cudaMemset(src, 0x5a, bytes) != cudaSuccess) {
    cudaFree(src);
    return 0.0;
  }
  const float ms = time_ms([&](int) { cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice); }, a, b);
  cudaFree(src);
  cudaFree(dst);
  return 2.0 * bytes / (ms * 1e6);
}

// permute's row_map for balanced random routing: each token picks k distinct experts of E (from rng),
// and its (token, slot) entries get rows in permute's order (by expert, then token, then slot).
inline std::vector<int32_t> balanced_row_map(int T, int k, int E, std::mt19937& rng) {
  const int64_t S = int64_t{T} * k;
  std::vector<int32_t> ids(S);
  std::vector<int> perm(E);
  std::iota(perm.begin(), perm.end(), 0);
  for (int t = 0; t < T; ++t) {
    for (int j = 0; j < k; ++j) std::swap(perm[j], perm[j + rng() % (E - j)]);
    for (int j = 0; j < k; ++j) ids[int64_t{t} * k + j] = perm[j];
  }
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t f = 0; f < S; ++f) ++start[ids[f] + 1];
  for (int e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int32_t> row_map(S);
  for (int64_t f = 0; f < S; ++f) row_map[f] = static_cast<int32_t>(start[ids[f]]++);
  return row_map;
}

// A device copy of h (nullptr when it cannot be made; the caller reports it). Never freed: the probes
// exit after one run.
template <typename T>
T* to_device(const std::vector<T>& h) {
  T* d = nullptr;
  if (cudaMalloc(&d, h.size() * sizeof(T)) != cudaSuccess ||
      cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice) != cudaSuccess) {
    cudaFree(d);
    return nullptr;
  }
  return d;
}

// The dispatch probes' table head: measures copy bandwidth, prints the shape and the floor (bytes over
// it) and the table's header; returns the floor in ms (0 when the copy could not run).
inline double dispatch_table_head(int T, int k, int H, int E, double bytes, cudaEvent_t a, cudaEvent_t b) {
  const double copy_gbs = copy_bandwidth_gbs(a, b);
  const double floor_ms = copy_gbs > 0 ? bytes / (copy_gbs * 1e6) : 0.0;
  std::printf("T=%d top-%d H=%d bf16, E=%d balanced; copy bandwidth %.0f GB/s; floor %.4f ms (%.0f MB over it)\n\n",
              T, k, H, E, copy_gbs, floor_ms, bytes / 1e6);
  std::printf("| variant | ms | GB/s | floor / time | bits vs current |\n| --- | --- | --- | --- | --- |\n");
  return floor_ms;
}

// Runs one variant of a kernel that writes out (out_bytes): out is filled with 0xff, launch() runs once
// and its output is compared bit for bit with ref (a device buffer; none: the row says no_ref), then
// timed (time_ms). Prints the table row: name, ms, GB/s of `bytes`, floor_ms / ms, the comparison.
template <typename Launch>
int run_variant(const char* name, Launch launch, void* out, const void* ref, size_t out_bytes, double bytes,
                double floor_ms, cudaEvent_t a, cudaEvent_t b, const char* no_ref = "(reference)") {
  CHECK(cudaMemset(out, 0xff, out_bytes));
  launch();
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  const char* bits = no_ref;
  if (ref != nullptr) {
    std::vector<unsigned char> got(out_bytes), want(out_bytes);
    CHECK(cudaMemcpy(got.data(), out, out_bytes, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(want.data(), ref, out_bytes, cudaMemcpyDeviceToHost));
    bits = std::memcmp(got.data(), want.data(), out_bytes) == 0 ? "equal" : "DIFFER";
  }
  const float ms = time_ms([&](int) { launch(); }, a, b);
  std::printf("| %s | %.4f | %.0f | %.2f | %s |\n", name, ms, bytes / (ms * 1e6), floor_ms / ms, bits);
  return 0;
}

// Shared-memory address of p, for the mbarrier and bulk-copy instructions.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Waits until the barrier's phase `parity` completed (try_wait in a loop; the labels are local to
// the braces, so the asm may be inlined more than once).
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_AGAIN:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_AGAIN;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
