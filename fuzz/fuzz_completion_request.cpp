// Fuzz target: a POST /v1/completions body (parse_completion, serve/request.h) against a real CPU
// engine's limits and admission check (the test-gpt2 preset, byte tokenizer), and the same bytes as a
// /v1/chat/completions body (parse_chat_completion, through a ChatML template). Refusals must be
// HttpError 400 with a message; an accepted request is one the engine can run.
#include <cstddef>
#include <cstdint>
#include <string>

#include "data/tokenizer.h"
#include "fuzz_util.h"
#include "model/gpt.h"
#include "serve/chat_template.h"
#include "serve/engine.h"
#include "serve/request.h"

using namespace lmf;

namespace {
ModelConfig served_config() {
  ModelConfig c = config_preset("test-gpt2");
  c.vocab_size = 256;  // the byte tokenizer's
  c.context_length = 64;
  return c;
}

struct Served {
  ModelConfig cfg = served_config();
  Parameters params{gpt_param_specs(cfg), Device::cpu, false};
  EngineOptions opt = [] {
    EngineOptions o;
    o.max_seqs = 2;
    o.max_prefill_tokens = 16;
    return o;
  }();
  Engine engine{cfg, params, opt};
  ByteTokenizer tok;
  ChatTemplate chatml{"{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"};
  CompletionLimits limits{"lmforge", cfg.vocab_size, opt.max_top_logprobs,
                          [this](const std::vector<int32_t>& p, const RequestParams& rp) { return engine.problem(p, rp); }};
};
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Served s;
  const std::string_view body(reinterpret_cast<const char*>(data), size);
  for (const bool chat : {false, true}) {
    try {
      const Completion c = chat ? parse_chat_completion(body, s.limits, s.tok, s.chatml) : parse_completion(body, s.limits, s.tok);
      fuzz::fuzz_check(c.chat == chat, "the completion says which endpoint it came from");
      fuzz::fuzz_check(s.engine.problem(c.prompt, c.rp).empty(), "an accepted request is one the engine can run");
      fuzz::fuzz_check(c.stops.size() <= 4, "at most 4 stop strings");
      fuzz::fuzz_check(c.logprobs <= s.opt.max_top_logprobs, "logprobs within the engine's limit");
    } catch (const HttpError& e) {
      fuzz::fuzz_check(e.status == 400 && !e.message.empty(), "a refusal is a 400 with a message");
    } catch (const Error& e) {
      fuzz::fuzz_abort("lmf::Error escaped the request parser (should be HttpError)", e.what());
    }
  }
  return 0;
}
