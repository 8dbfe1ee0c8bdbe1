// test_serve_engine.cpp: serving on the CPU (serve/engine.h, Model::forward_paged): batched paged
// steps of mixed-length sequences against each sequence's full forward (logits within fp32
// tolerance), greedy generation through the engine (chunked prefill, preemption and recompute, a
// small KV pool) against greedy decoding by full forwards, per-request seeds independent of the
// batch, and the requests the engine refuses.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "model/gpt.h"
#include "model/kv_cache.h"
#include "model/score.h"
#include "model/token_ends.h"
#include "serve/engine.h"
#include "serve/invariance.h"
#include "support/test_util.h"

namespace lmf {
namespace {

ModelConfig serving_config(const std::string& preset) {
  ModelConfig c = config_preset(preset);
  c.context_length = 48;
  return c;
}

// The full fp32 forward of one sequence: logits (T, V).
std::vector<float> full_logits(const ModelConfig& c, Parameters& weights, const std::vector<int32_t>& toks) {
  const int64_t T = static_cast<int64_t>(toks.size());
  ModelPlan p{1, T, false};
  Model m(c, p, weights, nullptr, std::make_unique<TokenEnds>(c));
  std::vector<float> logits(static_cast<size_t>(T * c.vocab_size));
  std::vector<int32_t> in = toks;
  m.forward_values(test::tensor_of(logits, {1, T, c.vocab_size}, "logits"), test::tensor_of(in, {1, T}, "tokens"));
  return logits;
}

std::unique_ptr<Parameters> random_weights(const ModelConfig& c, uint64_t seed) {
  Gpt g(c, ModelPlan{1, 1, false});
  g.params.init_gpt2(seed, c.n_layer, c.vocab_size);
  auto w = std::make_unique<Parameters>(gpt_param_specs(c), Device::cpu, false);
  std::memcpy(w->master().base(), g.params.master().base(), g.params.master().bytes());
  return w;
}

class Paged : public ::testing::TestWithParam<const char*> {};

// Three sequences: step 1 prefills a chunk of each, later steps mix the rest of the prompts with
// single decode rows and padding; every row's logits equal the full forward's at that position.
TEST_P(Paged, StepsMatchFullForward) {
  const ModelConfig c = serving_config(GetParam());
  auto weights = random_weights(c, 5);
  const std::vector<int64_t> lens{3, 20, 33};
  std::vector<std::vector<int32_t>> seqs;
  std::vector<std::vector<float>> ref;
  for (size_t s = 0; s < lens.size(); ++s) {
    seqs.push_back(test::randint(static_cast<size_t>(lens[s]), 9 + s, static_cast<int32_t>(c.vocab_size)));
    ref.push_back(full_logits(c, *weights, seqs.back()));
  }
  const int64_t N = 24, bs = 4, max_blocks = 12, S = 3;
  ModelPlan p{1, N, false};
  p.serve = true;
  p.samples = N;
  Model m(c, p, *weights, nullptr, std::make_unique<TokenEnds>(c));
  KvCache cache(c, 40, bs, Device::cpu);
  // shuffled blocks: sequence s owns blocks s, s + 3, s + 6, ... (interleaved in the pool)
  std::vector<int32_t> tables(static_cast<size_t>(S * max_blocks));
  for (int64_t s = 0; s < S; ++s)
    for (int64_t j = 0; j < max_blocks; ++j) tables[static_cast<size_t>(s * max_blocks + j)] = static_cast<int32_t>(j * S + s);
  std::vector<int32_t> tokens(N), positions(N), slots(N), seqv(N), samples(N);
  std::vector<float> logits(static_cast<size_t>(N * c.vocab_size));
  PagedBatch b{test::tensor_of(tokens, {1, N}, "tokens"), test::tensor_of(positions, {N}, "positions"),
               test::tensor_of(slots, {N}, "slots"), test::tensor_of(seqv, {N}, "seqs"),
               test::tensor_of(tables, {S, max_blocks}, "block_tables"), test::tensor_of(samples, {N}, "sample_rows")};
  std::vector<int64_t> done(S, 0);
  int steps = 0;
  while (done[0] < lens[0] || done[1] < lens[1] || done[2] < lens[2]) {
    // this step: sequence s computes up to `chunk` positions (1 after the first step: decode-like)
    std::vector<std::pair<int64_t, int64_t>> rows;  // (sequence, position); -1: padding
    for (int64_t s = 0; s < S; ++s) {
      const int64_t chunk = steps == 0 ? 6 : (s == 2 ? 7 : 1);
      for (int64_t k = 0; k < chunk && done[static_cast<size_t>(s)] < lens[static_cast<size_t>(s)]; ++k)
        rows.push_back({s, done[static_cast<size_t>(s)]++});
      rows.push_back({-1, 0});
    }
    ASSERT_LE(static_cast<int64_t>(rows.size()), N);
    while (static_cast<int64_t>(rows.size()) < N) rows.push_back({-1, 0});
    for (int64_t n = 0; n < N; ++n) {
      const auto [s, pos] = rows[static_cast<size_t>(n)];
      tokens[static_cast<size_t>(n)] = s < 0 ? 0 : seqs[static_cast<size_t>(s)][static_cast<size_t>(pos)];
      positions[static_cast<size_t>(n)] = static_cast<int32_t>(pos);
      slots[static_cast<size_t>(n)] = s < 0 ? -1 : tables[static_cast<size_t>(s * max_blocks + pos / bs)] * static_cast<int32_t>(bs) + static_cast<int32_t>(pos % bs);
      seqv[static_cast<size_t>(n)] = static_cast<int32_t>(s);
      samples[static_cast<size_t>(N - 1 - n)] = static_cast<int32_t>(n);  // every row, in reverse
    }
    m.forward_paged(test::tensor_of(logits, {N, c.vocab_size}, "logits"), b, cache);
    for (int64_t n = 0; n < N; ++n) {
      const auto [s, pos] = rows[static_cast<size_t>(n)];
      if (s < 0) continue;
      const float* got = &logits[static_cast<size_t>((N - 1 - n) * c.vocab_size)];
      const float* want = &ref[static_cast<size_t>(s)][static_cast<size_t>(pos * c.vocab_size)];
      // bitwise: every op computes a row the same way in the full forward and in a paged step
      for (int64_t j = 0; j < c.vocab_size; ++j)
        ASSERT_EQ(std::bit_cast<uint32_t>(got[j]), std::bit_cast<uint32_t>(want[j]))
            << "sequence " << s << " position " << pos << " logit " << j << ": " << got[j] << " vs " << want[j];
    }
    ++steps;
  }
  EXPECT_GT(steps, 10);
}

INSTANTIATE_TEST_SUITE_P(Presets, Paged, ::testing::Values("test-gpt2", "test-llama", "test-moe"), [](const auto& info) {
  const std::string p = info.param;
  return p == "test-gpt2" ? "Gpt2" : p == "test-llama" ? "Llama" : "Moe";
});

// Greedy decoding by full forwards: the reference the engine must reproduce token for token.
std::vector<int32_t> greedy_reference(const ModelConfig& c, Parameters& w, std::vector<int32_t> toks, int64_t n) {
  std::vector<int32_t> out;
  for (int64_t i = 0; i < n; ++i) {
    const std::vector<float> l = full_logits(c, w, toks);
    const float* last = &l[l.size() - static_cast<size_t>(c.vocab_size)];
    const int32_t t = static_cast<int32_t>(std::max_element(last, last + c.vocab_size) - last);
    out.push_back(t);
    toks.push_back(t);
  }
  return out;
}

std::map<int64_t, std::vector<int32_t>> drain(Engine& e, int64_t* max_running = nullptr) {
  std::map<int64_t, std::vector<int32_t>> out;
  int guard = 0;
  while (!e.idle()) {
    for (const EngineEvent& ev : e.step()) out[ev.id].push_back(ev.out.token);
    if (max_running) *max_running = std::max<int64_t>(*max_running, static_cast<int64_t>(e.stats().running));
    if (++guard > 10000) {
      ADD_FAILURE() << "the engine does not drain";
      break;
    }
  }
  return out;
}

class EngineGreedy : public ::testing::TestWithParam<const char*> {};

// Mixed prompts through continuous batching with chunked prefill, once with a pool large enough and
// once with a pool so small that sequences are preempted and recomputed: identical tokens, equal to
// greedy decoding by full forwards; the pool ends full.
TEST_P(EngineGreedy, MatchesFullForwardDecoding) {
  const ModelConfig c = serving_config(GetParam());
  auto weights = random_weights(c, 21);
  const std::vector<int64_t> lens{1, 5, 13, 30, 8, 17};
  const int64_t n_new = 12;
  std::vector<std::vector<int32_t>> prompts, want;
  for (size_t i = 0; i < lens.size(); ++i) {
    prompts.push_back(test::randint(static_cast<size_t>(lens[i]), 40 + i, static_cast<int32_t>(c.vocab_size)));
    want.push_back(greedy_reference(c, *weights, prompts.back(), std::min<int64_t>(n_new, c.context_length - lens[i])));
  }
  for (double gb : {0.0, 1e-9}) {  // auto (everything fits), and the smallest pool that holds one request
    EngineOptions o;
    o.max_seqs = 4;
    o.max_prefill_tokens = 7;
    o.block_size = 4;
    o.kv_cache_gb = gb == 0 ? 0 : static_cast<double>(KvCache::block_bytes(c, 4, Device::cpu)) * 11 / (1 << 30);
    Engine e(c, *weights, o);
    RequestParams rp;
    rp.sample.temperature = 0;
    for (size_t i = 0; i < prompts.size(); ++i) {
      rp.max_tokens = static_cast<int64_t>(want[i].size());
      e.add(static_cast<int64_t>(i), prompts[i], rp);
    }
    int64_t max_running = 0;
    const auto got = drain(e, &max_running);
    for (size_t i = 0; i < prompts.size(); ++i)
      EXPECT_EQ(got.at(static_cast<int64_t>(i)), want[i]) << "request " << i << " (pool " << e.kv_blocks() << " blocks)";
    const EngineStats st = e.stats();
    EXPECT_EQ(st.blocks_free, st.blocks_total);
    EXPECT_GE(max_running, 2);
    if (gb > 0) {
      EXPECT_EQ(e.kv_blocks(), 11);
      EXPECT_GT(st.preemptions, 0) << "the small pool should force preemptions";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Presets, EngineGreedy, ::testing::Values("test-gpt2", "test-llama", "test-moe"),
                         [](const auto& info) {
                           const std::string p = info.param;
                           return p == "test-gpt2" ? "Gpt2" : p == "test-llama" ? "Llama" : "Moe";
                         });

// A seeded request samples the same tokens alone and among other requests.
// The trainer's log-probabilities are the sampler's (CPU, fp32): a request decoded among others (chunked
// prefill, decode rows beside other sequences' prefill chunks and padding) reports for each sampled
// token bitwise the log-probability that the training forward + loss (SequenceScorer, `lmforge score`)
// gives that token after the same prefix. Sampled at temperature 1, so the tokens are not all argmaxes.
class EngineLogprobs : public ::testing::TestWithParam<const char*> {};

TEST_P(EngineLogprobs, AreBitwiseTheTrainersLogprobs) {
  const ModelConfig c = serving_config(GetParam());
  auto weights = random_weights(c, 11);
  const std::vector<int32_t> prompt = test::randint(13, 3, static_cast<int32_t>(c.vocab_size));
  RequestParams rp;
  rp.sample = SampleParams{1.0f, 0, 1.0f, 0, 77, 0};
  rp.max_tokens = 24;
  EngineOptions o;
  o.max_seqs = 6;
  o.max_prefill_tokens = 8;  // the prompt arrives in two chunks
  Engine e(c, *weights, o);
  for (int i = 0; i < 5; ++i) {
    RequestParams other = rp;
    other.sample.seed = 500 + static_cast<uint64_t>(i);
    e.add(100 + i, test::randint(static_cast<size_t>(4 + 5 * i), 60 + static_cast<uint64_t>(i), static_cast<int32_t>(c.vocab_size)), other);
    if (i == 1) e.add(7, prompt, rp);
  }
  std::vector<int32_t> seq = prompt;
  std::vector<float> served;
  while (!e.idle())
    for (const EngineEvent& ev : e.step())
      if (ev.id == 7) {
        seq.push_back(ev.out.token);
        served.push_back(ev.out.logprob);
      }
  ASSERT_EQ(served.size(), 24u);
  SequenceScorer scorer(c, *weights, "fp32");
  const std::vector<float> trained = scorer.logprobs({seq});  // value i: log p(seq[i + 1] | seq[..i])
  ASSERT_EQ(trained.size(), seq.size() - 1);
  for (size_t i = 0; i < served.size(); ++i) {
    const float want = trained[prompt.size() - 1 + i];
    EXPECT_EQ(std::bit_cast<uint32_t>(served[i]), std::bit_cast<uint32_t>(want))
        << "token " << i << ": served " << served[i] << ", trainer " << want;
  }
}

INSTANTIATE_TEST_SUITE_P(Presets, EngineLogprobs, ::testing::Values("test-gpt2", "test-llama", "test-moe"),
                         [](const auto& info) {
                           const std::string p = info.param;
                           return p == "test-gpt2" ? std::string("Gpt2") : p == "test-llama" ? std::string("Llama") : std::string("Moe");
                         });

// The harness (serve/invariance.h) on the CPU: dense and MoE models are batch-invariant, trainer =
// sampler, in every check. An MoE trained with a capacity factor is not: the trainer's forward drops
// assignments depending on the other rows of its batch (and on the later positions of its own row),
// while the sampler is dropless, and the harness says so.
TEST(Invariance, TheCpuIsBatchInvariantAndTheHarnessSeesACapacityFactor) {
  InvarianceOptions o;
  o.prompt_len = 12;
  o.new_tokens = 10;
  o.batches = {1, 2, 3, 8};
  for (const char* preset : {"test-gpt2", "test-llama", "test-moe"}) {
    const ModelConfig c = serving_config(preset);
    auto w = random_weights(c, 21);
    const InvarianceReport r = check_invariance(c, *w, o);
    EXPECT_EQ(r.checks.size(), 1u + 3u + 1u + 3u * 2u) << preset;  // vs sampler, 3 batches, padded, 3 x 2 sampler runs
    std::ostringstream table;
    r.print(table);
    EXPECT_TRUE(r.all_equal()) << preset << "\n" << table.str();
    EXPECT_NE(table.str().find("batch-invariant: yes"), std::string::npos);
  }
  ModelConfig c = serving_config("test-moe");
  c.moe.capacity_factor = 0.5f;
  auto w = random_weights(c, 21);
  const InvarianceReport r = check_invariance(c, *w, o);
  std::ostringstream table;
  r.print(table);
  EXPECT_FALSE(r.all_equal()) << table.str();
  EXPECT_NE(table.str().find("batch-invariant: no"), std::string::npos);
  int located = 0;
  for (const InvarianceCheck& ch : r.checks) {
    if (ch.sampler) EXPECT_TRUE(ch.equal()) << ch.what;  // serving is dropless
    if (!ch.sampler && !ch.equal() && ch.what.starts_with("trainer,")) {  // the op that drops is named
      EXPECT_NE(ch.first_op.find("MoE + residual"), std::string::npos) << ch.what << ": " << ch.first_op;
      ++located;
    }
  }
  EXPECT_GT(located, 0) << table.str();
  EXPECT_FALSE(r.checks[0].equal()) << "trainer (with drops) vs sampler (dropless)";
  // --batch-invariant: the same model's trainer runs dropless (model/plan.h plan_moe_config), so every
  // check passes; and the engine's logprobs come from token_logprobs (the loss's row arithmetic)
  InvarianceOptions bi = o;
  bi.batch_invariant = true;
  const InvarianceReport rb = check_invariance(c, *w, bi);
  std::ostringstream table_bi;
  rb.print(table_bi);
  EXPECT_TRUE(rb.all_equal()) << table_bi.str();
  EXPECT_NE(table_bi.str().find("batch-invariant: yes"), std::string::npos);
  ModelConfig bad = serving_config("test-gpt2");
  o.prompt_len = 40;  // + 10 > context 48
  EXPECT_NE(invariance_options_problem(o, bad).find("--prompt-len=40"), std::string::npos);
}

// The trainer-vs-sampler check names the first op whose output differs (serve/invariance.h
// first_op_trainer_vs_sampler): with the same weights every op is bitwise equal at every position on the
// CPU; with one element of layer 1's attention output projection changed on the sampler's side, the
// first differing op is that layer's "output projection + residual", at position 0 (the prefill).
TEST(Invariance, TheTrainerVsSamplerCheckNamesTheFirstDifferingOp) {
  for (const char* preset : {"test-gpt2", "test-moe"}) {
    const ModelConfig c = serving_config(preset);
    auto w = random_weights(c, 21), planted = random_weights(c, 21);
    planted->find("layers.1.attn.proj.weight").f32()[5] += 0.25f;
    // the probe: a 12-token prompt and its greedy continuation (the trainer's sequence)
    std::vector<int32_t> seq;
    for (int i = 0; i < 12; ++i) seq.push_back((7 * i + 3) % static_cast<int>(c.vocab_size));
    {
      Engine e(c, *w, EngineOptions{});
      RequestParams rp;
      rp.sample.temperature = 0;
      rp.max_tokens = 8;
      e.add(0, seq, rp);
      while (!e.idle())
        for (const EngineEvent& ev : e.step()) seq.push_back(ev.out.token);
    }
    ASSERT_EQ(seq.size(), 20u) << preset;
    EXPECT_EQ("", first_op_trainer_vs_sampler(c, *w, *w, seq, 12, "auto", false)) << preset;
    const std::string op = first_op_trainer_vs_sampler(c, *w, *planted, seq, 12, "auto", false);
    EXPECT_TRUE(op.starts_with("layer 1: output projection + residual (position 0)")) << preset << ": " << op;
    const std::string op_bi = first_op_trainer_vs_sampler(c, *planted, *w, seq, 12, "auto", true);
    EXPECT_TRUE(op_bi.starts_with("layer 1: output projection + residual (position 0)")) << preset << ": " << op_bi;
  }
}

// The batch-invariant plan rules (model/plan.h, plan_validate): on the GPU only the bf16 kernels that
// serving runs, with lmforge's flash attention (not cuDNN's); MoE plans run dropless.
TEST(Invariance, BatchInvariantPlansFollowTheirRules) {
  ModelConfig c = serving_config("test-moe");
  c.n_head = c.n_kv_head = 1;  // head size 32: the flash kernels' (the rule checked is the attention's)
  ModelPlan p;
  p.B = 2;
  p.T = 8;
  p.training = false;
  p.batch_invariant = true;
  EXPECT_NO_THROW(plan_validate(c, p));  // the CPU, fp32
  p.device = Device::cuda;
  p.precision = Precision::fp32;
  try {
    plan_validate(c, p);
    ADD_FAILURE() << "fp32 batch-invariant plan on the GPU accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--batch-invariant"), std::string::npos) << e.what();
  }
  p.precision = Precision::bf16;
  p.attention = FlashKernels::cudnn;
  try {
    plan_validate(c, p);
    ADD_FAILURE() << "batch-invariant bf16 plan with cuDNN attention accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--attention=cudnn"), std::string::npos) << e.what();
  }
  ModelConfig capped = c;
  capped.moe.capacity_factor = 1.25f;
  ModelPlan cpu;
  EXPECT_EQ(plan_moe_config(capped, cpu).capacity_factor, 1.25f);
  cpu.batch_invariant = true;
  EXPECT_EQ(plan_moe_config(capped, cpu).capacity_factor, 0.0f);
}

