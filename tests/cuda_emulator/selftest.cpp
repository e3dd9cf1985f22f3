// Self-test of the host emulator's own semantics (tests/test_cuda_emulated.py runs it), so
// that a harness bug cannot make the kernels' tests pass vacuously:
//   selftest            checks: launches cover the grid (in a new block order each time,
//                       also two launched from two host threads at once),
//                       concurrent blocks have their own shared memory,
//                       __syncthreads / __syncwarp order shared memory, shared memory
//                       starts as NaN in every block (so reads of unwritten elements show),
//                       WMMA computes d = a·b + c for every layout, cp.async copies land at
//                       the wait and not before, zero-fill, and a block starts with no
//                       copies queued by the block its host thread ran before;
//   selftest misaligned-wmma | misaligned-cp-async
//                       must abort with the emulator's message (alignment is enforced).
// Kernels are written in CUDA syntax and translated by build.py like csrc/*.cu.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

using namespace nvcuda;

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  std::printf("%s: %s\n", ok ? "ok  " : "FAIL", what);
  failures += ok ? 0 : 1;
}

// Every (block, thread) writes its own cell once.
__global__ void cover(int* out) {
  const int block = blockIdx.x + gridDim.x * blockIdx.y;
  out[block * blockDim.x + threadIdx.x] += 1;
}

// Records the order the blocks ran in (blocks run one at a time on the emulator).
__global__ void record_order(int* order, int* next) { order[(*next)++] = int(blockIdx.x); }

// Each block keeps its own shared memory, also while other blocks run: thread 0 writes the
// block's index, every thread reads it back after the barrier.
__global__ void own_shared(int* mismatches) {
  __shared__ int mine;
  if (threadIdx.x == 0) mine = int(blockIdx.x);
  __syncthreads();
  for (int spin = 0; spin < 1000; ++spin)
    mismatches[blockIdx.x * blockDim.x + threadIdx.x] += mine != int(blockIdx.x);
}

// Thread t writes shared[t], then after the barrier reads its neighbour's cell.
__global__ void barrier_orders(int* out, bool warp_only) {
  __shared__ int cells[64];
  cells[threadIdx.x] = int(threadIdx.x) * 3;
  if (warp_only)
    __syncwarp();
  else
    __syncthreads();
  const int lane_base = warp_only ? int(threadIdx.x) / 32 * 32 : 0;
  const int span = warp_only ? 32 : int(blockDim.x);
  out[threadIdx.x] = cells[lane_base + (int(threadIdx.x) - lane_base + 1) % span];
}

// d = a·b + c for A row- or col-major, B row- or col-major; lane 0 stores the result.
template <typename LA, typename LB>
__global__ void wmma_product(const __half* a, const __half* b, const float* c, float* d) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, LA> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, LB> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::load_matrix_sync(fc, c, 16, wmma::mem_row_major);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(d, fc, 16, wmma::mem_row_major);
}

// Copies 8 halves by cp.async: records the destination before and after the wait.
__global__ void async_copy(const __half* src, float* before, float* after, int zfill_halves) {
  __shared__ __align__(16) __half tile[8];
  for (int i = 0; i < 8; ++i) tile[i] = __float2half_rn(-1.f);
  __pipeline_memcpy_async(tile, src, 16, size_t(zfill_halves) * sizeof(__half));
  __pipeline_commit();
  for (int i = 0; i < 8; ++i) before[i] = __half2float(tile[i]);
  __pipeline_wait_prior(0);
  for (int i = 0; i < 8; ++i) after[i] = __half2float(tile[i]);
}

// Issues a copy and exits without waiting for it; the next block run by the same host
// thread waits for all of its own copies, and must not perform this one.
__global__ void abandon_copy(float* landing, const float* src) {
  __pipeline_memcpy_async(landing, src, 16);
  __pipeline_commit();
}
__global__ void wait_for_own_copies() { __pipeline_wait_prior(0); }

// Reads shared memory no thread of this block wrote, then writes it for the next block.
__global__ void read_unwritten(float* out) {
  __shared__ float cell;
  out[blockIdx.x] = cell;
  cell = 1.f;
}

__global__ void misaligned_wmma(const __half* a) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, a + 1, 16);  // 2 bytes off a 32-byte boundary
}

__global__ void misaligned_cp_async(const __half* src) {
  __shared__ __align__(16) __half tile[8];
  __pipeline_memcpy_async(tile, src + 1, 16);
  __pipeline_commit();
  __pipeline_wait_prior(0);
}

template <typename LA, typename LB>
void check_wmma(const char* what, bool a_row, bool b_row) {
  // Device allocations are at least 256-byte aligned; WMMA needs 32 bytes.
  alignas(256) static __half a[256], b[256];
  alignas(256) static float c[256], d[256];
  std::vector<float> af(256), bf(256);
  for (int i = 0; i < 256; ++i) {
    a[i] = __float2half_rn(float((i * 7) % 11) - 5.f);
    b[i] = __float2half_rn(float((i * 5) % 13) - 6.f);
    af[i] = __half2float(a[i]);
    bf[i] = __half2float(b[i]);
    c[i] = float(i % 3);
  }
  std::fill(d, d + 256, 0.f);
  wmma_product<LA, LB><<<1, 32>>>(a, b, c, d);
  bool ok = cudaGetLastError() == cudaSuccess;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float want = c[i * 16 + j];
      for (int k = 0; k < 16; ++k)
        want += af[a_row ? i * 16 + k : k * 16 + i] * bf[b_row ? k * 16 + j : j * 16 + k];
      ok &= d[i * 16 + j] == want;
    }
  expect(ok, what);
}

}  // namespace

