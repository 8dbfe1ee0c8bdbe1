#include "serve/engine.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/bf16.h"
#include "core/device.h"
#include "core/profiler.h"
#include "model/token_ends.h"
#include "ops/cross_entropy.h"

namespace lmf {

namespace {
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
constexpr double kAutoGpuFraction = 0.85;  // of the memory free after the models are planned

// Every i32 field of a step's batch lives in one tensor, so a GPU step uploads it with one copy.
struct BatchLayout {
  int64_t params, tokens, positions, slots, seqs, tables, samples, total;
  BatchLayout(int64_t rows, int64_t seqs_max, int64_t blocks_max) {
    params = 0;  // first: SampleParams hold 64-bit fields
    tokens = params + seqs_max * kSampleParamWords;
    positions = tokens + rows;
    slots = positions + rows;
    seqs = slots + rows;
    tables = seqs + rows;
    samples = tables + seqs_max * blocks_max;
    total = samples + seqs_max;
  }
};

Tensor sub(const Tensor& flat, int64_t offset, std::initializer_list<int64_t> shape, const char* name) {
  Tensor t(static_cast<int32_t*>(flat.data) + offset, DType::i32, shape, name, flat.device);
  return t;
}
}  // namespace

std::string engine_options_problem(const EngineOptions& o) {
  if (o.max_seqs < 1 || o.max_seqs > 65536) return "--max-seqs=" + std::to_string(o.max_seqs) + " must be in [1, 65536]";
  if (o.max_prefill_tokens < 1 || o.max_prefill_tokens > (1 << 20))
    return "--max-prefill-tokens=" + std::to_string(o.max_prefill_tokens) + " must be in [1, 1048576]";
  if (o.block_size < 1 || o.block_size > 1024) return "--block-size=" + std::to_string(o.block_size) + " must be in [1, 1024]";
  if (!(o.kv_cache_gb >= 0) || !std::isfinite(o.kv_cache_gb))
    return "--kv-cache-gb=" + std::to_string(o.kv_cache_gb) + " must be >= 0 (0: auto)";
  if (o.max_top_logprobs < 0 || o.max_top_logprobs > 1024) return "max_top_logprobs must be in [0, 1024]";
  return "";
}

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::length: return "length";
    case FinishReason::stop: return "stop";
    case FinishReason::none: break;
  }
  return "";
}

