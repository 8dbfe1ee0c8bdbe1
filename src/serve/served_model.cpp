// served_model.cpp: see served_model.h.
#include "serve/served_model.h"

#include <chrono>

#include "convert/import.h"
#include "core/check.h"
#include "core/device.h"
#include "model/gpt.h"
#include "model/plan.h"

namespace lmf {

ServedModel load_served_model(const std::string& path, const std::string& device, bool allow_nonfinite,
                              const std::string& tokenizer) {
  const auto t0 = std::chrono::steady_clock::now();
  const Device d = parse_device(device);  // a bad --device fails before any loading
  ModelSource src = load_model_source(path, allow_nonfinite);
  ServedModel m;
  m.dir = src.path;
  m.what = src.what;
  m.cfg = src.config;
  m.assets = src.assets;
  if (m.cfg.family != ModelFamily::text)
    fail(src.what, " is a time-series model: lmforge forecast and eval-forecast run it (docs/TIMESERIES.md)");
  m.tok = make_model_tokenizer(tokenizer, m.assets.tokenizer_json, m.dir + " (its tokenizer)");
  if (m.tok->vocab_size() > m.cfg.vocab_size)
    fail("tokenizer '", m.tok->name(), "' has ", m.tok->vocab_size(), " tokens but the model's vocab_size is ",
         m.cfg.vocab_size);
  if (d == Device::cuda) cuda_set_device(0);
  m.params = std::make_unique<Parameters>(gpt_param_specs(m.cfg), d, d == Device::cuda);
  src.load_weights(*m.params);
  m.load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return m;
}

std::string model_summary(const ModelConfig& c, bool tokenizer, bool chat_template) {
  std::string s = std::to_string(c.n_layer) + " layers, d_model " + std::to_string(c.d_model) + ", " +
                  std::to_string(c.n_head) + "/" + std::to_string(c.n_kv_head) + " heads, vocab " +
                  std::to_string(c.vocab_size) + ", context " + std::to_string(c.context_length) + ", " +
                  std::to_string(gpt_param_count(c)) + " parameters";
  if (c.moe.experts > 0)
    s += " (MoE: " + std::to_string(c.moe.experts) + " experts, top " + std::to_string(c.moe.top_k) + ", " +
         std::to_string(c.moe.shared) + " shared)";
  return s + "; tokenizer: " + (tokenizer ? "yes" : "no") + "; chat template: " + (chat_template ? "yes" : "no");
}

}  // namespace lmf