// The head-size rules of GPU plans (plan_validate asks flash_head_size_supported and
// paged_head_size_supported): training at the kernel set's sizes, serving at the paged kernels', a size
// neither runs refused in one line naming d_model/n_head. No GPU needed: the rules are checked on the plan.
TEST(Invariance, GpuPlansRefuseHeadSizesTheirKernelsDoNotRun) {
  ModelConfig c = serving_config("test-llama");
  c.n_kv_head = 1;
  ModelPlan p;
  p.B = 2;
  p.T = 8;
  p.device = Device::cuda;
  p.precision = Precision::bf16;
  p.attention = FlashKernels::lmforge;
  const auto refusal = [&](int64_t hs) -> std::string {
    c.d_model = 2 * static_cast<int>(hs);
    c.n_head = 2;
    try {
      plan_validate(c, p);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  for (const int64_t hs : {32, 64, 80, 96, 112, 128}) EXPECT_EQ("", refusal(hs)) << "training HS=" << hs;
  for (const int64_t hs : {48, 72, 256}) {
    const std::string why = refusal(hs);
    EXPECT_NE(why.find("d_model/n_head = " + std::to_string(hs)), std::string::npos) << why;
    EXPECT_NE(why.find("lmforge flash attention kernels"), std::string::npos) << why;
    EXPECT_EQ(why.find('\n'), std::string::npos) << why;
  }
  p.training = false;
  p.serve = true;
  p.B = 1;
  p.samples = 1;
  for (const int64_t hs : {16, 32, 64, 80, 96, 112, 128, 256}) EXPECT_EQ("", refusal(hs)) << "serving HS=" << hs;
  for (const int64_t hs : {48, 72, 200}) {
    const std::string why = refusal(hs);
    EXPECT_NE(why.find("d_model/n_head = " + std::to_string(hs)), std::string::npos) << why;
    EXPECT_NE(why.find("paged attention"), std::string::npos) << why;
  }
  p.batch_invariant = true;  // the flash forward's step: lmforge's sizes
  EXPECT_EQ("", refusal(80));
  const std::string why = refusal(256);
  EXPECT_NE(why.find("--batch-invariant"), std::string::npos) << why;
}

TEST(Engine, SeededSamplesDoNotDependOnTheBatch) {
  const ModelConfig c = serving_config("test-llama");
  auto weights = random_weights(c, 3);
  const std::vector<int32_t> prompt = test::randint(9, 1, static_cast<int32_t>(c.vocab_size));
  RequestParams rp;
  rp.sample = SampleParams{1.0f, 0, 0.95f, 0, 1234, 0};
  rp.max_tokens = 20;
  EngineOptions o;
  o.max_seqs = 8;
  o.max_prefill_tokens = 16;
  Engine alone(c, *weights, o);
  alone.add(7, prompt, rp);
  const auto a = drain(alone);
  Engine busy(c, *weights, o);
  for (int i = 0; i < 6; ++i) {
    RequestParams other = rp;
    other.sample.seed = 99 + static_cast<uint64_t>(i);
    busy.add(100 + i, test::randint(static_cast<size_t>(3 + 4 * i), 50 + static_cast<uint64_t>(i), static_cast<int32_t>(c.vocab_size)), other);
    if (i == 2) busy.add(7, prompt, rp);
  }
  const auto b = drain(busy);
  EXPECT_EQ(a.at(7), b.at(7));
  EXPECT_EQ(a.at(7).size(), 20u);
}

// Serving is dropless: an MoE model trained with a capacity factor serves a request the same tokens
// and log-probabilities alone and among others (with the capacity, a busy batch would drop some of its
// assignments, and which depends on the other rows).
TEST(Engine, MoeWithACapacityFactorServesTheSameTokensInAnyBatch) {
  ModelConfig c = serving_config("test-moe");
  c.moe.capacity_factor = 0.5f;
  auto weights = random_weights(c, 5);
  const std::vector<int32_t> prompt = test::randint(11, 2, static_cast<int32_t>(c.vocab_size));
  RequestParams rp;
  rp.sample.temperature = 0;
  rp.max_tokens = 16;
  EngineOptions o;
  o.max_seqs = 8;
  o.max_prefill_tokens = 32;
  auto run = [&](Engine& e) {
    std::vector<std::pair<int32_t, float>> out;
    while (!e.idle())
      for (const EngineEvent& ev : e.step())
        if (ev.id == 7) out.emplace_back(ev.out.token, ev.out.logprob);
    return out;
  };
  Engine alone(c, *weights, o);
  alone.add(7, prompt, rp);
  const auto a = run(alone);
  Engine busy(c, *weights, o);
  for (int i = 0; i < 7; ++i) {
    busy.add(100 + i, test::randint(static_cast<size_t>(5 + 3 * i), 70 + static_cast<uint64_t>(i), static_cast<int32_t>(c.vocab_size)), rp);
    if (i == 3) busy.add(7, prompt, rp);
  }
  const auto b = run(busy);
  ASSERT_EQ(a.size(), 16u);
  ASSERT_EQ(b.size(), 16u);
  // CPU GEMMs are not batch-invariant in the last bits (that is --batch-invariant's job); a dropped
  // expert assignment moves a log-probability by far more than that
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].first, b[i].first) << "token " << i;
    EXPECT_NEAR(a[i].second, b[i].second, 1e-5) << "token " << i;
  }
}

