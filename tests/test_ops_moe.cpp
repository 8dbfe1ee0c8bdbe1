// test_ops_moe.cpp: the MoE FFN CPU reference (ops/moe.h) against a float64 reference written
// differently (top-K by sorting (score, expert) pairs, dispatch by sorting (expert, token, slot)
// tuples, a per-token loop over the kept slots): routing and dispatch (ties, capacity drops), forward
// output and aux terms, finite-difference gradients of L = sum(out * G) + aux + z for every input
// (softmax/sigmoid router, with/without renormalisation, SwiGLU/GELU, with/without drops), shape errors.
// Also: shared experts (gated or not) and the selection-only bias against the same reference, the bias
// update rule, and bitwise identity with the plain routed layer when neither is used.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "ops/moe.h"
#include "support/moe_state.h"
#include "support/test_util.h"

namespace lmf {
namespace {

using test::all_close;
using test::randn;
using test::StateBuf;
using test::tensor_of;
using test::to_double;

// ---- float64 reference -------------------------------------------------------------------------

struct Ref {
  std::vector<double> out;  // (N, C)
  double aux = 0, z = 0;
  std::vector<int32_t> topk_idx, slot_row, counts, perm;  // perm: kept rows only
  std::vector<double> topk_w, scores;
  int64_t dropped = 0;
  double min_gap = 1e30;  // smallest score gap between a chosen and an unchosen expert
};

// One dense FFN on token xn (C): y (C) = w_out act(w_in xn); w_in (Fi, C), w_out (C, F).
std::vector<double> ffn_ref(const double* w_in, const double* w_out, const double* xn, const MoeConfig& cfg) {
  const int64_t C = cfg.C, F = cfg.F, Fi = moe_f_in(cfg);
  std::vector<double> pre(Fi, 0.0), h(F), y(C, 0.0);
  for (int64_t j = 0; j < Fi; ++j)
    for (int64_t c = 0; c < C; ++c) pre[j] += w_in[j * C + c] * xn[c];
  for (int64_t j = 0; j < F; ++j) {
    if (cfg.activation == MoeActivation::swiglu) {
      const double g = pre[j], u = pre[F + j];
      h[j] = g / (1.0 + std::exp(-g)) * u;
    } else {
      const double v = pre[j];
      h[j] = 0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
    }
  }
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < F; ++j) y[c] += w_out[c * F + j] * h[j];
  return y;
}

// params = [x (N, C) | router_w (E, C) | w_in (E, F_in, C) | w_out (E, C, F)], then when n_shared > 0
// [ws_in (S, F_in, C) | ws_out (S, C, F)] and with shared_gate [ws_gate (S, C)]. bias: (E) or empty,
// added (in double) to the scores for the top-K choice only.
Ref moe_ref(const std::vector<double>& p, const MoeConfig& cfg, int64_t N, const std::vector<float>& bias = {}) {
  const int64_t E = cfg.E, K = cfg.K, C = cfg.C, F = cfg.F, Fi = moe_f_in(cfg), S = cfg.n_shared;
  const double* x = p.data();
  const double* rw = x + N * C;
  const double* win = rw + E * C;
  const double* wout = win + E * Fi * C;
  const double* wsin = wout + E * C * F;
  const double* wsout = wsin + S * Fi * C;
  const double* wsgate = wsout + S * C * F;
  Ref r;
  r.out.assign(N * C, 0.0);
  r.scores.resize(N * E);
  r.counts.assign(E, 0);
  std::vector<double> lse(N);
  for (int64_t n = 0; n < N; ++n) {
    std::vector<double> l(E);
    for (int64_t e = 0; e < E; ++e) {
      l[e] = 0;
      for (int64_t c = 0; c < C; ++c) l[e] += x[n * C + c] * rw[e * C + c];
    }
    const double m = *std::max_element(l.begin(), l.end());
    double s = 0;
    for (double v : l) s += std::exp(v - m);
    lse[n] = m + std::log(s);
    for (int64_t e = 0; e < E; ++e)
      r.scores[n * E + e] =
          cfg.score == MoeScore::softmax ? std::exp(l[e] - lse[n]) : 1.0 / (1.0 + std::exp(-l[e]));
    // top-K: sort (-score, e)
    std::vector<std::pair<double, int>> order;
    for (int64_t e = 0; e < E; ++e)
      order.push_back({-(r.scores[n * E + e] + (bias.empty() ? 0.0 : double(bias[e]))), static_cast<int>(e)});
    std::sort(order.begin(), order.end());
    if (K < E) r.min_gap = std::min(r.min_gap, order[K].first - order[K - 1].first);
    double Ssum = 0;
    for (int64_t k = 0; k < K; ++k) Ssum += r.scores[n * E + order[k].second];
    for (int64_t k = 0; k < K; ++k) {
      const double sk = r.scores[n * E + order[k].second];
      r.topk_idx.push_back(order[k].second);
      r.topk_w.push_back(cfg.renormalize ? sk / Ssum : sk);
      ++r.counts[order[k].second];
    }
  }
  // dispatch: sort (expert, token, slot), keep the first Ce of each expert
  std::vector<std::tuple<int, int, int>> tup;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) tup.push_back({r.topk_idx[n * K + k], static_cast<int>(n), static_cast<int>(k)});
  std::sort(tup.begin(), tup.end());
  const int64_t cap = cfg.capacity_factor > 0 ? static_cast<int64_t>(std::ceil(cfg.capacity_factor * N * K / E)) : N * K;
  r.slot_row.assign(N * K, -1);
  int prev = -1, run = 0;
  for (auto [e, n, k] : tup) {
    run = e == prev ? run + 1 : 0;
    prev = e;
    if (run < cap) {
      r.slot_row[n * K + k] = static_cast<int32_t>(r.perm.size());
      r.perm.push_back(static_cast<int32_t>(n * K + k));
    } else {
      ++r.dropped;
    }
  }
  // per-token loop over kept slots
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      if (r.slot_row[n * K + k] < 0) continue;
      const int64_t e = r.topk_idx[n * K + k];
      const auto y = ffn_ref(win + e * Fi * C, wout + e * C * F, x + n * C, cfg);
      for (int64_t c = 0; c < C; ++c) r.out[n * C + c] += r.topk_w[n * K + k] * y[c];
    }
  // shared experts: every token, gated by sigmoid(x . ws_gate[s]) when shared_gate
  for (int64_t n = 0; n < N; ++n)
    for (int64_t s = 0; s < S; ++s) {
      const auto y = ffn_ref(wsin + s * Fi * C, wsout + s * C * F, x + n * C, cfg);
      double g = 1;
      if (cfg.shared_gate) {
        double z = 0;
        for (int64_t c = 0; c < C; ++c) z += x[n * C + c] * wsgate[s * C + c];
        g = 1.0 / (1.0 + std::exp(-z));
      }
      for (int64_t c = 0; c < C; ++c) r.out[n * C + c] += g * y[c];
    }
  double aux = 0, z = 0;
  for (int64_t e = 0; e < E; ++e) {
    double P = 0;
    for (int64_t n = 0; n < N; ++n) P += r.scores[n * E + e];
    aux += (double(r.counts[e]) / double(N * K)) * (P / double(N));
  }
  for (int64_t n = 0; n < N; ++n) z += lse[n] * lse[n];
  r.aux = cfg.aux_coef * double(E) * aux;
  r.z = cfg.z_coef * z / double(N);
  return r;
}

