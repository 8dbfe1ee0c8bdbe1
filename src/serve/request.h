// request.h: the body of a POST /v1/completions or /v1/chat/completions request -> what the engine
// runs (docs/SERVING.md).
//
// No network here: the HTTP server (serve/server.cpp) hands the body to parse_completion() and sends
// back the HttpError it throws as OpenAI's error object; the request fuzz target (fuzz/) calls it
// directly. The body goes through json_parse (core/json_util.h: nesting depth bounded); every field
// is type- and range-checked (integers that fit, finite numbers), and the engine's own admission
// check (`problem`: prompt + max_tokens within the context and the KV cache, sampling values) runs last.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "data/tokenizer.h"
#include "serve/chat_template.h"
#include "serve/engine.h"

namespace lmf {

// A request the server refuses: HTTP status, OpenAI's error object.
struct HttpError {
  int status;
  std::string message, param, type;
};
HttpError bad_request(std::string message, std::string param = "");

// A valid request.
struct Completion {
  std::vector<int32_t> prompt;
  std::string prompt_text;  // for echo
  RequestParams rp;
  std::vector<std::string> stops;
  bool stream = false, echo = false;
  int64_t logprobs = -1;  // -1: none; else the top-N count (0: just the chosen token's)
  bool chat = false;      // a chat completion: the prompt is the rendered conversation
};

// What a request is checked against: the served model's name and vocabulary, the engine's limit on
// top log-probabilities, and the engine's admission check (Engine::problem: "" when it can run).
struct CompletionLimits {
  std::string model_name;
  int64_t vocab_size = 0;
  int64_t max_top_logprobs = 0;
  std::function<std::string(const std::vector<int32_t>& prompt, const RequestParams& rp)> problem;
};

// Throws HttpError (status 400, the offending field in `param`) for anything it does not accept.
Completion parse_completion(std::string_view body, const CompletionLimits& limits, const Tokenizer& tok);
// A chat completion: `messages` ({role, content} objects; content a string or a list of text parts)
// rendered through the model's chat template with the generation prompt, then encoded as the prompt.
// OpenAI's chat fields: `logprobs` is a boolean and `top_logprobs` the count; `max_completion_tokens`
// is `max_tokens`. A conversation the template refuses (raise_exception) is a 400 with its message.
Completion parse_chat_completion(std::string_view body, const CompletionLimits& limits, const Tokenizer& tok,
                                 const ChatTemplate& chat_template);

}  // namespace lmf
