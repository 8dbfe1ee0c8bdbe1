// moe.cpp: CPU reference of the Mixture-of-Experts FFN layer (moe.h): a plain loop over experts.
//
// Every loop runs single-threaded in a fixed order (tokens, then slots, then experts), and each
// expert's GEMMs run on its gathered rows through blas_sgemm (deterministic for a fixed shape), so
// results are bitwise reproducible. Router math (softmax, logsumexp, aux/z terms) is done in double
// and rounded once. Backward accumulates (+=) into every gradient.
#include "ops/moe.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <vector>

#include "ops/activation.h"
#include "ops/blas.h"
#include "ops/dispatch.h"

namespace lmf {
namespace {

constexpr const char* kOpForward = "moe_forward";
constexpr const char* kOpBackward = "moe_backward";

// logsumexp of row (E) in double
double row_logsumexp(const float* row, int64_t E) {
  double m = row[0];
  for (int64_t e = 1; e < E; ++e) m = std::max(m, static_cast<double>(row[e]));
  double s = 0;
  for (int64_t e = 0; e < E; ++e) s += std::exp(row[e] - m);
  return m + std::log(s);
}

// logits, scores: (N, E)
void router_scores(float* scores, const float* logits, int64_t N, int64_t E, MoeScore score) {
  for (int64_t n = 0; n < N; ++n) {
    const float* l = logits + n * E;
    float* s = scores + n * E;
    if (score == MoeScore::softmax) {
      const double lse = row_logsumexp(l, E);
      for (int64_t e = 0; e < E; ++e) s[e] = static_cast<float>(std::exp(l[e] - lse));
    } else {
      for (int64_t e = 0; e < E; ++e) s[e] = static_cast<float>(1.0 / (1.0 + std::exp(-static_cast<double>(l[e]))));
    }
  }
}

// scores: (N, E); topk_idx, topk_w: (N, K); bias: (E) or null. Selection by repeated argmax of
// scores + bias (fp32): strict > over increasing expert index keeps the lower index on a tie. The
// weights use the unbiased scores.
void router_topk(int32_t* topk_idx, float* topk_w, const float* scores, const float* bias, int64_t N, int64_t E,
                 int64_t K, bool renormalize) {
  char taken[kMoeMaxExperts];
  float key[kMoeMaxExperts];
  for (int64_t n = 0; n < N; ++n) {
    const float* s = scores + n * E;
    const float* ks = s;
    if (bias) {
      for (int64_t e = 0; e < E; ++e) key[e] = s[e] + bias[e];
      ks = key;
    }
    std::fill(taken, taken + E, 0);
    double sum = 0;
    for (int64_t k = 0; k < K; ++k) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e)
        if (!taken[e] && (best < 0 || ks[e] > ks[best])) best = e;
      taken[best] = 1;
      topk_idx[n * K + k] = static_cast<int32_t>(best);
      topk_w[n * K + k] = s[best];
      sum += s[best];
    }
    if (renormalize)
      for (int64_t k = 0; k < K; ++k) topk_w[n * K + k] = static_cast<float>(topk_w[n * K + k] / sum);
  }
}