// Inputs of one case, concatenated as moe_ref's params.
struct Inputs {
  int64_t N;
  std::vector<float> x, rw, win, wout, wsin, wsout, wsgate;  // ws*: empty unless the config uses them
  Inputs(const MoeConfig& cfg, int64_t N_, uint64_t seed) : N(N_) {
    x = randn(N * cfg.C, seed, 1.0f);
    rw = randn(cfg.E * cfg.C, seed + 1, 1.0f);
    win = randn(cfg.E * moe_f_in(cfg) * cfg.C, seed + 2, 0.5f);
    wout = randn(cfg.E * cfg.C * cfg.F, seed + 3, 0.5f);
    if (cfg.n_shared > 0) {
      wsin = randn(cfg.n_shared * moe_f_in(cfg) * cfg.C, seed + 4, 0.5f);
      wsout = randn(cfg.n_shared * cfg.C * cfg.F, seed + 5, 0.5f);
      if (cfg.shared_gate) wsgate = randn(cfg.n_shared * cfg.C, seed + 6, 0.5f);
    }
  }
  MoeExtra extra(const MoeConfig& cfg) {
    MoeExtra ex;
    if (cfg.n_shared > 0) {
      ex.ws_in = tensor_of(wsin, {cfg.n_shared, moe_f_in(cfg), cfg.C}, "ws_in");
      ex.ws_out = tensor_of(wsout, {cfg.n_shared, cfg.C, cfg.F}, "ws_out");
      if (cfg.shared_gate) ex.ws_gate = tensor_of(wsgate, {cfg.n_shared, cfg.C}, "ws_gate");
    }
    return ex;
  }
  std::vector<double> params() const {
    std::vector<double> p;
    for (const auto* v : {&x, &rw, &win, &wout, &wsin, &wsout, &wsgate})
      for (float f : *v) p.push_back(f);
    return p;
  }
};

MoeConfig make_cfg(MoeScore score, bool renorm, MoeActivation act, float cap) {
  MoeConfig cfg;
  cfg.E = 4;
  cfg.K = 2;
  cfg.C = 8;
  cfg.F = 6;
  cfg.score = score;
  cfg.renormalize = renorm;
  cfg.activation = act;
  cfg.capacity_factor = cap;
  cfg.aux_coef = 0.1f;
  cfg.z_coef = 0.05f;
  return cfg;
}

MoeLosses run_forward(Inputs& in, StateBuf& sb, std::vector<float>& out, const MoeConfig& cfg) {
  out.assign(in.N * cfg.C, 0.0f);
  return moe_forward(tensor_of(out, {in.N, cfg.C}, "moe_out"), sb.st, tensor_of(in.x, {in.N, cfg.C}, "x"),
                     tensor_of(in.rw, {cfg.E, cfg.C}, "router_w"),
                     tensor_of(in.win, {cfg.E, moe_f_in(cfg), cfg.C}, "w_in"),
                     tensor_of(in.wout, {cfg.E, cfg.C, cfg.F}, "w_out"), cfg);
}

