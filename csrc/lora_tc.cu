// Fused LoRA stitching projection on tensor cores: WMMA m16n16k16, fp16 / bf16 operands,
// fp32 accumulation. Same arguments, results and fusion as the SIMT kernels in lora.cu.
//
// A block of 4 warps owns a 64 × 64 output tile at a time (the forward may take several in
// turn, see lowrank_matmul_kernel); warp w = 2·wm + wn owns the 32 × 32 quarter
// (wm, wn) as 2 × 2 accumulator fragments, and rows 16w .. 16w + 15 of the rank-R product
// (S = x·Aᵀ in the forward, dS = dy·B in the backward) as R/16 more. K advances in steps of
// 32, with the operand tiles staged in shared memory in their own dtype, double-buffered:
// where the columns are contiguous and 16-byte aligned the next step's tiles arrive by
// cp.async while this step computes (elsewhere by plain loads). Each staged x (resp. dy)
// tile feeds both the main product and the rank-R one, so x is read once per pass and no
// [tokens, OUT] low-rank intermediate exists. The epilogues reuse the same shared memory.
//
// Rounding, as in the Triton kernels: S and dS enter the second products (S·Bᵀ, dS·A, dSᵀ·x,
// dyᵀ·S) rounded to the operand dtype; the stored S and every partial sum stay fp32.
// A fragment's register layout is unspecified, so every fragment leaves through a per-warp
// fp32 scratch tile (store_matrix_sync, __syncwarp, then element-wise by lane).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "convert.cuh"
#include "lora_tc.h"