Engine::Engine(const ModelConfig& c, Parameters& params, const EngineOptions& o)
    : cfg_(c), opt_(o), params_(params), device_(params.device()) {
  const std::string problem = engine_options_problem(o);
  if (!problem.empty()) fail(problem);
  cfg_.validate("model config");
  if (cfg_.family != ModelFamily::text)
    fail("the serving engine runs language models; this is a timeseries model (lmforge forecast runs it)");
  max_rows_ = o.max_prefill_tokens + o.max_seqs;
  max_blocks_ = (cfg_.context_length + o.block_size - 1) / o.block_size;
  width_ = device_ == Device::cpu ? cfg_.vocab_size : cfg_.padded_vocab();
  plan_buckets();

  // The batch (filled on the host each step; on the GPU uploaded in one copy), the logits and the
  // sampler's outputs (on the GPU: device buffers, read back after the step).
  const BatchLayout L(max_rows_, o.max_seqs, max_blocks_);
  const int64_t S = o.max_seqs, top = std::max<int64_t>(o.max_top_logprobs, 1);
  const bool gpu = device_ == Device::cuda;
  std::vector<TensorSpec> outs = {{"next", {S}, DType::i32},
                                  {"logprobs", {S}},
                                  {"top_ids", {S, top}, DType::i32},
                                  {"top_logprobs", {S, top}}};
  std::vector<TensorSpec> hs = outs;
  hs.push_back({"batch", {L.total}, DType::i32});
  if (!gpu) {
    hs.push_back({"logits", {S, width_}});
    hs.push_back({"order", {S, cfg_.vocab_size}, DType::i32});
  }
  host_ = Arena("serve host", hs, Device::cpu, /*pinned=*/gpu);  // page-locked on the GPU: async copies
  const Tensor hb = host_.get("batch");
  h_params_ = sub(hb, L.params, {S, kSampleParamWords}, "sample_params");
  h_tokens_ = sub(hb, L.tokens, {1, max_rows_}, "tokens");
  h_positions_ = sub(hb, L.positions, {max_rows_}, "positions");
  h_slots_ = sub(hb, L.slots, {max_rows_}, "slots");
  h_seqs_ = sub(hb, L.seqs, {max_rows_}, "seqs");
  h_tables_ = sub(hb, L.tables, {S, max_blocks_}, "block_tables");
  h_samples_ = sub(hb, L.samples, {S}, "sample_rows");
  Arena* out = &host_;
  if (gpu) {
    std::vector<TensorSpec> ds = outs;
    ds.push_back({"batch", {L.total}, DType::i32});
    ds.push_back({"logits", {S, width_}, DType::bf16});
    dev_ = Arena("serve device", ds, device_);
    out = &dev_;
    // the sampler's outputs lead both arenas in the same order, so one copy brings them all back
    outputs_bytes_ = dev_.offset_bytes(static_cast<size_t>(dev_.find("batch")));
    LMF_CHECK(outputs_bytes_ == host_.offset_bytes(static_cast<size_t>(host_.find("batch"))),
              "engine: the host and device output layouts differ");
  }
  const Tensor db = out->get("batch"), logits = out->get("logits");
  for (Bucket& b : buckets_) {
    const int64_t T = b.model->plan().T, M = b.model->plan().samples;
    b.batch.tokens = sub(db, L.tokens, {1, T}, "tokens");
    b.batch.positions = sub(db, L.positions, {T}, "positions");
    b.batch.slots = sub(db, L.slots, {T}, "slots");
    b.batch.seqs = sub(db, L.seqs, {T}, "seqs");
    b.batch.block_tables = sub(db, L.tables, {S, max_blocks_}, "block_tables");
    b.batch.sample_rows = sub(db, L.samples, {M}, "sample_rows");
    b.params = sub(db, L.params, {M, kSampleParamWords}, "sample_params");
    b.logits = logits.rows(0, M);
    b.next = out->get("next").rows(0, M);
    b.logprobs = out->get("logprobs").rows(0, M);
    b.top_ids = out->get("top_ids").rows(0, M);
    b.top_logprobs = out->get("top_logprobs").rows(0, M);
    if (!gpu) b.order = host_.get("order").rows(0, M);
  }

  // the KV cache: --kv-cache-gb, or auto: every sequence at full context on the CPU, a fraction of the
  // free memory on the GPU
  const size_t block_bytes = KvCache::block_bytes(cfg_, o.block_size, device_);
  int64_t blocks = 0;
  if (o.kv_cache_gb > 0) {
    const double want = o.kv_cache_gb * kGiB / static_cast<double>(block_bytes);
    blocks = want >= static_cast<double>(INT32_MAX) ? INT32_MAX : static_cast<int64_t>(want);  // no UB cast
    if (blocks < 1)
      fail("--kv-cache-gb=", o.kv_cache_gb, " holds no KV block (one block of ", o.block_size, " positions takes ",
           block_bytes, " bytes)");
  } else if (device_ == Device::cpu) {
    blocks = o.max_seqs * max_blocks_;
  } else {
    blocks = static_cast<int64_t>(kAutoGpuFraction * static_cast<double>(cuda_memory_free_bytes()) /
                                  static_cast<double>(block_bytes));
    if (blocks < max_blocks_)
      fail("the GPU has too little free memory for a KV cache of one full sequence (", max_blocks_, " blocks of ",
           block_bytes, " bytes); lower --max-prefill-tokens or --max-seqs");
  }
  blocks = std::min<int64_t>(blocks, INT32_MAX / std::max<int64_t>(o.block_size, 1));
  cache_ = std::make_unique<KvCache>(cfg_, blocks, o.block_size, device_);
  pool_ = std::make_unique<BlockPool>(static_cast<int32_t>(blocks), o.block_size);
  sched_ = std::make_unique<Scheduler>(SchedulerLimits{o.max_seqs, o.max_prefill_tokens, cfg_.context_length}, *pool_);
  if (gpu && o.cuda_graphs) capture_graphs();
}