TEST(Engine, StopTokensAndRefusals) {
  const ModelConfig c = serving_config("test-gpt2");
  auto weights = random_weights(c, 8);
  Engine e(c, *weights, EngineOptions{});
  const std::vector<int32_t> prompt{1, 2, 3};
  RequestParams rp;
  rp.sample.temperature = 0;
  rp.max_tokens = 10;
  const std::vector<int32_t> greedy = greedy_reference(c, *weights, prompt, 10);
  rp.stop_tokens = {greedy[3]};
  e.add(1, prompt, rp);
  std::vector<EngineEvent> events;
  while (!e.idle())
    for (const EngineEvent& ev : e.step()) events.push_back(ev);
  const size_t first = static_cast<size_t>(std::find(greedy.begin(), greedy.end(), greedy[3]) - greedy.begin());
  ASSERT_EQ(events.size(), first + 1);
  EXPECT_EQ(events.back().finish, FinishReason::stop);
  for (size_t i = 0; i + 1 < events.size(); ++i) EXPECT_EQ(events[i].finish, FinishReason::none);

  RequestParams ok;
  EXPECT_NE(e.problem({}, ok).find("empty"), std::string::npos);
  EXPECT_NE(e.problem({1, 61}, ok).find("vocabulary"), std::string::npos);
  RequestParams big;
  big.max_tokens = 46;
  EXPECT_NE(e.problem({1, 2, 3}, big).find("context length"), std::string::npos);
  RequestParams zero;
  zero.max_tokens = 0;
  EXPECT_NE(e.problem({1}, zero).find("max_tokens"), std::string::npos);
  RequestParams temp;
  temp.sample.temperature = -1;
  EXPECT_NE(e.problem({1}, temp).find("temperature"), std::string::npos);
  EXPECT_THROW(e.add(2, {}, ok), Error);
  EXPECT_TRUE(e.idle());
}

}  // namespace
}  // namespace lmf
