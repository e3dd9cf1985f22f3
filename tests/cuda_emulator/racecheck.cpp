// Race check of csrc/*.cu on the host emulator, built with -fsanitize=thread by
// tests/test_cuda_emulated.py (torch-free, so ThreadSanitizer sees the whole program).
//
// Each emulated CUDA thread is a host thread and __syncthreads a std::barrier, so a missing
// barrier between a shared-memory write and another thread's read is a data race that
// ThreadSanitizer reports (the host stand-in for compute-sanitizer's racecheck). Each op's
// driver (racecheck_<op>.cpp, linked in by build.py) registers a check that also compares
// the results with float64 loops, so a run that races silently still fails.
#include <cstdio>
#include <string>
#include <vector>

#include "racecheck.h"

namespace {

// Negative controls: two races that the check must report (`racecheck missing-barrier`,
// `racecheck blocks-collide`), so that a harness which stopped seeing races fails its test.
__global__ void missing_barrier(float* out) {
  __shared__ float cell[64];
  cell[threadIdx.x] = float(threadIdx.x);
  out[threadIdx.x] = cell[(threadIdx.x + 1) % 64];  // a __syncthreads() belongs before this
}

__global__ void blocks_collide(float* out) {
  if (threadIdx.x == 0) out[0] = float(blockIdx.x);  // every block writes the same element
}

int race_on_purpose(const std::string& which) {
  std::vector<float> out(64, 0.f);
  if (which == "missing-barrier") {
    missing_barrier<<<1, 64>>>(out.data());
  } else if (which == "blocks-collide") {
    blocks_collide<<<8, 32>>>(out.data());
  } else {
    std::fprintf(stderr, "unknown race %s (missing-barrier, blocks-collide)\n", which.c_str());
    return 2;
  }
  std::printf("racecheck: %s ran\n", which.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1) return race_on_purpose(argv[1]);
  bool ok = !racecheck::registered().empty();
  for (const auto& [op, run] : racecheck::registered()) {
    std::printf("racecheck: %s\n", op);
    ok &= run();
  }
  std::printf(ok ? "racecheck: all results match\n" : "racecheck: MISMATCH\n");
  return ok ? 0 : 1;
}