// The same through the MoeExtra overload (shared experts from in, optional selection bias).
MoeLosses run_forward_ex(Inputs& in, StateBuf& sb, std::vector<float>& out, const MoeConfig& cfg,
                         std::vector<float>* bias = nullptr) {
  out.assign(in.N * cfg.C, 0.0f);
  MoeExtra ex = in.extra(cfg);
  if (bias) ex.bias = tensor_of(*bias, {cfg.E}, "moe_bias");
  return moe_forward(tensor_of(out, {in.N, cfg.C}, "moe_out"), sb.st, tensor_of(in.x, {in.N, cfg.C}, "x"),
                     tensor_of(in.rw, {cfg.E, cfg.C}, "router_w"),
                     tensor_of(in.win, {cfg.E, moe_f_in(cfg), cfg.C}, "w_in"),
                     tensor_of(in.wout, {cfg.E, cfg.C, cfg.F}, "w_out"), ex, cfg);
}

std::string cfg_name(const MoeConfig& cfg) {
  return std::string(cfg.score == MoeScore::softmax ? "softmax" : "sigmoid") + (cfg.renormalize ? "+renorm" : "") +
         (cfg.activation == MoeActivation::swiglu ? " swiglu" : " gelu") +
         " cap=" + std::to_string(cfg.capacity_factor);
}

const std::vector<MoeConfig>& all_cfgs() {
  static const std::vector<MoeConfig> v{
      make_cfg(MoeScore::softmax, true, MoeActivation::swiglu, 0.75f),
      make_cfg(MoeScore::sigmoid, false, MoeActivation::gelu, 0.75f),
      make_cfg(MoeScore::softmax, true, MoeActivation::gelu, 0.0f),
      make_cfg(MoeScore::sigmoid, false, MoeActivation::swiglu, 0.0f),
      make_cfg(MoeScore::softmax, false, MoeActivation::swiglu, 1.0f),
      make_cfg(MoeScore::sigmoid, true, MoeActivation::gelu, 1.0f),
  };
  return v;
}

// ---- (1) routing and dispatch -------------------------------------------------------------------

TEST(OpsMoe, RoutingAndDispatchMatchSortedReference) {
  for (const MoeConfig& cfg : all_cfgs())
    for (int64_t N : {1, 7, 19}) {
      const std::string what = cfg_name(cfg) + " N=" + std::to_string(N);
      Inputs in(cfg, N, 100 + N);
      if (N > 1) std::fill(in.x.begin() + cfg.C, in.x.begin() + 2 * cfg.C, 0.0f);  // token 1: all scores tie
      StateBuf sb(cfg, N);
      std::vector<float> out;
      const MoeLosses l = run_forward(in, sb, out, cfg);
      const Ref r = moe_ref(in.params(), cfg, N);
      if (N > 1) {
        EXPECT_EQ(sb.topk_idx[2], 0) << what << ": a tie goes to the lower expert index";
        EXPECT_EQ(sb.topk_idx[3], 1) << what;
      }
      EXPECT_EQ(sb.topk_idx, r.topk_idx) << what;
      EXPECT_TRUE(all_close("topk_w " + what, sb.topk_w, r.topk_w, 1e-6, 1e-5));
      EXPECT_TRUE(all_close("scores " + what, sb.scores, r.scores, 1e-6, 1e-5));
      EXPECT_EQ(sb.counts, r.counts) << what;
      EXPECT_EQ(sb.slot_row, r.slot_row) << what;
      EXPECT_EQ(l.dropped, r.dropped) << what;
      ASSERT_EQ(sb.offsets[cfg.E], static_cast<int32_t>(r.perm.size())) << what;
      EXPECT_EQ(std::vector<int32_t>(sb.perm.begin(), sb.perm.begin() + sb.offsets[cfg.E]), r.perm) << what;
      for (int64_t e = 0; e < cfg.E; ++e)
        EXPECT_EQ(sb.offsets[e + 1] - sb.offsets[e], std::min<int64_t>(sb.counts[e], moe_capacity(cfg, N))) << what;
      if (cfg.capacity_factor == 0.75f && N == 7) EXPECT_GT(l.dropped, 0) << what << ": E Ce = 12 < N K = 14";
      if (cfg.capacity_factor == 0.0f) EXPECT_EQ(l.dropped, 0) << what;
    }
}

TEST(OpsMoe, CapacityAndRows) {
  MoeConfig cfg = make_cfg(MoeScore::softmax, true, MoeActivation::swiglu, 0.75f);
  EXPECT_EQ(moe_capacity(cfg, 7), 3);  // ceil(0.75 * 14 / 4) = ceil(2.625)
  EXPECT_EQ(moe_rows(cfg, 7), 12);
  cfg.capacity_factor = 0;
  EXPECT_EQ(moe_capacity(cfg, 7), 14);
  EXPECT_EQ(moe_rows(cfg, 7), 14);
  cfg.capacity_factor = 4;
  EXPECT_EQ(moe_rows(cfg, 7), 14);  // never more than N K
  EXPECT_EQ(moe_f_in(cfg), 12);
  cfg.activation = MoeActivation::gelu;
  EXPECT_EQ(moe_f_in(cfg), 6);
}

// ---- (2) forward -------------------------------------------------------------------------------

// fp32 GEMMs of length C = 8 and F <= 12 plus the combine: observed errors ~1e-7; tolerance ~10-100x.
constexpr double kFwdAtol = 2e-6, kFwdRtol = 1e-5;