namespace stitchops {
namespace tc {
namespace {

using namespace nvcuda;

constexpr int BM = kBlockM;
constexpr int BN = kBlockN;
constexpr int BK = 32;
constexpr int WARPS = 4;
constexpr int THREADS = 32 * WARPS;
constexpr int F = 16;       // fragment edge
constexpr int PAD = 8;      // row padding (elements): 16 bytes, keeps fragments 32-byte aligned
constexpr int SLD = F + 4;  // row length of a warp's fp32 scratch tile
static_assert(BM == 4 * F && BN == 4 * F, "the warp layout assumes 64 × 64 tiles");

template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, F, F, F, T, wmma::row_major>;
template <typename T>
using FragAt = wmma::fragment<wmma::matrix_a, F, F, F, T, wmma::col_major>;
template <typename T>
using FragB = wmma::fragment<wmma::matrix_b, F, F, F, T, wmma::row_major>;
template <typename T>
using FragBt = wmma::fragment<wmma::matrix_b, F, F, F, T, wmma::col_major>;
using Acc = wmma::fragment<wmma::accumulator, F, F, F, float>;

__host__ __device__ constexpr int rank_frags(int rp) { return rp > 0 ? rp / F : 1; }
__host__ __device__ constexpr int pitch(int cols) { return (cols > 0 ? cols : F) + PAD; }
__host__ __device__ constexpr size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }
__host__ __device__ constexpr size_t larger(size_t a, size_t b) { return a > b ? a : b; }
constexpr size_t kScratchBytes = WARPS * F * SLD * sizeof(float);

// dst[r][c] (row pitch ld) = src[(r0 + r)·s_r + (c0 + c)·s_c] for r0 + r < r_end and
// c0 + c < c_end, else 0, over a ROWS × COLS tile. Contiguous, 16-byte aligned columns move
// as asynchronous 16-byte copies (cp.async; the part past the edge zero-filled), which land
// at the caller's __pipeline_wait_prior; otherwise plain loads, consecutive threads
// following the unit stride.
template <typename T, int ROWS, int COLS>
__device__ __forceinline__ void stage(T* dst, int ld, const T* src, int64_t s_r, int64_t s_c,
                                      int64_t r0, int64_t r_end, int64_t c0, int64_t c_end) {
  constexpr int V = 16 / sizeof(T);
  if (COLS % V == 0 && s_c == 1 && s_r % V == 0 && c0 % V == 0 &&
      reinterpret_cast<uintptr_t>(src) % 16 == 0) {
    for (int e = threadIdx.x; e < ROWS * COLS / V; e += THREADS) {
      const int r = e / (COLS / V), c = e % (COLS / V) * V;
      const int64_t gr = r0 + r, gc = c0 + c;
      const int64_t valid = gr < r_end ? min(int64_t(V), max(int64_t(0), c_end - gc)) : 0;
      // With nothing valid the copy reads no byte; its source only has to be aligned.
      const T* from = valid > 0 ? src + gr * s_r + gc : src;
      __pipeline_memcpy_async(dst + r * ld + c, from, 16, size_t(V - valid) * sizeof(T));
    }
    return;
  }
  const T zero = from_float<T>(0.f);
  const bool c_fast = s_c == 1 || s_r != 1;
  for (int e = threadIdx.x; e < ROWS * COLS; e += THREADS) {
    const int r = c_fast ? e / COLS : e % ROWS;
    const int c = c_fast ? e % COLS : e / ROWS;
    const int64_t gr = r0 + r, gc = c0 + c;
    dst[r * ld + c] = gr < r_end && gc < c_end ? src[gr * s_r + gc * s_c] : zero;
  }
}

// This thread's asynchronous copies so far have landed (a __syncthreads makes them shared).
__device__ __forceinline__ void land() {
  __pipeline_commit();
  __pipeline_wait_prior(0);
}

// fn(r, c, value) for the 16 × 16 elements of a warp's accumulator fragment, by lane.
template <typename Fn>
__device__ __forceinline__ void for_each_element(float* scratch, const Acc& frag, Fn fn) {
  wmma::store_matrix_sync(scratch, frag, SLD, wmma::mem_row_major);
  __syncwarp();
  for (int e = threadIdx.x % 32; e < F * F; e += 32) fn(e / F, e % F, scratch[e / F * SLD + e % F]);
  __syncwarp();
}

__device__ __forceinline__ void add_scaled(Acc& acc, const Acc& term, float scale) {
  for (int e = 0; e < acc.num_elements; ++e) acc.x[e] += scale * term.x[e];
}

// acc[i][j] += scale · Σ_r S[32wm + 16i + ·, r]·L[r, 32wn + 16j + ·] over the RP rank entries,
// from shared memory: S [BM][s_ld], L either n-major ([n][r]: the forward's Bᵀ tile) or
// r-major ([r][n]: the backward's A tile).
template <typename T, int RP, bool L_RMAJOR>
__device__ __forceinline__ void add_low_rank(Acc (&acc)[2][2], const T* s, int s_ld, const T* l,
                                             int l_ld, float scale) {
  using FragL = std::conditional_t<L_RMAJOR, FragB<T>, FragBt<T>>;
  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      Acc low;
      wmma::fill_fragment(low, 0.f);
#pragma unroll
      for (int c = 0; c < RP / F; ++c) {
        FragA<T> sf;
        FragL lf;
        const int n = 32 * wn + F * j;
        wmma::load_matrix_sync(sf, s + (32 * wm + F * i) * s_ld + F * c, s_ld);
        wmma::load_matrix_sync(lf, L_RMAJOR ? l + F * c * l_ld + n : l + n * l_ld + F * c, l_ld);
        wmma::mma_sync(low, sf, lf, low);
      }
      add_scaled(acc[i][j], low, scale);
    }
}

// The shared tiles of one K step, STAGES times over (cp.async double buffer), each laid out
// so that its rows follow the operand's contiguous dimension (16-byte copies):
//   X   [m][k] (row_major fragments), or with XT [k][m] (col_major; the dW pass, X = dyᵀ);
//   Wt, L  [n][k] (col_major fragments; the forward, whose Wt = Wᵀ and L1 = Aᵀ are views of
//   row-major W and A), or with KMAJOR [k][n] (row_major; the backward's W and B are
//   [OUT, ·], and the dW pass's Wt = x is [tokens, IN]).
template <typename T, int RP, bool XT, bool KMAJOR, int STAGES>
struct LoopTiles {
  static constexpr int x_ld = XT ? pitch(BM) : pitch(BK);
  static constexpr int w_ld = KMAJOR ? pitch(BN) : pitch(BK);
  static constexpr int l_ld = KMAJOR ? pitch(RP) : pitch(BK);
  static constexpr size_t x_bytes = align128((XT ? BK : BM) * x_ld * sizeof(T));
  static constexpr size_t w_bytes = align128((KMAJOR ? BK : BN) * w_ld * sizeof(T));
  static constexpr size_t l_bytes = RP > 0 ? align128((KMAJOR ? BK : RP) * l_ld * sizeof(T)) : 0;
  static constexpr size_t stage_bytes = x_bytes + w_bytes + l_bytes;
  static constexpr size_t bytes = STAGES * stage_bytes;
  using FragX = std::conditional_t<XT, FragAt<T>, FragA<T>>;
  using FragW = std::conditional_t<KMAJOR, FragB<T>, FragBt<T>>;

