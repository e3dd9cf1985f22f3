// FASeg's focus cross-attention: SIMT kernels (see focus_attention.h). A thread per query row
// or per key, fp32 math, every loop in a fixed order.
#include <cuda_runtime.h>

#include <cmath>

#include "convert.cuh"
#include "focus_attention.h"

namespace stitchops {
namespace {

constexpr int kThreads = 128;

int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

// The key id of ``slot`` for query q of batch element b.
__device__ int64_t slot_key(const FocusGeometry& g, int64_t b, int64_t q, int64_t slot) {
  if (g.mode < 2) return slot;
  const int64_t area = g.ws * g.ws, per_row = g.map_width / g.ws;
  const int32_t* set =
      g.windows + (b * (g.mode == 3 ? g.queries : 1) + (g.mode == 3 ? q : 0)) * g.sets;
  const int64_t w = set[slot / area], inner = slot % area;
  return ((w / per_row) * g.ws + inner / g.ws) * g.map_width + (w % per_row) * g.ws + inner % g.ws;
}

// Mask mode: whether head h's query q may attend ``key`` (an all-blocked row attends all).
__device__ bool mask_allows(const FocusGeometry& g, int64_t b, int64_t h, int64_t q, int64_t key) {
  if (g.mode != 1) return true;
  const int64_t row = (b * g.mask_heads + h % g.mask_heads) * g.queries + q;
  return g.mask[row * g.keys + key] == 0 || g.reset[row] != 0;
}

// Whether head h's query q attends key n at all (the per-key kernels' test).
__device__ bool key_attended(const FocusGeometry& g, int64_t b, int64_t h, int64_t q, int64_t n) {
  if (g.mode < 2) return mask_allows(g, b, h, q, n);
  const int64_t per_row = g.map_width / g.ws;
  const int64_t window = (n / g.map_width / g.ws) * per_row + (n % g.map_width) / g.ws;
  const int32_t* set =
      g.windows + (b * (g.mode == 3 ? g.queries : 1) + (g.mode == 3 ? q : 0)) * g.sets;
  for (int64_t j = 0; j < g.sets; ++j)
    if (set[j] == window) return true;
  return false;
}

template <typename T>
__device__ void load_row(float* dst, const T* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

template <typename T>
__device__ float dot_row(const float* a, const T* row, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * to_float(row[i]);
  return s;
}

// Typed row pointers of one (b, h): q, k, v, out, dout rows.
template <typename T>
struct Head {
  const T *q, *k, *v, *out, *dout;
  __device__ Head(const FocusGeometry& g, const FocusTensors& t, int64_t b, int64_t h) {
    const int64_t bh = b * g.heads + h;
    q = static_cast<const T*>(t.q) + bh * g.queries * g.dim;
    k = static_cast<const T*>(t.k) + bh * g.keys * g.dim;
    v = static_cast<const T*>(t.v) + bh * g.keys * g.dim;
    out = t.out ? static_cast<const T*>(t.out) + bh * g.queries * g.dim : nullptr;
    dout = t.dout ? static_cast<const T*>(t.dout) + bh * g.queries * g.dim : nullptr;
  }
};

template <typename T>
__device__ const T* pos_row(const FocusGeometry& g, const FocusTensors& t, int64_t b, int64_t n) {
  return static_cast<const T*>(t.pos) + (b * g.keys + n) * g.pos_dim;
}

template <typename T>
__device__ const T* dpos_row(const FocusGeometry& g, const FocusTensors& t, int64_t b, int64_t q) {
  return static_cast<const T*>(t.dpos_out) + (b * g.queries + q) * g.pos_dim;
}

// Thread per (b, h, q): out = softmax(q·kᵀ·scale)·v over the allowed slots, online.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(FocusGeometry g, FocusTensors t, T* out, float* lse) {
  const int64_t item = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (item >= g.batch * g.heads * g.queries) return;
  const int64_t q = item % g.queries, b = item / (g.heads * g.queries),
                h = item / g.queries % g.heads;
  const Head<T> head(g, t, b, h);
  float query[kFocusMaxDim], acc[kFocusMaxDim];
  load_row(query, head.q + q * g.dim, g.dim);
  for (int64_t d = 0; d < g.dim; ++d) acc[d] = 0.f;
  float top = -INFINITY, sum = 0.f;
  for (int64_t slot = 0; slot < g.slots; ++slot) {
    const int64_t key = slot_key(g, b, q, slot);
    if (!mask_allows(g, b, h, q, key)) continue;
    const float s = g.scale * dot_row(query, head.k + key * g.dim, g.dim);
    const float next = fmaxf(top, s);
    const float decay = expf(top - next), p = expf(s - next);
    sum = sum * decay + p;
    for (int64_t d = 0; d < g.dim; ++d)
      acc[d] = acc[d] * decay + p * to_float(head.v[key * g.dim + d]);
    top = next;
  }
  for (int64_t d = 0; d < g.dim; ++d) out[item * g.dim + d] = from_float<T>(acc[d] / sum);
  lse[item] = top + logf(sum);
}

// Ā[q, key] = (1/H) Σ_h A_h[q, key] (heads whose mask blocks the key add 0).
template <typename T>
__device__ float mean_probability(const FocusGeometry& g, const FocusTensors& t, int64_t b,
                                  int64_t q, int64_t key) {
  float mean = 0.f;
  for (int64_t h = 0; h < g.heads; ++h) {
    if (!mask_allows(g, b, h, q, key)) continue;
    const Head<T> head(g, t, b, h);
    float s = 0.f;
    for (int64_t d = 0; d < g.dim; ++d)
      s += to_float(head.q[q * g.dim + d]) * to_float(head.k[key * g.dim + d]);
    mean += expf(g.scale * s - t.lse[(b * g.heads + h) * g.queries + q]);
  }
  return mean / g.heads;
}

// Thread per (b, q): pos_out = Σ_slots Ā·pos.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    mean_pos_kernel(FocusGeometry g, FocusTensors t, float* pos_out) {
  const int64_t item = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (item >= g.batch * g.queries) return;
  const int64_t q = item % g.queries, b = item / g.queries;
  float acc[kFocusMaxPos];
  for (int64_t p = 0; p < g.pos_dim; ++p) acc[p] = 0.f;
  for (int64_t slot = 0; slot < g.slots; ++slot) {
    const int64_t key = slot_key(g, b, q, slot);
    const float mean = mean_probability<T>(g, t, b, q, key);
    const T* pos = pos_row<T>(g, t, b, key);
    for (int64_t p = 0; p < g.pos_dim; ++p) acc[p] += mean * to_float(pos[p]);
  }
  for (int64_t p = 0; p < g.pos_dim; ++p) pos_out[item * g.pos_dim + p] = acc[p];
}

// Thread per (b, key): over the queries that attend it, Σ_q Ā and Σ_q Ā·dpos_out.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    key_means_kernel(FocusGeometry g, FocusTensors t, float* scores, T* dpos) {
  const int64_t item = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (item >= g.batch * g.keys) return;
  const int64_t n = item % g.keys, b = item / g.keys;
  float total = 0.f, acc[kFocusMaxPos];
  for (int64_t p = 0; p < g.pos_dim; ++p) acc[p] = 0.f;
  for (int64_t q = 0; q < g.queries; ++q) {
    if (g.mode >= 2 && !key_attended(g, b, 0, q, n)) continue;  // (masks: per head, below)
    const float mean = mean_probability<T>(g, t, b, q, n);
    total += mean;
    if (dpos != nullptr) {
      const T* grad = dpos_row<T>(g, t, b, q);
      for (int64_t p = 0; p < g.pos_dim; ++p) acc[p] += mean * to_float(grad[p]);
    }
  }
  if (scores != nullptr) scores[item] = total;
  if (dpos != nullptr)
    for (int64_t p = 0; p < g.pos_dim; ++p) dpos[item * g.pos_dim + p] = from_float<T>(acc[p]);
}

