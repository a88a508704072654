// Gather-in-A probe, step 2 (issue 15): the gate_up grouped GEMM (SwiGLU epilogue) with its A rows read
// straight from the token rows (gather_mainloop.cuh, beside this file) against today's permute copy +
// GEMM over the permuted rows, at real shape (H=4096, E=128, top-6, N = 2 * 1408). A standalone
// program, run on the GPU (CUTLASS: the nvidia-cutlass wheel's cutlass_library/source/include):
//
//   nvcc -O3 -std=c++17 -arch=sm_90a --expt-relaxed-constexpr -Icsrc -I$CUTLASS_INCLUDE \
//        -o /tmp/gather_gemm bench/probes/gather_gemm.cu && /tmp/gather_gemm
//
// Checks, per (T, routing, configuration): the gather GEMM's output against the plain GEMM's, bit for
// bit (the same MMA order over the same A values), and with one row_token out of range: that row NaN,
// every other row unchanged. Then times (probe_util.cuh's time_ms, CUDA events, medians): the row
// copy alone, the plain GEMM alone, copy + plain GEMM, and the gather GEMM.
// GATHER_GEMM_FIRST_ONLY=1: the first case only (T=16384 balanced, cooperative), e.g. under ncu.
#include <cmath>
#include <cstdlib>

#include "probe_util.cuh"
#include "gather_mainloop.cuh"

using Element = cutlass::bfloat16_t;
constexpr int kTopK = 6, kE = 128, kH = 4096, kI = 1408, kN = 2 * kI;

__global__ void fill_random(uint16_t* p, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    const float v = (static_cast<float>(h & 0xffff) / 65536.0f - 0.5f) * 0.25f;
    p[i] = static_cast<uint16_t>(__float_as_uint(v) >> 16);  // bf16 by truncation
  }
}

// permuted[r] = hidden[row_token[r]] (what permute's row copy writes).
__global__ void gather_rows(const uint4* __restrict__ hidden, const int32_t* __restrict__ row_token, int64_t S,
                            uint4* __restrict__ permuted) {
  constexpr int kVecs = kH / 8;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < S * kVecs; i += int64_t{gridDim.x} * blockDim.x)
    permuted[i] = hidden[int64_t{row_token[i / kVecs]} * kVecs + i % kVecs];
}

// The expert-sorted rows of a routing: row_token [S] (each row's token, rows by expert, then token,
// then slot, as permute orders them) and offsets [E + 1]. Balanced: each token picks k distinct experts
// uniformly; Zipf (s = 1.2): with weights 1 / (e + 1)^1.2.
struct Routing {
  std::vector<int32_t> row_token, offsets;
};
Routing make_routing(int T, bool zipf, std::mt19937& rng) {
  std::vector<double> w(kE);
  for (int e = 0; e < kE; ++e) w[e] = zipf ? 1.0 / std::pow(e + 1.0, 1.2) : 1.0;
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<std::vector<int32_t>> tokens_of(kE);
  for (int t = 0; t < T; ++t) {
    std::vector<double> left = w;
    for (int j = 0; j < kTopK; ++j) {
      double total = 0;
      for (double x : left) total += x;
      double pick = u(rng) * total;
      int e = 0;
      while (e < kE - 1 && (pick -= left[e]) > 0) ++e;
      while (left[e] == 0) e = (e + 1) % kE;
      tokens_of[e].push_back(t);
      left[e] = 0;
    }
  }
  Routing r;
  r.offsets.push_back(0);
  for (int e = 0; e < kE; ++e) {
    r.row_token.insert(r.row_token.end(), tokens_of[e].begin(), tokens_of[e].end());
    r.offsets.push_back(static_cast<int32_t>(r.row_token.size()));
  }
  return r;
}

