// Race check of the focus-attention kernels of csrc/focus_attention.cu: forward (out, Ā·pos,
// key scores) and backward (Δ, dq, dk, dv, dpos) in mask, shared-window and per-query-window
// modes, against float64 loops over an explicit allowed-keys matrix. Registered with
// racecheck.cpp's driver.
#include <cmath>
#include <random>

#include "focus_attention.h"
#include "racecheck.h"

namespace {

using racecheck::check;
using racecheck::Dtype;
using racecheck::narrow;

constexpr int64_t B = 1, H = 2, Q = 5, D = 4, P = 3, WS = 3, MW = 6, N = 36;

struct Reference {
  std::vector<double> out, pos_out, scores, dq, dk, dv, dpos;
};

// allowed[(h·Q + q)·N + n] of the dense spec, then softmax, outputs and adjoints in float64.
Reference dense(const std::vector<char>& allowed, const std::vector<float>& q,
                const std::vector<float>& k, const std::vector<float>& v,
                const std::vector<float>& pos, const std::vector<float>& dout,
                const std::vector<float>& dpos_out, double scale) {
  Reference r{std::vector<double>(H * Q * D, 0), std::vector<double>(Q * P, 0),
              std::vector<double>(N, 0),         std::vector<double>(H * Q * D, 0),
              std::vector<double>(H * N * D, 0), std::vector<double>(H * N * D, 0),
              std::vector<double>(N * P, 0)};
  std::vector<double> a(H * Q * N, 0);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < Q; ++i) {
      double top = -INFINITY, sum = 0;
      std::vector<double> s(N, -INFINITY);
      for (int64_t n = 0; n < N; ++n) {
        if (!allowed[(h * Q + i) * N + n]) continue;
        s[n] = 0;
        for (int64_t d = 0; d < D; ++d)
          s[n] += double(q[(h * Q + i) * D + d]) * k[(h * N + n) * D + d];
        s[n] *= scale;
        top = std::max(top, s[n]);
      }
      for (int64_t n = 0; n < N; ++n) sum += std::exp(s[n] - top);
      for (int64_t n = 0; n < N; ++n) a[(h * Q + i) * N + n] = std::exp(s[n] - top) / sum;
    }
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < Q; ++i) {
      const int64_t row = h * Q + i;
      double delta = 0;
      std::vector<double> dp(N, 0);
      for (int64_t n = 0; n < N; ++n) {
        const double w = a[row * N + n], mean = w / H;
        r.scores[n] += mean;
        for (int64_t d = 0; d < D; ++d) {
          r.out[row * D + d] += w * v[(h * N + n) * D + d];
          dp[n] += double(dout[row * D + d]) * v[(h * N + n) * D + d];
        }
        for (int64_t p = 0; p < P; ++p) {
          r.pos_out[i * P + p] += mean * pos[n * P + p];
          dp[n] += double(dpos_out[i * P + p]) * pos[n * P + p] / H;
          r.dpos[n * P + p] += mean * dpos_out[i * P + p];
        }
        delta += w * dp[n];
      }
      for (int64_t n = 0; n < N; ++n) {
        const double ds = a[row * N + n] * (dp[n] - delta) * scale;
        for (int64_t d = 0; d < D; ++d) {
          r.dq[row * D + d] += ds * k[(h * N + n) * D + d];
          r.dk[(h * N + n) * D + d] += ds * q[row * D + d];
          r.dv[(h * N + n) * D + d] += a[row * N + n] * dout[row * D + d];
        }
      }
    }
  return r;
}