// Thread per (b, h, q): Δ = rowsum(dout ∘ out) + Σ_slots A·(dpos_out·pos) / H.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    delta_kernel(FocusGeometry g, FocusTensors t, float* delta) {
  const int64_t item = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (item >= g.batch * g.heads * g.queries) return;
  const int64_t q = item % g.queries, b = item / (g.heads * g.queries),
                h = item / g.queries % g.heads;
  const Head<T> head(g, t, b, h);
  float total = 0.f;
  for (int64_t d = 0; d < g.dim; ++d)
    total += to_float(head.dout[q * g.dim + d]) * to_float(head.out[q * g.dim + d]);
  if (t.pos != nullptr) {
    float query[kFocusMaxDim], grad[kFocusMaxPos], extra = 0.f;
    load_row(query, head.q + q * g.dim, g.dim);
    load_row(grad, dpos_row<T>(g, t, b, q), g.pos_dim);
    for (int64_t slot = 0; slot < g.slots; ++slot) {
      const int64_t key = slot_key(g, b, q, slot);
      if (!mask_allows(g, b, h, q, key)) continue;
      const float p = expf(g.scale * dot_row(query, head.k + key * g.dim, g.dim) - t.lse[item]);
      extra += p * dot_row(grad, pos_row<T>(g, t, b, key), g.pos_dim);
    }
    total += extra / g.heads;
  }
  delta[item] = total;
}

