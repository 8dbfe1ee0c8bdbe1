// offline.h: many prompts through the serving engine at once, without a server (the Python package's
// Model.generate). Continuous batching does the rest: every request is added up front, the engine
// steps until all have finished, and each one's text is cut at its first stop string as the server
// cuts it (serve/text_stream.h).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "serve/engine.h"

namespace lmf {

struct OfflineRequest {
  std::vector<int32_t> prompt;
  RequestParams params;            // sampling, max_tokens, stop tokens, top logprobs
  std::vector<std::string> stops;  // stop strings (non-empty): the text ends before the first one
};

struct OfflineResult {
  std::vector<int32_t> tokens;  // generated, the one that ended it included
  std::vector<float> logprobs;  // of each generated token
  std::vector<std::vector<std::pair<int32_t, float>>> top;  // top-N per token (params.top_logprobs)
  std::string text;             // the generated text, cut at a stop string
  std::string finish_reason;    // "stop" (a stop token or string) or "length"
};

// "" when every request can run, else one line naming the first that can't (its index) and why.
std::string offline_problem(const Engine& engine, const std::vector<OfflineRequest>& requests);
// Runs every request to its end; results in request order. `interrupted` (optional) is asked between
// engine steps: when it returns true the live requests are cancelled and lmf::Error("interrupted") is
// thrown. Throws offline_problem()'s line before any work.
std::vector<OfflineResult> generate_offline(Engine& engine, const Tokenizer& tok, const std::vector<OfflineRequest>& requests,
                                            const std::function<bool()>& interrupted = {});

}  // namespace lmf
