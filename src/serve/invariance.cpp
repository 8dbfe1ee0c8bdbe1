#include "serve/invariance.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstring>

#include "core/check.h"
#include "core/rng.h"
#include "model/score.h"
#include "serve/engine.h"

namespace lmf {

namespace {

// Deterministic ids in [0, V): stream `stream` of the harness's seed.
std::vector<int32_t> random_ids(uint64_t seed, uint64_t stream, int64_t n, int64_t V) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    v[static_cast<size_t>(i)] = static_cast<int32_t>(rng_u64(seed, stream, static_cast<uint64_t>(i)) % static_cast<uint64_t>(V));
  return v;
}

InvarianceCheck compare(std::string what, const float* got, const float* want, int64_t n) {
  InvarianceCheck c;
  c.what = std::move(what);
  c.values = n;
  for (int64_t i = 0; i < n; ++i) {
    if (std::bit_cast<uint32_t>(got[i]) == std::bit_cast<uint32_t>(want[i])) continue;
    if (c.first < 0) c.first = i;
    ++c.differing;
    c.worst_abs = std::max(c.worst_abs, std::fabs(static_cast<double>(got[i]) - static_cast<double>(want[i])));
  }
  return c;
}

// The probe's rows [row0, row0 + n) of every op's output in one trainer forward, in forward order.
struct OpOutput {
  int layer;
  std::string op;
  size_t row_bytes;
  std::vector<uint8_t> bytes;
};

std::vector<OpOutput> capture(SequenceScorer& scorer, const std::vector<std::vector<int32_t>>& rows, int64_t row0,
                              int64_t n) {
  std::vector<OpOutput> out;
  scorer.set_activation_tap([&](int layer, const char* op, Tensor t) {
    const int64_t w = t.dim(t.ndim - 1);
    const Tensor m = t.view({t.numel() / w, w}).rows(row0, row0 + n);
    OpOutput o{layer, op, static_cast<size_t>(w) * dtype_size(t.dtype), std::vector<uint8_t>(m.nbytes())};
    tensor_to_host(o.bytes.data(), m);
    out.push_back(std::move(o));
  });
  try {
    (void)scorer.logprobs(rows);
  } catch (...) {
    scorer.set_activation_tap(nullptr);
    throw;
  }
  scorer.set_activation_tap(nullptr);
  return out;
}

// "layer 2: MoE + residual (position 20)" for the first op output, in forward order, whose bytes differ
// between two captures of the same positions; "" when none does.
std::string first_differing_op(const std::vector<OpOutput>& ref, const std::vector<OpOutput>& got) {
  for (size_t i = 0; i < ref.size() && i < got.size(); ++i) {
    const OpOutput &a = ref[i], &b = got[i];
    const size_t n = std::min(a.bytes.size(), b.bytes.size());
    for (size_t j = 0; j < n; ++j)
      if (a.bytes[j] != b.bytes[j])
        return (a.layer < 0 ? std::string("input") : detail::concat("layer ", a.layer)) + ": " + a.op + " (position " +
               std::to_string(j / a.row_bytes) + ")";
  }
  return "";
}

// The probe (the first prompt_len tokens of seq) decoded alone by an engine, eagerly, with every op's
// output captured at each position it computes (prefill chunks, then one row per decode step), in the
// forward order of a step. n: on entry the positions wanted ([0, n)); on return cut before the first
// position not computed or whose input token is not seq's (a different input is no numerical difference).
std::vector<OpOutput> capture_decode(const ModelConfig& c, Parameters& params, const std::vector<int32_t>& seq,
                                     int64_t prompt_len, int64_t& n, bool batch_invariant) {
  EngineOptions eo;
  eo.batch_invariant = batch_invariant;
  eo.max_seqs = 1;
  eo.max_prefill_tokens = 512;
  Engine e(c, params, eo);
  RequestParams rp;
  rp.sample.temperature = 0;
  rp.max_tokens = static_cast<int64_t>(seq.size()) - prompt_len;
  e.add(0, std::vector<int32_t>(seq.begin(), seq.begin() + prompt_len), rp);
  std::vector<OpOutput> out;
  std::vector<uint8_t> seen(static_cast<size_t>(n), 0);
  int64_t bad_input = n;
  size_t k = 0;  // this step's op index
  std::vector<uint8_t> host;
  e.set_activation_tap([&](int layer, const char* op, Tensor t) {
    const int64_t w = t.dim(t.ndim - 1), R = t.numel() / w;
    const size_t rb = static_cast<size_t>(w) * dtype_size(t.dtype);
    if (k == out.size()) out.push_back(OpOutput{layer, op, rb, std::vector<uint8_t>(static_cast<size_t>(n) * rb)});
    OpOutput& o = out[k++];
    host.resize(t.nbytes());
    tensor_to_host(host.data(), t);
    const int32_t *pos = e.step_positions(), *sq = e.step_seqs(), *tok = e.step_tokens();
    for (int64_t r = 0; r < R; ++r) {
      if (sq[r] < 0 || pos[r] < 0 || pos[r] >= n) continue;
      std::memcpy(o.bytes.data() + static_cast<size_t>(pos[r]) * rb, host.data() + static_cast<size_t>(r) * rb, rb);
      seen[static_cast<size_t>(pos[r])] = 1;
      if (tok[r] != seq[static_cast<size_t>(pos[r])]) bad_input = std::min<int64_t>(bad_input, pos[r]);
    }
  });
  while (!e.idle()) {
    k = 0;
    (void)e.step();
  }
  int64_t filled = 0;
  while (filled < n && seen[static_cast<size_t>(filled)]) ++filled;
  n = std::min(filled, bad_input);
  for (OpOutput& o : out) o.bytes.resize(static_cast<size_t>(n) * o.row_bytes);
  return out;
}

struct Decoded {
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;
};

// The probe decoded greedily by an engine that also serves `others` (random prompts and lengths).
Decoded decode(const ModelConfig& c, Parameters& params, const std::vector<int32_t>& prompt, int64_t new_tokens,
               int64_t others, int64_t prefill_budget, uint64_t seed, bool batch_invariant) {
  EngineOptions eo;
  eo.batch_invariant = batch_invariant;
  eo.max_seqs = static_cast<int32_t>(std::max<int64_t>(others + 1, 1));
  eo.max_prefill_tokens = prefill_budget;
  Engine e(c, params, eo);
  RequestParams rp;
  rp.sample.temperature = 0;
  rp.max_tokens = new_tokens;
  const int64_t V = c.vocab_size, L = static_cast<int64_t>(prompt.size());
  const int64_t probe_at = others > 0 ? static_cast<int64_t>(rng_u64(seed, 900, static_cast<uint64_t>(others)) % static_cast<uint64_t>(others + 1)) : 0;
  for (int64_t i = 0; i <= others; ++i) {
    if (i == probe_at) {
      e.add(0, prompt, rp);
      continue;
    }
    const uint64_t s = 1000 + static_cast<uint64_t>(others) * 64 + static_cast<uint64_t>(i);
    const int64_t len = 1 + static_cast<int64_t>(rng_u64(seed, s, 0) % static_cast<uint64_t>(2 * L));
    RequestParams other;
    other.sample.temperature = 1.0f;
    other.sample.seed = s;
    other.max_tokens = 1 + static_cast<int64_t>(rng_u64(seed, s, 1) % static_cast<uint64_t>(2 * new_tokens));
    other.max_tokens = std::min<int64_t>(other.max_tokens, c.context_length - len);
    if (other.max_tokens < 1) continue;
    e.add(1 + i, random_ids(seed, s, len, V), other);
  }
  Decoded d;
  while (!e.idle())
    for (const EngineEvent& ev : e.step())
      if (ev.id == 0) {
        d.tokens.push_back(ev.out.token);
        d.logprobs.push_back(ev.out.logprob);
      }
  return d;
}

}  // namespace