Engine::~Engine() {
  for (Bucket& b : buckets_)
    if (b.graph) cuda_graph_destroy(b.graph);
}

// The step of bucket b on the batch as it stands: the model, then the sampler (top log-probabilities
// for every row when the engine offers them: a captured graph cannot depend on the requests).
void Engine::run_bucket(Bucket& b, bool top) {
  b.model->forward_paged(b.logits, b.batch, *cache_);
  ProfileScope scope(prof_, "sample tokens");
  sample_tokens(b.next, b.logprobs, top ? b.top_ids : Tensor(), top ? b.top_logprobs : Tensor(), b.logits, b.params,
                cfg_.vocab_size, b.order);
  // batch-invariant: the sampled tokens' logprobs as the trainer's loss computes them (the sampler's own
  // reduction is batch-invariant too, but a different one: its top-N logprobs keep it)
  if (opt_.batch_invariant) token_logprobs(b.logprobs, b.logits, b.next, cfg_.vocab_size);
}

// CUDA graphs, one per bucket, captured at start: each bucket runs once eagerly on an all-padding batch
// (the libraries build their plans; padding rows write nothing), then is captured.
void Engine::capture_graphs() {
  const bool top = opt_.max_top_logprobs > 0;
  for (Bucket& b : buckets_) {
    pad(b, 0, 0);
    for (int64_t m = 0; m < b.model->plan().samples; ++m) set_params(m, SampleParams{});
    tensor_from_host(dev_.get("batch"), host_.get("batch").data);
    run_bucket(b, top);
    device_synchronize();
    cuda_capture_begin();
    run_bucket(b, top);
    b.graph = cuda_capture_end();
  }
}

// Buckets: 1, 2, 4, ... up to max_seqs (decode steps), then doubling up to max_rows (prefill).
void Engine::plan_buckets() {
  std::vector<int64_t> sizes;
  for (int64_t r = 1; r < opt_.max_seqs; r *= 2) sizes.push_back(r);
  sizes.push_back(opt_.max_seqs);
  for (int64_t r = 2 * sizes.back(); r < max_rows_; r *= 2) sizes.push_back(r);
  if (sizes.back() < max_rows_) sizes.push_back(max_rows_);
  for (int64_t T : sizes) {
    ModelPlan p;
    p.B = 1;
    p.T = T;
    p.training = false;
    p.device = device_;
    p.precision = device_ == Device::cuda ? Precision::bf16 : Precision::fp32;
    p.attention = FlashKernels::lmforge;
    p.serve = true;
    p.samples = std::min<int64_t>(T, opt_.max_seqs);
    p.batch_invariant = opt_.batch_invariant;
    Bucket b;
    b.model = std::make_unique<Model>(cfg_, p, params_, nullptr, std::make_unique<TokenEnds>(cfg_));
    buckets_.push_back(std::move(b));
  }
}

void Engine::set_activation_tap(ActivationTap f) {
  tapped_ = static_cast<bool>(f);
  for (Bucket& b : buckets_) b.model->set_activation_tap(f);
}

void Engine::set_profiler(OpProfiler* p) {
  prof_ = p;
  for (Bucket& b : buckets_) b.model->set_profiler(p);
}

std::vector<int64_t> Engine::buckets() const {
  std::vector<int64_t> out;
  for (const Bucket& b : buckets_) out.push_back(b.model->plan().T);
  return out;
}