int main(int argc, char** argv) {
  alignas(64) static __half buffer[64];
  if (argc > 1 && std::strcmp(argv[1], "misaligned-wmma") == 0) {
    misaligned_wmma<<<1, 32>>>(buffer);
    return 0;  // not reached: the emulator aborts
  }
  if (argc > 1 && std::strcmp(argv[1], "misaligned-cp-async") == 0) {
    misaligned_cp_async<<<1, 32>>>(buffer);
    return 0;
  }

  std::vector<int> cells(3 * 2 * 40, 0);
  cover<<<dim3(3, 2), 40>>>(cells.data());
  bool all_once = true;
  for (int v : cells) all_once &= v == 1;
  expect(all_once, "a launch runs every thread of every block exactly once");

  std::vector<int> left(4 * 64, 0), right(4 * 64, 0);
  std::thread other([&] { cover<<<4, 64>>>(right.data()); });
  cover<<<4, 64>>>(left.data());
  other.join();
  bool both_once = true;
  for (int i = 0; i < 4 * 64; ++i) both_once &= left[i] == 1 && right[i] == 1;
  expect(both_once, "launches from two host threads at once both run every thread once");

  std::vector<int> first(16), second(16);
  int next = 0;
  record_order<<<16, 1>>>(first.data(), &next);
  next = 0;
  record_order<<<16, 1>>>(second.data(), &next);
  std::vector<int> sorted_first = first;
  std::sort(sorted_first.begin(), sorted_first.end());
  bool permutation = true;
  for (int i = 0; i < 16; ++i) permutation &= sorted_first[i] == i;
  expect(permutation && first != second, "each launch runs the blocks in another order");

  setenv("STITCHOPS_EMULATE_CONCURRENT_BLOCKS", "8", 1);
  std::vector<int> mismatches(8 * 64, 0);
  own_shared<<<8, 64>>>(mismatches.data());
  bool separate = true;
  for (int m : mismatches) separate &= m == 0;
  expect(separate, "blocks running at the same time have separate shared memory");
  unsetenv("STITCHOPS_EMULATE_CONCURRENT_BLOCKS");

  for (bool warp_only : {false, true}) {
    std::vector<int> out(64, -1);
    barrier_orders<<<1, 64>>>(out.data(), warp_only);
    bool ok = true;
    for (int t = 0; t < 64; ++t) {
      const int base = warp_only ? t / 32 * 32 : 0, span = warp_only ? 32 : 64;
      ok &= out[t] == 3 * (base + (t - base + 1) % span);
    }
    expect(ok, warp_only ? "__syncwarp orders shared memory within a warp"
                         : "__syncthreads orders shared memory within a block");
  }

  float unwritten[3] = {0.f, 0.f, 0.f};
  read_unwritten<<<3, 1>>>(unwritten);
  expect(std::isnan(unwritten[0]) && std::isnan(unwritten[1]) && std::isnan(unwritten[2]),
         "shared memory starts as NaN in every block");

  check_wmma<wmma::row_major, wmma::row_major>("wmma row·row", true, true);
  check_wmma<wmma::row_major, wmma::col_major>("wmma row·col", true, false);
  check_wmma<wmma::col_major, wmma::row_major>("wmma col·row", false, true);
  check_wmma<wmma::col_major, wmma::col_major>("wmma col·col", false, false);

  for (int i = 0; i < 8; ++i) buffer[i] = __float2half_rn(float(i + 1));
  for (int zfill : {0, 3, 8}) {
    std::vector<float> before(8), after(8);
    async_copy<<<1, 1>>>(buffer, before.data(), after.data(), zfill);
    bool untouched = true, landed = true;
    for (int i = 0; i < 8; ++i) {
      untouched &= before[i] == -1.f;
      landed &= after[i] == (i < 8 - zfill ? float(i + 1) : 0.f);
    }
    char what[96];
    std::snprintf(what, sizeof what, "cp.async (zfill %d halves) lands at the wait, not before",
                  zfill);
    expect(untouched && landed, what);
  }

  alignas(16) static float landing[4] = {-1.f, -1.f, -1.f, -1.f}, source[4] = {1, 2, 3, 4};
  abandon_copy<<<1, 1>>>(landing, source);
  wait_for_own_copies<<<1, 1>>>();
  expect(landing[0] == -1.f && landing[3] == -1.f,
         "each block starts with no cp.async copies queued (host threads are reused)");

  std::printf(failures == 0 ? "selftest: all passed\n" : "selftest: %d FAILED\n", failures);
  return failures == 0 ? 0 : 1;
}
