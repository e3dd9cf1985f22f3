// Race check of the band kernels of csrc/token_cluster.cu: one EM iteration (band weights,
// the per-centre gather of the M-step), the reconstruction's apply and the weight backward's
// band dots, against float64 loops over each pixel's explicit candidate list. Registered
// with racecheck.cpp's driver.
#include <cmath>
#include <random>

#include "racecheck.h"
#include "token_cluster.h"

namespace {

using racecheck::check;
using racecheck::Dtype;
using racecheck::narrow;

struct Problem {
  int64_t height, width, h, w, channels, window;
};

// PyTorch's nearest rule (float scale, floor, clamp): the cell of each of ``out`` positions.
std::vector<int32_t> cells(int64_t out, int64_t in) {
  std::vector<int32_t> c(out);
  const float scale = float(in) / float(out);
  for (int64_t i = 0; i < out; ++i)
    c[i] = int32_t(std::min<int64_t>(int64_t(std::floor(i * scale)), in - 1));
  return c;
}

template <typename E>
bool run(const Problem& p) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  const int64_t N = p.height * p.width, M = p.h * p.w, C = p.channels, r = p.window / 2;
  std::vector<float> x(N * C), s(M * C), v(M * 3), dy(N * 3);
  for (auto& e : x) e = normal(rng);
  for (auto& e : s) e = normal(rng);
  for (auto& e : v) e = normal(rng);
  for (auto& e : dy) e = normal(rng);
  const auto x_t = narrow<E>(x);
  const auto cy = cells(p.height, p.h), cx = cells(p.width, p.w);
  std::vector<int32_t> pixel_start(p.h), pixel_count(p.h), centre_start(p.h), centre_count(p.h);
  int64_t max_pixels = 0, max_centres = 0;
  for (int64_t row = 0, y = 0; row < p.h; ++row) {
    const int64_t first = y;
    while (y < p.height && cy[y] == row) ++y;
    const int64_t low = std::max<int64_t>(0, row - r), high = std::min<int64_t>(p.h, row + r + 1);
    pixel_start[row] = int32_t(first * p.width), pixel_count[row] = int32_t((y - first) * p.width);
    centre_start[row] = int32_t(low * p.w), centre_count[row] = int32_t((high - low) * p.w);
    max_pixels = std::max<int64_t>(max_pixels, pixel_count[row]);
    max_centres = std::max<int64_t>(max_centres, centre_count[row]);
  }
  std::vector<int32_t> column_start(p.w + 1);
  for (int64_t j = 0, col = 0; j <= p.w; ++j) {
    while (col < p.width && cx[col] < j) ++col;
    column_start[j] = int32_t(col);
  }
  stitchops::BandTable t;
  t.pixel_start = pixel_start.data(), t.pixel_count = pixel_count.data();
  t.centre_start = centre_start.data(), t.centre_count = centre_count.data();
  t.cell_column = cx.data(), t.column_start = column_start.data();
  t.grid_h = p.h, t.grid_w = p.w, t.width = p.width, t.radius = r;
  t.max_pixels = max_pixels, t.max_centres = max_centres;

