// Fused LoRA stitching projection: CUDA kernels (see lora.h for the interface and the math).
//
// Both kernels share one structure: a 64 × 64 output tile per block of 256 threads, operand
// tiles staged in shared memory as fp32, 4 × 4 outputs per thread accumulated in fp32 FMA.
// Every operand tile loaded for the main GEMM also feeds the rank-R product (S = x·Aᵀ in the
// forward, dS = dy·B in the backward), held in registers, so x (resp. dy) is read once per
// pass and no [tokens, OUT] low-rank intermediate is ever written.
//
// This is the SIMT implementation of the fusion, for fp32: exact fp32 products and
// accumulation (torch's default for fp32 matmul, no TF32). fp16 and bf16 go to the
// tensor-core kernels of lora_tc.cu. The Triton backend (autotuned) is the default on CUDA.
#include <cuda_runtime.h>

#include "convert.cuh"
#include "lora.h"
#include "lora_tc.h"

namespace stitchops {
namespace {

constexpr int BM = kBlockM;
constexpr int BN = kBlockN;
constexpr int BK = 16;
constexpr int THREADS = 256;
constexpr int RC = 16;  // rank chunk of the epilogues

// dst[k][n] (row length NT + 1, padded against bank conflicts) = src[k·s_k + n·s_n] for
// k0 + k < k_end and n0 + n < n_end, else 0. Consecutive threads follow the unit stride.
template <typename T, int KT, int NT>
__device__ __forceinline__ void load_tile(float* dst, const T* src, int64_t s_k, int64_t s_n,
                                          int64_t k0, int64_t k_end, int64_t n0, int64_t n_end) {
  const bool n_fast = s_n == 1 || s_k != 1;
  for (int e = threadIdx.x; e < KT * NT; e += THREADS) {
    const int k = n_fast ? e / NT : e % KT;
    const int n = n_fast ? e % NT : e / KT;
    const int64_t gk = k0 + k, gn = n0 + n;
    float v = 0.f;
    if (gk < k_end && gn < n_end) v = to_float(src[gk * s_k + gn * s_n]);
    dst[k * (NT + 1) + n] = v;
  }
}

// The shared main loop: acc[i][j] += Σ_k X[row_i, k]·Wt[k, col_j] (when want_w) and, with
// RP > 0 and want_l, lr[q] += Σ_k X[srow, k]·L[k, scol + 4q]. Thread (ty, tx) = (tid / 16, tid %
// 16) owns rows ty + 16i and columns tx + 16j; thread (srow, scol) = (tid / 4, tid % 4) owns rank
// entries scol + 4q of row srow. Hook(k0, xs) runs on every staged X tile (backward reductions).
template <typename T, int RP>
struct Stage {
  float xs[BK][BM + 1];
  float ws[BK][BN + 1];
  float ls[BK][(RP > 0 ? RP : 1) + 1];
};

template <typename T, int RP, typename Hook>
__device__ __forceinline__ void main_loop(Stage<T, RP>& st, float (&acc)[4][4],
                                          float (&lr)[RP > 0 ? RP / 4 : 1], const T* X,
                                          int64_t s_xm, int64_t s_xk, const T* Wt, int64_t s_wk,
                                          int64_t s_wn, const T* L, int64_t s_lk, int64_t s_lr,
                                          int64_t m0, int64_t m_end, int64_t n0, int64_t n_end,
                                          int64_t k_begin, int64_t k_end, int64_t R, bool want_w,
                                          bool want_l, Hook hook) {
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16, srow = tid / 4, scol = tid % 4;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
    load_tile<T, BK, BM>(&st.xs[0][0], X, s_xk, s_xm, k0, k_end, m0, m_end);
    if (want_w) load_tile<T, BK, BN>(&st.ws[0][0], Wt, s_wk, s_wn, k0, k_end, n0, n_end);
    if constexpr (RP > 0)
      if (want_l) load_tile<T, BK, RP>(&st.ls[0][0], L, s_lk, s_lr, k0, k_end, 0, R);
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < BK; ++kk) {
      if (want_w) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = st.xs[kk][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = st.ws[kk][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      if constexpr (RP > 0) {
        if (want_l) {
          const float xv = st.xs[kk][srow];
#pragma unroll
          for (int q = 0; q < RP / 4; ++q) lr[q] = fmaf(xv, st.ls[kk][scol + 4 * q], lr[q]);
        }
      }
    }
    hook(k0, st.xs);
    __syncthreads();
  }
}

struct NoHook {
  __device__ void operator()(int64_t, const float (&)[BK][BM + 1]) const {}
};

// Rank chunk c of lr (rank entries 16c .. 16c + 15) into sm_s[row][r - 16c].
template <int RP>
__device__ __forceinline__ void stage_rank_chunk(float (*sm_s)[RC + 1], const float (&lr)[RP / 4],
                                                 int c) {
  const int srow = threadIdx.x / 4, scol = threadIdx.x % 4;
#pragma unroll
  for (int qq = 0; qq < RC / 4; ++qq) sm_s[srow][scol + 4 * qq] = lr[c * (RC / 4) + qq];
}

// acc[i][j] += scale · Σ_rr sm_s[row_i][rr] · sm_l[rr][col_j] over one staged rank chunk.
__device__ __forceinline__ void add_rank_chunk(float (&acc)[4][4], const float (*sm_s)[RC + 1],
                                               const float (*sm_l)[BN + 1], float scale) {
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll 4
  for (int rr = 0; rr < RC; ++rr) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float sv = scale * sm_s[ty + 16 * i][rr];
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(sv, sm_l[rr][tx + 16 * j], acc[i][j]);
    }
  }
}

