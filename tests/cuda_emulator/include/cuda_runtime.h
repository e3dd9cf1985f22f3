// Host emulation of the CUDA runtime subset that csrc/*.cu uses (tests only).
//
// Replaces the toolkit's cuda_runtime.h when csrc/*.cu is compiled as plain C++ by
// tests/cuda_emulator/build.py. A launch `kernel<<<grid, block, shmem, stream>>>(args)`,
// rewritten by build.py to `emu::launch(kernel, emu::Config{grid, block, ...}, args)`, runs
// the blocks in a shuffled order, one at a time or several at once, each as
// block.x·block.y·block.z real host threads (kept from launch to launch, see Workers):
// __syncthreads() is a std::barrier, __shared__ variables are the running block's own
// (emu::block_shared), and threadIdx / blockIdx are thread_local; each run of 32
// consecutive threads is a warp with its own std::barrier for __syncwarp(). What this
// checks: indexing, bounds, the tiling logic and the arithmetic, with races between the
// threads of a block as real as the host makes them. What it cannot: warp timing,
// memory-model subtleties, shared-memory limits, performance. It is a test harness, not a
// CUDA implementation.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <random>
#include <semaphore>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // build.py rewrites every declaration to emu::block_shared
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

inline unsigned long next_serial() {
  static unsigned long serial = 0;
  return __atomic_add_fetch(&serial, 1, __ATOMIC_RELAXED);
}

// The running block of the calling thread: its __syncthreads barrier, its warps' barriers
// and its shared memory (blocks may run at the same time, see launch).
struct AlignedDelete {
  std::size_t align = 1;
  void operator()(unsigned char* p) const { ::operator delete(p, std::align_val_t(align)); }
};

struct Block {
  explicit Block(unsigned threads) : barrier(threads) {
    for (unsigned w = 0; w * 32 < threads; ++w)
      warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
  }
  // Which block this is, of all blocks of all launches so far: per-thread state such as
  // cp.async's queue (cuda_pipeline.h) starts afresh when its host thread moves to another.
  const unsigned long serial = next_serial();
  std::barrier<> barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::mutex shared_lock;
  std::map<const void*, std::unique_ptr<unsigned char, AlignedDelete>> shared;
};

inline thread_local Block* this_block = nullptr;
inline thread_local std::barrier<>* warp_barrier = nullptr;  // threads 32w .. 32w + 31

// A __shared__ variable of the running block, created at its first use in the block: build.py
// turns `__shared__ T name[N];` into `auto& name = emu::block_shared<T[N], align>(&site)`.
// Shared memory is not initialised on a GPU, so it starts as 0xFF bytes (a NaN in fp32,
// fp16 and bf16) and a read of an element no thread wrote shows up in the results. Created
// under the block's lock, so every later access is ordered after the fill.
template <typename T, std::size_t Align>
T& block_shared(const void* site) {
  static_assert(std::is_trivially_default_constructible_v<std::remove_all_extents_t<T>>,
                "__shared__ variables cannot have constructors");
  Block& block = *this_block;
  std::lock_guard<std::mutex> guard(block.shared_lock);
  auto& slot = block.shared[site];
  if (!slot) {
    constexpr std::size_t align = Align > alignof(T) ? Align : alignof(T);
    auto* bytes = static_cast<unsigned char*>(::operator new(sizeof(T), std::align_val_t(align)));
    std::memset(bytes, 0xFF, sizeof(T));
    slot = std::unique_ptr<unsigned char, AlignedDelete>(bytes, AlignedDelete{align});
  }
  return *reinterpret_cast<T*>(slot.get());
}

// How many blocks run at the same time (STITCHOPS_EMULATE_CONCURRENT_BLOCKS, default 1):
// one at a time is fast; all at once lets ThreadSanitizer see races between blocks (two
// blocks writing the same global element), as racecheck.cpp does.
inline unsigned concurrent_blocks() {
  const char* env = std::getenv("STITCHOPS_EMULATE_CONCURRENT_BLOCKS");
  const long n = env != nullptr ? std::strtol(env, nullptr, 10) : 1;
  return n > 0 ? unsigned(n) : 1u;
}

// Lane of the calling thread within its warp (threads are numbered x fastest, as on a GPU).
inline unsigned lane_id() {
  return (threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) % 32u;
}

// The host threads that play the GPU's threads, created when first needed and kept for the
// process: creating and joining 128 host threads per block cost more than the kernels'
// arithmetic. run(n, task) calls task(i) for every i < n, each on its own thread, all at
// the same time, and returns when all have returned. Each worker has its own pair of
// semaphores, so what a task does is ordered after run() starts and before it returns, as
// with threads created and joined, and the tasks of one run are not ordered with one
// another through the pool: ThreadSanitizer sees their races even when one task happens to
// finish before another starts (a shared lock would order them, hiding the race).
class Workers {
 public:
  static Workers& get() {
    static Workers workers;
    return workers;
  }

  void run(std::size_t n, const std::function<void(std::size_t)>& task) {
    // Launches from several host threads take turns (a legal schedule of two streams).
    std::lock_guard<std::mutex> one_run_at_a_time(run_);
    while (workers_.size() < n) {
      auto worker = std::make_unique<Worker>();
      Worker* w = worker.get();
      w->thread = std::thread([this, w, id = workers_.size()] { serve(*w, id); });
      workers_.push_back(std::move(worker));
    }
    task_ = &task;  // read by each worker after its start semaphore
    for (std::size_t i = 0; i < n; ++i) workers_[i]->start.release();
    for (std::size_t i = 0; i < n; ++i) workers_[i]->done.acquire();
  }

  ~Workers() {
    stop_ = true;
    for (auto& w : workers_) w->start.release();
    for (auto& w : workers_) w->thread.join();
  }

 private:
  struct Worker {
    std::binary_semaphore start{0}, done{0};
    std::thread thread;
  };

  void serve(Worker& w, std::size_t id) {
    for (;;) {
      w.start.acquire();
      if (stop_) return;
      (*task_)(id);
      w.done.release();
    }
  }

  std::mutex run_;
  std::vector<std::unique_ptr<Worker>> workers_;
  const std::function<void(std::size_t)>* task_ = nullptr;
  bool stop_ = false;
};

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
  const std::size_t wave = concurrent_blocks();
  for (std::size_t first = 0; first < blocks.size(); first += wave) {
    const std::size_t count = std::min(wave, blocks.size() - first);
    std::vector<std::unique_ptr<Block>> running;
    for (std::size_t i = 0; i < count; ++i) running.push_back(std::make_unique<Block>(threads));
    // Host thread i runs thread i % threads of the wave's block i / threads.
    Workers::get().run(count * threads, [&](std::size_t i) {
      const unsigned t = unsigned(i % threads);
      Block* blk = running[i / threads].get();
      threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      blockIdx = blocks[first + i / threads];
      blockDim = block;
      gridDim = grid;
      this_block = blk;
      warp_barrier = blk->warps[t / 32].get();
      kernel(args...);
      // An exited thread no longer holds the others back.
      warp_barrier->arrive_and_drop();
      blk->barrier.arrive_and_drop();
    });
  }
}

}  // namespace emu

inline void __syncthreads() { emu::this_block->barrier.arrive_and_wait(); }
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