// Stable counting sort of the N K assignments by expert, then the capacity cut.
// topk_idx, slot_row: (N, K); counts: (E); offsets: (E + 1); perm: (R). Returns the dropped count.
int64_t dispatch(int32_t* slot_row, int32_t* counts, int32_t* offsets, int32_t* perm, const int32_t* topk_idx,
                 int64_t N, int64_t E, int64_t K, int64_t cap) {
  std::fill(counts, counts + E, 0);
  for (int64_t a = 0; a < N * K; ++a) ++counts[topk_idx[a]];
  offsets[0] = 0;
  for (int64_t e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + static_cast<int32_t>(std::min<int64_t>(counts[e], cap));
  int64_t seen[kMoeMaxExperts] = {};  // assignments of expert e met so far
  int64_t dropped = 0;
  for (int64_t a = 0; a < N * K; ++a) {  // a = n K + k: increasing (token, slot) order
    const int64_t e = topk_idx[a];
    const int64_t pos = seen[e]++;
    if (pos < cap) {
      slot_row[a] = static_cast<int32_t>(offsets[e] + pos);
      perm[offsets[e] + pos] = static_cast<int32_t>(a);
    } else {
      slot_row[a] = -1;
      ++dropped;
    }
  }
  return dropped;
}

struct Dims {
  int64_t N, E, K, C, F, F_in, R, cap, S;
};

DType row_dtype(const Tensor& x) { return x.device == Device::cpu ? DType::f32 : DType::bf16; }

template <class T>
T* opt_ptr(const Tensor& t) { return t.defined() ? static_cast<T*>(t.data) : nullptr; }

// The device pointers of one call (cuda::MoePtrs); absent tensors are null.
cuda::MoePtrs device_ptrs(const MoeState& st, const MoeScratch& sc, const Tensor& x, const Tensor& router_w,
                          const Tensor& w_in, const Tensor& w_out, const MoeExtra& ex) {
  cuda::MoePtrs p{};
  p.x = opt_ptr<const bf16>(x);
  p.router_w = opt_ptr<const float>(router_w);
  p.w_in = opt_ptr<const bf16>(w_in);
  p.w_out = opt_ptr<const bf16>(w_out);
  p.ws_in = opt_ptr<const bf16>(ex.ws_in);
  p.ws_out = opt_ptr<const bf16>(ex.ws_out);
  p.ws_gate = opt_ptr<const float>(ex.ws_gate);
  p.bias = opt_ptr<const float>(ex.bias);
  p.logits = opt_ptr<float>(st.logits);
  p.scores = opt_ptr<float>(st.scores);
  p.topk_idx = opt_ptr<int32_t>(st.topk_idx);
  p.topk_w = opt_ptr<float>(st.topk_w);
  p.slot_row = opt_ptr<int32_t>(st.slot_row);
  p.counts = opt_ptr<int32_t>(st.counts);
  p.offsets = opt_ptr<int32_t>(st.offsets);
  p.perm = opt_ptr<int32_t>(st.perm);
  p.pre = opt_ptr<bf16>(st.pre);
  p.act = opt_ptr<bf16>(st.act);
  p.y = opt_ptr<bf16>(st.y);
  p.stats = opt_ptr<float>(st.stats);
  p.shared_pre = opt_ptr<bf16>(st.shared_pre);
  p.shared_act = opt_ptr<bf16>(st.shared_act);
  p.shared_y = opt_ptr<bf16>(st.shared_y);
  p.shared_g = opt_ptr<float>(st.shared_g);
  p.xg = opt_ptr<bf16>(sc.xg);
  p.xg_saved = sc.xg_saved;
  p.dy = opt_ptr<bf16>(sc.dy);
  p.dact = opt_ptr<bf16>(sc.dact);
  p.dpre = opt_ptr<bf16>(sc.dpre);
  p.dxg = opt_ptr<bf16>(sc.dxg);
  p.dlogits = opt_ptr<float>(sc.dlogits);
  p.dlogits_bf16 = opt_ptr<bf16>(sc.dlogits_bf16);
  p.dys = opt_ptr<bf16>(sc.dys);
  p.dacts = opt_ptr<bf16>(sc.dacts);
  p.dpres = opt_ptr<bf16>(sc.dpres);
  p.dgl = opt_ptr<float>(sc.dgl);
  p.dgl_bf16 = opt_ptr<bf16>(sc.dgl_bf16);
  p.dsx = opt_ptr<float>(sc.dsx);
  return p;
}

void check_i32(const Tensor& t, const char* op) { check_dtype(t, DType::i32, op); }

// Shapes and dtypes shared by forward and backward.
Dims check_moe(const char* op, const MoeConfig& cfg, const MoeState& st, const Tensor& x, const Tensor& router_w,
               const Tensor& w_in, const Tensor& w_out) {
  LMF_CHECK(cfg.E >= 1 && cfg.K >= 1 && cfg.K <= cfg.E && cfg.C >= 1 && cfg.F >= 1, op, ": bad MoeConfig E=", cfg.E,
            " K=", cfg.K, " C=", cfg.C, " F=", cfg.F, " (need E >= 1, 1 <= K <= E, C >= 1, F >= 1)");
  LMF_CHECK(cfg.E <= kMoeMaxExperts && cfg.K <= kMoeMaxTopK, op, ": MoeConfig E=", cfg.E, " K=", cfg.K,
            " exceeds the supported E <= ", kMoeMaxExperts, ", K <= ", kMoeMaxTopK);
  LMF_CHECK(cfg.n_shared >= 0, op, ": bad MoeConfig n_shared=", cfg.n_shared, " (need >= 0)");
  LMF_CHECK(cfg.capacity_factor >= 0 && std::isfinite(cfg.capacity_factor), op,
            ": capacity_factor must be >= 0 (0 = dropless), got ", cfg.capacity_factor);
  // CPU: everything f32. GPU (bf16 mixed precision): the rows and expert weights bf16, router f32.
  const DType rdt = row_dtype(x);
  check_dtype(x, rdt, op);
  LMF_CHECK(x.ndim == 2 && x.shape[1] == cfg.C, op, ": x '", x.name, "' ", x.shape_str(), " must be (N, C=", cfg.C,
            ")");
  Dims d{x.shape[0], cfg.E, cfg.K, cfg.C, cfg.F, moe_f_in(cfg), moe_rows(cfg, x.shape[0]),
         moe_capacity(cfg, x.shape[0]), cfg.n_shared};
  LMF_CHECK(d.N * d.K <= INT_MAX && d.F_in * d.C <= INT_MAX, op, ": sizes N=", d.N, " K=", d.K,
            " exceed the int32 index range");
  for (const Tensor* t : {&router_w, &st.logits, &st.scores, &st.topk_w}) check_f32(*t, op);
  for (const Tensor* t : {&w_in, &w_out, &st.pre, &st.act, &st.y}) check_dtype(*t, rdt, op);
  for (const Tensor* t : {&st.topk_idx, &st.slot_row, &st.counts, &st.offsets, &st.perm}) check_i32(*t, op);
  check_shape(router_w, {d.E, d.C}, op);
  check_shape(w_in, {d.E, d.F_in, d.C}, op);
  check_shape(w_out, {d.E, d.C, d.F}, op);
  check_shape(st.logits, {d.N, d.E}, op);
  check_shape(st.scores, {d.N, d.E}, op);
  check_shape(st.topk_idx, {d.N, d.K}, op);
  check_shape(st.topk_w, {d.N, d.K}, op);
  check_shape(st.slot_row, {d.N, d.K}, op);
  check_shape(st.counts, {d.E}, op);
  check_shape(st.offsets, {d.E + 1}, op);
  check_shape(st.perm, {d.R}, op);
  check_shape(st.pre, {d.R, d.F_in}, op);
  check_shape(st.act, {d.R, d.F}, op);
  check_shape(st.y, {d.R, d.C}, op);
  check_same_device(op, {&x, &router_w, &w_in, &w_out, &st.logits, &st.scores, &st.topk_idx, &st.topk_w,
                         &st.slot_row, &st.counts, &st.offsets, &st.perm, &st.pre, &st.act, &st.y});
  if (x.device == Device::cuda) {
    LMF_CHECK(st.stats.defined(), op, ": MoeState::stats is required on the GPU (the aux terms stay on the device)");
    LMF_CHECK(d.C % 8 == 0 && d.F % 8 == 0, op, ": the GPU layer needs C and F multiples of 8, got C=", d.C,
              " F=", d.F);
    LMF_CHECK(d.N * d.K <= INT_MAX / 2, op, ": N K = ", d.N * d.K, " too large");
  }
  if (st.stats.defined()) {
    check_f32(st.stats, op);
    check_shape(st.stats, {3}, op);
    check_same_device(op, {&x, &st.stats});
  }
  return d;
}

bool has_gate(const MoeConfig& cfg) { return cfg.n_shared > 0 && cfg.shared_gate; }

void require(const Tensor& t, const char* op, const char* field, const MoeConfig& cfg) {
  LMF_CHECK(t.defined(), op, ": ", field, " is absent but the config has n_shared=", cfg.n_shared,
            " shared_gate=", cfg.shared_gate);
}

// Shapes of the shared-expert weights, the selection bias and the shared-expert state.
void check_extra(const char* op, const Dims& d, const MoeConfig& cfg, const MoeState& st, const MoeExtra& ex,
                 const Tensor& x) {
  if (ex.bias.defined()) {
    check_f32(ex.bias, op);
    check_shape(ex.bias, {d.E}, op);
    check_same_device(op, {&ex.bias, &x});
  }
  if (d.S == 0) return;
  require(ex.ws_in, op, "ws_in", cfg);
  require(ex.ws_out, op, "ws_out", cfg);
  require(st.shared_pre, op, "MoeState::shared_pre", cfg);
  require(st.shared_act, op, "MoeState::shared_act", cfg);
  require(st.shared_y, op, "MoeState::shared_y", cfg);
  for (const Tensor* t : {&ex.ws_in, &ex.ws_out, &st.shared_pre, &st.shared_act, &st.shared_y})
    check_dtype(*t, row_dtype(x), op);
  check_shape(ex.ws_in, {d.S, d.F_in, d.C}, op);
  check_shape(ex.ws_out, {d.S, d.C, d.F}, op);
  check_shape(st.shared_pre, {d.S, d.N, d.F_in}, op);
  check_shape(st.shared_act, {d.S, d.N, d.F}, op);
  check_shape(st.shared_y, {d.S, d.N, d.C}, op);
  check_same_device(op, {&x, &ex.ws_in, &ex.ws_out, &st.shared_pre, &st.shared_act, &st.shared_y});
  if (has_gate(cfg)) {
    require(ex.ws_gate, op, "ws_gate", cfg);
    require(st.shared_g, op, "MoeState::shared_g", cfg);
    check_f32(ex.ws_gate, op);
    check_f32(st.shared_g, op);
    check_shape(ex.ws_gate, {d.S, d.C}, op);
    check_shape(st.shared_g, {d.S, d.N}, op);
    check_same_device(op, {&x, &ex.ws_gate, &st.shared_g});
  }
}

// Rows of x (C wide) gathered in perm order: xg (rows, C) = x[perm[r] / K]
void gather_rows(float* xg, const float* x, const int32_t* perm, int64_t rows, int64_t K, int64_t C) {
  for (int64_t r = 0; r < rows; ++r) std::copy_n(x + (perm[r] / K) * C, C, xg + r * C);
}

void act_forward(float* act, float* pre, int64_t rows, const Dims& d, MoeActivation a) {
  if (rows == 0) return;
  if (a == MoeActivation::swiglu)
    swiglu_forward(Tensor(act, DType::f32, {rows, d.F}, "moe_act"), Tensor(pre, DType::f32, {rows, d.F_in}, "moe_pre"));
  else
    gelu_forward(Tensor(act, DType::f32, {rows, d.F}, "moe_act"), Tensor(pre, DType::f32, {rows, d.F_in}, "moe_pre"));
}

void act_backward(float* dpre, float* dact, float* pre, int64_t rows, const Dims& d, MoeActivation a) {
  if (rows == 0) return;
  const Tensor tdpre(dpre, DType::f32, {rows, d.F_in}, "moe_dpre"), tdact(dact, DType::f32, {rows, d.F}, "moe_dact"),
      tpre(pre, DType::f32, {rows, d.F_in}, "moe_pre");
  if (a == MoeActivation::swiglu) swiglu_backward(tdpre, tdact, tpre);
  else gelu_backward(tdpre, tdact, tpre);
}

// The scratch's shapes (f32 on the CPU); backward also needs its gradient buffers.
void check_scratch(const char* op, const Dims& d, const MoeScratch& sc, const Tensor& x, bool backward) {
  auto one = [&](const Tensor& t, const char* field, std::initializer_list<int64_t> shape) {
    LMF_CHECK(t.defined(), op, ": MoeScratch::", field, " is absent");
    check_shape(t, shape, op);
    check_same_device(op, {&t, &x});
    check_dtype(t, row_dtype(x), op);
  };
  one(sc.xg, "xg", {d.R, d.C});
  if (!backward) return;
  one(sc.dy, "dy", {d.R, d.C});
  one(sc.dact, "dact", {d.R, d.F});
  one(sc.dpre, "dpre", {d.R, d.F_in});
  one(sc.dxg, "dxg", {d.R, d.C});
  auto f32 = [&](const Tensor& t, const char* field, std::initializer_list<int64_t> shape) {
    LMF_CHECK(t.defined(), op, ": MoeScratch::", field, " is absent");
    check_shape(t, shape, op);
    check_same_device(op, {&t, &x});
    check_f32(t, op);
  };
  f32(sc.dlogits, "dlogits", {d.N, d.E});
  const bool gpu = x.device == Device::cuda;
  if (gpu) one(sc.dlogits_bf16, "dlogits_bf16", {d.N, d.E});
  if (d.S == 0) return;
  one(sc.dys, "dys", {d.N, d.C});
  one(sc.dacts, "dacts", {d.N, d.F});
  one(sc.dpres, "dpres", {d.N, d.F_in});
  f32(sc.dgl, "dgl", {d.N});
  if (gpu) {
    one(sc.dgl_bf16, "dgl_bf16", {d.N});
    f32(sc.dsx, "dsx", {d.N, d.C});
  }
}

}  // namespace