// Counts the rows of out [S, kI] that differ from ref (bitwise), and whether row `nan_row` (or none: -1)
// is all NaN in out.
int compare(const uint16_t* out, const uint16_t* ref, int64_t S, int64_t nan_row, int64_t* differing, bool* nan_ok) {
  std::vector<uint16_t> got(S * kI), want(S * kI);
  CHECK(cudaMemcpy(got.data(), out, S * kI * 2, cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(want.data(), ref, S * kI * 2, cudaMemcpyDeviceToHost));
  *differing = 0;
  *nan_ok = true;
  for (int64_t r = 0; r < S; ++r) {
    if (r == nan_row) {
      for (int c = 0; c < kI; ++c) {
        const uint16_t v = got[r * kI + c];
        if (!((v & 0x7f80) == 0x7f80 && (v & 0x7f) != 0)) *nan_ok = false;
      }
      continue;
    }
    if (std::memcmp(&got[r * kI], &want[r * kI], kI * 2) != 0) ++*differing;
  }
  return 0;
}

template <class Config>
int run_case(const char* config_name, int T, bool zipf, int sms, const uint16_t* hidden, const uint16_t* weight,
             void* ws, size_t ws_bytes, cudaEvent_t a, cudaEvent_t b) {
  std::mt19937 rng(T);
  const Routing routing = make_routing(T, zipf, rng);
  const int64_t S = int64_t{T} * kTopK;
  int32_t* token_d = to_device(routing.row_token);
  int32_t* offsets_d = to_device(routing.offsets);
  uint16_t *permuted = nullptr, *out_plain = nullptr, *out_gather = nullptr;
  CHECK(cudaMalloc(&permuted, S * kH * 2));
  CHECK(cudaMalloc(&out_plain, S * kI * 2));
  CHECK(cudaMalloc(&out_gather, S * kI * 2));
  if (token_d == nullptr || offsets_d == nullptr) CHECK(cudaErrorMemoryAllocation);

  auto copy = [&]() { gather_rows<<<8 * sms, 512>>>(reinterpret_cast<const uint4*>(hidden), token_d, S, reinterpret_cast<uint4*>(permuted)); };
  auto plain = [&]() {
    return dots1::sm90::run<Element, Config, true>(permuted, weight, offsets_d, out_plain, S, kE, kN, kH, ws, ws_bytes, sms, nullptr);
  };
  auto gather = [&](int warps) {
    return warps == 1 ? dots1::sm90::run_gather<Element, Config, 1>(hidden, token_d, T, weight, offsets_d, out_gather, S, kE,
                                                                     kN, kH, ws, ws_bytes, sms, nullptr)
                      : dots1::sm90::run_gather<Element, Config, 2>(hidden, token_d, T, weight, offsets_d, out_gather, S, kE,
                                                                     kN, kH, ws, ws_bytes, sms, nullptr);
  };
  copy();
  CHECK(plain());
  CHECK(cudaDeviceSynchronize());
  int max_rows = 0;
  for (int e = 0; e < kE; ++e) max_rows = std::max(max_rows, routing.offsets[e + 1] - routing.offsets[e]);
  const float copy_ms = time_ms([&](int) { copy(); }, a, b);
  const float both_ms = time_ms([&](int) { copy(); (void)plain(); }, a, b);
  for (int warps : {1, 2}) {
    CHECK(cudaMemset(out_gather, 0xff, S * kI * 2));
    CHECK(gather(warps));
    CHECK(cudaDeviceSynchronize());
    int64_t differing = 0;
    bool nan_ok = true;
    if (compare(out_gather, out_plain, S, -1, &differing, &nan_ok)) return 1;
    // One row's token out of range (T): that row must come out NaN, the others unchanged.
    const int64_t poison_row = S / 3;
    const int32_t bad = T;
    CHECK(cudaMemcpy(token_d + poison_row, &bad, 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemset(out_gather, 0xff, S * kI * 2));
    CHECK(gather(warps));
    CHECK(cudaDeviceSynchronize());
    int64_t differing_poison = 0;
    bool poison_nan = false;
    if (compare(out_gather, out_plain, S, poison_row, &differing_poison, &poison_nan)) return 1;
    CHECK(cudaMemcpy(token_d + poison_row, &routing.row_token[poison_row], 4, cudaMemcpyHostToDevice));

    // Plain and gather alternate, twice each, so drift between them shows.
    const float plain_ms = time_ms([&](int) { (void)plain(); }, a, b);
    const float gather_ms = time_ms([&](int) { (void)gather(warps); }, a, b);
    const float plain_ms2 = time_ms([&](int) { (void)plain(); }, a, b);
    const float gather_ms2 = time_ms([&](int) { (void)gather(warps); }, a, b);
    const double flops = 2.0 * S * kN * kH;
    const float best = std::min(gather_ms, gather_ms2);
    std::printf("| %d | %s (max %d rows) | %s | %d | %.4f | %.4f / %.4f | %.4f | %.4f / %.4f (%.0f TFLOP/s) | %.3f | %s | %s |\n",
                T, zipf ? "zipf" : "balanced", max_rows, config_name, warps, copy_ms, plain_ms, plain_ms2, both_ms,
                gather_ms, gather_ms2, flops / (best * 1e9), both_ms / best, differing == 0 ? "equal" : "DIFFER",
                differing_poison == 0 && poison_nan ? "NaN row, rest equal" : "WRONG");
    if (differing != 0) std::printf("  %lld rows differ\n", static_cast<long long>(differing));
  }
  cudaFree(permuted);
  cudaFree(out_plain);
  cudaFree(out_gather);
  cudaFree(token_d);
  cudaFree(offsets_d);
  return 0;
}

int main() {
  std::setvbuf(stdout, nullptr, _IONBF, 0);  // rows survive a timeout
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  const int kMaxT = 16384;
  uint16_t *hidden = nullptr, *weight = nullptr;
  CHECK(cudaMalloc(&hidden, int64_t{kMaxT} * kH * 2));
  CHECK(cudaMalloc(&weight, int64_t{kE} * kN * kH * 2));
  fill_random<<<4 * sms, 512>>>(hidden, int64_t{kMaxT} * kH, 1);
  fill_random<<<4 * sms, 512>>>(weight, int64_t{kE} * kN * kH, 2);
  using namespace dots1::sm90;
  const size_t ws_bytes = std::max({workspace_bytes<Element, Cooperative128x256, true>(kE, sms),
                                    workspace_bytes<Element, Pingpong64x256, true>(kE, sms),
                                    gather_workspace_bytes<Element, Cooperative128x256, 1>(kE, sms),
                                    gather_workspace_bytes<Element, Pingpong64x256, 1>(kE, sms),
                                    gather_workspace_bytes<Element, Cooperative128x256, 2>(kE, sms),
                                    gather_workspace_bytes<Element, Pingpong64x256, 2>(kE, sms)});
  void* ws = nullptr;
  CHECK(cudaMalloc(&ws, ws_bytes));
  CHECK(cudaDeviceSynchronize());
  std::printf("gate_up + SwiGLU, H=%d E=%d top-%d N=%d bf16; ms (plain and gather timed twice, alternating)\n\n", kH, kE,
              kTopK, kN);
  std::printf("| T | routing | config | gather warps | row copy | plain GEMM | copy + plain | gather GEMM | (copy + plain) / gather | "
              "gather vs plain | one bad row_token |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
  for (int T : {16384, 4096}) {
    for (bool zipf : {false, true}) {
      if (run_case<Cooperative128x256>("coop 128x256", T, zipf, sms, hidden, weight, ws, ws_bytes, a, b)) return 1;
      if (std::getenv("GATHER_GEMM_FIRST_ONLY") != nullptr) return 0;  // one case (for ncu)
      if (run_case<Pingpong64x256>("pingpong 64x256", T, zipf, sms, hidden, weight, ws, ws_bytes, a, b)) return 1;
    }
  }
  return 0;
}