// dS·scale of one (query, key) pair: P ∘ (dP − Δ), dP = dout·v + dpos_out·pos / H.
template <typename T>
__device__ float score_grad(const FocusGeometry& g, const FocusTensors& t, const float* query,
                            const float* dout, const float* dpos, int64_t b, const Head<T>& head,
                            int64_t row, int64_t key, float* p_out) {
  const float p = expf(g.scale * dot_row(query, head.k + key * g.dim, g.dim) - t.lse[row]);
  float dp = dot_row(dout, head.v + key * g.dim, g.dim);
  if (t.pos != nullptr) dp += dot_row(dpos, pos_row<T>(g, t, b, key), g.pos_dim) / g.heads;
  *p_out = p;
  return p * (dp - t.delta[row]) * g.scale;
}

// Thread per (b, h, q): dq = Σ_slots dS·k.
template <typename T>
__global__ void __launch_bounds__(kThreads) dq_kernel(FocusGeometry g, FocusTensors t, T* dq) {
  const int64_t item = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (item >= g.batch * g.heads * g.queries) return;
  const int64_t q = item % g.queries, b = item / (g.heads * g.queries),
                h = item / g.queries % g.heads;
  const Head<T> head(g, t, b, h);
  float query[kFocusMaxDim], dout[kFocusMaxDim], dpos[kFocusMaxPos], acc[kFocusMaxDim];
  load_row(query, head.q + q * g.dim, g.dim);
  load_row(dout, head.dout + q * g.dim, g.dim);
  if (t.pos != nullptr) load_row(dpos, dpos_row<T>(g, t, b, q), g.pos_dim);
  for (int64_t d = 0; d < g.dim; ++d) acc[d] = 0.f;
  for (int64_t slot = 0; slot < g.slots; ++slot) {
    const int64_t key = slot_key(g, b, q, slot);
    if (!mask_allows(g, b, h, q, key)) continue;
    float p = 0.f;
    const float ds = score_grad<T>(g, t, query, dout, dpos, b, head, item, key, &p);
    for (int64_t d = 0; d < g.dim; ++d) acc[d] += ds * to_float(head.k[key * g.dim + d]);
  }
  for (int64_t d = 0; d < g.dim; ++d) dq[item * g.dim + d] = from_float<T>(acc[d]);
}

// Thread per (b, h, key): dk = Σ_q dSᵀ·q, dv = Σ_q Pᵀ·dout over the queries attending it.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    dkdv_kernel(FocusGeometry g, FocusTensors t, T* dk, T* dv) {
  const int64_t item = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (item >= g.batch * g.heads * g.keys) return;
  const int64_t n = item % g.keys, b = item / (g.heads * g.keys), h = item / g.keys % g.heads;
  const Head<T> head(g, t, b, h);
  float query[kFocusMaxDim], dout[kFocusMaxDim], dpos[kFocusMaxPos];
  float key_grad[kFocusMaxDim], value_grad[kFocusMaxDim];
  for (int64_t d = 0; d < g.dim; ++d) key_grad[d] = value_grad[d] = 0.f;
  for (int64_t q = 0; q < g.queries; ++q) {
    if (!key_attended(g, b, h, q, n)) continue;
    load_row(query, head.q + q * g.dim, g.dim);
    load_row(dout, head.dout + q * g.dim, g.dim);
    if (t.pos != nullptr) load_row(dpos, dpos_row<T>(g, t, b, q), g.pos_dim);
    const int64_t row = (b * g.heads + h) * g.queries + q;
    float p = 0.f;
    const float ds = score_grad<T>(g, t, query, dout, dpos, b, head, row, n, &p);
    for (int64_t d = 0; d < g.dim; ++d) {
      key_grad[d] += ds * query[d];
      value_grad[d] += p * dout[d];
    }
  }
  for (int64_t d = 0; d < g.dim; ++d) {
    dk[item * g.dim + d] = from_float<T>(key_grad[d]);
    dv[item * g.dim + d] = from_float<T>(value_grad[d]);
  }
}