std::vector<TensorSpec> moe_state_specs(const MoeConfig& cfg, int64_t N, DType adt, const std::string& p) {
  const int64_t E = cfg.E, K = cfg.K, R = moe_rows(cfg, N), Fi = moe_f_in(cfg), S = cfg.n_shared;
  std::vector<TensorSpec> v = {{p + "logits", {N, E}},          {p + "scores", {N, E}},
                               {p + "topk_idx", {N, K}, DType::i32}, {p + "topk_w", {N, K}},
                               {p + "slot_row", {N, K}, DType::i32}, {p + "counts", {E}, DType::i32},
                               {p + "offsets", {E + 1}, DType::i32}, {p + "perm", {R}, DType::i32},
                               {p + "pre", {R, Fi}, adt},        {p + "act", {R, cfg.F}, adt},
                               {p + "y", {R, cfg.C}, adt},       {p + "stats", {3}}};
  if (S > 0) {
    v.push_back({p + "shared_pre", {S, N, Fi}, adt});
    v.push_back({p + "shared_act", {S, N, cfg.F}, adt});
    v.push_back({p + "shared_y", {S, N, cfg.C}, adt});
    if (cfg.shared_gate) v.push_back({p + "shared_g", {S, N}});
  }
  return v;
}

MoeState moe_state_bind(const std::function<Tensor(const std::string& field)>& get, const MoeConfig& cfg) {
  MoeState st;
  st.logits = get("logits");
  st.scores = get("scores");
  st.topk_idx = get("topk_idx");
  st.topk_w = get("topk_w");
  st.slot_row = get("slot_row");
  st.counts = get("counts");
  st.offsets = get("offsets");
  st.perm = get("perm");
  st.pre = get("pre");
  st.act = get("act");
  st.y = get("y");
  st.stats = get("stats");
  if (cfg.n_shared > 0) {
    st.shared_pre = get("shared_pre");
    st.shared_act = get("shared_act");
    st.shared_y = get("shared_y");
    if (cfg.shared_gate) st.shared_g = get("shared_g");
  }
  return st;
}

