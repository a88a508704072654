// Probe: what handing a small result (the router's ids) from one set of CTAs to a whole persistent grid
// (gate_up's) costs, as a kernel boundary under PDL against an in-kernel handoff. The question behind
// it: would a gate_up kernel that routes by itself (arrival counter + a flag its CTAs spin on) start its
// routed tiles sooner than one that waits for the router kernel's completion? A standalone program (not
// part of the extension), run on the GPU:
//
//   nvcc -O3 -arch=sm_90a -o /tmp/pdl_boundary bench/probes/pdl_boundary.cu && /tmp/pdl_boundary
//
// Producer work: kProducerCtas CTAs (the grid router's 128) each spin `work_ns` on %globaltimer, then
// arrive on a counter; the last to arrive writes the value and %globaltimer (t_ready). Consumers: 2 CTAs
// of 256 threads per SM (gate_up's persistent grid); each CTA's thread 0 records when it can read the
// value, minus t_ready: the handoff latency.
//   chain+pdl  the producer kernel, then the consumer kernel launched with programmatic stream
//              serialization (it waits in griddepcontrol.wait, as our kernels do; the producer lets it
//              launch right after its own start, csrc/pdl.cuh rule 3)
//   chain      the same without PDL (plain stream order)
//   in-kernel  one kernel of the consumers' size: its first kProducerCtas CTAs also do the producer
//              work; the last arrival stores the value and then a flag with release semantics, every
//              CTA spins on the flag with acquire loads (the grid is one wave: all CTAs resident)
// Reported per variant over kIters runs: median and max over CTAs of the handoff latency, and the time
// from the first CTA's start to the last CTA's read (the whole handoff).
#include <cstdint>

#include "probe_util.cuh"

constexpr int kThreads = 256;
constexpr int kProducerCtas = 128;
constexpr int kIters = 20;

__device__ __forceinline__ uint64_t now_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
__device__ __forceinline__ void pdl_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }

struct Shared {  // global scratch, zeroed before every run
  unsigned int arrivals;
  unsigned int flag;
  int value;
  unsigned long long t_ready;
  unsigned long long t_first_start;
};

__device__ void produce(Shared* s, uint64_t work_ns, bool release_flag) {
  if (threadIdx.x == 0) {
    const uint64_t t0 = now_ns();
    atomicMin(&s->t_first_start, static_cast<unsigned long long>(t0));
    while (now_ns() - t0 < work_ns) {
    }
    __threadfence();
    if (atomicAdd(&s->arrivals, 1u) == kProducerCtas - 1) {
      s->value = 42;
      s->t_ready = now_ns();
      __threadfence();
      if (release_flag) asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(&s->flag), "r"(1u) : "memory");
    }
  }
}

__global__ void __launch_bounds__(kThreads) producer_kernel(Shared* s, uint64_t work_ns) {
  pdl_launch_dependents();  // the consumers may become resident at once (they wait in griddepcontrol.wait)
  if (blockIdx.x < kProducerCtas) produce(s, work_ns, false);
}

__global__ void __launch_bounds__(kThreads, 2) consumer_kernel(Shared* s, unsigned long long* t_read, int* seen) {
  pdl_wait();
  if (threadIdx.x == 0) {
    const int v = *reinterpret_cast<volatile int*>(&s->value);
    t_read[blockIdx.x] = now_ns();
    seen[blockIdx.x] = v;
  }
}

__global__ void __launch_bounds__(kThreads, 2) in_kernel(Shared* s, uint64_t work_ns, unsigned long long* t_read,
                                                         int* seen) {
  if (blockIdx.x < kProducerCtas) produce(s, work_ns, true);
  if (threadIdx.x == 0) {
    unsigned int f = 0;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(f) : "l"(&s->flag) : "memory");
    } while (f == 0);
    const int v = *reinterpret_cast<volatile int*>(&s->value);
    t_read[blockIdx.x] = now_ns();
    seen[blockIdx.x] = v;
  }
}

int main() {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int consumers = 2 * sms;
  Shared* s = nullptr;
  unsigned long long* t_read = nullptr;
  int* seen = nullptr;
  CHECK(cudaMalloc(&s, sizeof(Shared)));
  CHECK(cudaMalloc(&t_read, consumers * sizeof(unsigned long long)));
  CHECK(cudaMalloc(&seen, consumers * sizeof(int)));
  std::vector<unsigned long long> host_t(consumers);
  std::vector<int> host_seen(consumers);
  std::printf("pdl_boundary: %d SMs, %d producer CTAs, %d consumer CTAs x %d threads, %d runs per row\n", sms,
              kProducerCtas, consumers, kThreads, kIters);
  for (const uint64_t work_ns : {2000ull, 8000ull}) {
    for (const char* variant : {"chain+pdl", "chain", "in-kernel"}) {
      std::vector<double> medians, maxima, spans;
      for (int it = 0; it < kIters; ++it) {
        Shared init = {0u, 0u, 0, 0ull, ~0ull};
        CHECK(cudaMemcpy(s, &init, sizeof(Shared), cudaMemcpyHostToDevice));
        CHECK(cudaMemset(seen, 0, consumers * sizeof(int)));
        CHECK(cudaDeviceSynchronize());
        if (variant[0] == 'i') {
          in_kernel<<<consumers, kThreads>>>(s, work_ns, t_read, seen);
        } else {
          producer_kernel<<<kProducerCtas, kThreads>>>(s, work_ns);
          cudaLaunchConfig_t config = {};
          config.gridDim = dim3(consumers);
          config.blockDim = dim3(kThreads);
          cudaLaunchAttribute attr;
          attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
          attr.val.programmaticStreamSerializationAllowed = 1;
          config.attrs = &attr;
          config.numAttrs = variant[5] == '+' ? 1 : 0;
          CHECK(cudaLaunchKernelEx(&config, consumer_kernel, s, t_read, seen));
        }
        CHECK(cudaGetLastError());
        CHECK(cudaDeviceSynchronize());
        Shared out;
        CHECK(cudaMemcpy(&out, s, sizeof(Shared), cudaMemcpyDeviceToHost));
        CHECK(cudaMemcpy(host_t.data(), t_read, consumers * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
        CHECK(cudaMemcpy(host_seen.data(), seen, consumers * sizeof(int), cudaMemcpyDeviceToHost));
        std::vector<double> lat(consumers);
        unsigned long long last = 0;
        for (int c = 0; c < consumers; ++c) {
          if (host_seen[c] != 42) {
            std::printf("%s: CTA %d read %d, not the value\n", variant, c, host_seen[c]);
            return 1;
          }
          lat[c] = static_cast<double>(static_cast<long long>(host_t[c] - out.t_ready)) / 1000.0;
          last = std::max(last, host_t[c]);
        }
        std::sort(lat.begin(), lat.end());
        medians.push_back(lat[consumers / 2]);
        maxima.push_back(lat.back());
        spans.push_back(static_cast<double>(last - out.t_first_start) / 1000.0);
      }
      const auto med = [](std::vector<double> v) {
        std::sort(v.begin(), v.end());
        return v[v.size() / 2];
      };
      std::printf("work %5.1f us  %-10s handoff median %6.2f us  max %6.2f us | first start -> last read %6.2f us\n",
                  work_ns / 1000.0, variant, med(medians), med(maxima), med(spans));
    }
  }
  return 0;
}