// GROUPED: a block covers a.column_tiles output tiles of its row block in turn (lora.h):
// S = X·L1 accumulates in registers during the first tile's K loop and serves the others.
// Ungrouped, the loop over tiles compiles away (a separate instantiation: the grouped one
// takes more registers, e.g. 106 → 184 at rank 128 on sm_90a).
template <typename T, int RP, bool GROUPED>
__global__ void __launch_bounds__(THREADS) lowrank_matmul_kernel(LowRankMatmulArgs a) {
  static_assert(!GROUPED || RP > 0, "column groups share S: no low-rank term, nothing to share");
  __shared__ Stage<T, RP> st;
  __shared__ float sm_s[BM][RC + 1];
  __shared__ float sm_l2[RC][BN + 1];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t m0 = int64_t(blockIdx.x) * BM;
  const int64_t k_begin = int64_t(blockIdx.z) * a.k_per_split;
  const int64_t k_end = min(a.K, k_begin + a.k_per_split);
  const T* l2 = static_cast<const T*>(a.l2);
  const T* bias = static_cast<const T*>(a.bias);
  const T* bias2 = static_cast<const T*>(a.bias2);

  float lr[RP > 0 ? RP / 4 : 1] = {};
  const int column_tiles = GROUPED ? a.column_tiles : 1;
  for (int c = 0; c < column_tiles; ++c) {
    const int64_t n0 = (int64_t(blockIdx.y) * column_tiles + c) * BN;
    if (n0 >= a.N) break;
    float acc[4][4] = {};
    main_loop<T, RP>(st, acc, lr, static_cast<const T*>(a.x), a.stride_xm, a.stride_xk,
                     static_cast<const T*>(a.w), a.stride_wk, a.stride_wn,
                     static_cast<const T*>(a.l1), a.stride_l1k, a.stride_l1r, m0, a.M, n0, a.N,
                     k_begin, k_end, a.R, true, c == 0, NoHook{});

    if constexpr (RP > 0) {
      const int srow = tid / 4, scol = tid % 4;
      if (a.s_out != nullptr && blockIdx.y == 0 && c == 0 && m0 + srow < a.M) {
#pragma unroll
        for (int q = 0; q < RP / 4; ++q)
          if (scol + 4 * q < a.R) a.s_out[(m0 + srow) * a.stride_sm + scol + 4 * q] = lr[q];
      }
      // acc += scale · S · L2, one chunk of 16 rank entries at a time.
#pragma unroll
      for (int rc = 0; rc < RP / RC; ++rc) {
        stage_rank_chunk<RP>(sm_s, lr, rc);
        load_tile<T, RC, BN>(&sm_l2[0][0], l2, a.stride_l2r, a.stride_l2n, rc * RC, a.R, n0, a.N);
        __syncthreads();
        add_rank_chunk(acc, sm_s, sm_l2, a.scale);
        __syncthreads();
      }
    }

#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx + 16 * j;
      if (n >= a.N) continue;
      float add = 0.f;
      if (bias != nullptr) add += to_float(bias[n]);
      if (bias2 != nullptr) add += to_float(bias2[n]);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t m = m0 + ty + 16 * i;
        if (m >= a.M) continue;
        const int64_t off = blockIdx.z * a.stride_oz + m * a.stride_om + n * a.stride_on;
        const float v = acc[i][j] + add;
        if (a.out_fp32)
          static_cast<float*>(a.out)[off] = v;
        else
          static_cast<T*>(a.out)[off] = from_float<T>(v);
      }
    }
  }
}

