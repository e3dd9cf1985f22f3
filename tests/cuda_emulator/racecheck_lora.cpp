// Race check of the LoRA kernels of csrc/lora.cu and csrc/lora_tc.cu: forward, backward over
// token ranges and the split-K dW pass, against float64 loops (their per-range partials are
// summed here, not by sum_ranges.cu). fp32 runs the SIMT kernels of lora.cu; fp16 and bf16 the
// tensor-core kernels of lora_tc.cu. Registered with racecheck.cpp's driver.
#include <random>

#include "lora.h"
#include "racecheck.h"

namespace {

using racecheck::check;
using racecheck::Dtype;
using racecheck::narrow;
using racecheck::widen;

struct Problem {
  int64_t tokens, in_f, out_f, rank;
  int column_tiles;  // per forward block (lora.h)
};

template <typename E>
bool run(const Problem& p) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  auto rnd = [&](int64_t n) {
    std::vector<float> v(n);
    for (auto& e : v) e = normal(rng);
    return v;
  };
  const int64_t T = p.tokens, I = p.in_f, O = p.out_f, R = p.rank;
  auto x = rnd(T * I), w = rnd(O * I), a = rnd(R * I), b = rnd(O * R), bias = rnd(O),
       dy = rnd(T * O);
  const float scale = 0.5f;
  // The kernels' inputs in T; the float copies are rounded alike for the reference.
  const auto x_t = narrow<E>(x), w_t = narrow<E>(w), a_t = narrow<E>(a), b_t = narrow<E>(b),
             bias_t = narrow<E>(bias), dy_t = narrow<E>(dy);

