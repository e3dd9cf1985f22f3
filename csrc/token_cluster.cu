// Expedit's token clustering and local reconstruction: CUDA kernels of the band steps (see
// token_cluster.h). SIMT fp32: one thread per output row or element (a pixel's weights or
// band dots, a pixel's output channel, a centre's channel); loops in a fixed order.
// Distances are Σ_c (x_c − s_c)², which does not cancel when tokens sit far from the origin.
#include <cuda_runtime.h>

#include <cmath>

#include "convert.cuh"
#include "token_cluster.h"

namespace stitchops {
namespace {

constexpr int kThreads = 256;

__host__ __device__ int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

// Thread per pixel of the band: the logits of its candidates into a (pass 1, with their
// maximum), then exp and sum (pass 2), then the division (pass 3); a is the scratch.
template <typename T>
__global__ void __launch_bounds__(kThreads) affinity_kernel(BandTable t, AffinityArgs g) {
  const int64_t band = blockIdx.x % t.grid_h, batch = blockIdx.x / t.grid_h;
  const int64_t local = int64_t(blockIdx.y) * kThreads + threadIdx.x;
  if (local >= t.pixel_count[band]) return;
  const int64_t p = t.pixel_start[band] + local;
  const int64_t q0 = t.centre_start[band], q_count = t.centre_count[band];
  const T* x = static_cast<const T*>(g.x) + (batch * g.pixels + p) * g.channels;
  const float* s = g.s + batch * g.centres * g.channels;
  float* a = g.a + (batch * g.pixels + p) * t.max_centres;
  const int64_t column = t.cell_column[p % t.width];
  float top = -INFINITY;
  for (int64_t q = 0; q < t.max_centres; ++q) {
    const int64_t centre_column = (q0 + q) % t.grid_w;
    const int64_t gap = column > centre_column ? column - centre_column : centre_column - column;
    if (q >= q_count || gap > t.radius) {
      a[q] = -INFINITY;
      continue;
    }
    const float* centre = s + (q0 + q) * g.channels;
    float d = 0.f;
    for (int64_t c = 0; c < g.channels; ++c) {
      const float diff = to_float(x[c]) - centre[c];
      d += diff * diff;
    }
    a[q] = -d * g.inv_temperature;
    top = a[q] > top ? a[q] : top;
  }
  float sum = 0.f;
  for (int64_t q = 0; q < t.max_centres; ++q) {
    a[q] = a[q] == -INFINITY ? 0.f : expf(a[q] - top);
    sum += a[q];
  }
  for (int64_t q = 0; q < t.max_centres; ++q) a[q] = a[q] / sum;
}

// Thread per (band pixel, channel): y = Σ_q a·v.
__global__ void __launch_bounds__(kThreads) apply_kernel(BandTable t, ApplyArgs g) {
  const int64_t band = blockIdx.x % t.grid_h, batch = blockIdx.x / t.grid_h;
  const int64_t item = int64_t(blockIdx.y) * kThreads + threadIdx.x;
  const int64_t local = item / g.dim, col = item % g.dim;
  if (local >= t.pixel_count[band]) return;
  const int64_t p = t.pixel_start[band] + local;
  const int64_t q0 = t.centre_start[band], q_count = t.centre_count[band];
  const float* a = g.a + (batch * g.pixels + p) * t.max_centres;
  const float* v = g.v + (batch * g.centres + q0) * g.dim + col;
  float acc = 0.f;
  for (int64_t q = 0; q < q_count; ++q) acc += a[q] * v[q * g.dim];
  float* y = g.y + (batch * g.pixels + p) * g.dim + col;
  *y = g.accumulate ? *y + acc : acc;
}

// Thread per (centre, channel): the pixels that may pick the centre, band by band, row by
// row; the threads of one centre read a pixel's weight together and its channels coalesced.
__global__ void __launch_bounds__(kThreads) gather_kernel(BandTable t, GatherArgs g) {
  const int64_t centres = t.grid_h * t.grid_w;
  const int64_t item = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (item >= g.batch * centres * g.channels) return;
  const int64_t c = item % g.channels, row = item / g.channels;
  const int64_t centre = row % centres, batch = row / centres;
  const int64_t iy = centre / t.grid_w, ix = centre % t.grid_w;
  const int64_t column_lo = t.column_start[ix - t.radius > 0 ? ix - t.radius : 0];
  const int64_t column_hi =
      t.column_start[ix + t.radius + 1 < t.grid_w ? ix + t.radius + 1 : t.grid_w];
  const int64_t first = iy - t.radius > 0 ? iy - t.radius : 0;
  const int64_t last = iy + t.radius + 1 < t.grid_h ? iy + t.radius + 1 : t.grid_h;
  float acc = 0.f, total = 0.f;
  for (int64_t band = first; band < last; ++band) {
    const int64_t row0 = band - t.radius > 0 ? band - t.radius : 0;
    const int64_t q = (iy - row0) * t.grid_w + ix;
    const int64_t p0 = batch * g.pixels + t.pixel_start[band];
    for (int64_t y = 0; y < t.pixel_count[band] / t.width; ++y)
      for (int64_t col = column_lo; col < column_hi; ++col) {
        const int64_t p = p0 + y * t.width + col;
        const float weight = g.a[p * t.max_centres + q];
        acc += weight * g.x[p * g.channels + c];
        total += weight;
      }
  }
  if (g.m_step) {
    if (g.total_floor > 0.f)
      acc = acc / (total > g.total_floor ? total : g.total_floor);
    else
      acc = total == 0.f ? g.previous[item] : acc / total;
  }
  if (c == 0) g.totals[row] = total;
  g.out[item] = acc;
}

// Thread per band pixel: for each candidate slot q, the dot product dy_p · v_{q0+q} over D
// (0 for a slot off the pixel's ±r columns or past the band).
__global__ void __launch_bounds__(kThreads) dot_kernel(BandTable t, BandDotArgs g) {
  const int64_t band = blockIdx.x % t.grid_h, batch = blockIdx.x / t.grid_h;
  const int64_t local = int64_t(blockIdx.y) * kThreads + threadIdx.x;
  if (local >= t.pixel_count[band]) return;
  const int64_t p = t.pixel_start[band] + local;
  const int64_t q0 = t.centre_start[band], q_count = t.centre_count[band];
  const int64_t column = t.cell_column[p % t.width];
  const float* dy = g.dy + (batch * g.pixels + p) * g.dim;
  float* out = g.g + (batch * g.pixels + p) * t.max_centres;
  for (int64_t q = 0; q < t.max_centres; ++q) {
    const int64_t centre_column = (q0 + q) % t.grid_w;
    const int64_t gap = column > centre_column ? column - centre_column : centre_column - column;
    float acc = 0.f;
    if (q < q_count && gap <= t.radius) {
      const float* v = g.v + (batch * g.centres + q0 + q) * g.dim;
      for (int64_t d = 0; d < g.dim; ++d) acc += dy[d] * v[d];
    }
    out[q] = acc;
  }
}

template <typename T>
int launch_affinity(const BandTable& t, const AffinityArgs& g, cudaStream_t stream) {
  if (g.batch == 0 || t.max_pixels == 0) return cudaSuccess;
  const dim3 grid(unsigned(g.batch * t.grid_h), unsigned(blocks_for(t.max_pixels)));
  affinity_kernel<T><<<grid, kThreads, 0, stream>>>(t, g);
  return cudaGetLastError();
}

}  // namespace

int band_affinity(DType dtype, const BandTable& t, const AffinityArgs& args, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return launch_affinity<float>(t, args, s);
    case DType::kFloat16: return launch_affinity<__half>(t, args, s);
    case DType::kBFloat16: return launch_affinity<__nv_bfloat16>(t, args, s);
  }
  return cudaErrorInvalidValue;
}

int band_apply(const BandTable& t, const ApplyArgs& g, void* stream) {
  if (g.batch == 0 || g.dim == 0 || t.max_pixels == 0) return cudaSuccess;
  const dim3 grid(unsigned(g.batch * t.grid_h), unsigned(blocks_for(t.max_pixels * g.dim)));
  apply_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(t, g);
  return cudaGetLastError();
}

int band_dots(const BandTable& t, const BandDotArgs& g, void* stream) {
  if (g.batch == 0 || t.max_pixels == 0 || t.max_centres == 0) return cudaSuccess;
  const dim3 grid(unsigned(g.batch * t.grid_h), unsigned(blocks_for(t.max_pixels)));
  dot_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(t, g);
  return cudaGetLastError();
}

int band_gather(const BandTable& t, const GatherArgs& g, void* stream) {
  const int64_t items = g.batch * t.grid_h * t.grid_w * g.channels;
  if (items == 0) return cudaSuccess;
  gather_kernel<<<unsigned(blocks_for(items)), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(t,
                                                                                                 g);
  return cudaGetLastError();
}

}  // namespace stitchops