TEST(OpsMoe, ForwardMatchesPerTokenLoop) {
  for (const MoeConfig& cfg : all_cfgs())
    for (int64_t N : {1, 7, 19}) {
      const std::string what = cfg_name(cfg) + " N=" + std::to_string(N);
      Inputs in(cfg, N, 200 + N);
      StateBuf sb(cfg, N);
      std::vector<float> out;
      const MoeLosses l = run_forward(in, sb, out, cfg);
      const Ref r = moe_ref(in.params(), cfg, N);
      ASSERT_GT(r.min_gap, 1e-5) << what << ": near-tie in the router, pick another seed";
      EXPECT_TRUE(all_close("out " + what, out, r.out, kFwdAtol, kFwdRtol));
      EXPECT_NEAR(l.aux, r.aux, 1e-6 + 1e-5 * std::abs(r.aux)) << what;
      EXPECT_NEAR(l.z, r.z, 1e-6 + 1e-5 * std::abs(r.z)) << what;
      // deterministic: a second call gives the same bits
      std::vector<float> out2;
      run_forward(in, sb, out2, cfg);
      EXPECT_EQ(out, out2) << what;
    }
}

// ---- (3) finite differences ----------------------------------------------------------------------

// L = sum(out * G) + aux + z as a function of all params (float64). The gradient check needs no
// top-K tie or capacity boundary within the FD step: asserted through min_gap (>> the step's effect
// on the scores, ~1e-6); the capacity cut depends only on the (fixed) top-K indices.
// Tolerance: the op's fp32 gradients (products of O(1) values, sums of <= 14 rows, added to an O(0.5)
// prefill) show a worst error of ~2.7e-6 absolute; the FD reference (step 1e-6, float64) ~1e-8.
// Setting d_aux = 0 (dropping the aux/z gradients) fails this test by ~0.1.
constexpr double kBwdAtol = 2e-5, kBwdRtol = 1e-4;

// The FD objective: L(q) = aux + z + sum(out * G) of the reference at parameters q.
double ref_loss(const std::vector<double>& q, const MoeConfig& cfg, int64_t N, const std::vector<double>& Gd,
                const std::vector<float>& bias = {}) {
  const Ref rq = moe_ref(q, cfg, N, bias);
  double L = rq.aux + rq.z;
  for (size_t i = 0; i < Gd.size(); ++i) L += rq.out[i] * Gd[i];
  return L;
}

// One gradient the backward added into a prefilled buffer.
struct PrefilledGrad {
  const char* name;
  const std::vector<float>& got;
  const std::vector<float>& prefill;
};
// Each gradient must equal its prefill plus its slice of the FD gradient `fd` (slices in the order
// given, which is Inputs::params()'s order); returns the number of values checked.
size_t expect_prefilled_grads(const std::string& what, const std::vector<double>& fd,
                              std::initializer_list<PrefilledGrad> grads) {
  size_t off = 0;
  for (const PrefilledGrad& g : grads) {
    std::vector<double> want(g.got.size());
    for (size_t i = 0; i < want.size(); ++i) want[i] = g.prefill[i] + fd[off + i];
    off += want.size();
    EXPECT_TRUE(all_close(std::string(g.name) + " " + what, g.got, want, kBwdAtol, kBwdRtol));
  }
  return off;
}

TEST(OpsMoe, BackwardFiniteDifferencesAccumulates) {
  const int64_t N = 7;
  for (const MoeConfig& cfg : all_cfgs()) {
    const std::string what = cfg_name(cfg);
    const int64_t E = cfg.E, C = cfg.C, F = cfg.F, Fi = moe_f_in(cfg);
    Inputs in(cfg, N, 300);
    StateBuf sb(cfg, N);
    std::vector<float> out;
    const MoeLosses l = run_forward(in, sb, out, cfg);
    const auto p = in.params();
    const Ref r = moe_ref(p, cfg, N);
    ASSERT_GT(r.min_gap, 1e-4) << what << ": router near-tie within the FD step";
    if (cfg.capacity_factor == 0.75f) ASSERT_GT(l.dropped, 0) << what;
    auto G = randn(N * C, 301);
    const auto Gd = to_double(G);
    const auto grad = test::finite_diff([&](const std::vector<double>& q) { return ref_loss(q, cfg, N, Gd); }, p);
    // prefilled gradients: backward must add
    auto dx = randn(N * C, 302, 0.5f), drw = randn(E * C, 303, 0.5f), dwin = randn(E * Fi * C, 304, 0.5f),
         dwout = randn(E * C * F, 305, 0.5f);
    const auto dx0 = dx, drw0 = drw, dwin0 = dwin, dwout0 = dwout;
    moe_backward(tensor_of(dx, {N, C}, "dx"), tensor_of(drw, {E, C}, "drouter_w"), tensor_of(dwin, {E, Fi, C}, "dw_in"),
                 tensor_of(dwout, {E, C, F}, "dw_out"), tensor_of(G, {N, C}, "dout"), sb.st,
                 tensor_of(in.x, {N, C}, "x"), tensor_of(in.rw, {E, C}, "router_w"),
                 tensor_of(in.win, {E, Fi, C}, "w_in"), tensor_of(in.wout, {E, C, F}, "w_out"), cfg, 1.0f);
    expect_prefilled_grads(what, grad,
                           {{"dx", dx, dx0}, {"drouter_w", drw, drw0}, {"dw_in", dwin, dwin0}, {"dw_out", dwout, dwout0}});
  }
}

// ---- (4) errors ----------------------------------------------------------------------------------