enum class Step { kForward, kMeanPos, kKeyMeans, kDelta, kDq, kDkdv };

template <typename T>
int launch_step(Step step, const FocusGeometry& g, const FocusTensors& t, void* a, void* b,
                cudaStream_t stream) {
  const int64_t rows = g.batch * g.heads * g.queries;
  const int64_t items = step == Step::kMeanPos    ? g.batch * g.queries
                        : step == Step::kKeyMeans ? g.batch * g.keys
                        : step == Step::kDkdv     ? g.batch * g.heads * g.keys
                                                  : rows;
  if (items == 0) return cudaSuccess;
  const unsigned grid = unsigned(blocks_for(items));
  switch (step) {
    case Step::kForward:
      forward_kernel<T>
          <<<grid, kThreads, 0, stream>>>(g, t, static_cast<T*>(a), static_cast<float*>(b));
      break;
    case Step::kMeanPos:
      mean_pos_kernel<T><<<grid, kThreads, 0, stream>>>(g, t, static_cast<float*>(a));
      break;
    case Step::kKeyMeans:
      key_means_kernel<T>
          <<<grid, kThreads, 0, stream>>>(g, t, static_cast<float*>(a), static_cast<T*>(b));
      break;
    case Step::kDelta:
      delta_kernel<T><<<grid, kThreads, 0, stream>>>(g, t, static_cast<float*>(a));
      break;
    case Step::kDq: dq_kernel<T><<<grid, kThreads, 0, stream>>>(g, t, static_cast<T*>(a)); break;
    case Step::kDkdv:
      dkdv_kernel<T><<<grid, kThreads, 0, stream>>>(g, t, static_cast<T*>(a), static_cast<T*>(b));
      break;
  }
  return cudaGetLastError();
}

int launch(Step step, DType dtype, const FocusGeometry& g, const FocusTensors& t, void* a, void* b,
           void* stream) {
  if (g.dim > kFocusMaxDim || g.pos_dim > kFocusMaxPos) return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return launch_step<float>(step, g, t, a, b, s);
    case DType::kFloat16: return launch_step<__half>(step, g, t, a, b, s);
    case DType::kBFloat16: return launch_step<__nv_bfloat16>(step, g, t, a, b, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int focus_forward(DType dtype, const FocusGeometry& g, const FocusTensors& t, void* out, float* lse,
                  void* stream) {
  return launch(Step::kForward, dtype, g, t, out, lse, stream);
}

int focus_mean_pos(DType dtype, const FocusGeometry& g, const FocusTensors& t, float* pos_out,
                   void* stream) {
  return launch(Step::kMeanPos, dtype, g, t, pos_out, nullptr, stream);
}

int focus_key_means(DType dtype, const FocusGeometry& g, const FocusTensors& t, float* scores,
                    void* dpos, void* stream) {
  return launch(Step::kKeyMeans, dtype, g, t, scores, dpos, stream);
}

int focus_delta(DType dtype, const FocusGeometry& g, const FocusTensors& t, float* delta,
                void* stream) {
  return launch(Step::kDelta, dtype, g, t, delta, nullptr, stream);
}

int focus_dq(DType dtype, const FocusGeometry& g, const FocusTensors& t, void* dq, void* stream) {
  return launch(Step::kDq, dtype, g, t, dq, nullptr, stream);
}

int focus_dkdv(DType dtype, const FocusGeometry& g, const FocusTensors& t, void* dk, void* dv,
               void* stream) {
  return launch(Step::kDkdv, dtype, g, t, dk, dv, stream);
}

}  // namespace stitchops