std::string Engine::problem(const std::vector<int32_t>& prompt, const RequestParams& rp) const {
  if (prompt.empty()) return "the prompt is empty";
  for (size_t i = 0; i < prompt.size(); ++i)
    if (prompt[i] < 0 || prompt[i] >= cfg_.vocab_size)
      return "prompt token " + std::to_string(i) + " is " + std::to_string(prompt[i]) + ", outside the vocabulary [0, " +
             std::to_string(cfg_.vocab_size) + ")";
  if (rp.max_tokens < 1) return "max_tokens=" + std::to_string(rp.max_tokens) + " must be >= 1";
  const int64_t n = static_cast<int64_t>(prompt.size());
  if (rp.max_tokens > cfg_.context_length - n)  // not n + max_tokens: max_tokens may be near 2^63
    return "the prompt (" + std::to_string(n) + " tokens) plus max_tokens (" + std::to_string(rp.max_tokens) +
           ") exceeds the model's context length of " + std::to_string(cfg_.context_length);
  if (pool_->blocks_for(n + rp.max_tokens) > pool_->total())
    return std::to_string(n + rp.max_tokens) + " positions need " + std::to_string(pool_->blocks_for(n + rp.max_tokens)) +
           " KV blocks; the cache has " + std::to_string(pool_->total()) + " (raise --kv-cache-gb)";
  const std::string sp = sample_params_problem(rp.sample);
  if (!sp.empty()) return sp;
  if (rp.top_logprobs < 0 || rp.top_logprobs > opt_.max_top_logprobs)
    return "logprobs=" + std::to_string(rp.top_logprobs) + " must be in [0, " + std::to_string(opt_.max_top_logprobs) + "]";
  for (int32_t t : rp.stop_tokens)
    if (t < 0 || t >= cfg_.vocab_size) return "stop token " + std::to_string(t) + " is outside the vocabulary";
  return "";
}

void Engine::add(int64_t id, std::vector<int32_t> prompt, const RequestParams& rp) {
  const std::string p = problem(prompt, rp);
  if (!p.empty()) fail("request ", id, ": ", p);
  if (seqs_.count(id)) fail("request ", id, " is already in the engine");
  sched_->add(id, static_cast<int64_t>(prompt.size()), rp.max_tokens);
  Seq s;
  s.prompt = static_cast<int64_t>(prompt.size());
  s.tokens = std::move(prompt);
  s.tokens.reserve(static_cast<size_t>(s.prompt + rp.max_tokens));
  s.rp = rp;
  seqs_.emplace(id, std::move(s));
  stats_.prompt_tokens += static_cast<int64_t>(seqs_.at(id).prompt);
}

void Engine::cancel(int64_t id) {
  sched_->cancel(id);
  seqs_.erase(id);
}

EngineStats Engine::stats() const {
  EngineStats s = stats_;
  s.running = sched_->running();
  s.waiting = sched_->waiting();
  s.blocks_total = pool_->total();
  s.blocks_free = pool_->free_blocks();
  return s;
}

// The rows of `plan` into the host batch: each work item's positions, then its sampled row.
int64_t Engine::layout(const StepPlan& plan, std::vector<int64_t>& sample_ids) {
  int32_t *tok = h_tokens_.i32(), *pos = h_positions_.i32(), *slot = h_slots_.i32(), *seq = h_seqs_.i32();
  int32_t *tab = h_tables_.i32(), *smp = h_samples_.i32();
  const int64_t bs = opt_.block_size;
  int64_t n = 0;
  for (size_t j = 0; j < plan.work.size(); ++j) {
    const SeqWork& w = plan.work[j];
    const Seq& s = seqs_.at(w.id);
    const std::vector<int32_t>& table = sched_->block_table(w.id);
    std::fill(tab + j * max_blocks_, tab + (j + 1) * max_blocks_, 0);
    std::copy(table.begin(), table.end(), tab + j * max_blocks_);
    for (int64_t p = w.start; p < w.start + w.count; ++p, ++n) {
      tok[n] = s.tokens[static_cast<size_t>(p)];
      pos[n] = static_cast<int32_t>(p);
      slot[n] = static_cast<int32_t>(table[static_cast<size_t>(p / bs)] * bs + p % bs);
      seq[n] = static_cast<int32_t>(j);
    }
    if (w.samples) {
      smp[sample_ids.size()] = static_cast<int32_t>(n - 1);
      sample_ids.push_back(w.id);
    }
  }
  return n;
}