std::string first_op_trainer_vs_sampler(const ModelConfig& c, Parameters& trainer_params, Parameters& sampler_params,
                                        const std::vector<int32_t>& seq, int64_t prompt_len,
                                        const std::string& precision, bool batch_invariant) {
  const int64_t L = static_cast<int64_t>(seq.size());
  LMF_CHECK(prompt_len >= 1 && prompt_len < L, "first_op_trainer_vs_sampler: prompt_len=", prompt_len,
            " must be in [1, ", L, ")");
  SequenceScorer scorer(c, trainer_params, precision, batch_invariant);
  const std::vector<OpOutput> ref = capture(scorer, {seq}, 0, L - 1);
  int64_t n = L - 1;
  const std::vector<OpOutput> got = capture_decode(c, sampler_params, seq, prompt_len, n, batch_invariant);
  const std::string op = first_differing_op(ref, got);
  if (!op.empty() || n == L - 1) return op;
  return detail::concat("- (every op equal at positions 0 to ", n - 1, "; the decode's input differs from position ", n,
                        ")");
}

std::string invariance_options_problem(const InvarianceOptions& o, const ModelConfig& c) {
  if (c.family != ModelFamily::text) return "check-invariance: the model is not a language model (family timeseries)";
  if (o.prompt_len < 1 || o.new_tokens < 1 || o.prompt_len + o.new_tokens > c.context_length)
    return detail::concat("check-invariance: --prompt-len=", o.prompt_len, " + --new-tokens=", o.new_tokens,
                          " must be >= 1 each and fit the context length (", c.context_length, ")");
  if (o.batches.empty()) return "check-invariance: --batches is empty";
  for (int64_t b : o.batches)
    if (b < 1 || b > 1024) return detail::concat("check-invariance: --batches: ", b, " is not in [1, 1024]");
  return "";
}