// Backward reductions over tokens, done on each staged dy tile of K step k0 / BK by the
// blocks of IN tile (k0 / BK) mod gridDim.y, so that the IN tiles share them evenly:
// db_part[z][k][r] += Σ_m dy[m, k]·S[m, r] and dbias_part[z][k] += Σ_m dy[m, k], written to
// the range's own slice (the first row block overwrites, so nothing needs zeroing).
template <int RP>
struct TokenReductionHook {
  const LoraBackwardArgs* a;
  int64_t m0, m_end;
  bool first_block;
  __device__ void operator()(int64_t k0, const float (&xs)[BK][BM + 1]) const {
    if ((k0 / BK) % gridDim.y != blockIdx.y) return;
    const int tid = threadIdx.x;
    const int64_t z = blockIdx.x;
    if constexpr (RP > 0) {
      if (a->db_part != nullptr) {
        const int pk = tid / 16, pr = tid % 16;
        const int64_t k = k0 + pk;
        if (k < a->OUT) {
          const int rows = int(min(int64_t(BM), m_end - m0));
#pragma unroll
          for (int q = 0; q < RP / 16; ++q) {
            const int64_t r = pr + 16 * q;
            if (r >= a->R) continue;
            float part = 0.f;
            for (int m = 0; m < rows; ++m)
              part = fmaf(xs[pk][m], __ldg(&a->s[(m0 + m) * a->stride_sm + r]), part);
            float* dst = &a->db_part[(z * a->OUT + k) * a->R + r];
            *dst = first_block ? part : *dst + part;
          }
        }
      }
    }
    if (a->dbias_part != nullptr && tid < BK && k0 + tid < a->OUT) {
      float col = 0.f;
      for (int m = 0; m < BM; ++m) col += xs[tid][m];  // rows past m_end were loaded as 0
      float* dst = &a->dbias_part[z * a->OUT + k0 + tid];
      *dst = first_block ? col : *dst + col;
    }
  }
};

template <typename T, int RP>
__global__ void __launch_bounds__(THREADS, 1) lora_backward_kernel(LoraBackwardArgs a) {
  __shared__ Stage<T, RP> st;
  __shared__ float sm_s[BM][RC + 1];
  __shared__ float sm_a[RC][BN + 1];
  __shared__ float sm_x[BM][BN + 1];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t i0 = int64_t(blockIdx.y) * BN;
  const int64_t row_begin = int64_t(blockIdx.x) * a.rows_per_range;
  const int64_t row_end = min(a.M, row_begin + a.rows_per_range);
  const bool need_da = RP > 0 && a.da_part != nullptr;
  const T* A = static_cast<const T*>(a.a);
  // dA tile [RP, BN]: thread (tr, tn) = (tid / 64, tid % 64) owns rows 16c + tr + 4qq.
  const int tr = tid / 64, tn = tid % 64;
  float da[RP > 0 ? RP / RC : 1][RC / 4] = {};

  for (int64_t m0 = row_begin; m0 < row_end; m0 += BM) {
    float acc[4][4] = {};
    float ds[RP > 0 ? RP / 4 : 1] = {};
    TokenReductionHook<RP> hook{&a, m0, row_end, m0 == row_begin};
    main_loop<T, RP>(st, acc, ds, static_cast<const T*>(a.dy), a.stride_dym, a.stride_dyo,
                     static_cast<const T*>(a.w), a.stride_wo, a.stride_wi,
                     static_cast<const T*>(a.b), a.stride_bo, a.stride_br, m0, row_end, i0, a.IN, 0,
                     a.OUT, a.R, a.dx != nullptr, true, hook);
    if constexpr (RP > 0) {
      if (need_da)
        load_tile<T, BM, BN>(&sm_x[0][0], static_cast<const T*>(a.x), a.stride_xm, a.stride_xi, m0,
                             row_end, i0, a.IN);
#pragma unroll
      for (int c = 0; c < RP / RC; ++c) {
        stage_rank_chunk<RP>(sm_s, ds, c);
        load_tile<T, RC, BN>(&sm_a[0][0], A, a.stride_ar, a.stride_ai, c * RC, a.R, i0, a.IN);
        __syncthreads();
        add_rank_chunk(acc, sm_s, sm_a, a.scale);  // dx += scale · dS · A
        // dA += dSᵀ · x
        if (need_da) {
#pragma unroll
          for (int qq = 0; qq < RC / 4; ++qq) {
            float sum = 0.f;
            for (int m = 0; m < BM; ++m) sum = fmaf(sm_s[m][tr + 4 * qq], sm_x[m][tn], sum);
            da[c][qq] += sum;
          }
        }
        __syncthreads();
      }
    }
    if (a.dx != nullptr) {
      T* dx = static_cast<T*>(a.dx);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t m = m0 + ty + 16 * i;
        if (m >= row_end) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int64_t n = i0 + tx + 16 * j;
          if (n < a.IN) dx[m * a.stride_dxm + n * a.stride_dxi] = from_float<T>(acc[i][j]);
        }
      }
    }
  }
  if constexpr (RP > 0) {
    if (need_da && i0 + tn < a.IN) {
#pragma unroll
      for (int c = 0; c < RP / RC; ++c)
#pragma unroll
        for (int qq = 0; qq < RC / 4; ++qq) {
          const int64_t r = c * RC + tr + 4 * qq;
          if (r < a.R) a.da_part[(int64_t(blockIdx.x) * a.R + r) * a.IN + i0 + tn] = da[c][qq];
        }
    }
  }
}

