#include "serve/request.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>

#include "core/check.h"
#include "core/json_util.h"

namespace lmf {

namespace {

using json = nlohmann::json;

const json* field(const json& body, const char* name) {
  auto it = body.find(name);
  return it == body.end() || it->is_null() ? nullptr : &*it;
}

int64_t get_int(const json& body, const char* name, int64_t dflt) {
  const json* v = field(body, name);
  if (!v) return dflt;
  const std::optional<int64_t> i = json_int64(*v);
  if (!i) throw bad_request(std::string("'") + name + "' must be an integer in [-2^63, 2^63)", name);
  return *i;
}

double get_number(const json& body, const char* name, double dflt) {
  const json* v = field(body, name);
  if (!v) return dflt;
  if (!v->is_number()) throw bad_request(std::string("'") + name + "' must be a number", name);
  const double d = v->get<double>();
  if (!std::isfinite(d)) throw bad_request(std::string("'") + name + "' must be finite", name);
  return d;
}

// A number that is finite as a float (1e300 is a finite double; as a float it would be infinite).
float get_float(const json& body, const char* name, float dflt) {
  const double d = get_number(body, name, dflt);
  if (std::abs(d) > static_cast<double>(std::numeric_limits<float>::max()))
    throw bad_request(std::string("'") + name + "' is out of range", name);
  return static_cast<float>(d);
}

bool get_bool(const json& body, const char* name, bool dflt) {
  const json* v = field(body, name);
  if (!v) return dflt;
  if (!v->is_boolean()) throw bad_request(std::string("'") + name + "' must be a boolean", name);
  return v->get<bool>();
}

std::vector<int32_t> token_ids(const json& arr, int64_t vocab) {
  std::vector<int32_t> out;
  for (const json& t : arr) {
    const std::optional<int64_t> v = json_int64(t);
    if (!v) throw bad_request("'prompt' must be a string or an array of token ids", "prompt");
    if (*v < 0 || *v >= vocab)
      throw bad_request("prompt token " + std::to_string(*v) + " is outside the vocabulary [0, " + std::to_string(vocab) + ")",
                        "prompt");
    out.push_back(static_cast<int32_t>(*v));
  }
  return out;
}

}  // namespace

HttpError bad_request(std::string message, std::string param) {
  return {400, std::move(message), std::move(param), "invalid_request_error"};
}

namespace {

json parse_body(std::string_view text) {
  json body;
  try {
    body = json_parse(text, "the request body");
  } catch (const Error& e) {
    throw bad_request(e.what());
  }
  if (!body.is_object()) throw bad_request("the request body must be a JSON object");
  return body;
}

// Unknown fields, the model's name, and what lmforge does not do (n > 1, penalties, logit_bias, ...).
void check_fields(const json& body, std::initializer_list<const char*> known, const std::string& model_name) {
  for (auto it = body.begin(); it != body.end(); ++it)
    if (std::find_if(known.begin(), known.end(), [&](const char* k) { return it.key() == k; }) == known.end())
      throw bad_request("unknown field '" + excerpt(it.key()) + "'", excerpt(it.key()));
  const json* model = field(body, "model");
  if (!model || !model->is_string()) throw bad_request("'model' is required and must be a string", "model");
  if (model->get<std::string>() != model_name)
    throw HttpError{400, "the model '" + excerpt(model->get<std::string>()) + "' does not exist; this server serves '" + model_name + "'",
                    "model", "invalid_request_error"};
  for (const char* unsupported : {"suffix", "logit_bias"})
    if (field(body, unsupported)) throw bad_request(std::string("'") + unsupported + "' is not supported", unsupported);
  for (const char* penalty : {"presence_penalty", "frequency_penalty"})
    if (get_number(body, penalty, 0.0) != 0.0) throw bad_request(std::string("'") + penalty + "' is not supported (only 0)", penalty);
  if (get_int(body, "n", 1) != 1) throw bad_request("'n' must be 1 (one completion per request)", "n");
  if (const json* u = field(body, "user"); u && !u->is_string()) throw bad_request("'user' must be a string", "user");
}

// The fields both endpoints share: sampling, stop strings, streaming; then the checks that need them all.
void parse_options(const json& body, Completion& c, const Tokenizer& tok, int64_t default_max_tokens) {
  c.rp.max_tokens = get_int(body, "max_tokens", default_max_tokens);
  c.rp.stop_tokens = tok.end_tokens();  // a model ends its text with one (finish_reason "stop")
  c.rp.sample.temperature = get_float(body, "temperature", 1.0f);
  c.rp.sample.top_p = get_float(body, "top_p", 1.0f);
  const int64_t top_k = get_int(body, "top_k", 0);
  if (top_k < -1 || top_k > INT32_MAX) throw bad_request("'top_k' must be >= 0 (0 or -1: off)", "top_k");
  c.rp.sample.top_k = static_cast<int32_t>(std::max<int64_t>(top_k, 0));
  if (const json* seed = field(body, "seed")) {
    if (!seed->is_number_integer()) throw bad_request("'seed' must be an integer", "seed");
    c.rp.sample.seed = seed->is_number_unsigned() ? seed->get<uint64_t>() : static_cast<uint64_t>(seed->get<int64_t>());
  } else {
    static std::atomic<uint64_t> unseeded{0x9e3779b97f4a7c15ull};
    c.rp.sample.seed = unseeded.fetch_add(0x9e3779b97f4a7c15ull);
  }
  if (const json* stop = field(body, "stop")) {
    if (stop->is_string()) c.stops.push_back(stop->get<std::string>());
    else if (stop->is_array() && stop->size() <= 4 &&
             std::all_of(stop->begin(), stop->end(), [](const json& s) { return s.is_string(); }))
      for (const json& s : *stop) c.stops.push_back(s.get<std::string>());
    else throw bad_request("'stop' must be a string or an array of at most 4 strings", "stop");
    for (const std::string& s : c.stops)
      if (s.empty()) throw bad_request("'stop' strings must not be empty", "stop");
  }
  c.stream = get_bool(body, "stream", false);
}

void check_admission(const Completion& c, const CompletionLimits& limits) {
  for (int32_t t : c.prompt)
    if (t >= limits.vocab_size)
      throw bad_request("the prompt encodes to token " + std::to_string(t) + ", outside the model's vocabulary", "prompt");
  if (const std::string p = sample_params_problem(c.rp.sample); !p.empty()) {
    const std::string param = p.substr(0, p.find('='));
    throw bad_request(p, param);
  }
  if (const std::string p = limits.problem ? limits.problem(c.prompt, c.rp) : std::string(); !p.empty())
    throw bad_request(p, p.find("max_tokens") != std::string::npos ? "max_tokens" : "prompt");
}

int64_t top_logprobs_count(const json& v, const char* name, const CompletionLimits& limits) {
  const std::optional<int64_t> n = json_int64(v);
  if (!n || *n < 0 || *n > limits.max_top_logprobs)
    throw bad_request(std::string("'") + name + "' must be an integer in [0, " + std::to_string(limits.max_top_logprobs) + "]", name);
  return *n;
}

}  // namespace

Completion parse_completion(std::string_view text, const CompletionLimits& limits, const Tokenizer& tok) {
  const json body = parse_body(text);
  check_fields(body, {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
                      "logprobs", "echo", "n", "user", "presence_penalty", "frequency_penalty", "best_of", "suffix",
                      "logit_bias", "stream_options"},
               limits.model_name);
  if (get_int(body, "best_of", 1) != 1) throw bad_request("'best_of' must be 1", "best_of");

  Completion c;
  const json* prompt = field(body, "prompt");
  if (!prompt) throw bad_request("'prompt' is required", "prompt");
  if (prompt->is_array() && prompt->size() == 1 && ((*prompt)[0].is_string() || (*prompt)[0].is_array()))
    prompt = &(*prompt)[0];  // a batch of one
  if (prompt->is_string()) {
    c.prompt_text = prompt->get<std::string>();
    c.prompt = tok.special_prefix();  // the tokenizer's BOS, where its template has one
    const std::vector<int32_t> ids = tok.encode(c.prompt_text);
    c.prompt.insert(c.prompt.end(), ids.begin(), ids.end());
  } else if (prompt->is_array() && !prompt->empty() && (*prompt)[0].is_number_integer()) {
    c.prompt = token_ids(*prompt, limits.vocab_size);
    for (int32_t t : c.prompt) c.prompt_text += t < tok.vocab_size() ? tok.decode(t) : "";
  } else if (prompt->is_array() && prompt->size() > 1) {
    throw bad_request("one prompt per request is supported; got " + std::to_string(prompt->size()), "prompt");
  } else {
    throw bad_request("'prompt' must be a string or an array of token ids", "prompt");
  }
  parse_options(body, c, tok, 16);
  c.echo = get_bool(body, "echo", false);
  if (const json* lp = field(body, "logprobs")) {
    c.logprobs = top_logprobs_count(*lp, "logprobs", limits);
    c.rp.top_logprobs = c.logprobs;
  }
  if (c.echo && c.logprobs >= 0)
    throw bad_request("'echo' with 'logprobs' is not supported (the prompt's log-probabilities are not computed)", "echo");
  check_admission(c, limits);
  return c;
}

Completion parse_chat_completion(std::string_view text, const CompletionLimits& limits, const Tokenizer& tok,
                                 const ChatTemplate& chat_template) {
  const json body = parse_body(text);
  check_fields(body, {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
                      "seed", "stop", "stream", "logprobs", "top_logprobs", "n", "user", "presence_penalty",
                      "frequency_penalty", "logit_bias", "stream_options"},
               limits.model_name);
  const json* msgs = field(body, "messages");
  if (!msgs || !msgs->is_array() || msgs->empty()) throw bad_request("'messages' must be a non-empty array", "messages");
  std::vector<ChatMessage> messages;
  for (const json& m : *msgs) {
    const json* role = m.is_object() ? field(m, "role") : nullptr;
    const json* content = m.is_object() ? field(m, "content") : nullptr;
    if (!role || !role->is_string()) throw bad_request("each message needs a string 'role'", "messages");
    std::string text_content;
    if (content && content->is_string()) {
      text_content = content->get<std::string>();
    } else if (content && content->is_array()) {  // [{"type": "text", "text": ...}, ...]
      for (const json& part : *content) {
        const json* type = part.is_object() ? field(part, "type") : nullptr;
        const json* t = part.is_object() ? field(part, "text") : nullptr;
        if (!type || *type != "text" || !t || !t->is_string())
          throw bad_request("message content parts must be {\"type\": \"text\", \"text\": ...}", "messages");
        text_content += t->get<std::string>();
      }
    } else if (content) {
      throw bad_request("a message's 'content' must be a string or an array of text parts", "messages");
    }
    messages.push_back({role->get<std::string>(), std::move(text_content)});
  }
  Completion c;
  c.chat = true;
  try {
    c.prompt_text = chat_template.render(messages, /*add_generation_prompt=*/true, tok.bos_token_text(), tok.eos_token_text());
  } catch (const ChatTemplateRaised& e) {
    throw bad_request(e.message, "messages");
  } catch (const Error& e) {
    throw bad_request(std::string("the model's chat template cannot render this conversation: ") + e.what(), "messages");
  }
  c.prompt = tok.encode(c.prompt_text);  // the template wrote every special token, BOS included
  if (field(body, "max_tokens") && field(body, "max_completion_tokens"))
    throw bad_request("give 'max_tokens' or 'max_completion_tokens', not both", "max_completion_tokens");
  parse_options(body, c, tok, 256);
  if (field(body, "max_completion_tokens")) c.rp.max_tokens = get_int(body, "max_completion_tokens", 256);
  const bool logprobs = get_bool(body, "logprobs", false);
  if (const json* n = field(body, "top_logprobs")) {
    if (!logprobs) throw bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs");
    c.logprobs = top_logprobs_count(*n, "top_logprobs", limits);
  } else if (logprobs) {
    c.logprobs = 0;
  }
  c.rp.top_logprobs = std::max<int64_t>(c.logprobs, 0);
  check_admission(c, limits);
  return c;
}

}  // namespace lmf
