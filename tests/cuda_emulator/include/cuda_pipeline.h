// Host emulation of the CUDA pipeline primitives (cp.async) for tests/cuda_emulator.
//
// A copy does not happen when it is issued: __pipeline_memcpy_async queues it on the calling
// thread, __pipeline_commit closes the thread's current group, and __pipeline_wait_prior(n)
// performs every committed group but the newest n, in order. That is one legal schedule of
// the real hardware's, and the one that exposes the bugs: a tile read before its wait sees
// the old contents (wrong results), and a copy landing while another thread still reads the
// buffer is a data race under ThreadSanitizer. The alignment rules are checked.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <vector>

#include "cuda_runtime.h"

namespace emu {

struct AsyncCopy {
  void* dst;
  const void* src;
  std::size_t bytes, zfill;
};

struct Pipeline {
  unsigned long block = 0;                    // Block::serial of the block it belongs to
  std::vector<AsyncCopy> open;                // issued since the last commit
  std::deque<std::vector<AsyncCopy>> groups;  // committed, not yet waited for
};

// The calling thread's queue, empty at the start of each block it runs (host threads are
// reused from block to block, GPU threads are not).
inline Pipeline& pipeline() {
  static thread_local Pipeline queue;
  if (queue.block != this_block->serial) queue = Pipeline{this_block->serial, {}, {}};
  return queue;
}

}  // namespace emu

inline void __pipeline_memcpy_async(void* dst, const void* src, std::size_t size_and_align,
                                    std::size_t zfill = 0) {
  const auto misaligned = [&](const void* p) {
    return reinterpret_cast<std::uintptr_t>(p) % size_and_align != 0;
  };
  if ((size_and_align != 4 && size_and_align != 8 && size_and_align != 16) ||
      zfill > size_and_align || misaligned(dst) || misaligned(src)) {
    std::fprintf(stderr, "cp.async: bad copy of %zu bytes (zfill %zu) %p <- %p\n", size_and_align,
                 zfill, dst, src);
    std::abort();
  }
  emu::pipeline().open.push_back({dst, src, size_and_align, zfill});
}

inline void __pipeline_commit() {
  emu::Pipeline& queue = emu::pipeline();
  queue.groups.push_back(std::move(queue.open));
  queue.open.clear();
}

inline void __pipeline_wait_prior(std::size_t prior) {
  auto& groups = emu::pipeline().groups;
  while (groups.size() > prior) {
    for (const emu::AsyncCopy& c : groups.front()) {
      const std::size_t copied = c.bytes - c.zfill;  // reads only these source bytes
      std::memcpy(c.dst, c.src, copied);
      std::memset(static_cast<char*>(c.dst) + copied, 0, c.zfill);
    }
    groups.pop_front();
  }
}