MoeState moe_state_bind(const Arena& a, const MoeConfig& cfg, const std::string& p) {
  return moe_state_bind([&](const std::string& field) { return a.get(p + field); }, cfg);
}

bool moe_state_is_routing(const std::string& field) {
  return field == "logits" || field == "scores" || field == "topk_idx" || field == "topk_w" || field == "slot_row" ||
         field == "counts" || field == "offsets" || field == "perm" || field == "stats";
}

std::vector<TensorSpec> moe_scratch_specs(const MoeConfig& cfg, int64_t N, DType adt, bool training,
                                          const std::string& p) {
  const int64_t R = moe_rows(cfg, N), Fi = moe_f_in(cfg), C = cfg.C, F = cfg.F;
  std::vector<TensorSpec> v = {{p + "xg", {R, C}, adt}};
  if (!training) return v;
  v.insert(v.end(), {{p + "dy", {R, C}, adt},
                     {p + "dact", {R, F}, adt},
                     {p + "dpre", {R, Fi}, adt},
                     {p + "dxg", {R, C}, adt},
                     {p + "dlogits", {N, cfg.E}}});
  if (cfg.n_shared > 0)
    v.insert(v.end(), {{p + "dys", {N, C}, adt}, {p + "dacts", {N, F}, adt}, {p + "dpres", {N, Fi}, adt},
                       {p + "dgl", {N}}});
  if (adt == DType::bf16) {
    v.push_back({p + "dlogits_bf16", {N, cfg.E}, DType::bf16});
    if (cfg.n_shared > 0) {
      v.push_back({p + "dgl_bf16", {N}, DType::bf16});
      v.push_back({p + "dsx", {N, C}});
    }
  }
  return v;
}

MoeScratch moe_scratch_bind(const Arena& a, const MoeConfig& cfg, bool training, const std::string& p) {
  MoeScratch sc;
  sc.xg = a.get(p + "xg");
  if (!training) return sc;
  sc.dy = a.get(p + "dy");
  sc.dact = a.get(p + "dact");
  sc.dpre = a.get(p + "dpre");
  sc.dxg = a.get(p + "dxg");
  sc.dlogits = a.get(p + "dlogits");
  if (cfg.n_shared > 0) {
    sc.dys = a.get(p + "dys");
    sc.dacts = a.get(p + "dacts");
    sc.dpres = a.get(p + "dpres");
    sc.dgl = a.get(p + "dgl");
  }
  if (a.find(p + "dlogits_bf16") >= 0) sc.dlogits_bf16 = a.get(p + "dlogits_bf16");
  if (a.find(p + "dgl_bf16") >= 0) sc.dgl_bf16 = a.get(p + "dgl_bf16");
  if (a.find(p + "dsx") >= 0) sc.dsx = a.get(p + "dsx");
  return sc;
}

int64_t moe_f_in(const MoeConfig& cfg) { return cfg.activation == MoeActivation::swiglu ? 2 * cfg.F : cfg.F; }

int64_t moe_capacity(const MoeConfig& cfg, int64_t N) {
  const int64_t NK = N * cfg.K;
  if (cfg.capacity_factor <= 0 || cfg.E <= 0) return NK;
  const double c = std::ceil(static_cast<double>(cfg.capacity_factor) * static_cast<double>(NK) /
                             static_cast<double>(cfg.E));
  return c >= static_cast<double>(NK) ? NK : static_cast<int64_t>(c);  // compared first: a huge factor is no UB
}

int64_t moe_rows(const MoeConfig& cfg, int64_t N) {
  const int64_t NK = N * cfg.K;
  if (cfg.capacity_factor <= 0) return NK;
  return std::min<int64_t>(NK, cfg.E * moe_capacity(cfg, N));
}

MoeLosses moe_forward(Tensor out, const MoeState& st, Tensor x, Tensor router_w, Tensor w_in, Tensor w_out,
                      const MoeConfig& cfg) {
  return moe_forward(out, st, x, router_w, w_in, w_out, MoeExtra{}, cfg);
}

MoeLosses moe_forward(Tensor out, const MoeState& st, Tensor x, Tensor router_w, Tensor w_in, Tensor w_out,
                      const MoeExtra& ex, const MoeConfig& cfg) {
  const Dims d = check_moe(kOpForward, cfg, st, x, router_w, w_in, w_out);
  const Arena scratch("moe scratch", moe_scratch_specs(cfg, d.N, DType::f32, false, ""), x.device);
  return moe_forward(out, st, moe_scratch_bind(scratch, cfg, false, ""), x, router_w, w_in, w_out, ex, cfg);
}

