// test_ops_moe.cpp: the MoE FFN CPU reference (ops/moe.h) against a float64 reference written
// differently (top-K by sorting (score, expert) pairs, dispatch by sorting (expert, token, slot)
// tuples, a per-token loop over the kept slots): routing and dispatch (ties, capacity drops), forward
// output and aux terms, finite-difference gradients of L = sum(out * G) + aux + z for every input
// (softmax/sigmoid router, with/without renormalisation, SwiGLU/GELU, with/without drops), shape errors.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "ops/moe.h"
#include "support/test_util.h"

namespace lmf {
namespace {

using test::all_close;
using test::randn;
using test::tensor_of;
using test::to_double;

// Saved-state buffers for N tokens, and the MoeState over them.
struct StateBuf {
  std::vector<float> logits, scores, topk_w, pre, act, y;
  std::vector<int32_t> topk_idx, slot_row, counts, offsets, perm;
  MoeState st;
  StateBuf(const MoeConfig& cfg, int64_t N) {
    const int64_t E = cfg.E, K = cfg.K, R = moe_rows(cfg, N), Fi = moe_f_in(cfg);
    logits.resize(N * E);
    scores.resize(N * E);
    topk_w.resize(N * K);
    topk_idx.resize(N * K);
    slot_row.resize(N * K);
    counts.resize(E);
    offsets.resize(E + 1);
    perm.resize(R);
    pre.resize(R * Fi);
    act.resize(R * cfg.F);
    y.resize(R * cfg.C);
    st.logits = tensor_of(logits, {N, E}, "moe_logits");
    st.scores = tensor_of(scores, {N, E}, "moe_scores");
    st.topk_idx = tensor_of(topk_idx, {N, K}, "moe_topk_idx");
    st.topk_w = tensor_of(topk_w, {N, K}, "moe_topk_w");
    st.slot_row = tensor_of(slot_row, {N, K}, "moe_slot_row");
    st.counts = tensor_of(counts, {E}, "moe_counts");
    st.offsets = tensor_of(offsets, {E + 1}, "moe_offsets");
    st.perm = tensor_of(perm, {R}, "moe_perm");
    st.pre = tensor_of(pre, {R, Fi}, "moe_pre");
    st.act = tensor_of(act, {R, cfg.F}, "moe_act");
    st.y = tensor_of(y, {R, cfg.C}, "moe_y");
  }
};

// ---- float64 reference -------------------------------------------------------------------------

struct Ref {
  std::vector<double> out;  // (N, C)
  double aux = 0, z = 0;
  std::vector<int32_t> topk_idx, slot_row, counts, perm;  // perm: kept rows only
  std::vector<double> topk_w, scores;
  int64_t dropped = 0;
  double min_gap = 1e30;  // smallest score gap between a chosen and an unchosen expert
};

// params = [x (N, C) | router_w (E, C) | w_in (E, Fi, C) | w_out (E, C, F)]
Ref moe_ref(const std::vector<double>& p, const MoeConfig& cfg, int64_t N) {
  const int64_t E = cfg.E, K = cfg.K, C = cfg.C, F = cfg.F, Fi = moe_f_in(cfg);
  const double* x = p.data();
  const double* rw = x + N * C;
  const double* win = rw + E * C;
  const double* wout = win + E * Fi * C;
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
    for (int64_t e = 0; e < E; ++e) order.push_back({-r.scores[n * E + e], static_cast<int>(e)});
    std::sort(order.begin(), order.end());
    if (K < E) r.min_gap = std::min(r.min_gap, order[K].first - order[K - 1].first);
    double S = 0;
    for (int64_t k = 0; k < K; ++k) S += -order[k].first;
    for (int64_t k = 0; k < K; ++k) {
      r.topk_idx.push_back(order[k].second);
      r.topk_w.push_back(cfg.renormalize ? -order[k].first / S : -order[k].first);
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
      std::vector<double> pre(Fi, 0.0), h(F);
      for (int64_t j = 0; j < Fi; ++j)
        for (int64_t c = 0; c < C; ++c) pre[j] += win[(e * Fi + j) * C + c] * x[n * C + c];
      for (int64_t j = 0; j < F; ++j) {
        if (cfg.activation == MoeActivation::swiglu) {
          const double g = pre[j], u = pre[F + j];
          h[j] = g / (1.0 + std::exp(-g)) * u;
        } else {
          const double v = pre[j];
          h[j] = 0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        double yc = 0;
        for (int64_t j = 0; j < F; ++j) yc += wout[(e * C + c) * F + j] * h[j];
        r.out[n * C + c] += r.topk_w[n * K + k] * yc;
      }
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
  std::vector<float> x, rw, win, wout;
  Inputs(const MoeConfig& cfg, int64_t N_, uint64_t seed) : N(N_) {
    x = randn(N * cfg.C, seed, 1.0f);
    rw = randn(cfg.E * cfg.C, seed + 1, 1.0f);
    win = randn(cfg.E * moe_f_in(cfg) * cfg.C, seed + 2, 0.5f);
    wout = randn(cfg.E * cfg.C * cfg.F, seed + 3, 0.5f);
  }
  std::vector<double> params() const {
    std::vector<double> p;
    for (const auto* v : {&x, &rw, &win, &wout})
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
    const auto grad = test::finite_diff(
        [&](const std::vector<double>& q) {
          const Ref rq = moe_ref(q, cfg, N);
          double L = rq.aux + rq.z;
          for (size_t i = 0; i < Gd.size(); ++i) L += rq.out[i] * Gd[i];
          return L;
        },
        p);
    // prefilled gradients: backward must add
    auto dx = randn(N * C, 302, 0.5f), drw = randn(E * C, 303, 0.5f), dwin = randn(E * Fi * C, 304, 0.5f),
         dwout = randn(E * C * F, 305, 0.5f);
    const auto dx0 = dx, drw0 = drw, dwin0 = dwin, dwout0 = dwout;
    moe_backward(tensor_of(dx, {N, C}, "dx"), tensor_of(drw, {E, C}, "drouter_w"), tensor_of(dwin, {E, Fi, C}, "dw_in"),
                 tensor_of(dwout, {E, C, F}, "dw_out"), tensor_of(G, {N, C}, "dout"), sb.st,
                 tensor_of(in.x, {N, C}, "x"), tensor_of(in.rw, {E, C}, "router_w"),
                 tensor_of(in.win, {E, Fi, C}, "w_in"), tensor_of(in.wout, {E, C, F}, "w_out"), cfg, 1.0f);
    size_t off = 0;
    auto expect_grad = [&](const char* name, const std::vector<float>& got, const std::vector<float>& prefill) {
      std::vector<double> want(got.size());
      for (size_t i = 0; i < got.size(); ++i) want[i] = prefill[i] + grad[off + i];
      off += got.size();
      EXPECT_TRUE(all_close(std::string(name) + " " + what, got, want, kBwdAtol, kBwdRtol));
    };
    expect_grad("dx", dx, dx0);
    expect_grad("drouter_w", drw, drw0);
    expect_grad("dw_in", dwin, dwin0);
    expect_grad("dw_out", dwout, dwout0);
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

}  // namespace
}  // namespace lmf