TEST(OpsMoe, RejectsBadShapesNamingTensor) {
  const MoeConfig cfg = make_cfg(MoeScore::softmax, true, MoeActivation::swiglu, 0.75f);
  const int64_t N = 7, E = cfg.E, C = cfg.C, F = cfg.F, Fi = moe_f_in(cfg);
  Inputs in(cfg, N, 400);
  StateBuf sb(cfg, N);
  std::vector<float> out(N * C);
  auto expect_error = [](auto call, const char* text) {
    try {
      call();
      ADD_FAILURE() << "no error, expected: " << text;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), ::testing::HasSubstr(text));
    }
  };
  auto fwd = [&](Tensor o, Tensor x, Tensor rw, Tensor wi, Tensor wo, const MoeState& st) {
    moe_forward(o, st, x, rw, wi, wo, cfg);
  };
  const Tensor to = tensor_of(out, {N, C}, "moe_out"), tx = tensor_of(in.x, {N, C}, "x"),
               trw = tensor_of(in.rw, {E, C}, "router_w"), twi = tensor_of(in.win, {E, Fi, C}, "w_in"),
               two = tensor_of(in.wout, {E, C, F}, "w_out");
  EXPECT_NO_THROW(fwd(to, tx, trw, twi, two, sb.st));
  // w_in with F rows instead of 2F (GELU layout under a SwiGLU config)
  expect_error([&] { fwd(to, tx, trw, tensor_of(in.win, {E, F, 2 * C}, "expert_w_in"), two, sb.st); },
               "'expert_w_in'");
  expect_error([&] { fwd(to, tx, trw, twi, tensor_of(in.wout, {E, F, C}, "expert_w_out"), sb.st); },
               "'expert_w_out'");
  expect_error([&] { fwd(to, tensor_of(in.x, {C, N}, "tokens"), trw, twi, two, sb.st); }, "'tokens'");
  expect_error([&] { fwd(to, tx, tensor_of(in.rw, {C, E}, "router"), twi, two, sb.st); }, "'router'");
  expect_error([&] { fwd(tensor_of(out, {C, N}, "layer_out"), tx, trw, twi, two, sb.st); }, "'layer_out'");
  {
    MoeState bad = sb.st;
    bad.perm = Tensor(sb.perm.data(), DType::i32, {static_cast<int64_t>(sb.perm.size()) - 1}, "saved_perm");
    expect_error([&] { fwd(to, tx, trw, twi, two, bad); }, "'saved_perm'");
    bad = sb.st;
    bad.topk_idx = tensor_of(sb.topk_w, {N, cfg.K}, "saved_topk_idx");  // f32 instead of i32
    expect_error([&] { fwd(to, tx, trw, twi, two, bad); }, "'saved_topk_idx'");
  }
  std::vector<float> dwin(E * Fi * C), dx(N * C), drw(E * C), dwout(E * C * F);
  expect_error(
      [&] {
        moe_backward(tensor_of(dx, {N, C}, "dx"), tensor_of(drw, {E, C}, "drouter_w"),
                     tensor_of(dwin, {E, C, Fi}, "grad_w_in"), tensor_of(dwout, {E, C, F}, "dw_out"),
                     tensor_of(out, {N, C}, "dout"), sb.st, tx, trw, twi, two, cfg);
      },
      "'grad_w_in'");
  MoeConfig bad_cfg = cfg;
  bad_cfg.K = 5;
  expect_error([&] { moe_forward(to, sb.st, tx, trw, twi, two, bad_cfg); }, "bad MoeConfig");
}

// ---- (5) shared experts, selection bias ------------------------------------------------------------

// Backward through the MoeExtra overload into prefilled gradients, checked against FD of moe_ref
// (routed grads and the shared-expert weights; bias: selection only).
void check_grads_ex(const MoeConfig& cfg, uint64_t seed, std::vector<float>* bias, const std::string& what) {
  const int64_t N = 7, E = cfg.E, C = cfg.C, F = cfg.F, Fi = moe_f_in(cfg), S = cfg.n_shared;
  Inputs in(cfg, N, seed);
  StateBuf sb(cfg, N);
  std::vector<float> out;
  run_forward_ex(in, sb, out, cfg, bias);
  const auto p = in.params();
  const std::vector<float> bv = bias ? *bias : std::vector<float>{};
  const Ref r = moe_ref(p, cfg, N, bv);
  ASSERT_GT(r.min_gap, 1e-4) << what << ": router near-tie within the FD step";
  EXPECT_EQ(sb.topk_idx, r.topk_idx) << what;
  EXPECT_TRUE(all_close("out " + what, out, r.out, kFwdAtol, kFwdRtol));
  auto G = randn(N * C, seed + 11);
  const auto Gd = to_double(G);
  auto loss = [&](const std::vector<double>& q, const std::vector<float>& b) { return ref_loss(q, cfg, N, Gd, b); };
  const auto grad = test::finite_diff([&](const std::vector<double>& q) { return loss(q, bv); }, p);
  auto dx = randn(N * C, seed + 12, 0.5f), drw = randn(E * C, seed + 13, 0.5f),
       dwin = randn(E * Fi * C, seed + 14, 0.5f), dwout = randn(E * C * F, seed + 15, 0.5f),
       dwsin = randn(S * Fi * C, seed + 16, 0.5f), dwsout = randn(S * C * F, seed + 17, 0.5f),
       dwsgate = randn(cfg.shared_gate ? S * C : 0, seed + 18, 0.5f);
  const auto dx0 = dx, drw0 = drw, dwin0 = dwin, dwout0 = dwout, dwsin0 = dwsin, dwsout0 = dwsout,
             dwsgate0 = dwsgate;
  MoeExtraGrads dex;
  if (S > 0) {
    dex.dws_in = tensor_of(dwsin, {S, Fi, C}, "dws_in");
    dex.dws_out = tensor_of(dwsout, {S, C, F}, "dws_out");
    if (cfg.shared_gate) dex.dws_gate = tensor_of(dwsgate, {S, C}, "dws_gate");
  }
  MoeExtra ex = in.extra(cfg);
  if (bias) ex.bias = tensor_of(*bias, {E}, "moe_bias");
  moe_backward(tensor_of(dx, {N, C}, "dx"), tensor_of(drw, {E, C}, "drouter_w"), tensor_of(dwin, {E, Fi, C}, "dw_in"),
               tensor_of(dwout, {E, C, F}, "dw_out"), dex, tensor_of(G, {N, C}, "dout"), sb.st,
               tensor_of(in.x, {N, C}, "x"), tensor_of(in.rw, {E, C}, "router_w"),
               tensor_of(in.win, {E, Fi, C}, "w_in"), tensor_of(in.wout, {E, C, F}, "w_out"), ex, cfg, 1.0f);
  const size_t checked = expect_prefilled_grads(what, grad,
                                                {{"dx", dx, dx0},
                                                 {"drouter_w", drw, drw0},
                                                 {"dw_in", dwin, dwin0},
                                                 {"dw_out", dwout, dwout0},
                                                 {"dws_in", dwsin, dwsin0},
                                                 {"dws_out", dwsout, dwsout0},
                                                 {"dws_gate", dwsgate, dwsgate0}});
  EXPECT_EQ(checked, p.size()) << what;
  if (bias) {  // the loss is piecewise constant in the bias: zero gradient away from a tie
    std::vector<double> b0(bv.begin(), bv.end());
    const auto gb = test::finite_diff(
        [&](const std::vector<double>& b) { return loss(p, std::vector<float>(b.begin(), b.end())); }, b0, 1e-4);
    for (size_t e = 0; e < gb.size(); ++e) EXPECT_EQ(gb[e], 0.0) << what << " dL/dbias[" << e << "]";
  }
}