MoeLosses moe_forward(Tensor out, const MoeState& st, const MoeScratch& sc, Tensor x, Tensor router_w, Tensor w_in,
                      Tensor w_out, const MoeExtra& ex, const MoeConfig& cfg) {
  const Dims d = check_moe(kOpForward, cfg, st, x, router_w, w_in, w_out);
  check_extra(kOpForward, d, cfg, st, ex, x);
  check_scratch(kOpForward, d, sc, x, false);
  check_dtype(out, row_dtype(x), kOpForward);
  check_shape(out, {d.N, d.C}, kOpForward);
  check_same_device(kOpForward, {&out, &x});
  MoeLosses losses;
  if (d.N == 0) return losses;
  if (x.device == Device::cuda) {  // the aux terms and the drop count stay on the device, in state.stats
    cuda::MoePtrs p = device_ptrs(st, sc, x, router_w, w_in, w_out, ex);
    p.out = static_cast<bf16*>(out.data);
    LMF_CUDA_DISPATCH(kOpForward, cuda::moe_forward(p, cuda::MoeDims{d.N, d.E, d.K, d.C, d.F, d.F_in, d.R, d.cap, d.S}, cfg));
    return losses;
  }
  const float* xp = x.f32();
  float* logits = st.logits.f32();  // (N, E)
  float* scores = st.scores.f32();  // (N, E)
  int32_t* topk_idx = st.topk_idx.i32();
  float* topk_w = st.topk_w.f32();
  int32_t* slot_row = st.slot_row.i32();
  int32_t* counts = st.counts.i32();
  int32_t* offsets = st.offsets.i32();
  int32_t* perm = st.perm.i32();

  // router
  blas_sgemm(false, true, d.N, d.E, d.C, 1.0f, xp, d.C, router_w.f32(), d.C, 0.0f, logits, d.E);
  router_scores(scores, logits, d.N, d.E, cfg.score);
  router_topk(topk_idx, topk_w, scores, ex.bias.defined() ? ex.bias.f32() : nullptr, d.N, d.E, d.K,
              cfg.renormalize);
  losses.dropped = dispatch(slot_row, counts, offsets, perm, topk_idx, d.N, d.E, d.K, d.cap);

  // experts
  float* xg = sc.xg.f32();  // (R, C) gathered rows of x
  gather_rows(xg, xp, perm, offsets[d.E], d.K, d.C);
  for (int64_t e = 0; e < d.E; ++e) {
    const int64_t r0 = offsets[e], rows = offsets[e + 1] - r0;
    if (rows == 0) continue;
    float* pre = st.pre.f32() + r0 * d.F_in;
    float* act = st.act.f32() + r0 * d.F;
    // pre (rows, F_in) = xg (rows, C) w_in[e]^T; y (rows, C) = act (rows, F) w_out[e]^T
    blas_sgemm(false, true, rows, d.F_in, d.C, 1.0f, xg + r0 * d.C, d.C, w_in.f32() + e * d.F_in * d.C, d.C,
               0.0f, pre, d.F_in);
    act_forward(act, pre, rows, d, cfg.activation);
    blas_sgemm(false, true, rows, d.C, d.F, 1.0f, act, d.F, w_out.f32() + e * d.C * d.F, d.F, 0.0f,
               st.y.f32() + r0 * d.C, d.C);
  }

  // combine, in (token, slot) order
  float* o = out.f32();
  std::fill(o, o + d.N * d.C, 0.0f);
  for (int64_t n = 0; n < d.N; ++n)
    for (int64_t k = 0; k < d.K; ++k) {
      const int64_t r = slot_row[n * d.K + k];
      if (r < 0) continue;
      const float w = topk_w[n * d.K + k];
      const float* yr = st.y.f32() + r * d.C;
      for (int64_t c = 0; c < d.C; ++c) o[n * d.C + c] += w * yr[c];
    }

  // shared experts, in order: out += g_s y_s
  for (int64_t s = 0; s < d.S; ++s) {
    float* pre = st.shared_pre.f32() + s * d.N * d.F_in;
    float* act = st.shared_act.f32() + s * d.N * d.F;
    float* ys = st.shared_y.f32() + s * d.N * d.C;
    blas_sgemm(false, true, d.N, d.F_in, d.C, 1.0f, xp, d.C, ex.ws_in.f32() + s * d.F_in * d.C, d.C, 0.0f, pre,
               d.F_in);
    act_forward(act, pre, d.N, d, cfg.activation);
    blas_sgemm(false, true, d.N, d.C, d.F, 1.0f, act, d.F, ex.ws_out.f32() + s * d.C * d.F, d.F, 0.0f, ys, d.C);
    if (has_gate(cfg)) {
      const float* gw = ex.ws_gate.f32() + s * d.C;
      float* g = st.shared_g.f32() + s * d.N;
      for (int64_t n = 0; n < d.N; ++n) {
        double z = 0;
        for (int64_t c = 0; c < d.C; ++c) z += static_cast<double>(xp[n * d.C + c]) * gw[c];
        g[n] = static_cast<float>(1.0 / (1.0 + std::exp(-z)));
        for (int64_t c = 0; c < d.C; ++c) o[n * d.C + c] += g[n] * ys[n * d.C + c];
      }
    } else {
      for (int64_t i = 0; i < d.N * d.C; ++i) o[i] += ys[i];
    }
  }

  // aux terms
  if (cfg.aux_coef != 0) {
    double acc = 0;
    for (int64_t e = 0; e < d.E; ++e) {
      double P = 0;
      for (int64_t n = 0; n < d.N; ++n) P += scores[n * d.E + e];
      acc += static_cast<double>(counts[e]) / static_cast<double>(d.N * d.K) * (P / static_cast<double>(d.N));
    }
    losses.aux = static_cast<float>(cfg.aux_coef * static_cast<double>(d.E) * acc);
  }
  if (cfg.z_coef != 0) {
    double acc = 0;
    for (int64_t n = 0; n < d.N; ++n) {
      const double lse = row_logsumexp(logits + n * d.E, d.E);
      acc += lse * lse;
    }
    losses.z = static_cast<float>(cfg.z_coef * acc / static_cast<double>(d.N));
  }
  if (st.stats.defined()) {
    float* o3 = st.stats.f32();
    o3[0] = losses.aux;
    o3[1] = losses.z;
    o3[2] = static_cast<float>(losses.dropped);
  }
  return losses;
}

