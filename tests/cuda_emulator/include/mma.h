// Host emulation of the WMMA API (nvcuda::wmma) that csrc/*.cu uses, for tests/cuda_emulator.
//
// On a GPU a fragment is spread over the 32 lanes of a warp in an unspecified layout. Here
// every lane holds the whole tile (fragment::x is the tile in row-major order) and computes
// the whole product itself, so code that treats x[] element-wise and uniformly (all that the
// CUDA programming guide allows) behaves the same. The collective store is done by lane 0
// alone: another lane that reads the stored tile without a __syncwarp() in between races
// with it, as on a GPU, and ThreadSanitizer (tests/cuda_emulator/racecheck.cpp) says so.
#pragma once

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

#include <cstdio>
#include <cstdlib>

namespace nvcuda {
namespace wmma {

struct matrix_a;
struct matrix_b;
struct accumulator;
struct row_major;
struct col_major;
enum layout_t { mem_row_major, mem_col_major };

namespace detail {

template <typename Use, int M, int N, int K>
struct shape;  // rows × cols of each operand of an M×N×K product
template <int M, int N, int K>
struct shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

inline float as_float(float v) { return v; }
inline float as_float(__half v) { return __half2float(v); }
inline float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using element_type = T;
  static constexpr int rows = detail::shape<Use, M, N, K>::rows;
  static constexpr int cols = detail::shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  T x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const T& v) {
  for (auto& e : f.x) e = v;
}

namespace detail {
// What the CUDA programming guide requires of every load and store, checked: a 256-bit
// aligned pointer and a leading dimension of a multiple of 16 bytes.
template <typename T>
void check_operand(const T* p, unsigned ldm) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0 || ldm * sizeof(T) % 16 != 0) {
    std::fprintf(stderr, "wmma: misaligned operand %p or ldm %u (elements of %zu bytes)\n",
                 static_cast<const void*>(p), ldm, sizeof(T));
    std::abort();
  }
}

template <typename Frag, typename T>
void load(Frag& f, const T* p, unsigned ldm, bool row_major) {
  check_operand(p, ldm);
  for (int r = 0; r < Frag::rows; ++r)
    for (int c = 0; c < Frag::cols; ++c)
      f.x[r * Frag::cols + c] = row_major ? p[r * ldm + c] : p[c * ldm + r];
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T>
void load_matrix_sync(fragment<Use, M, N, K, T, row_major>& f, const T* p, unsigned ldm) {
  detail::load(f, p, ldm, true);
}
template <typename Use, int M, int N, int K, typename T>
void load_matrix_sync(fragment<Use, M, N, K, T, col_major>& f, const T* p, unsigned ldm) {
  detail::load(f, p, ldm, false);
}
template <int M, int N, int K, typename T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm,
                      layout_t layout) {
  detail::load(f, p, ldm, layout == mem_row_major);
}

template <int M, int N, int K, typename T>
void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm,
                       layout_t layout) {
  detail::check_operand(p, ldm);
  if (emu::lane_id() != 0) return;  // one writer per warp; readers need a __syncwarp()
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * N + c];
}

// d = a·b + c with fp32 accumulation (d may be c).
template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  static_assert(sizeof(T) == 2, "fp16 and bf16 operands only");
  // Each operand converted once (not once per use: half's conversion is a libgcc call).
  float fa[M * K], fb[K * N], out[M * N];
  for (int i = 0; i < M * K; ++i) fa[i] = detail::as_float(a.x[i]);
  for (int i = 0; i < K * N; ++i) fb[i] = detail::as_float(b.x[i]);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = c.x[i * N + j];
      // The product of two fp16 or two bf16 values is exact in fp32 (at most 22 significant
      // bits; bf16 overflow aside), so one rounding per step: an fma, without libm's call.
      for (int k = 0; k < K; ++k) acc += fa[i * K + k] * fb[k * N + j];
      out[i * N + j] = acc;
    }
  std::copy(out, out + M * N, d.x);
}

}  // namespace wmma
}  // namespace nvcuda