  // float64 reference: y, S, dx, dA, dB, dbias.
  std::vector<double> s_ref(T * R), y_ref(T * O), ds(T * R), dx_ref(T * I), da_ref(R * I, 0.0),
      db_ref(O * R, 0.0), dbias_ref(O, 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t r = 0; r < R; ++r) {
      double acc = 0;
      for (int64_t i = 0; i < I; ++i) acc += double(x[t * I + i]) * a[r * I + i];
      s_ref[t * R + r] = acc;
    }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t o = 0; o < O; ++o) {
      double acc = bias[o];
      for (int64_t i = 0; i < I; ++i) acc += double(x[t * I + i]) * w[o * I + i];
      for (int64_t r = 0; r < R; ++r) acc += scale * s_ref[t * R + r] * b[o * R + r];
      y_ref[t * O + o] = acc;
      dbias_ref[o] += dy[t * O + o];
    }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t r = 0; r < R; ++r) {
      double acc = 0;
      for (int64_t o = 0; o < O; ++o) acc += double(dy[t * O + o]) * b[o * R + r];
      ds[t * R + r] = acc;
    }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < I; ++i) {
      double acc = 0;
      for (int64_t o = 0; o < O; ++o) acc += double(dy[t * O + o]) * w[o * I + i];
      for (int64_t r = 0; r < R; ++r) acc += scale * ds[t * R + r] * a[r * I + i];
      dx_ref[t * I + i] = acc;
      for (int64_t r = 0; r < R; ++r) da_ref[r * I + i] += ds[t * R + r] * x[t * I + i];
    }
  for (int64_t o = 0; o < O; ++o)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t t = 0; t < T; ++t) db_ref[o * R + r] += double(dy[t * O + o]) * s_ref[t * R + r];

  // Forward, laid out as csrc/binding/bind_lora.h does: Wt = Wᵀ, L1 = Aᵀ, L2 = Bᵀ as strided views.
  std::vector<E> y(T * O, Dtype<E>::from(NAN));
  std::vector<float> s(T * R, NAN);
  stitchops::LowRankMatmulArgs f;
  f.x = x_t.data(), f.stride_xm = I, f.stride_xk = 1;
  f.w = w_t.data(), f.stride_wk = 1, f.stride_wn = I;
  f.l1 = a_t.data(), f.stride_l1k = 1, f.stride_l1r = I;
  f.l2 = b_t.data(), f.stride_l2r = 1, f.stride_l2n = R;
  f.bias = bias_t.data();
  f.out = y.data(), f.stride_om = O, f.stride_on = 1;
  f.s_out = s.data(), f.stride_sm = R;
  f.M = T, f.N = O, f.K = I, f.R = R, f.scale = scale, f.k_per_split = I;
  f.column_tiles = p.column_tiles;
  if (stitchops::lowrank_matmul(Dtype<E>::id, f, nullptr) != 0) return false;

  // Backward over two token ranges.
  const int64_t rows_per_range = stitchops::kBlockM,
                ranges = (T + rows_per_range - 1) / rows_per_range;
  std::vector<E> dx(T * I, Dtype<E>::from(NAN));
  std::vector<float> da_part(ranges * R * I, NAN), db_part(ranges * O * R, NAN),
      dbias_part(ranges * O, NAN);
  stitchops::LoraBackwardArgs g;
  g.dy = dy_t.data(), g.stride_dym = O, g.stride_dyo = 1;
  g.w = w_t.data(), g.stride_wo = I, g.stride_wi = 1;
  g.a = a_t.data(), g.stride_ar = I, g.stride_ai = 1;
  g.b = b_t.data(), g.stride_bo = R, g.stride_br = 1;
  g.s = s.data(), g.stride_sm = R;
  g.x = x_t.data(), g.stride_xm = I, g.stride_xi = 1;
  g.dx = dx.data(), g.stride_dxm = I, g.stride_dxi = 1;
  g.da_part = da_part.data(), g.db_part = db_part.data(), g.dbias_part = dbias_part.data();
  g.M = T, g.IN = I, g.OUT = O, g.R = R, g.scale = scale;
  g.rows_per_range = rows_per_range, g.ranges = int(ranges);
  if (stitchops::lora_backward(Dtype<E>::id, g, nullptr) != 0) return false;

  // dW = dyᵀ·x (SN-Net v1 trains W), split over tokens as csrc/binding/bind_lora.h does it.
  std::vector<double> dw_ref(O * I, 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t o = 0; o < O; ++o)
      for (int64_t i = 0; i < I; ++i) dw_ref[o * I + i] += double(dy[t * O + o]) * x[t * I + i];
  const int64_t splits = (T + stitchops::kBlockM - 1) / stitchops::kBlockM;
  std::vector<float> dw_part(splits * O * I, NAN);
  stitchops::LowRankMatmulArgs d;
  d.x = dy_t.data(), d.stride_xm = 1, d.stride_xk = O;
  d.w = x_t.data(), d.stride_wk = I, d.stride_wn = 1;
  d.out = dw_part.data(), d.out_fp32 = true, d.stride_oz = O * I, d.stride_om = I, d.stride_on = 1;
  d.M = O, d.N = I, d.K = T, d.k_per_split = stitchops::kBlockM, d.splits = int(splits);
  if (stitchops::lowrank_matmul(Dtype<E>::id, d, nullptr) != 0) return false;

  // Σ_z part[z] · mult over the per-range (or per-split) partials of n elements each.
  auto reduce = [&](const std::vector<float>& part, int64_t n, float mult) {
    std::vector<float> out(n, 0.f);
    for (int64_t z = 0; z < int64_t(part.size()) / n; ++z)
      for (int64_t k = 0; k < n; ++k) out[k] += part[z * n + k] * mult;
    return out;
  };
  const std::string where = "T=" + std::to_string(T) + " IN=" + std::to_string(I) +
                            " OUT=" + std::to_string(O) + " R=" + std::to_string(R);
  bool ok = check<E>(where, "y", widen(y), y_ref);
  ok &= check<E>(where, "S", s, s_ref);
  ok &= check<E>(where, "dx", widen(dx), dx_ref);
  ok &= check<E>(where, "dA", reduce(da_part, R * I, scale), [&] {
    for (auto& v : da_ref) v *= scale;
    return da_ref;
  }());
  ok &= check<E>(where, "dB", reduce(db_part, O * R, scale), [&] {
    for (auto& v : db_ref) v *= scale;
    return db_ref;
  }());
  ok &= check<E>(where, "dbias", reduce(dbias_part, O, 1.f), dbias_ref);
  ok &= check<E>(where, "dW", reduce(dw_part, O * I, 1.f), dw_ref);
  return ok;
}

bool run_lora() {
  bool ok = true;
  // Odd sizes and rank 3; 16-byte-aligned rows (cp.async), several K steps, rank 70 (one
  // loop buffer in the backward), rank 24 (double-buffered everywhere, three token ranges);
  // three IN tiles, which share the backward's reductions over tokens (dB, bias) by K step.
  // Forward column groups: 3 tiles (the last partial) sharing S, 2 tiles at rank 70 (fp32
  // only: the tensor-core kernel stays ungrouped above rank 64), 2 tiles at rank 5.
  for (const Problem& p : {Problem{77, 50, 130, 3, 3}, Problem{70, 40, 72, 70, 2},
                           Problem{130, 48, 80, 24, 1}, Problem{96, 150, 100, 5, 2}}) {
    ok &= run<float>(p);
    ok &= run<__half>(p);
    ok &= run<__nv_bfloat16>(p);
  }
  return ok;
}

const racecheck::Register registered("lora_linear", run_lora);

}  // namespace