int padded_rank(int64_t r) { return r == 0 ? 0 : r <= 16 ? 16 : r <= 64 ? 64 : 128; }

template <typename T, bool GROUPED>
void launch_matmul_ranked(int rp, dim3 grid, const LowRankMatmulArgs& a, cudaStream_t stream) {
  switch (rp) {
    case 16: lowrank_matmul_kernel<T, 16, GROUPED><<<grid, THREADS, 0, stream>>>(a); break;
    case 64: lowrank_matmul_kernel<T, 64, GROUPED><<<grid, THREADS, 0, stream>>>(a); break;
    default: lowrank_matmul_kernel<T, 128, GROUPED><<<grid, THREADS, 0, stream>>>(a); break;
  }
}

// Column groups only with a low-rank term (lora.h: column_tiles has no effect without one).
template <typename T>
int launch_matmul(const LowRankMatmulArgs& a, cudaStream_t stream) {
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  if (a.column_tiles < 1) return cudaErrorInvalidValue;
  const int rp = padded_rank(a.l1 != nullptr ? a.R : 0);
  const int64_t tiles = (a.N + BN - 1) / BN;
  const bool grouped = rp > 0 && a.column_tiles > 1;
  const int64_t groups = grouped ? (tiles + a.column_tiles - 1) / a.column_tiles : tiles;
  const dim3 grid(unsigned((a.M + BM - 1) / BM), unsigned(groups), unsigned(a.splits));
  if (rp == 0)
    lowrank_matmul_kernel<T, 0, false><<<grid, THREADS, 0, stream>>>(a);
  else if (grouped)
    launch_matmul_ranked<T, true>(rp, grid, a, stream);
  else
    launch_matmul_ranked<T, false>(rp, grid, a, stream);
  return cudaGetLastError();
}

template <typename T>
int launch_backward(const LoraBackwardArgs& a, cudaStream_t stream) {
  if (a.ranges == 0 || a.IN == 0) return cudaSuccess;
  const dim3 grid(unsigned(a.ranges), unsigned((a.IN + BN - 1) / BN));
  switch (padded_rank(a.a != nullptr ? a.R : 0)) {
    case 0: lora_backward_kernel<T, 0><<<grid, THREADS, 0, stream>>>(a); break;
    case 16: lora_backward_kernel<T, 16><<<grid, THREADS, 0, stream>>>(a); break;
    case 64: lora_backward_kernel<T, 64><<<grid, THREADS, 0, stream>>>(a); break;
    default: lora_backward_kernel<T, 128><<<grid, THREADS, 0, stream>>>(a); break;
  }
  return cudaGetLastError();
}

}  // namespace

// fp32 runs the SIMT kernels above (exact fp32 products, as torch's default fp32 matmul);
// fp16 and bf16 run the tensor-core kernels of lora_tc.cu.
int lowrank_matmul(DType dtype, const LowRankMatmulArgs& args, void* stream) {
  if (args.R > kMaxRank) return cudaErrorInvalidValue;
  if (dtype != DType::kFloat32) return tc::lowrank_matmul(dtype, args, stream);
  return launch_matmul<float>(args, static_cast<cudaStream_t>(stream));
}

int lora_backward(DType dtype, const LoraBackwardArgs& args, void* stream) {
  if (args.R > kMaxRank || args.rows_per_range % kBlockM != 0) return cudaErrorInvalidValue;
  if (dtype != DType::kFloat32) return tc::lora_backward(dtype, args, stream);
  return launch_backward<float>(args, static_cast<cudaStream_t>(stream));
}

}  // namespace stitchops