  unsigned char* base;
  __device__ T* x(int s) const { return reinterpret_cast<T*>(base + s * stage_bytes); }
  __device__ T* w(int s) const { return reinterpret_cast<T*>(base + s * stage_bytes + x_bytes); }
  __device__ T* l(int s) const {
    return reinterpret_cast<T*>(base + s * stage_bytes + x_bytes + w_bytes);
  }
  // Fragment (k offset kk, row block i) of X, (kk, column block j) of Wt resp. L, in stage s.
  __device__ const T* x_at(int s, int kk, int i) const {
    return XT ? x(s) + kk * x_ld + F * i : x(s) + F * i * x_ld + kk;
  }
  __device__ const T* w_at(int s, int kk, int j) const {
    return KMAJOR ? w(s) + kk * w_ld + F * j : w(s) + F * j * w_ld + kk;
  }
  __device__ const T* l_at(int s, int kk, int c) const {
    return KMAJOR ? l(s) + kk * l_ld + F * c : l(s) + F * c * l_ld + kk;
  }
};

struct NoHook {
  template <typename T>
  __device__ void operator()(int64_t, const T*) const {}
};

// acc[i][j] += Σ_k X[m0 + 32wm + 16i + ·, k]·Wt[k, n0 + 32wn + 16j + ·] (when want_w) and
// lr[c] += Σ_k X[m0 + 16w + ·, k]·L[k, 16c + ·] (when want_l) over k in [k_begin, k_end).
// hook(k0, x_tile) runs on every staged X tile (rows past m_end, columns past k_end zero).
// With two stages the copies of step k0 + BK are in flight while step k0 computes.
template <typename T, int RP, bool XT, bool KMAJOR, int STAGES, typename Hook>
__device__ __forceinline__ void main_loop(const LoopTiles<T, RP, XT, KMAJOR, STAGES>& t,
                                          Acc (&acc)[2][2], Acc (&lr)[rank_frags(RP)], const T* X,
                                          int64_t s_xm, int64_t s_xk, const T* Wt, int64_t s_wk,
                                          int64_t s_wn, const T* L, int64_t s_lk, int64_t s_lr,
                                          int64_t m0, int64_t m_end, int64_t n0, int64_t n_end,
                                          int64_t k_begin, int64_t k_end, int64_t R, bool want_w,
                                          bool want_l, Hook hook) {
  static_assert(STAGES == 1 || STAGES == 2, "one buffer, or a double buffer");
  using Tiles = LoopTiles<T, RP, XT, KMAJOR, STAGES>;
  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
  auto issue = [&](int s, int64_t k0) {
    if constexpr (XT)
      stage<T, BK, BM>(t.x(s), Tiles::x_ld, X, s_xk, s_xm, k0, k_end, m0, m_end);
    else
      stage<T, BM, BK>(t.x(s), Tiles::x_ld, X, s_xm, s_xk, m0, m_end, k0, k_end);
    if (want_w) {
      if constexpr (KMAJOR)
        stage<T, BK, BN>(t.w(s), Tiles::w_ld, Wt, s_wk, s_wn, k0, k_end, n0, n_end);
      else
        stage<T, BN, BK>(t.w(s), Tiles::w_ld, Wt, s_wn, s_wk, n0, n_end, k0, k_end);
    }
    if constexpr (RP > 0) {
      if (want_l) {
        if constexpr (KMAJOR)
          stage<T, BK, RP>(t.l(s), Tiles::l_ld, L, s_lk, s_lr, k0, k_end, 0, R);
        else
          stage<T, RP, BK>(t.l(s), Tiles::l_ld, L, s_lr, s_lk, 0, R, k0, k_end);
      }
    }
    __pipeline_commit();
  };
  if constexpr (STAGES == 2)
    if (k_begin < k_end) issue(0, k_begin);
  int s = 0;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += BK, s = STAGES - 1 - s) {
    if constexpr (STAGES == 2) {
      // Prefetch the next step into the other buffer (freed by the last __syncthreads),
      // then wait for all but that newest group: this step's copies.
      if (k0 + BK < k_end)
        issue(1 - s, k0 + BK);
      else
        __pipeline_commit();  // an empty group keeps the count
      __pipeline_wait_prior(1);
    } else {
      issue(0, k0);
      __pipeline_wait_prior(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += F) {
      if (want_w) {
        typename Tiles::FragX a[2];
        typename Tiles::FragW b[2];
#pragma unroll
        for (int i = 0; i < 2; ++i)
          wmma::load_matrix_sync(a[i], t.x_at(s, kk, 2 * wm + i), Tiles::x_ld);
#pragma unroll
        for (int j = 0; j < 2; ++j)
          wmma::load_matrix_sync(b[j], t.w_at(s, kk, 2 * wn + j), Tiles::w_ld);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
      if constexpr (RP > 0) {
        if (want_l) {
          typename Tiles::FragX a;
          wmma::load_matrix_sync(a, t.x_at(s, kk, warp), Tiles::x_ld);
#pragma unroll
          for (int c = 0; c < RP / F; ++c) {
            typename Tiles::FragW b;
            wmma::load_matrix_sync(b, t.l_at(s, kk, c), Tiles::l_ld);
            wmma::mma_sync(lr[c], a, b, lr[c]);
          }
        }
      }
    }
    hook(k0, static_cast<const T*>(t.x(s)));
    __syncthreads();  // buffer s is refilled two steps on
  }
}

template <int N>
__device__ __forceinline__ void zero(Acc (&frags)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) wmma::fill_fragment(frags[i], 0.f);
}

// TRANSPOSED: the dW pass's layout (X = dyᵀ and Wt = x, both contiguous along m resp. n).
// GROUPED: a block covers a.column_tiles output tiles of its row block in turn (lora.h). The
// first computes S = X·L1 in its K loop and keeps T(S) in shared memory for the others: up
// to rank 64, as at rank 128 that would pass 48 KB of static shared memory. Ungrouped, the
// loop over tiles compiles away: a separate instantiation, as the grouped one takes more
// registers at some ranks (ptxas, sm_90a: fp16 ranks 16 and 32 96 → 128, rank 64 128 → 168).
template <typename T, int RP, bool TRANSPOSED, bool GROUPED>
__global__ void __launch_bounds__(THREADS) lowrank_matmul_kernel(LowRankMatmulArgs a) {
  static_assert(!TRANSPOSED || RP == 0, "the dW pass has no low-rank term");
  static_assert(!GROUPED || (RP > 0 && RP <= 64), "column groups keep S: ranks 1 to 64");
  using Tiles = LoopTiles<T, RP, TRANSPOSED, TRANSPOSED, 2>;
  // After each K loop the loop tiles' memory holds the L2 tile n-major [BN][s_ld], and
  // (ungrouped) T(S) [BM][s_ld] after it; grouped, T(S) has its own region.
  constexpr int s_ld = pitch(RP);
  constexpr size_t s_bytes = align128(BM * s_ld * sizeof(T));
  constexpr size_t tile_bytes = larger(Tiles::bytes, RP > 0 ? (GROUPED ? 1 : 2) * s_bytes : 0);
  constexpr size_t kept_bytes = GROUPED ? s_bytes : 0;
  __shared__ __align__(128) unsigned char smem[tile_bytes + kept_bytes + kScratchBytes];
  const Tiles tiles{smem};
  T* l2_t = reinterpret_cast<T*>(smem);
  T* s_t = reinterpret_cast<T*>(smem + (GROUPED ? tile_bytes : s_bytes));
  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
  float* scratch = reinterpret_cast<float*>(smem + tile_bytes + kept_bytes) + warp * F * SLD;
  const int64_t m0 = int64_t(blockIdx.x) * BM;
  const int64_t k_begin = int64_t(blockIdx.z) * a.k_per_split;
  const int64_t k_end = min(a.K, k_begin + a.k_per_split);
  const T* bias = static_cast<const T*>(a.bias);
  const T* bias2 = static_cast<const T*>(a.bias2);

  const int column_tiles = GROUPED ? a.column_tiles : 1;
  for (int c = 0; c < column_tiles; ++c) {
    const int64_t n0 = (int64_t(blockIdx.y) * column_tiles + c) * BN;
    if (n0 >= a.N) break;
    const bool fresh_s = RP > 0 && c == 0;
    Acc acc[2][2], lr[rank_frags(RP)];
    zero(acc[0]);
    zero(acc[1]);
    if (fresh_s) zero(lr);
    // Two inlined copies of the loop, with and without the rank-R product, each compiled
    // for its own case (one loop testing fresh_s inside needed up to 40 more registers).
    auto loop = [&](bool want_l) {
      main_loop(tiles, acc, lr, static_cast<const T*>(a.x), a.stride_xm, a.stride_xk,
                static_cast<const T*>(a.w), a.stride_wk, a.stride_wn, static_cast<const T*>(a.l1),
                a.stride_l1k, a.stride_l1r, m0, a.M, n0, a.N, k_begin, k_end, a.R, true, want_l,
                NoHook{});
    };
    if (fresh_s)
      loop(true);
    else
      loop(false);

    if constexpr (RP > 0) {
      // S leaves exact (fp32) from the grid's first column tile, and as T(S) into shared
      // memory for acc += scale·S·L2.
      if (fresh_s) {
        const bool store_s = a.s_out != nullptr && blockIdx.y == 0 && c == 0;
#pragma unroll
        for (int rc = 0; rc < RP / F; ++rc)
          for_each_element(scratch, lr[rc], [&](int r, int cc, float v) {
            const int row = F * warp + r, col = F * rc + cc;
            if (store_s && m0 + row < a.M && col < a.R) a.s_out[(m0 + row) * a.stride_sm + col] = v;
            s_t[row * s_ld + col] = from_float<T>(v);
          });
      }
      stage<T, BN, RP>(l2_t, s_ld, static_cast<const T*>(a.l2), a.stride_l2n, a.stride_l2r, n0, a.N,
                       0, a.R);
      land();
      __syncthreads();
      add_low_rank<T, RP, false>(acc, s_t, s_ld, l2_t, s_ld, a.scale);
    }

#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        for_each_element(scratch, acc[i][j], [&](int r, int cc, float v) {
          const int64_t m = m0 + 32 * wm + F * i + r, n = n0 + 32 * wn + F * j + cc;
          if (m >= a.M || n >= a.N) return;
          if (bias != nullptr) v += to_float(bias[n]);
          if (bias2 != nullptr) v += to_float(bias2[n]);
          const int64_t off = blockIdx.z * a.stride_oz + m * a.stride_om + n * a.stride_on;
          if (a.out_fp32)
            static_cast<float*>(a.out)[off] = v;
          else
            static_cast<T*>(a.out)[off] = from_float<T>(v);
        });
    __syncthreads();  // the next tile's K loop refills the L2 tile's memory
  }
}