template <typename E>
bool run(int mode) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  auto rnd = [&](int64_t n) {
    std::vector<float> x(n);
    for (auto& e : x) e = normal(rng);
    return x;
  };
  auto q = rnd(H * Q * D), k = rnd(H * N * D), v = rnd(H * N * D), pos = rnd(N * P);
  auto dout = rnd(H * Q * D), dpos_out = rnd(Q * P);
  const auto q_t = narrow<E>(q), k_t = narrow<E>(k), v_t = narrow<E>(v), pos_t = narrow<E>(pos);
  const auto dout_t = narrow<E>(dout), dpos_t = narrow<E>(dpos_out);
  // mask mode: a pseudo-random pattern, row 2 of head 0 all blocked (reset to every key);
  // window modes: 4 windows of 3×3 on the 6×6 map, sets of 2 (shared) or per query
  std::vector<int8_t> mask(H * Q * N), reset(H * Q, 0);
  std::vector<int32_t> windows =
      mode == 2 ? std::vector<int32_t>{3, 1} : std::vector<int32_t>{0, 1, 2, 3, 1, 2, 3, 0, 2, 0};
  std::vector<char> allowed(H * Q * N, 1);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < Q; ++i) {
      bool all = true;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t at = (h * Q + i) * N + n;
        mask[at] = int8_t((n * 7 + i * 3 + h) % 5 < 2 || (h == 0 && i == 2));
        all = all && mask[at];
        const int64_t window = (n / MW / WS) * (MW / WS) + (n % MW) / WS;
        if (mode == 1) allowed[at] = !mask[at];
        if (mode >= 2) {
          const int32_t* set = windows.data() + (mode == 3 ? i * 2 : 0);
          allowed[at] = set[0] == window || set[1] == window;
        }
      }
      reset[h * Q + i] = int8_t(all);
      if (mode == 1 && all)
        for (int64_t n = 0; n < N; ++n) allowed[(h * Q + i) * N + n] = 1;
    }
  const double scale = 0.5;
  const Reference want = dense(allowed, q, k, v, pos, dout, dpos_out, scale);

  stitchops::FocusGeometry g;
  g.batch = B, g.heads = H, g.queries = Q, g.keys = N, g.dim = D, g.pos_dim = P;
  g.mode = mode, g.scale = float(scale), g.slots = N;
  if (mode == 1) g.mask = mask.data(), g.reset = reset.data(), g.mask_heads = H;
  if (mode >= 2) g.windows = windows.data(), g.sets = 2, g.ws = WS, g.map_width = MW;
  if (mode >= 2) g.slots = 2 * WS * WS;
  const auto id = Dtype<E>::id;
  std::vector<E> out(H * Q * D), dq(H * Q * D), dk(H * N * D), dv(H * N * D), dpos(N * P);
  std::vector<float> lse(H * Q, NAN), pos_out(Q * P, NAN), scores(N, NAN), delta(H * Q, NAN);
  stitchops::FocusTensors t;
  t.q = q_t.data(), t.k = k_t.data(), t.v = v_t.data(), t.pos = pos_t.data();
  bool ok = stitchops::focus_forward(id, g, t, out.data(), lse.data(), nullptr) == 0;
  t.lse = lse.data();
  ok = ok && stitchops::focus_mean_pos(id, g, t, pos_out.data(), nullptr) == 0;
  ok = ok && stitchops::focus_key_means(id, g, t, scores.data(), nullptr, nullptr) == 0;
  t.out = out.data(), t.dout = dout_t.data(), t.dpos_out = dpos_t.data();
  ok = ok && stitchops::focus_delta(id, g, t, delta.data(), nullptr) == 0;
  t.delta = delta.data();
  ok = ok && stitchops::focus_dq(id, g, t, dq.data(), nullptr) == 0;
  ok = ok && stitchops::focus_dkdv(id, g, t, dk.data(), dv.data(), nullptr) == 0;
  ok = ok && stitchops::focus_key_means(id, g, t, nullptr, dpos.data(), nullptr) == 0;
  if (!ok) return false;
  const std::string where = std::string("mode ") + std::to_string(mode);
  using racecheck::widen;
  ok &= check<E>(where, "out", widen(out), want.out);
  ok &= check<E>(where, "pos_out", pos_out, want.pos_out);
  ok &= check<E>(where, "scores", scores, want.scores);
  ok &= check<E>(where, "dq", widen(dq), want.dq);
  ok &= check<E>(where, "dk", widen(dk), want.dk);
  ok &= check<E>(where, "dv", widen(dv), want.dv);
  ok &= check<E>(where, "dpos", widen(dpos), want.dpos);
  return ok;
}

bool run_focus_attention() {
  bool ok = true;
  for (int mode : {1, 2, 3}) {
    ok &= run<float>(mode);
    ok &= run<__half>(mode);
  }
  return ok;
}

const racecheck::Register registered("focus_attention", run_focus_attention);

}  // namespace
