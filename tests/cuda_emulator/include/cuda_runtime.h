// Host emulation of the CUDA runtime subset that csrc/*.cu uses (tests only).
//
// Replaces the toolkit's cuda_runtime.h when csrc/*.cu is compiled as plain C++ by
// tests/cuda_emulator/build.py. A launch `kernel<<<grid, block, shmem, stream>>>(args)`,
// rewritten by build.py to `emu::launch(kernel, emu::Config{grid, block, ...}, args)`, runs
// the blocks one after another, in a shuffled order, each as block.x·block.y·block.z real
// host threads: __syncthreads() is a std::barrier, __shared__ variables are function statics
// (one block at a time, so every thread of the running block sees the same object), and
// threadIdx / blockIdx are thread_local; each run of 32 consecutive threads is a warp with
// its own std::barrier for __syncwarp(). What this checks: indexing, bounds, the tiling
// logic and the arithmetic, with races between the threads of a block as real as the host
// makes them. What it cannot: warp timing, memory-model subtleties, shared-memory limits,
// performance. It is a test harness, not a CUDA implementation.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

inline thread_local dim3 threadIdx{0, 0, 0};
inline thread_local dim3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
};
enum cudaDeviceAttr : int { cudaDevAttrMultiProcessorCount = 16 };
struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace emu {

// The SM count the emulated device reports (an H100 SXM's, so launch heuristics that depend
// on it split the work as they would on the real device).
constexpr int kMultiprocessors = 132;

// Launches so far (defined in runtime.cpp; read through ctypes by the tests, to prove the
// kernels ran rather than some other backend).
extern "C" long stitchops_emulated_launches;

inline cudaError_t& last_error() {
  static cudaError_t error = cudaSuccess;
  return error;
}

inline std::barrier<>*& block_barrier() {
  static std::barrier<>* barrier = nullptr;
  return barrier;
}

// The barrier of the calling thread's warp (threads 32w .. 32w + 31 of its block).
inline thread_local std::barrier<>* warp_barrier = nullptr;

// Shared memory is not initialised on a GPU: build.py makes every __shared__ variable's
// first use in a block fill it with 0xFF bytes (a NaN in fp32, fp16 and bf16), so a read of
// an element no thread wrote shows up in the results. Once per variable and block, under a
// lock, so that later writers are ordered after the fill.
inline std::mutex& shared_lock() {
  static std::mutex lock;
  return lock;
}
inline std::set<const void*>& poisoned_this_block() {
  static std::set<const void*> seen;
  return seen;
}
inline void poison_shared(void* p, std::size_t bytes) {
  std::lock_guard<std::mutex> guard(shared_lock());
  if (poisoned_this_block().insert(p).second) std::memset(p, 0xFF, bytes);
}

// Lane of the calling thread within its warp (threads are numbered x fastest, as on a GPU).
inline unsigned lane_id() {
  return (threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) % 32u;
}

// The <<<grid, block, shmem, stream>>> of a launch (the last two optional, as in CUDA).
struct Config {
  dim3 grid, block;
  std::size_t shmem = 0;
  cudaStream_t stream = nullptr;
};

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), Config config, Args&&... args) {
  const dim3 grid = config.grid, block = config.block;
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535) {
    last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  const long launch = __atomic_add_fetch(&stitchops_emulated_launches, 1, __ATOMIC_RELAXED);
  std::vector<dim3> blocks;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.emplace_back(x, y, z);
  // Blocks run in no particular order on a GPU: each launch shuffles them differently
  // (reproducibly, seeded by the launch count), so a result that depends on the order
  // differs between two runs of the same call.
  std::mt19937 rng(12345u + unsigned(launch));
  std::shuffle(blocks.begin(), blocks.end(), rng);
  for (const dim3& b : blocks) {
    poisoned_this_block().clear();
    std::barrier<> barrier(threads);
    block_barrier() = &barrier;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    for (unsigned w = 0; w * 32 < threads; ++w)
      warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
        blockIdx = b;
        blockDim = block;
        gridDim = grid;
        warp_barrier = warps[t / 32].get();
        kernel(args...);
        // An exited thread no longer holds the others back.
        warp_barrier->arrive_and_drop();
        barrier.arrive_and_drop();
      });
    }
    for (auto& th : pool) th.join();
    block_barrier() = nullptr;
  }
}

}  // namespace emu

inline void __syncthreads() { emu::block_barrier()->arrive_and_wait(); }
inline void __syncwarp(unsigned /*mask*/ = 0xffffffffu) { emu::warp_barrier->arrive_and_wait(); }

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return a < b ? a : b;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}

inline cudaError_t cudaGetLastError() { return std::exchange(emu::last_error(), cudaSuccess); }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = emu::kMultiprocessors;
  return cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error (emulated)";
    case cudaErrorInvalidValue: return "invalid argument (emulated)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulated)";
  }
  return "unknown error (emulated)";
}