void moe_backward(Tensor dx, Tensor drouter_w, Tensor dw_in, Tensor dw_out, Tensor dout, const MoeState& st,
                  Tensor x, Tensor router_w, Tensor w_in, Tensor w_out, const MoeConfig& cfg, float d_aux) {
  moe_backward(dx, drouter_w, dw_in, dw_out, MoeExtraGrads{}, dout, st, x, router_w, w_in, w_out, MoeExtra{}, cfg,
               d_aux);
}

void moe_backward(Tensor dx, Tensor drouter_w, Tensor dw_in, Tensor dw_out, const MoeExtraGrads& dex, Tensor dout,
                  const MoeState& st, Tensor x, Tensor router_w, Tensor w_in, Tensor w_out, const MoeExtra& ex,
                  const MoeConfig& cfg, float d_aux) {
  const Dims d = check_moe(kOpBackward, cfg, st, x, router_w, w_in, w_out);
  const Arena scratch("moe scratch", moe_scratch_specs(cfg, d.N, DType::f32, true, ""), x.device);
  moe_backward(dx, drouter_w, dw_in, dw_out, dex, dout, st, moe_scratch_bind(scratch, cfg, true, ""), x, router_w,
               w_in, w_out, ex, cfg, d_aux);
}

namespace {

// moe_backward's gradient tensors: present where the config needs them, with their shapes.
void check_backward_grads(const Dims& d, const MoeConfig& cfg, Tensor dx, Tensor drouter_w, Tensor dw_in, Tensor dw_out,
                          const MoeExtraGrads& dex, Tensor dout, Tensor x) {
  if (d.S > 0) {
    require(dex.dws_in, kOpBackward, "dws_in", cfg);
    require(dex.dws_out, kOpBackward, "dws_out", cfg);
    check_f32(dex.dws_in, kOpBackward);
    check_f32(dex.dws_out, kOpBackward);
    check_shape(dex.dws_in, {d.S, d.F_in, d.C}, kOpBackward);
    check_shape(dex.dws_out, {d.S, d.C, d.F}, kOpBackward);
    check_same_device(kOpBackward, {&x, &dex.dws_in, &dex.dws_out});
    if (has_gate(cfg)) {
      require(dex.dws_gate, kOpBackward, "dws_gate", cfg);
      check_f32(dex.dws_gate, kOpBackward);
      check_shape(dex.dws_gate, {d.S, d.C}, kOpBackward);
      check_same_device(kOpBackward, {&x, &dex.dws_gate});
    }
  }
  for (const Tensor* t : {&dx, &dout}) {
    check_dtype(*t, row_dtype(x), kOpBackward);
    check_shape(*t, {d.N, d.C}, kOpBackward);
  }
  check_f32(drouter_w, kOpBackward);
  check_shape(drouter_w, {d.E, d.C}, kOpBackward);
  check_f32(dw_in, kOpBackward);
  check_shape(dw_in, {d.E, d.F_in, d.C}, kOpBackward);
  check_f32(dw_out, kOpBackward);
  check_shape(dw_out, {d.E, d.C, d.F}, kOpBackward);
  check_same_device(kOpBackward, {&dx, &drouter_w, &dw_in, &dw_out, &dout, &x});
}

// The CPU reference of moe_backward in three parts, run in this order: the routed experts (their
// weight gradients and dx through the gathered rows), the router (dlogits from the combine weights,
// the aux and z terms; drouter_w and dx), the shared experts (and their gates).
void moe_backward_cpu_experts(const Dims& d, const MoeConfig& cfg, const MoeState& st, const MoeScratch& sc, Tensor x,
                              Tensor w_in, Tensor w_out, Tensor dw_in, Tensor dw_out, Tensor dout, Tensor dx) {
  const float* xp = x.f32();
  const float* go = dout.f32();  // (N, C)
  const float* topk_w = st.topk_w.f32();
  const int32_t* slot_row = st.slot_row.i32();
  const int32_t* offsets = st.offsets.i32();
  const int32_t* perm = st.perm.i32();
  const int64_t rows_all = offsets[d.E];

  // combine: dy[r] = w dout[n] (the gradient of the combine weights comes with the router below)
  float* dy = sc.dy.f32();  // (R, C)
  for (int64_t a = 0; a < d.N * d.K; ++a) {
    const int64_t r = slot_row[a];
    if (r < 0) continue;
    const float* g = go + (a / d.K) * d.C;
    for (int64_t c = 0; c < d.C; ++c) dy[r * d.C + c] = topk_w[a] * g[c];
  }

  // experts, in expert order: dw_out[e] += dy^T act; dact = dy w_out[e]; dpre = act'(dact);
  // dw_in[e] += dpre^T xg; dxg = dpre w_in[e]
  float* xg = sc.xg.f32();
  float* dxg = sc.dxg.f32();
  float* dact = sc.dact.f32();
  float* dpre = sc.dpre.f32();
  std::fill(dpre, dpre + rows_all * d.F_in, 0.0f);
  if (!sc.xg_saved) gather_rows(xg, xp, perm, rows_all, d.K, d.C);
  for (int64_t e = 0; e < d.E; ++e) {
    const int64_t r0 = offsets[e], rows = offsets[e + 1] - r0;
    if (rows == 0) continue;
    const float* we_in = w_in.f32() + e * d.F_in * d.C;    // (F_in, C)
    const float* we_out = w_out.f32() + e * d.C * d.F;     // (C, F)
    const float* act = st.act.f32() + r0 * d.F;            // (rows, F)
    const float* dye = dy + r0 * d.C;                      // (rows, C)
    float* dacte = dact + r0 * d.F;                        // (rows, F)
    float* dpree = dpre + r0 * d.F_in;                     // (rows, F_in), zero
    blas_sgemm(true, false, d.C, d.F, rows, 1.0f, dye, d.C, act, d.F, 1.0f, dw_out.f32() + e * d.C * d.F, d.F);
    blas_sgemm(false, false, rows, d.F, d.C, 1.0f, dye, d.C, we_out, d.F, 0.0f, dacte, d.F);
    act_backward(dpree, dacte, st.pre.f32() + r0 * d.F_in, rows, d, cfg.activation);
    blas_sgemm(true, false, d.F_in, d.C, rows, 1.0f, dpree, d.F_in, xg + r0 * d.C, d.C, 1.0f,
               dw_in.f32() + e * d.F_in * d.C, d.C);
    blas_sgemm(false, false, rows, d.C, d.F_in, 1.0f, dpree, d.F_in, we_in, d.C, 0.0f, dxg + r0 * d.C, d.C);
  }
  float* dxp = dx.f32();
  for (int64_t r = 0; r < rows_all; ++r) {  // scatter-add in row order
    float* dst = dxp + (perm[r] / d.K) * d.C;
    for (int64_t c = 0; c < d.C; ++c) dst[c] += dxg[r * d.C + c];
  }

}

void moe_backward_cpu_router(const Dims& d, const MoeConfig& cfg, const MoeState& st, const MoeScratch& sc, Tensor x,
                             Tensor router_w, Tensor drouter_w, Tensor dout, Tensor dx, float d_aux) {
  const float* xp = x.f32();
  const float* go = dout.f32();  // (N, C)
  const float* logits = st.logits.f32();
  const float* scores = st.scores.f32();
  const int32_t* topk_idx = st.topk_idx.i32();
  const int32_t* slot_row = st.slot_row.i32();
  const int32_t* counts = st.counts.i32();
  float* dxp = dx.f32();
  // router: dscores (N, E) from the combine weights and the aux term, then dlogits (N, E)
  float* dlogits = sc.dlogits.f32();
  double dscore[kMoeMaxExperts];
  double gw[kMoeMaxTopK];  // d loss / d topk_w[n, k] = dout[n] . y[row(n, k)]  (0 for a dropped slot)
  const double aux_scale = static_cast<double>(d_aux) * cfg.aux_coef * static_cast<double>(d.E) /
                           (static_cast<double>(d.N) * static_cast<double>(d.N * d.K));  // times counts[e]
  const double z_scale = static_cast<double>(d_aux) * cfg.z_coef * 2.0 / static_cast<double>(d.N);
  for (int64_t n = 0; n < d.N; ++n) {
    const float* s = scores + n * d.E;
    for (int64_t k = 0; k < d.K; ++k) {
      const int64_t r = slot_row[n * d.K + k];
      double s = 0;
      if (r >= 0) {
        const float* g = go + n * d.C;
        const float* yr = st.y.f32() + r * d.C;
        for (int64_t c = 0; c < d.C; ++c) s += static_cast<double>(g[c]) * yr[c];
      }
      gw[k] = s;
    }
    std::fill(dscore, dscore + d.E, 0.0);
    if (cfg.renormalize) {
      // w_k = s_k / S, S = sum_j s_j over the top K: ds_k = (gw_k - sum_j gw_j w_j) / S
      double S = 0, gww = 0;
      for (int64_t k = 0; k < d.K; ++k) S += s[topk_idx[n * d.K + k]];
      for (int64_t k = 0; k < d.K; ++k) gww += gw[k] * (s[topk_idx[n * d.K + k]] / S);
      for (int64_t k = 0; k < d.K; ++k) dscore[topk_idx[n * d.K + k]] += (gw[k] - gww) / S;
    } else {
      for (int64_t k = 0; k < d.K; ++k) dscore[topk_idx[n * d.K + k]] += gw[k];
    }
    for (int64_t e = 0; e < d.E; ++e) dscore[e] += aux_scale * counts[e];
    float* dl = dlogits + n * d.E;
    if (cfg.score == MoeScore::softmax) {
      double sd = 0;
      for (int64_t e = 0; e < d.E; ++e) sd += s[e] * dscore[e];
      for (int64_t e = 0; e < d.E; ++e) dl[e] = static_cast<float>(s[e] * (dscore[e] - sd));
    } else {
      for (int64_t e = 0; e < d.E; ++e) dl[e] = static_cast<float>(dscore[e] * s[e] * (1.0 - s[e]));
    }
    if (z_scale != 0) {
      const float* l = logits + n * d.E;
      const double lse = row_logsumexp(l, d.E);
      for (int64_t e = 0; e < d.E; ++e) dl[e] += static_cast<float>(z_scale * lse * std::exp(l[e] - lse));
    }
  }
  // drouter_w (E, C) += dlogits^T x; dx (N, C) += dlogits router_w
  blas_sgemm(true, false, d.E, d.C, d.N, 1.0f, dlogits, d.E, xp, d.C, 1.0f, drouter_w.f32(), d.C);
  blas_sgemm(false, false, d.N, d.C, d.E, 1.0f, dlogits, d.E, router_w.f32(), d.C, 1.0f, dxp, d.C);
}

void moe_backward_cpu_shared(const Dims& d, const MoeConfig& cfg, const MoeState& st, const MoeScratch& sc, Tensor x,
                             const MoeExtra& ex, const MoeExtraGrads& dex, Tensor dout, Tensor dx) {
  const float* xp = x.f32();
  const float* go = dout.f32();  // (N, C)
  float* dxp = dx.f32();
  // shared experts, in order: dy_s = g_s dout; dgate_logit[n] = (dout[n] . y_s[n]) g (1 - g);
  // dws_gate[s] += dgl^T x; dx += dgl ws_gate[s]; then the dense FFN as for a routed expert on all N rows
  if (d.S > 0) {
    float* dys = sc.dys.f32();
    float* dacts = sc.dacts.f32();
    float* dpres = sc.dpres.f32();
    float* dgl = sc.dgl.f32();
    for (int64_t s = 0; s < d.S; ++s) {
      const float* pre = st.shared_pre.f32() + s * d.N * d.F_in;
      const float* act = st.shared_act.f32() + s * d.N * d.F;
      const float* ys = st.shared_y.f32() + s * d.N * d.C;
      const float* ws_in = ex.ws_in.f32() + s * d.F_in * d.C;
      const float* ws_out = ex.ws_out.f32() + s * d.C * d.F;
      if (has_gate(cfg)) {
        const float* g = st.shared_g.f32() + s * d.N;
        for (int64_t n = 0; n < d.N; ++n) {
          double dot = 0;
          for (int64_t c = 0; c < d.C; ++c) {
            dys[n * d.C + c] = g[n] * go[n * d.C + c];
            dot += static_cast<double>(go[n * d.C + c]) * ys[n * d.C + c];
          }
          dgl[n] = static_cast<float>(dot * g[n] * (1.0 - g[n]));
        }
        // dws_gate[s] (1, C) += dgl^T (1, N) x (N, C); dx (N, C) += dgl (N, 1) ws_gate[s] (1, C)
        blas_sgemm(true, false, 1, d.C, d.N, 1.0f, dgl, 1, xp, d.C, 1.0f, dex.dws_gate.f32() + s * d.C, d.C);
        blas_sgemm(false, false, d.N, d.C, 1, 1.0f, dgl, 1, ex.ws_gate.f32() + s * d.C, d.C, 1.0f, dxp, d.C);
      } else {
        std::copy_n(go, d.N * d.C, dys);
      }
      std::fill(dpres, dpres + d.N * d.F_in, 0.0f);
      blas_sgemm(true, false, d.C, d.F, d.N, 1.0f, dys, d.C, act, d.F, 1.0f, dex.dws_out.f32() + s * d.C * d.F,
                 d.F);
      blas_sgemm(false, false, d.N, d.F, d.C, 1.0f, dys, d.C, ws_out, d.F, 0.0f, dacts, d.F);
      act_backward(dpres, dacts, const_cast<float*>(pre), d.N, d, cfg.activation);
      blas_sgemm(true, false, d.F_in, d.C, d.N, 1.0f, dpres, d.F_in, xp, d.C, 1.0f,
                 dex.dws_in.f32() + s * d.F_in * d.C, d.C);
      blas_sgemm(false, false, d.N, d.C, d.F_in, 1.0f, dpres, d.F_in, ws_in, d.C, 1.0f, dxp, d.C);
    }
  }
}

}  // namespace

