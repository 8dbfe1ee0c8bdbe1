// tensor_parallel.cpp: see tensor_parallel.h.
#include "dist/tensor_parallel.h"

#include <algorithm>
#include <cstring>

#include "core/check.h"
#include "model/model.h"

namespace lmf {

namespace {

bool ends_with(const std::string& s, const char* suffix) {
  const size_t n = std::strlen(suffix);
  return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
}

// The split of one parameter of the full config `c` (its full spec `s`).
TpSplit split_of(const ModelConfig& c, const TensorSpec& s) {
  TpSplit t;
  t.name = s.name;
  const int64_t C = c.d_model, HS = c.head_size(), Q = c.n_head * HS, KV = c.n_kv_head * HS;
  const bool swiglu = c.activation == ActivationKind::swiglu;
  auto shard = [&](int64_t outer, int64_t mid, int64_t inner, std::vector<std::pair<int64_t, int64_t>> seg) {
    t.replicated = false;
    t.outer = outer;
    t.mid = mid;
    t.inner = inner;
    t.segments = std::move(seg);
  };
  // the first F rows of an fc (gate for SwiGLU) and, for SwiGLU, the next F (up)
  auto fc_segments = [&](int64_t F) {
    std::vector<std::pair<int64_t, int64_t>> seg{{0, F}};
    if (swiglu) seg.push_back({F, F});
    return seg;
  };
  const std::string& n = s.name;
  if (ends_with(n, "attn.qkv.weight") || ends_with(n, "attn.qkv.bias")) {
    shard(1, Q + 2 * KV, ends_with(n, ".weight") ? C : 1, {{0, Q}, {Q, KV}, {Q + KV, KV}});
  } else if (ends_with(n, "attn.proj.weight")) {
    shard(C, Q, 1, {{0, Q}});
  } else if (ends_with(n, "mlp.fc.weight") || ends_with(n, "mlp.fc.bias")) {
    shard(1, c.fc_dim(), ends_with(n, ".weight") ? C : 1, fc_segments(c.d_ff));
  } else if (ends_with(n, "mlp.proj.weight")) {
    shard(C, c.d_ff, 1, {{0, c.d_ff}});
  } else if (ends_with(n, "moe.experts.w_in") || ends_with(n, "moe.shared.w_in")) {
    const int64_t F = c.d_expert();
    shard(s.shape.at(0), swiglu ? 2 * F : F, C, fc_segments(F));
  } else if (ends_with(n, "moe.experts.w_out") || ends_with(n, "moe.shared.w_out")) {
    shard(s.shape.at(0) * C, c.d_expert(), 1, {{0, c.d_expert()}});
  } else if (n == "tok_emb.weight" || n == "lm_head.weight") {
    shard(1, c.padded_vocab(), C, {{0, c.padded_vocab()}});
  } else if (ends_with(n, "moe.router.weight") || ends_with(n, "moe.shared.gate")) {
    t.partial_grad = true;  // replicated; its gradient reads the experts' partial outputs
  }
  return t;
}

// Copies between a full tensor and a rank's share: to_local (scatter) or back (gather's placement).
void move_share(const TpSplit& t, float* full, float* local, int tp, int rank, bool to_local) {
  float* dst = local;
  for (int64_t o = 0; o < t.outer; ++o)
    for (const auto& [begin, len] : t.segments) {
      const int64_t part = len / tp;
      float* src = full + ((o * t.mid) + begin + rank * part) * t.inner;
      const size_t bytes = static_cast<size_t>(part * t.inner) * sizeof(float);
      if (to_local) std::memcpy(dst, src, bytes);
      else std::memcpy(src, dst, bytes);
      dst += part * t.inner;
    }
}

}  // namespace

int64_t TpSplit::segment_rows() const {
  int64_t n = 0;
  for (const auto& s : segments) n += s.second;
  return n;
}

ModelConfig tp_local_config(const ModelConfig& c, int tp, int rank) {
  if (tp == 1) return c;
  LMF_CHECK(tp >= 1 && rank >= 0 && rank < tp, "tensor parallelism: rank ", rank, " of ", tp);
  auto need = [&](const char* what, int64_t v) {
    if (v % tp != 0)
      fail("--tp=", tp, " does not divide the model's ", what, " (", v, "): tensor parallelism splits it over the ranks");
  };
  need("n_head", c.n_head);
  if (c.n_kv_head % tp != 0)
    fail("--tp=", tp, " does not divide the model's n_kv_head (", c.n_kv_head,
         "): each rank holds whole key-value heads (replicating them over more ranks than heads is not built)");
  need("d_ff", c.d_ff);
  if (c.moe.experts > 0) need("moe.d_expert", c.d_expert());
  if (c.family == ModelFamily::text)  // (the other ends have no token tables)
    need("padded vocabulary (vocab_size rounded up to pad_vocab_multiple)", c.padded_vocab());
  ModelConfig l = c;
  l.head_dim = c.head_size();
  l.n_head = c.n_head / tp;
  l.n_kv_head = c.n_kv_head / tp;
  l.d_ff = c.d_ff / tp;
  if (c.moe.experts > 0) l.moe.d_expert = c.d_expert() / tp;
  if (c.family == ModelFamily::text) {
    l.vocab_shards = tp;
    l.vocab_shard = rank;
  }
  return l;
}

TensorParallel::TensorParallel(const ModelConfig& full_config, const std::vector<TensorSpec>& full,
                               const std::vector<TensorSpec>& local, int tp, int rank, bool sequence_parallel)
    : tp_(tp), rank_(rank) {
  LMF_CHECK(full.size() == local.size(), "tensor parallelism: the full model has ", full.size(),
            " parameters, a rank's share ", local.size());
  for (size_t i = 0; i < full.size(); ++i) {
    LMF_CHECK(full[i].name == local[i].name, "tensor parallelism: parameter ", i, " is '", full[i].name,
              "' in the full model, '", local[i].name, "' in a rank's share");
    TpSplit t = split_of(full_config, full[i]);
    const std::string& n = full[i].name;
    if (sequence_parallel && (ends_with(n, "norm1.weight") || ends_with(n, "norm1.bias") ||
                              ends_with(n, "norm2.weight") || ends_with(n, "norm2.bias") || n == "norm_f.weight" ||
                              n == "norm_f.bias"))
      t.partial_grad = true;  // each rank's norm saw its own rows
    // the share's size, from the split, must be the local model's tensor (one rule for both sides)
    const int64_t want = t.replicated ? full[i].numel() : t.outer * (t.segment_rows() / tp) * t.inner;
    LMF_CHECK(want == local[i].numel() && (t.replicated || t.outer * t.mid * t.inner == full[i].numel()),
              "tensor parallelism: '", full[i].name, "' splits into ", want, " elements, the rank's model has ",
              local[i].numel());
    for (const auto& s : t.segments)
      LMF_CHECK(s.second % tp == 0, "tensor parallelism: '", full[i].name, "' has a segment of ", s.second,
                " rows that ", tp, " ranks do not divide");
    splits_.push_back(std::move(t));
  }
}

void TensorParallel::scatter(const Arena& full, Arena& local) const {
  LMF_CHECK(full.size() == splits_.size() && local.size() == splits_.size(), "tensor parallelism: scatter of '",
            full.name(), "' into '", local.name(), "': arenas of another model");
  for (size_t i = 0; i < splits_.size(); ++i) {
    const TpSplit& t = splits_[i];
    const Tensor f = full[i], l = local[i];
    LMF_CHECK(f.device == Device::cpu && l.device == Device::cpu, "tensor parallelism: scatter on the CPU");
    if (t.replicated) std::memcpy(l.f32(), f.f32(), l.nbytes());
    else move_share(t, f.f32(), l.f32(), tp_, rank_, true);
  }
}

void TensorParallel::gather(const Arena& local, Arena& full, Communicator& group) const {
  LMF_CHECK(full.size() == splits_.size() && local.size() == splits_.size(), "tensor parallelism: gather of '",
            local.name(), "' into '", full.name(), "': arenas of another model");
  full.zero();
  for (size_t i = 0; i < splits_.size(); ++i) {
    const TpSplit& t = splits_[i];
    const Tensor f = full[i], l = local[i];
    if (t.replicated) {
      if (rank_ == 0) std::memcpy(f.f32(), l.f32(), l.nbytes());
    } else {
      move_share(t, f.f32(), l.f32(), tp_, rank_, false);
    }
  }
  group.all_reduce_sum(full.flat_f32());
}

void TensorParallel::reduce_partial_grads(const Arena& grads, Communicator& group) const {
  for (size_t i = 0; i < splits_.size(); ++i)
    if (splits_[i].partial_grad) group.all_reduce_sum(grads[i]);
}

double TensorParallel::grad_norm_sq_share(const Arena& grads) const {
  const Tensor flat = grads.flat_f32();
  return grad_norm_sq_share(grads, flat.f32(), 0, flat.numel());
}

double TensorParallel::grad_norm_sq_share(const Arena& layout, const float* g, int64_t lo, int64_t hi) const {
  double total = 0;
  for (size_t i = 0; i < splits_.size(); ++i) {
    const int64_t off = static_cast<int64_t>(layout.offset_elems(i)), len = layout[i].numel();
    const int64_t b = std::max(off, lo), e = std::min(off + len, hi);
    double s = 0;
    for (int64_t j = b; j < e; ++j) s += static_cast<double>(g[j - lo]) * static_cast<double>(g[j - lo]);
    total += splits_[i].replicated ? s / tp_ : s;
  }
  return total;
}

}  // namespace lmf