TEST(OpsMoe, SharedExpertsFiniteDifferences) {
  for (const MoeConfig& base : {make_cfg(MoeScore::softmax, true, MoeActivation::swiglu, 0.75f),
                                make_cfg(MoeScore::sigmoid, false, MoeActivation::gelu, 0.0f)})
    for (int64_t S : {1, 2})
      for (bool gate : {false, true}) {
        MoeConfig cfg = base;
        cfg.n_shared = S;
        cfg.shared_gate = gate;
        check_grads_ex(cfg, 500, nullptr,
                       cfg_name(cfg) + " n_shared=" + std::to_string(S) + (gate ? " gated" : ""));
      }
}

TEST(OpsMoe, SharedExpertsSaveState) {
  MoeConfig cfg = make_cfg(MoeScore::softmax, true, MoeActivation::swiglu, 0.0f);
  cfg.n_shared = 2;
  cfg.shared_gate = true;
  const int64_t N = 5;
  Inputs in(cfg, N, 550);
  StateBuf sb(cfg, N);
  std::vector<float> out;
  run_forward_ex(in, sb, out, cfg);
  // out = routed + sum_s g_s y_s, from the saved state
  MoeConfig routed = cfg;
  routed.n_shared = 0;
  routed.shared_gate = false;
  StateBuf sr(routed, N);
  std::vector<float> out_r;
  run_forward(in, sr, out_r, routed);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < cfg.C; ++c) {
      float want = out_r[n * cfg.C + c];
      for (int64_t s = 0; s < 2; ++s) want += sb.s_g[s * N + n] * sb.s_y[(s * N + n) * cfg.C + c];
      EXPECT_EQ(out[n * cfg.C + c], want);
    }
  for (float g : sb.s_g) EXPECT_TRUE(g > 0 && g < 1);
}

TEST(OpsMoe, SelectionBiasFlipsChoiceNotWeights) {
  const int64_t N = 7;
  for (MoeConfig cfg : {make_cfg(MoeScore::softmax, true, MoeActivation::swiglu, 0.0f),
                        make_cfg(MoeScore::sigmoid, false, MoeActivation::gelu, 0.75f)}) {
    const std::string what = cfg_name(cfg);
    const int64_t E = cfg.E, K = cfg.K;
    Inputs in(cfg, N, 600);
    StateBuf s0(cfg, N), s1(cfg, N);
    std::vector<float> out0, out1;
    run_forward(in, s0, out0, cfg);
    // token 0: the best unchosen expert u gets a bias larger than any score gap, so it is chosen first
    int64_t u = -1;
    for (int64_t e = 0; e < E; ++e) {
      bool chosen = false;
      for (int64_t k = 0; k < K; ++k) chosen = chosen || s0.topk_idx[k] == e;
      if (!chosen && (u < 0 || s0.scores[e] > s0.scores[u])) u = e;
    }
    ASSERT_GE(u, 0);
    std::vector<float> bias(E, 0.0f);
    bias[u] = 1.5f;
    run_forward_ex(in, s1, out1, cfg, &bias);
    EXPECT_EQ(s1.topk_idx[0], u) << what << ": the bias flips token 0's choice";
    EXPECT_NE(s1.topk_idx, s0.topk_idx) << what;
    EXPECT_EQ(s1.scores, s0.scores) << what << ": scores are unbiased";
    EXPECT_EQ(s1.logits, s0.logits) << what;
    // combine weights from the unbiased scores of the chosen experts
    for (int64_t n = 0; n < N; ++n) {
      double S = 0;
      for (int64_t k = 0; k < K; ++k) S += s1.scores[n * E + s1.topk_idx[n * K + k]];
      for (int64_t k = 0; k < K; ++k) {
        const float sc = s1.scores[n * E + s1.topk_idx[n * K + k]];
        if (cfg.renormalize) EXPECT_EQ(s1.topk_w[n * K + k], static_cast<float>(sc / S)) << what;
        else EXPECT_EQ(s1.topk_w[n * K + k], sc) << what;
      }
    }
    const Ref r = moe_ref(in.params(), cfg, N, bias);
    EXPECT_EQ(s1.topk_idx, r.topk_idx) << what;
    EXPECT_EQ(s1.counts, r.counts) << what;
    EXPECT_EQ(s1.slot_row, r.slot_row) << what;
    EXPECT_TRUE(all_close("biased topk_w " + what, s1.topk_w, r.topk_w, 1e-6, 1e-5));
    EXPECT_TRUE(all_close("biased out " + what, out1, r.out, kFwdAtol, kFwdRtol));
    // gradients unchanged in form (through the unbiased scores), none into the bias
    check_grads_ex(cfg, 600, &bias, "biased " + what);
  }
  // with shared experts too
  MoeConfig cfg = make_cfg(MoeScore::softmax, false, MoeActivation::swiglu, 0.0f);
  cfg.n_shared = 1;
  cfg.shared_gate = true;
  std::vector<float> bias{0.3f, -0.2f, 0.1f, 0.0f};
  check_grads_ex(cfg, 610, &bias, "biased+shared");
}

