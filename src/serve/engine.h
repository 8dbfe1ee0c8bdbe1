// engine.h: serving's engine (docs/SERVING.md): continuous batching over a paged KV cache.
//
// Each step() asks the scheduler (serve/scheduler.h) which positions to compute -- every running
// sequence's next position, prompt chunks within --max-prefill-tokens --, lays them out as the rows of
// one batch (model/kv_cache.h PagedBatch), runs the model planned for the smallest row bucket that
// holds them (buckets 1, 2, 4, ... up to --max-seqs, then up to the prefill budget; padding rows do
// nothing), samples one token for each sequence whose known tokens are all cached (ops/sampling.h,
// per-request seed and position), and retires sequences that finished. Every bucket's model shares
// the one set of weights and the one KV cache. Single-threaded: serve/server.h runs it on its own thread.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "model/kv_cache.h"
#include "model/model.h"
#include "model/params.h"
#include "ops/sampling.h"
#include "serve/block_pool.h"
#include "serve/scheduler.h"

namespace lmf {

struct EngineOptions {
  int32_t max_seqs = 32;             // --max-seqs: sequences decoding at once
  int64_t max_prefill_tokens = 512;  // --max-prefill-tokens: prompt positions per step
  int32_t block_size = 16;           // --block-size: positions per KV block
  double kv_cache_gb = 0;            // --kv-cache-gb: the pool's size; 0: auto (see engine.cpp)
  int64_t max_top_logprobs = 5;      // the most top log-probabilities a request may ask for
  bool cuda_graphs = true;           // --cuda-graphs: each bucket's step (model + sampler) as one CUDA graph
  // --batch-invariant (docs/BATCH_INVARIANCE.md): batch-invariant plans (model/plan.h), and each sampled
  // token's logprob computed by the training loss's row kernels (token_logprobs), so it is bitwise the
  // trainer's for the same sequence.
  bool batch_invariant = false;
};
// One line naming the flag when an option is out of range ("" when fine).
std::string engine_options_problem(const EngineOptions& o);

struct RequestParams {
  SampleParams sample;               // temperature, top_k, top_p, seed (index is the engine's)
  int64_t max_tokens = 16;
  std::vector<int32_t> stop_tokens;  // generation stops after producing one of these (it is kept)
  int64_t top_logprobs = 0;          // top-N log-probabilities per token (0: none)
};

enum class FinishReason { none, length, stop };
const char* finish_reason_name(FinishReason r);  // "", "length", "stop"

struct TokenOut {
  int32_t token = 0;
  float logprob = 0;
  std::vector<std::pair<int32_t, float>> top;  // (token, logprob), best first
};

struct EngineEvent {
  int64_t id = 0;
  TokenOut out;                     // the token generated this step
  FinishReason finish = FinishReason::none;
};

struct EngineStats {
  size_t running = 0, waiting = 0;
  int32_t blocks_total = 0, blocks_free = 0;
  int64_t steps = 0, prompt_tokens = 0, generated_tokens = 0, preemptions = 0;
};

class Engine {
 public:
  // params: the model's weights on the plan's device (fp32 on the CPU; with a bf16 copy on the GPU).
  Engine(const ModelConfig& c, Parameters& params, const EngineOptions& o);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // "" when the request can run, else one line saying why not (empty prompt, a token outside the
  // vocabulary, prompt + max_tokens beyond the context, bad sampling values, ...).
  std::string problem(const std::vector<int32_t>& prompt, const RequestParams& rp) const;
  // Queues a request (ids are the caller's, unique among live requests); throws problem()'s line.
  void add(int64_t id, std::vector<int32_t> prompt, const RequestParams& rp);
  // Drops a request wherever it is (a client went away); unknown ids are ignored.
  void cancel(int64_t id);
  // One engine iteration; the tokens it generated, in the requests' arrival order.
  std::vector<EngineEvent> step();
  bool idle() const { return seqs_.empty(); }
  EngineStats stats() const;

  const ModelConfig& config() const { return cfg_; }
  const EngineOptions& options() const { return opt_; }
  int64_t kv_blocks() const { return cache_->num_blocks(); }
  std::vector<int64_t> buckets() const;  // rows of each planned model
  // Attach an op profiler (nullptr detaches) to every bucket's model: while attached, steps run eagerly
  // (a graph replay has no per-op scopes) and each op, the batch upload and the sampler are timed.
  void set_profiler(OpProfiler* p);
  // Every step's activations, op by op, to `f` (model/block.h ActivationTap; empty: none), from every
  // bucket's model: the tensors hold the step's rows (padding rows too); while a tap is set, steps run
  // eagerly. During the callback step_positions() / step_seqs() / step_tokens() give each row's position,
  // batch sequence (-1: padding) and input token (the check-invariance harness, serve/invariance.h).
  void set_activation_tap(ActivationTap f);
  const int32_t* step_positions() const { return h_positions_.i32(); }
  const int32_t* step_seqs() const { return h_seqs_.i32(); }
  const int32_t* step_tokens() const { return h_tokens_.i32(); }

 private:
  struct Seq {
    std::vector<int32_t> tokens;  // prompt, then generated
    int64_t prompt = 0;
    RequestParams rp;
  };
  // A row bucket: the model planned for T rows and `samples` sampled rows, and views of the step's
  // buffers at that size (on the plan's device).
  struct Bucket {
    std::unique_ptr<Model> model;
    PagedBatch batch;
    Tensor params, logits, next, logprobs, top_ids, top_logprobs, order;
    void* graph = nullptr;  // the captured step (GPU, --cuda-graphs)
  };
  void plan_buckets();
  void capture_graphs();
  void run_bucket(Bucket& b, bool top);
  Bucket& bucket_for(int64_t rows);
  int64_t layout(const StepPlan& plan, std::vector<int64_t>& sample_ids);  // fills the host batch; rows
  void pad(const Bucket& b, int64_t rows, int64_t samples);
  void set_params(int64_t m, const SampleParams& p);

  ModelConfig cfg_;
  EngineOptions opt_;
  Parameters& params_;
  Device device_;
  int64_t max_rows_ = 0, max_blocks_ = 0, width_ = 0;
  std::unique_ptr<KvCache> cache_;
  std::unique_ptr<BlockPool> pool_;
  std::unique_ptr<Scheduler> sched_;
  std::vector<Bucket> buckets_;
  Arena host_, dev_;  // the batch (host, and its device copy on the GPU), logits and sampling buffers
  size_t outputs_bytes_ = 0;  // the sampler's outputs at the start of both arenas (GPU)
  Tensor h_params_, h_tokens_, h_positions_, h_slots_, h_seqs_, h_tables_, h_samples_;
  std::map<int64_t, Seq> seqs_;
  EngineStats stats_;
  OpProfiler* prof_ = nullptr;
  bool tapped_ = false;  // set_activation_tap: steps run eagerly
};

}  // namespace lmf