void moe_backward(Tensor dx, Tensor drouter_w, Tensor dw_in, Tensor dw_out, const MoeExtraGrads& dex, Tensor dout,
                  const MoeState& st, const MoeScratch& sc, Tensor x, Tensor router_w, Tensor w_in, Tensor w_out,
                  const MoeExtra& ex, const MoeConfig& cfg, float d_aux) {
  const Dims d = check_moe(kOpBackward, cfg, st, x, router_w, w_in, w_out);
  check_extra(kOpBackward, d, cfg, st, ex, x);
  check_scratch(kOpBackward, d, sc, x, true);
  check_backward_grads(d, cfg, dx, drouter_w, dw_in, dw_out, dex, dout, x);
  if (d.N == 0) return;
  if (x.device == Device::cuda) {
    cuda::MoePtrs p = device_ptrs(st, sc, x, router_w, w_in, w_out, ex);
    p.dx = static_cast<bf16*>(dx.data);
    p.dout = static_cast<const bf16*>(dout.data);
    p.drouter_w = drouter_w.f32();
    p.dw_in = dw_in.f32();
    p.dw_out = dw_out.f32();
    p.dws_in = opt_ptr<float>(dex.dws_in);
    p.dws_out = opt_ptr<float>(dex.dws_out);
    p.dws_gate = opt_ptr<float>(dex.dws_gate);
    p.expert_grads_zero = dex.expert_grads_zero;
    LMF_CUDA_DISPATCH(kOpBackward,
                      cuda::moe_backward(p, cuda::MoeDims{d.N, d.E, d.K, d.C, d.F, d.F_in, d.R, d.cap, d.S}, cfg, d_aux));
    return;
  }
  moe_backward_cpu_experts(d, cfg, st, sc, x, w_in, w_out, dw_in, dw_out, dout, dx);
  moe_backward_cpu_router(d, cfg, st, sc, x, router_w, drouter_w, dout, dx, d_aux);
  moe_backward_cpu_shared(d, cfg, st, sc, x, ex, dex, dout, dx);
}