TEST(OpsMoe, UpdateBiasMovesBySignOfLoadError) {
  std::vector<float> bias{0.5f, 0.5f, 0.5f, 0.5f};
  std::vector<int32_t> counts{5, 1, 3, 3};  // mean 3
  moe_update_bias(tensor_of(bias, {4}, "bias"), tensor_of(counts, {4}, "counts"), 0.25f);
  EXPECT_EQ(bias, (std::vector<float>{0.25f, 0.75f, 0.5f, 0.5f}));
  std::vector<int32_t> counts2{2, 1, 0, 0};  // mean 0.75
  moe_update_bias(tensor_of(bias, {4}, "bias"), tensor_of(counts2, {4}, "counts"), 0.25f);
  EXPECT_EQ(bias, (std::vector<float>{0.0f, 0.5f, 0.75f, 0.75f}));
  // from a forward: overloaded experts go down, underloaded up
  const MoeConfig cfg = make_cfg(MoeScore::softmax, true, MoeActivation::swiglu, 0.0f);
  Inputs in(cfg, 19, 650);
  StateBuf sb(cfg, 19);
  std::vector<float> out, b(cfg.E, 0.0f);
  run_forward(in, sb, out, cfg);
  moe_update_bias(tensor_of(b, {cfg.E}, "bias"), sb.st.counts, 1e-3f);
  const double mean = 19.0 * cfg.K / cfg.E;
  for (int64_t e = 0; e < cfg.E; ++e)
    EXPECT_EQ(b[e], sb.counts[e] < mean ? 1e-3f : sb.counts[e] > mean ? -1e-3f : 0.0f) << e;
  std::vector<int32_t> c3(3);
  try {
    moe_update_bias(tensor_of(b, {cfg.E}, "bias"), tensor_of(c3, {3}, "load_counts"), 1e-3f);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("'load_counts'"));
  }
}

TEST(OpsMoe, NoSharedNoBiasIsBitwiseTheRoutedLayer) {
  const int64_t N = 7;
  for (const MoeConfig& cfg : all_cfgs()) {
    const std::string what = cfg_name(cfg);
    const int64_t E = cfg.E, C = cfg.C, F = cfg.F, Fi = moe_f_in(cfg);
    Inputs in(cfg, N, 700);
    StateBuf s0(cfg, N), s1(cfg, N), s2(cfg, N);
    std::vector<float> out0, out1, out2, zero_bias(E, 0.0f);
    const MoeLosses l0 = run_forward(in, s0, out0, cfg);  // the old call pattern
    const MoeLosses l1 = run_forward_ex(in, s1, out1, cfg);
    const MoeLosses l2 = run_forward_ex(in, s2, out2, cfg, &zero_bias);
    for (const auto* o : {&out1, &out2}) EXPECT_EQ(*o, out0) << what;
    for (const StateBuf* sb : {&s1, &s2}) {
      EXPECT_EQ(sb->topk_idx, s0.topk_idx) << what;
      EXPECT_EQ(sb->topk_w, s0.topk_w) << what;
      EXPECT_EQ(sb->y, s0.y) << what;
    }
    EXPECT_EQ(l1.aux, l0.aux);
    EXPECT_EQ(l1.z, l0.z);
    EXPECT_EQ(l2.aux, l0.aux);
    EXPECT_EQ(l1.dropped, l0.dropped);
    auto G = randn(N * C, 701);
    std::vector<float> g0[4], g1[4];
    for (auto* g : {g0, g1}) {
      g[0] = randn(N * C, 702, 0.5f);
      g[1] = randn(E * C, 703, 0.5f);
      g[2] = randn(E * Fi * C, 704, 0.5f);
      g[3] = randn(E * C * F, 705, 0.5f);
    }
    const Tensor tx = tensor_of(in.x, {N, C}, "x"), trw = tensor_of(in.rw, {E, C}, "router_w"),
                 twi = tensor_of(in.win, {E, Fi, C}, "w_in"), two = tensor_of(in.wout, {E, C, F}, "w_out");
    moe_backward(tensor_of(g0[0], {N, C}, "dx"), tensor_of(g0[1], {E, C}, "drouter_w"),
                 tensor_of(g0[2], {E, Fi, C}, "dw_in"), tensor_of(g0[3], {E, C, F}, "dw_out"),
                 tensor_of(G, {N, C}, "dout"), s0.st, tx, trw, twi, two, cfg);
    MoeExtra ex;
    ex.bias = tensor_of(zero_bias, {E}, "bias");
    moe_backward(tensor_of(g1[0], {N, C}, "dx"), tensor_of(g1[1], {E, C}, "drouter_w"),
                 tensor_of(g1[2], {E, Fi, C}, "dw_in"), tensor_of(g1[3], {E, C, F}, "dw_out"), MoeExtraGrads{},
                 tensor_of(G, {N, C}, "dout"), s2.st, tx, trw, twi, two, ex, cfg);
    for (int i = 0; i < 4; ++i) EXPECT_EQ(g1[i], g0[i]) << what << " grad " << i;
  }
}