template <typename T, int RP>
__global__ void __launch_bounds__(THREADS) lora_backward_kernel(LoraBackwardArgs a) {
  // The widest rank keeps one loop buffer: two would not fit the 48 KB of static shared memory.
  using Tiles = LoopTiles<T, RP, false, true, RP >= 128 ? 1 : 2>;
  // During the K loop: the loop tiles, then T(S) rows [BM][r_ld] for dB. After it: T(dS)
  // [BM][r_ld], then the A tile [RP][n_ld] (for dx), later the x tile [BM][n_ld] (for dA).
  constexpr int r_ld = pitch(RP), n_ld = pitch(BN);
  constexpr size_t s_bytes = align128(BM * r_ld * sizeof(T));
  constexpr size_t a_bytes = align128(rank_frags(RP) * F * n_ld * sizeof(T));
  constexpr size_t x_bytes = align128(BM * n_ld * sizeof(T));
  constexpr size_t loop_bytes = Tiles::bytes + (RP > 0 ? s_bytes : 0);
  constexpr size_t epilogue_bytes = RP > 0 ? s_bytes + larger(a_bytes, x_bytes) : 0;
  constexpr size_t tile_bytes = larger(loop_bytes, epilogue_bytes);
  __shared__ __align__(128) unsigned char smem[tile_bytes + kScratchBytes];
  const Tiles tiles{smem};
  T* s_rows = reinterpret_cast<T*>(smem + Tiles::bytes);
  T* ds_t = reinterpret_cast<T*>(smem);
  T* a_t = reinterpret_cast<T*>(smem + s_bytes);
  T* x_t = a_t;
  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
  float* scratch = reinterpret_cast<float*>(smem + tile_bytes) + warp * F * SLD;

  const int64_t z = blockIdx.x, i0 = int64_t(blockIdx.y) * BN;
  const int64_t row_begin = z * a.rows_per_range;
  const int64_t row_end = min(a.M, row_begin + a.rows_per_range);
  // The reductions over tokens (dB, the bias gradient) of K step k0 / BK are done by the
  // blocks of IN tile (k0 / BK) mod gridDim.y: the IN tiles share them evenly.
  const int64_t k_steps = (a.OUT + BK - 1) / BK;
  const bool need_dx = a.dx != nullptr;
  const bool need_da = RP > 0 && a.da_part != nullptr;
  const bool need_db = RP > 0 && a.db_part != nullptr && blockIdx.y < k_steps;
  const T* x = static_cast<const T*>(a.x);
  // dA [RP, BN] of this IN tile over the range: warp w owns columns 16w .., all rank rows.
  Acc da[rank_frags(RP)];
  zero(da);

  for (int64_t m0 = row_begin; m0 < row_end; m0 += BM) {
    const bool first = m0 == row_begin;  // the first row block overwrites the range's partials
    if constexpr (RP > 0) {
      if (need_db)
        for (int e = threadIdx.x; e < BM * RP; e += THREADS) {
          const int r = e / RP, c = e % RP;
          const int64_t m = m0 + r;
          const float v = m < row_end && c < a.R ? a.s[m * a.stride_sm + c] : 0.f;
          s_rows[r * r_ld + c] = from_float<T>(v);
        }
    }
    // On each staged dy tile of its K steps: db_part[z][k0 + ·] += dyᵀ·T(S) ([BK, RP]
    // in (BK/16)·(RP/16) fragments, spread over the warps) and dbias_part[z][k0 + ·] += Σ dy.
    auto reduce_tokens = [&](int64_t k0, const T* dy_tile) {
      if ((k0 / BK) % gridDim.y != blockIdx.y) return;  // another IN tile's step
      if constexpr (RP > 0) {
        if (need_db)
          for (int f = warp; f < (BK / F) * (RP / F); f += WARPS) {
            const int kf = f % (BK / F), rc = f / (BK / F);
            Acc part;
            wmma::fill_fragment(part, 0.f);
#pragma unroll
            for (int mm = 0; mm < BM; mm += F) {
              FragAt<T> dy_t;
              FragB<T> s;
              wmma::load_matrix_sync(dy_t, dy_tile + mm * Tiles::x_ld + F * kf, Tiles::x_ld);
              wmma::load_matrix_sync(s, s_rows + mm * r_ld + F * rc, r_ld);
              wmma::mma_sync(part, dy_t, s, part);
            }
            for_each_element(scratch, part, [&](int r, int c, float v) {
              const int64_t k = k0 + F * kf + r, col = F * rc + c;
              if (k >= a.OUT || col >= a.R) return;
              float* dst = &a.db_part[(z * a.OUT + k) * a.R + col];
              *dst = first ? v : *dst + v;
            });
          }
      }
      if (a.dbias_part != nullptr && threadIdx.x < BK && k0 + threadIdx.x < a.OUT) {
        float col = 0.f;
        for (int m = 0; m < BM; ++m) col += to_float(dy_tile[m * Tiles::x_ld + threadIdx.x]);
        float* dst = &a.dbias_part[z * a.OUT + k0 + threadIdx.x];
        *dst = first ? col : *dst + col;
      }
    };

    Acc acc[2][2], ds[rank_frags(RP)];
    zero(acc[0]);
    zero(acc[1]);
    zero(ds);
    main_loop(tiles, acc, ds, static_cast<const T*>(a.dy), a.stride_dym, a.stride_dyo,
              static_cast<const T*>(a.w), a.stride_wo, a.stride_wi, static_cast<const T*>(a.b),
              a.stride_bo, a.stride_br, m0, row_end, i0, a.IN, 0, a.OUT, a.R, need_dx, true,
              reduce_tokens);

    if constexpr (RP > 0) {
      __syncthreads();  // T(dS) overwrites the loop tiles (and S rows, also with no K step)
#pragma unroll
      for (int c = 0; c < RP / F; ++c)
        for_each_element(scratch, ds[c], [&](int r, int cc, float v) {
          ds_t[(F * warp + r) * r_ld + F * c + cc] = from_float<T>(v);
        });
      if (need_dx) {  // dx += scale · T(dS)·A
        stage<T, RP, BN>(a_t, n_ld, static_cast<const T*>(a.a), a.stride_ar, a.stride_ai, 0, a.R,
                         i0, a.IN);
        land();
        __syncthreads();
        add_low_rank<T, RP, true>(acc, ds_t, r_ld, a_t, n_ld, a.scale);
        __syncthreads();  // the x tile takes the A tile's place
      }
      if (need_da) {  // dA += T(dS)ᵀ·x
        stage<T, BM, BN>(x_t, n_ld, x, a.stride_xm, a.stride_xi, m0, row_end, i0, a.IN);
        land();
        __syncthreads();
#pragma unroll
        for (int rc = 0; rc < RP / F; ++rc)
#pragma unroll
          for (int mm = 0; mm < BM; mm += F) {
            FragAt<T> d_t;
            FragB<T> xf;
            wmma::load_matrix_sync(d_t, ds_t + mm * r_ld + F * rc, r_ld);
            wmma::load_matrix_sync(xf, x_t + mm * n_ld + F * warp, n_ld);
            wmma::mma_sync(da[rc], d_t, xf, da[rc]);
          }
      }
    }
    if (need_dx) {
      T* dx = static_cast<T*>(a.dx);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
          for_each_element(scratch, acc[i][j], [&](int r, int c, float v) {
            const int64_t m = m0 + 32 * wm + F * i + r, n = i0 + 32 * wn + F * j + c;
            if (m < row_end && n < a.IN) dx[m * a.stride_dxm + n * a.stride_dxi] = from_float<T>(v);
          });
    }
    __syncthreads();  // the next row block restages the shared tiles
  }
  if constexpr (RP > 0) {
    if (need_da)
#pragma unroll
      for (int rc = 0; rc < RP / F; ++rc)
        for_each_element(scratch, da[rc], [&](int r, int c, float v) {
          const int64_t row = F * rc + r, n = i0 + F * warp + c;
          if (row < a.R && n < a.IN) a.da_part[(z * a.R + row) * a.IN + n] = v;
        });
  }
}

