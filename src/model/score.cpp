// score.cpp: see score.h.
#include "model/score.h"

#include <algorithm>

#include "core/check.h"
#include "core/device.h"
#include "model/plan.h"
#include "model/token_ends.h"
#include "ops/residual.h"

namespace lmf {

namespace {
constexpr size_t kPlansKept = 4;  // each planned shape holds its own activations
}

SequenceScorer::SequenceScorer(const ModelConfig& c, Parameters& params, std::string precision, bool batch_invariant)
    : cfg_(c), params_(params), precision_(std::move(precision)), batch_invariant_(batch_invariant) {
  if (c.family != ModelFamily::text) fail("logprobs: a ", "timeseries model has no tokens to score (lmforge forecast runs it)");
  // the precision flag fails here, not at the first call
  (void)plan_from_flags(cfg_, {device_name(params_.device()), precision_, "auto", batch_invariant_}, 1, 1, false);
}

SequenceScorer::~SequenceScorer() = default;

std::string SequenceScorer::problem(const std::vector<std::vector<int32_t>>& rows) const {
  if (rows.empty()) return "logprobs: no sequences";
  const size_t n = rows[0].size();
  if (n < 2) return "logprobs: a sequence needs at least 2 tokens (the first one's log-probability is not defined)";
  if (static_cast<int64_t>(n) > cfg_.context_length + 1)
    return "logprobs: " + std::to_string(n) + " tokens; the model's context_length " + std::to_string(cfg_.context_length) +
           " scores at most " + std::to_string(cfg_.context_length + 1);
  for (size_t b = 0; b < rows.size(); ++b) {
    if (rows[b].size() != n)
      return "logprobs: sequence " + std::to_string(b) + " has " + std::to_string(rows[b].size()) +
             " tokens, sequence 0 has " + std::to_string(n) + " (a batch has one length)";
    for (size_t i = 0; i < n; ++i)
      if (rows[b][i] < 0 || rows[b][i] >= cfg_.vocab_size)
        return "logprobs: token " + std::to_string(rows[b][i]) + " (sequence " + std::to_string(b) + ", position " +
               std::to_string(i) + ") is outside the vocabulary [0, " + std::to_string(cfg_.vocab_size) + ")";
  }
  return "";
}

SequenceScorer::Planned& SequenceScorer::planned(int64_t B, int64_t T) {
  const auto key = std::make_pair(B, T);
  auto it = plans_.find(key);
  if (it != plans_.end()) return it->second;
  if (plans_.size() >= kPlansKept) {
    plans_.erase(order_.front());
    order_.erase(order_.begin());
  }
  const ModelPlan p = plan_from_flags(cfg_, {device_name(params_.device()), precision_, "auto", batch_invariant_}, B, T, false);
  Planned pl;
  pl.model = std::make_unique<Model>(cfg_, p, params_, nullptr, std::make_unique<TokenEnds>(cfg_));
  pl.io = Arena("scorer batch", {{"tokens", {B, T}, DType::i32}, {"targets", {B, T}, DType::i32}}, p.device);
  order_.push_back(key);
  return plans_.emplace(key, std::move(pl)).first->second;
}

void SequenceScorer::logprobs_into(const std::vector<std::vector<int32_t>>& rows, Tensor out) {
  if (const std::string why = problem(rows); !why.empty()) fail(why);
  const int64_t B = static_cast<int64_t>(rows.size()), T = static_cast<int64_t>(rows[0].size()) - 1;
  LMF_CHECK(out.numel() == B * T && out.dtype == DType::f32 && out.device == params_.device(),
            "logprobs_into: out is ", out.describe(), ", expected ", B * T, " f32 on ", device_name(params_.device()));
  Planned& pl = planned(B, T);
  std::vector<int32_t> tokens(static_cast<size_t>(B * T)), targets(tokens.size());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      tokens[static_cast<size_t>(b * T + t)] = rows[static_cast<size_t>(b)][static_cast<size_t>(t)];
      targets[static_cast<size_t>(b * T + t)] = rows[static_cast<size_t>(b)][static_cast<size_t>(t + 1)];
    }
  tensor_from_host(pl.io[0], tokens.data());
  tensor_from_host(pl.io[1], targets.data());
  pl.model->set_activation_tap(tap_);
  pl.model->forward_loss_device(pl.io[0], pl.io[1]);
  scale_forward(out.view({B * T}), pl.model->row_losses(), -1.0f);  // the per-row loss is -log p(target): negation is exact
}

std::vector<float> SequenceScorer::logprobs(const std::vector<std::vector<int32_t>>& rows) {
  if (const std::string why = problem(rows); !why.empty()) fail(why);
  const int64_t n = static_cast<int64_t>(rows.size()) * (static_cast<int64_t>(rows[0].size()) - 1);
  std::vector<float> host(static_cast<size_t>(n));
  if (params_.device() == Device::cpu) {
    logprobs_into(rows, Tensor(host.data(), DType::f32, {n}, "logprobs"));
    return host;
  }
  Arena dev("logprobs", {{"logprobs", {n}, DType::f32}}, params_.device());
  logprobs_into(rows, dev[0]);
  tensor_to_host(host.data(), dev[0]);
  return host;
}

}  // namespace lmf