bool InvarianceReport::all_equal() const {
  return std::all_of(checks.begin(), checks.end(), [](const InvarianceCheck& c) { return c.equal(); });
}

void InvarianceReport::print(std::ostream& os) const {
  os << "| check | values | differing | first | worst abs diff | tokens | first differing op |\n"
        "|---|---|---|---|---|---|---|\n";
  int64_t bad = 0;
  for (const InvarianceCheck& c : checks) {
    char worst[32];
    std::snprintf(worst, sizeof worst, "%.3g", c.worst_abs);
    os << "| " << c.what << " | " << c.values << " | " << c.differing << " | " << c.first << " | " << worst << " | "
       << (!c.sampler ? "-" : c.tokens_equal ? "same" : "DIFFER") << " | "
       << (c.first_op.empty() ? std::string("-") : c.first_op) << " |\n";
    bad += c.equal() ? 0 : 1;
  }
  if (bad == 0) os << "batch-invariant: yes (" << checks.size() << " checks, every value bitwise equal)\n";
  else os << "batch-invariant: no (" << bad << " of " << checks.size() << " checks differ)\n";
}

InvarianceReport check_invariance(const ModelConfig& c, Parameters& params, const InvarianceOptions& o,
                                  std::ostream* progress) {
  if (const std::string p = invariance_options_problem(o, c); !p.empty()) fail(p);
  InvarianceReport r;
  auto add = [&](InvarianceCheck ch) {
    if (progress) *progress << "[check-invariance] " << ch.what << ": " << (ch.equal() ? "equal" : "DIFFERS") << "\n" << std::flush;
    r.checks.push_back(std::move(ch));
  };
  const int64_t V = c.vocab_size, P = o.prompt_len;
  const std::vector<int32_t> prompt = random_ids(o.seed, 1, P, V);

  // the reference: the probe decoded alone
  const Decoded alone = decode(c, params, prompt, o.new_tokens, 0, 512, o.seed, o.batch_invariant);
  LMF_CHECK(!alone.tokens.empty(), "check-invariance: the probe decoded no token");
  std::vector<int32_t> seq = prompt;
  seq.insert(seq.end(), alone.tokens.begin(), alone.tokens.end());
  const int64_t L = static_cast<int64_t>(seq.size()), G = static_cast<int64_t>(alone.tokens.size());

  // the trainer over the whole sequence (every position at once) = the sampler's decode
  SequenceScorer scorer(c, params, o.precision, o.batch_invariant);
  const std::vector<float> ref = scorer.logprobs({seq});  // L - 1 values
  std::vector<OpOutput> ref_captured;  // the reference forward's ops, captured when a check first differs
  auto ref_ops = [&]() -> const std::vector<OpOutput>& {
    if (ref_captured.empty()) ref_captured = capture(scorer, {seq}, 0, L - 1);
    return ref_captured;
  };
  {
    InvarianceCheck ch = compare("trainer (prefill, batch 1) vs sampler (decode, alone): the generated tokens' "
                                 "log-probabilities", ref.data() + (P - 1), alone.logprobs.data(), G);
    if (!ch.equal()) {  // the first op (every op's output captured at every position on both sides)
      ch.first_op = first_op_trainer_vs_sampler(c, params, params, seq, P, o.precision, o.batch_invariant);
      if (ch.first_op.empty()) ch.first_op = "the log-probability of the sampled token (every op before it equal)";
    }
    add(std::move(ch));
  }

  // the trainer: the probe at a random row of B rows
  for (int64_t B : o.batches) {
    if (B == 1) continue;
    const int64_t row = static_cast<int64_t>(rng_u64(o.seed, 2, static_cast<uint64_t>(B)) % static_cast<uint64_t>(B));
    std::vector<std::vector<int32_t>> rows;
    for (int64_t b = 0; b < B; ++b)
      rows.push_back(b == row ? seq : random_ids(o.seed, 100 + static_cast<uint64_t>(B) * 1024 + static_cast<uint64_t>(b), L, V));
    const std::vector<float> got = scorer.logprobs(rows);
    InvarianceCheck ch = compare(detail::concat("trainer, batch of ", B, " (probe at row ", row, ")"),
                                 got.data() + row * (L - 1), ref.data(), L - 1);
    if (!ch.equal()) ch.first_op = first_differing_op(ref_ops(), capture(scorer, rows, row * (L - 1), L - 1));
    add(std::move(ch));
  }
  // the trainer: the probe as the prefix of a longer row (right padding with other tokens)
  if (L < c.context_length + 1) {
    const int64_t pad = std::min<int64_t>(8, c.context_length + 1 - L);
    std::vector<int32_t> longer = seq;
    const std::vector<int32_t> tail = random_ids(o.seed, 3, pad, V);
    longer.insert(longer.end(), tail.begin(), tail.end());
    const std::vector<float> got = scorer.logprobs({longer});
    InvarianceCheck ch = compare(detail::concat("trainer, probe + ", pad, " more positions"), got.data(), ref.data(), L - 1);
    if (!ch.equal()) ch.first_op = first_differing_op(ref_ops(), capture(scorer, {longer}, 0, L - 1));
    add(std::move(ch));
  }
  // the sampler among others: continuous batching, two prefill budgets
  for (int64_t B : o.batches) {
    if (B == 1) continue;
    for (int64_t budget : {int64_t{7}, int64_t{512}}) {
      const Decoded d = decode(c, params, prompt, o.new_tokens, B - 1, budget, o.seed, o.batch_invariant);
      InvarianceCheck ch;
      const int64_t n = std::min<int64_t>(G, static_cast<int64_t>(d.logprobs.size()));
      ch = compare(detail::concat("sampler among ", B - 1, " other requests, prefill budget ", budget), d.logprobs.data(),
                   alone.logprobs.data(), n);
      ch.sampler = true;
      ch.tokens_equal = d.tokens == alone.tokens;
      add(std::move(ch));
    }
  }
  return r;
}

}  // namespace lmf