// Rank padded to a fragment multiple the kernels are instantiated for.
int rank_tile(int64_t r) { return r == 0 ? 0 : r <= 16 ? 16 : r <= 32 ? 32 : r <= 64 ? 64 : 128; }

// A ranked forward (rp 16..128). A grouped kernel keeps T(S) in its own shared memory, which
// leaves no room at rank 128: GROUPED stops at 64 (launch_matmul never asks for more).
template <typename T, bool GROUPED>
void launch_matmul_ranked(int rp, dim3 grid, const LowRankMatmulArgs& a, cudaStream_t stream) {
  constexpr int kWidest = GROUPED ? 64 : 128;
  switch (rp) {
    case 16: lowrank_matmul_kernel<T, 16, false, GROUPED><<<grid, THREADS, 0, stream>>>(a); break;
    case 32: lowrank_matmul_kernel<T, 32, false, GROUPED><<<grid, THREADS, 0, stream>>>(a); break;
    case 64: lowrank_matmul_kernel<T, 64, false, GROUPED><<<grid, THREADS, 0, stream>>>(a); break;
    default: lowrank_matmul_kernel<T, kWidest, false, GROUPED><<<grid, THREADS, 0, stream>>>(a);
  }
}

// Column groups only where S can be kept (lora.h: column_tiles has no effect without a
// low-rank term, nor above rank 64 on tensor cores).
template <typename T>
int launch_matmul(const LowRankMatmulArgs& a, cudaStream_t stream) {
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  if (a.column_tiles < 1) return cudaErrorInvalidValue;
  const int rp = rank_tile(a.l1 != nullptr ? a.R : 0);
  const int64_t tiles = (a.N + BN - 1) / BN;
  const bool grouped = rp > 0 && rp <= 64 && a.column_tiles > 1;
  const int64_t groups = grouped ? (tiles + a.column_tiles - 1) / a.column_tiles : tiles;
  const dim3 grid(unsigned((a.M + BM - 1) / BM), unsigned(groups), unsigned(a.splits));
  if (rp == 0) {
    // SN-Net v1's dW pass reads x along tokens (X = dyᵀ, Wt = x): the transposed tiles.
    if (a.stride_xm == 1 && a.stride_xk != 1 && a.stride_wn == 1)
      lowrank_matmul_kernel<T, 0, true, false><<<grid, THREADS, 0, stream>>>(a);
    else
      lowrank_matmul_kernel<T, 0, false, false><<<grid, THREADS, 0, stream>>>(a);
  } else if (grouped) {
    launch_matmul_ranked<T, true>(rp, grid, a, stream);
  } else {
    launch_matmul_ranked<T, false>(rp, grid, a, stream);
  }
  return cudaGetLastError();
}