TEST(OpsMoe, RejectsBadSharedAndBiasShapesNamingTensor) {
  MoeConfig cfg = make_cfg(MoeScore::softmax, true, MoeActivation::swiglu, 0.0f);
  cfg.n_shared = 2;
  cfg.shared_gate = true;
  const int64_t N = 5, E = cfg.E, C = cfg.C, F = cfg.F, Fi = moe_f_in(cfg), S = 2;
  Inputs in(cfg, N, 800);
  StateBuf sb(cfg, N);
  std::vector<float> out(N * C), bias(E + 1);
  auto expect_error = [](auto call, const char* text) {
    try {
      call();
      ADD_FAILURE() << "no error, expected: " << text;
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), ::testing::HasSubstr(text));
    }
  };
  const Tensor to = tensor_of(out, {N, C}, "moe_out"), tx = tensor_of(in.x, {N, C}, "x"),
               trw = tensor_of(in.rw, {E, C}, "router_w"), twi = tensor_of(in.win, {E, Fi, C}, "w_in"),
               two = tensor_of(in.wout, {E, C, F}, "w_out");
  auto fwd = [&](const MoeExtra& ex, const MoeState& st, const MoeConfig& c) {
    moe_forward(to, st, tx, trw, twi, two, ex, c);
  };
  const MoeExtra good = in.extra(cfg);
  EXPECT_NO_THROW(fwd(good, sb.st, cfg));
  MoeExtra ex = good;
  ex.ws_in = tensor_of(in.wsin, {S, C, Fi}, "shared_w_in");
  expect_error([&] { fwd(ex, sb.st, cfg); }, "'shared_w_in'");
  ex = good;
  ex.ws_out = tensor_of(in.wsout, {S, F, C}, "shared_w_out");
  expect_error([&] { fwd(ex, sb.st, cfg); }, "'shared_w_out'");
  ex = good;
  ex.ws_gate = tensor_of(in.wsgate, {C, S}, "shared_gate_w");
  expect_error([&] { fwd(ex, sb.st, cfg); }, "'shared_gate_w'");
  ex = good;
  ex.ws_gate = Tensor();
  expect_error([&] { fwd(ex, sb.st, cfg); }, "ws_gate");
  ex = good;
  ex.ws_in = Tensor();
  expect_error([&] { fwd(ex, sb.st, cfg); }, "ws_in");
  ex = good;
  ex.bias = tensor_of(bias, {E + 1}, "router_bias");
  expect_error([&] { fwd(ex, sb.st, cfg); }, "'router_bias'");
  {
    MoeState bad = sb.st;
    bad.shared_pre = tensor_of(sb.s_pre, {N, S, Fi}, "saved_shared_pre");
    expect_error([&] { fwd(good, bad, cfg); }, "'saved_shared_pre'");
    bad = sb.st;
    bad.shared_g = Tensor();
    expect_error([&] { fwd(good, bad, cfg); }, "shared_g");
  }
  MoeConfig neg = cfg;
  neg.n_shared = -1;
  expect_error([&] { fwd(good, sb.st, neg); }, "n_shared");
  std::vector<float> dx(N * C), drw(E * C), dwin(E * Fi * C), dwout(E * C * F), dwsin(S * Fi * C),
      dwsout(S * C * F), dwsg(S * C);
  MoeExtraGrads dex;
  dex.dws_in = tensor_of(dwsin, {S, Fi, C}, "dws_in");
  dex.dws_out = tensor_of(dwsout, {S, C, F}, "dws_out");
  auto bwd = [&] {
    moe_backward(tensor_of(dx, {N, C}, "dx"), tensor_of(drw, {E, C}, "drouter_w"), tensor_of(dwin, {E, Fi, C}, "dw_in"),
                 tensor_of(dwout, {E, C, F}, "dw_out"), dex, tensor_of(out, {N, C}, "dout"), sb.st, tx, trw, twi, two,
                 good, cfg);
  };
  dex.dws_gate = tensor_of(dwsg, {C, S}, "grad_shared_gate");
  expect_error(bwd, "'grad_shared_gate'");
  dex.dws_gate = tensor_of(dwsg, {S, C}, "dws_gate");
  dex.dws_out = Tensor();
  expect_error(bwd, "dws_out");
}

}  // namespace
}  // namespace lmf