void Engine::set_params(int64_t m, const SampleParams& p) {
  std::memcpy(h_params_.i32() + m * kSampleParamWords, &p, sizeof(SampleParams));
}

Engine::Bucket& Engine::bucket_for(int64_t rows) {
  for (Bucket& b : buckets_)
    if (b.model->plan().T >= rows) return b;
  fail("engine: a step of ", rows, " rows exceeds the largest bucket of ", max_rows_);
}

// Padding rows compute nothing that is kept; padding samples read row 0 with greedy parameters.
void Engine::pad(const Bucket& b, int64_t rows, int64_t samples) {
  const int64_t T = b.model->plan().T, M = b.model->plan().samples;
  for (int64_t r = rows; r < T; ++r) {
    h_tokens_.i32()[r] = 0;
    h_positions_.i32()[r] = 0;
    h_slots_.i32()[r] = -1;
    h_seqs_.i32()[r] = -1;
  }
  for (int64_t m = samples; m < M; ++m) {
    h_samples_.i32()[m] = 0;
    set_params(m, SampleParams{0.0f, 0, 1.0f, 0, 0, 0});
  }
}

std::vector<EngineEvent> Engine::step() {
  const StepPlan plan = sched_->schedule();
  stats_.preemptions += static_cast<int64_t>(plan.preempted.size());
  if (plan.empty()) return {};
  std::vector<int64_t> ids;
  const int64_t rows = layout(plan, ids);
  Bucket& b = bucket_for(rows);
  const int64_t M = static_cast<int64_t>(ids.size());
  bool top = false;
  for (int64_t m = 0; m < M; ++m) {
    const Seq& s = seqs_.at(ids[static_cast<size_t>(m)]);
    SampleParams p = s.rp.sample;
    p.index = s.tokens.size();  // the new token's position
    set_params(m, p);
    top = top || s.rp.top_logprobs > 0;
  }
  pad(b, rows, M);
  if (device_ == Device::cuda) {
    // one stream-ordered upload from pinned memory, the step, one readback; the only host wait is the
    // one for the sampled tokens, which the next step's schedule needs
    {
      ProfileScope scope(prof_, "batch upload");
      const Tensor hb = host_.get("batch");
      copy_to_device_async(dev_.get("batch").data, hb.data, hb.nbytes());
    }
    if (b.graph && !prof_ && !tapped_) cuda_graph_replay(b.graph);
    else run_bucket(b, opt_.max_top_logprobs > 0);
    copy_to_host_async(host_.base(), dev_.base(), outputs_bytes_);
    device_synchronize();
  } else {
    run_bucket(b, top);
  }
  ++stats_.steps;
  std::vector<EngineEvent> events;
  if (M == 0) {
    sched_->complete(plan);
    return events;
  }
  const Tensor next = host_.get("next"), logprobs = host_.get("logprobs"), top_ids = host_.get("top_ids"),
               top_lps = host_.get("top_logprobs");

  std::vector<int64_t> stopped;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t id = ids[static_cast<size_t>(m)];
    Seq& s = seqs_.at(id);
    EngineEvent e;
    e.id = id;
    e.out.token = next.i32()[m];
    e.out.logprob = logprobs.f32()[m];
    for (int64_t j = 0; j < s.rp.top_logprobs; ++j)
      e.out.top.emplace_back(top_ids.i32()[m * top_ids.dim(1) + j], top_lps.f32()[m * top_lps.dim(1) + j]);
    s.tokens.push_back(e.out.token);
    ++stats_.generated_tokens;
    if (std::find(s.rp.stop_tokens.begin(), s.rp.stop_tokens.end(), e.out.token) != s.rp.stop_tokens.end()) {
      stopped.push_back(id);
      e.finish = FinishReason::stop;
    }
    events.push_back(std::move(e));
  }
  sched_->complete(plan, stopped);
  for (EngineEvent& e : events) {
    if (sched_->has(e.id)) continue;
    if (e.finish == FinishReason::none) e.finish = FinishReason::length;
    seqs_.erase(e.id);
  }
  return events;
}

}  // namespace lmf