template <typename T>
int launch_backward(const LoraBackwardArgs& a, cudaStream_t stream) {
  if (a.ranges == 0 || a.IN == 0) return cudaSuccess;
  const dim3 grid(unsigned(a.ranges), unsigned((a.IN + BN - 1) / BN));
  switch (rank_tile(a.a != nullptr ? a.R : 0)) {
    case 0: lora_backward_kernel<T, 0><<<grid, THREADS, 0, stream>>>(a); break;
    case 16: lora_backward_kernel<T, 16><<<grid, THREADS, 0, stream>>>(a); break;
    case 32: lora_backward_kernel<T, 32><<<grid, THREADS, 0, stream>>>(a); break;
    case 64: lora_backward_kernel<T, 64><<<grid, THREADS, 0, stream>>>(a); break;
    default: lora_backward_kernel<T, 128><<<grid, THREADS, 0, stream>>>(a); break;
  }
  return cudaGetLastError();
}

}  // namespace

int lowrank_matmul(DType dtype, const LowRankMatmulArgs& args, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat16: return launch_matmul<__half>(args, s);
    case DType::kBFloat16: return launch_matmul<__nv_bfloat16>(args, s);
    case DType::kFloat32: break;
  }
  return cudaErrorInvalidValue;
}

int lora_backward(DType dtype, const LoraBackwardArgs& args, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat16: return launch_backward<__half>(args, s);
    case DType::kBFloat16: return launch_backward<__nv_bfloat16>(args, s);
    case DType::kFloat32: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace tc
}  // namespace stitchops