  // float64: weights over each pixel's explicit candidates, the M-step, the reconstruction.
  const double tau = 4.0;
  std::vector<double> w_ref(N * M, 0.0), s_ref(M * C, 0.0), tot(M, 0.0), y_ref(N * 3, 0.0);
  std::vector<double> g_ref(N * M, 0.0);  // dy_p · v_i over the candidates
  for (int64_t q = 0; q < N; ++q) {
    const int64_t py = q / p.width, px = q % p.width;
    double top = -INFINITY;
    std::vector<double> logit(M, -INFINITY);
    for (int64_t i = 0; i < M; ++i) {
      if (std::abs(i / p.w - cy[py]) > r || std::abs(i % p.w - cx[px]) > r) continue;
      for (int64_t d = 0; d < 3; ++d) g_ref[q * M + i] += double(dy[q * 3 + d]) * v[i * 3 + d];
      double d = 0;
      for (int64_t c = 0; c < C; ++c) d += std::pow(double(x[q * C + c]) - s[i * C + c], 2);
      logit[i] = -d / tau;
      top = std::max(top, logit[i]);
    }
    double sum = 0;
    for (int64_t i = 0; i < M; ++i) sum += std::exp(logit[i] - top);
    for (int64_t i = 0; i < M; ++i) w_ref[q * M + i] = std::exp(logit[i] - top) / sum;
  }
  for (int64_t q = 0; q < N; ++q)
    for (int64_t i = 0; i < M; ++i) {
      tot[i] += w_ref[q * M + i];
      for (int64_t c = 0; c < C; ++c) s_ref[i * C + c] += w_ref[q * M + i] * x[q * C + c];
      for (int64_t d = 0; d < 3; ++d) y_ref[q * 3 + d] += w_ref[q * M + i] * v[i * 3 + d];
    }
  for (int64_t i = 0; i < M; ++i)
    for (int64_t c = 0; c < C; ++c)
      s_ref[i * C + c] = tot[i] == 0 ? s[i * C + c] : s_ref[i * C + c] / tot[i];

  std::vector<float> a(N * max_centres, NAN), out(M * C, NAN), totals(M, NAN), y(N * 3, NAN);
  stitchops::AffinityArgs ga;
  ga.x = x_t.data(), ga.s = s.data(), ga.a = a.data();
  ga.batch = 1, ga.pixels = N, ga.centres = M, ga.channels = C, ga.inv_temperature = float(1 / tau);
  if (stitchops::band_affinity(Dtype<E>::id, t, ga, nullptr) != 0) return false;
  stitchops::GatherArgs gg;
  gg.a = a.data(), gg.x = x.data(), gg.previous = s.data(), gg.out = out.data();
  gg.totals = totals.data(), gg.batch = 1, gg.pixels = N, gg.channels = C, gg.m_step = true;
  if (stitchops::band_gather(t, gg, nullptr) != 0) return false;
  stitchops::ApplyArgs gp;
  gp.a = a.data(), gp.v = v.data(), gp.y = y.data(), gp.batch = 1, gp.pixels = N, gp.centres = M;
  gp.dim = 3;
  if (stitchops::band_apply(t, gp, nullptr) != 0) return false;
  std::vector<float> g(N * max_centres, NAN);
  stitchops::BandDotArgs gd;
  gd.dy = dy.data(), gd.v = v.data(), gd.g = g.data(), gd.batch = 1, gd.pixels = N;
  gd.centres = M, gd.dim = 3;
  if (stitchops::band_dots(t, gd, nullptr) != 0) return false;
  std::vector<float> g_dense(N * M, 0.f);  // the band slots at their centres
  for (int64_t q = 0; q < N; ++q) {
    const int64_t band = cy[q / p.width];
    for (int64_t k = 0; k < centre_count[band]; ++k)
      g_dense[q * M + centre_start[band] + k] = g[q * max_centres + k];
  }

  const std::string where = std::to_string(p.height) + "x" + std::to_string(p.width) + "->" +
                            std::to_string(p.h) + "x" + std::to_string(p.w) + " window " +
                            std::to_string(p.window);
  bool ok = check<E>(where, "centres", out, s_ref);
  ok &= check<E>(where, "y", y, y_ref);
  ok &= check<float>(where, "band dots", g_dense, g_ref);
  return ok;
}

bool run_token_cluster() {
  bool ok = true;
  for (const Problem& p : {Problem{13, 17, 5, 7, 6, 5}, Problem{9, 10, 4, 3, 5, 3}}) {
    ok &= run<float>(p);
    ok &= run<__half>(p);
    ok &= run<__nv_bfloat16>(p);
  }
  return ok;
}

const racecheck::Register registered("token_cluster", run_token_cluster);

}  // namespace