void moe_update_bias(Tensor bias, Tensor counts, float rate) {
  constexpr const char* op = "moe_update_bias";
  check_f32(bias, op);
  check_dtype(counts, DType::i32, op);
  LMF_CHECK(bias.ndim == 1, op, ": bias '", bias.name, "' ", bias.shape_str(), " must be (E)");
  check_shape(counts, {bias.shape[0]}, op);
  check_same_device(op, {&bias, &counts});
  const int64_t E = bias.shape[0];
  if (bias.device == Device::cuda) {
    LMF_CUDA_DISPATCH(op, cuda::moe_update_bias(bias.f32(), counts.i32(), E, rate));
    return;
  }
  const int32_t* c = counts.i32();
  float* b = bias.f32();
  int64_t total = 0;
  for (int64_t e = 0; e < E; ++e) total += c[e];
  // counts[e] < total / E  <=>  counts[e] E < total (exact in integers)
  for (int64_t e = 0; e < E; ++e) {
    const int64_t load = static_cast<int64_t>(c[e]) * E;
    if (load < total) b[e] += rate;
    else if (load > total) b[e] -= rate;
  }
}

#ifndef LMF_WITH_CUDA
// Builds without the CUDA backend (moe.cu defines it otherwise): no CUDA workspace.
size_t moe_cuda_workspace(const MoeConfig&, int64_t) { return 0; }
#endif

}  // namespace lmf
