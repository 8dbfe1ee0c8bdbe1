// offline.cpp: see offline.h.
#include "serve/offline.h"

#include "core/check.h"
#include "serve/text_stream.h"

namespace lmf {

std::string offline_problem(const Engine& engine, const std::vector<OfflineRequest>& requests) {
  for (size_t i = 0; i < requests.size(); ++i) {
    const OfflineRequest& r = requests[i];
    std::string why = engine.problem(r.prompt, r.params);
    for (const std::string& s : r.stops)
      if (s.empty() && why.empty()) why = "a stop string is empty";
    if (!why.empty()) return requests.size() == 1 ? why : "prompt " + std::to_string(i) + ": " + why;
  }
  return "";
}

std::vector<OfflineResult> generate_offline(Engine& engine, const Tokenizer& tok, const std::vector<OfflineRequest>& requests,
                                            const std::function<bool()>& interrupted) {
  if (const std::string why = offline_problem(engine, requests); !why.empty()) fail(why);
  LMF_CHECK(engine.idle(), "generate_offline: the engine has live requests");
  std::vector<OfflineResult> out(requests.size());
  std::vector<TextStream> streams;
  streams.reserve(requests.size());
  for (const OfflineRequest& r : requests) streams.emplace_back(tok, r.stops);
  for (size_t i = 0; i < requests.size(); ++i)
    engine.add(static_cast<int64_t>(i), requests[i].prompt, requests[i].params);
  while (!engine.idle()) {
    if (interrupted && interrupted()) {
      for (size_t i = 0; i < requests.size(); ++i) engine.cancel(static_cast<int64_t>(i));
      fail("interrupted");
    }
    for (const EngineEvent& e : engine.step()) {
      const size_t i = static_cast<size_t>(e.id);
      OfflineResult& r = out[i];
      if (!r.finish_reason.empty()) continue;  // stopped by a string earlier in this step's events
      r.tokens.push_back(e.out.token);
      r.logprobs.push_back(e.out.logprob);
      if (requests[i].params.top_logprobs > 0) r.top.push_back(e.out.top);
      r.text += streams[i].push(e.out.token);
      if (streams[i].stopped()) {
        r.finish_reason = "stop";
        engine.cancel(e.id);
      } else if (e.finish != FinishReason::none) {
        r.finish_reason = finish_reason_name(e.finish);
        r.text += streams[i].finish();
      }
    }
  }
  return out;
}

}  // namespace lmf
