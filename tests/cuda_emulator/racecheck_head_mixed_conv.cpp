// Race check of SPViT's head-mixed stencil, csrc/head_mixed_conv.cu: the forward and dv (a
// thread per element: no shared writes) and the dmix partials (a thread per (head, tap) of
// each block), on odd and rectangular maps with a prefix, against float64 loops. The
// partials are summed here, not by sum_ranges.cu. Registered with racecheck.cpp.
#include <random>

#include "head_mixed_conv.h"
#include "racecheck.h"

namespace {

using racecheck::check;
using racecheck::Dtype;
using racecheck::narrow;
using racecheck::widen;

struct Problem {
  int64_t batch, heads, dim, gh, gw, prefix, k;
};

template <typename E>
bool run(const Problem& p) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  auto rnd = [&](int64_t n) {
    std::vector<float> v(n);
    for (auto& e : v) e = normal(rng);
    return v;
  };
  const int64_t n = p.prefix + p.gh * p.gw, kk = p.k * p.k, H = p.heads, D = p.dim;
  auto v = rnd(p.batch * n * H * D), mix = rnd(H * kk), g = rnd(p.batch * n * D);
  const auto v_t = narrow<E>(v), mix_t = narrow<E>(mix), g_t = narrow<E>(g);
  // The reference loops: out, dv, dmix in float64.
  std::vector<double> out_ref(p.batch * n * D, 0.0), dv_ref(v.size(), 0.0), dmix_ref(H * kk, 0.0);
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t q = 0; q < p.gh * p.gw; ++q)
      for (int64_t t = 0; t < kk; ++t) {
        const int64_t row = q / p.gw + t % p.k - p.k / 2, col = q % p.gw + t / p.k - p.k / 2;
        if (row < 0 || row >= p.gh || col < 0 || col >= p.gw) continue;
        const int64_t src = p.prefix + row * p.gw + col, dst = p.prefix + q;
        for (int64_t h = 0; h < H; ++h)
          for (int64_t d = 0; d < D; ++d) {
            const int64_t vi = ((b * n + src) * H + h) * D + d, gi = (b * n + dst) * D + d;
            out_ref[gi] += double(mix[h * kk + t]) * v[vi];
            dv_ref[vi] += double(mix[h * kk + t]) * g[gi];
            dmix_ref[h * kk + t] += double(g[gi]) * v[vi];
          }
      }
  stitchops::HeadMixedConvArgs a;
  a.v = v_t.data(), a.stride_vb = n * H * D, a.stride_vn = H * D, a.stride_vh = D, a.stride_vd = 1;
  a.mix = mix_t.data();
  a.grad = g_t.data(), a.stride_gb = n * D, a.stride_gn = D, a.stride_gd = 1;
  a.batch = p.batch, a.heads = H, a.dim = D, a.gh = p.gh, a.gw = p.gw, a.prefix = p.prefix;
  a.k = p.k;
  std::vector<float> out_zero(p.batch * n * D, 0.f), dv_zero(v.size(), 0.f);
  auto out = narrow<E>(out_zero);
  a.out = out.data();
  if (stitchops::head_mixed_conv_forward(Dtype<E>::id, a, nullptr) != 0) return false;
  auto dv = narrow<E>(dv_zero);
  a.out = dv.data();
  if (stitchops::head_mixed_conv_grad_v(Dtype<E>::id, a, nullptr) != 0) return false;
  const int64_t blocks =
      p.batch * ((p.gh * p.gw + stitchops::kMixPositions - 1) / stitchops::kMixPositions);
  std::vector<float> part(blocks * H * kk, NAN), dmix(H * kk, 0.f);
  a.part = part.data();
  if (stitchops::head_mixed_conv_grad_mix(Dtype<E>::id, a, nullptr) != 0) return false;
  for (int64_t z = 0; z < blocks; ++z)
    for (int64_t i = 0; i < H * kk; ++i) dmix[i] += part[z * H * kk + i];
  const std::string where = "B=" + std::to_string(p.batch) + " H=" + std::to_string(H) +
                            " D=" + std::to_string(D) + " grid=" + std::to_string(p.gh) + "x" +
                            std::to_string(p.gw) + " k=" + std::to_string(p.k);
  bool ok = check<E>(where, "out", widen(out), out_ref);
  ok &= check<E>(where, "dv", widen(dv), dv_ref);
  ok &= check<E>(where, "dmix", dmix, dmix_ref);
  return ok;
}

bool run_head_mixed_conv() {
  bool ok = true;
  // A rectangular map over two dmix blocks with a class token; k 5 on a map smaller than it.
  for (const Problem& p : {Problem{2, 3, 9, 5, 7, 1, 3}, Problem{1, 2, 4, 3, 2, 0, 5}}) {
    ok &= run<float>(p);
    ok &= run<__half>(p);
    ok &= run<__nv_bfloat16>(p);
  }
  return ok;
}

const racecheck::Register registered("head_mixed_conv", run_head_mixed_conv);

}  // namespace
