#include "convert/import.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>

#include "convert/gguf.h"
#include "convert/hf.h"
#include "core/check.h"
#include "core/fsutil.h"
#include "core/json_util.h"
#include "model/gpt.h"

namespace lmf {

namespace fs = std::filesystem;

bool is_hf_dir(const std::string& path) {
  std::error_code ec;
  const fs::path config = fs::path(path) / "config.json";
  if (!fs::is_directory(path, ec) || !fs::is_regular_file(config, ec)) return false;
  try {
    const nlohmann::json j = json_parse(read_regular_file(config.string(), "config"), config.string());
    return j.is_object() && (j.contains("architectures") || j.contains("model_type"));
  } catch (const Error&) {
    return false;  // not JSON: whoever reads it as a checkpoint config says what is wrong
  }
}

bool is_gguf_file(const std::string& path) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return false;
  std::ifstream f(path, std::ios::binary);
  char magic[4] = {};
  return f.read(magic, 4) && std::string(magic, 4) == "GGUF";
}

ImportedModel import_model(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) fail_not_found(path, ": not found");
  if (is_gguf_file(path)) return import_gguf(path);
  if (fs::is_directory(path, ec)) return import_hf(path);
  fail(path, ": neither a Hugging Face model directory nor a GGUF file (no GGUF magic)");
}

std::vector<std::pair<std::string, Tensor>> imported_weights(const ImportedModel& m) {
  std::map<std::string, const ImportedTensor*> by_name;
  for (const ImportedTensor& t : m.tensors)
    if (!by_name.emplace(t.name, &t).second) fail(m.source, ": tensor '", t.name, "' appears twice");
  const std::vector<TensorSpec> specs = gpt_param_specs(m.config);
  std::vector<std::pair<std::string, Tensor>> out;
  for (const TensorSpec& s : specs) {
    const auto it = by_name.find(s.name);
    if (it == by_name.end()) fail(m.source, ": no tensor '", s.name, "'");
    const ImportedTensor& t = *it->second;
    if (t.shape != s.shape || static_cast<int64_t>(t.data.size()) != s.numel())
      fail(m.source, ": tensor '", s.name, "' does not have the shape its config gives it");
    // read only: serialized or copied into Parameters
    out.emplace_back(s.name, Tensor(const_cast<float*>(t.data.data()), DType::f32, s.shape, t.name.c_str()));
  }
  if (by_name.size() != specs.size())
    for (const ImportedTensor& t : m.tensors)
      if (std::none_of(specs.begin(), specs.end(), [&](const TensorSpec& s) { return s.name == t.name; }))
        fail(m.source, ": unexpected tensor '", t.name, "' (not a parameter of its config)");
  return out;
}

void write_imported_checkpoint(const ImportedModel& m, const std::string& out_dir, bool overwrite) {
  m.config.validate(m.source);
  const auto weights = imported_weights(m);
  write_dir_atomic(out_dir, overwrite, [&](const std::string& tmp) {
    write_model_files(tmp, m.config, weights, ModelAssets{m.tokenizer_json, m.chat_template}, m.source);
  });
}

namespace {

void check_finite(const std::vector<std::pair<std::string, Tensor>>& weights, const std::string& source) {
  for (const auto& [name, t] : weights) {
    const float* p = t.f32();
    for (int64_t i = 0; i < t.numel(); ++i)
      if (!std::isfinite(p[i]))
        fail(source, ": tensor '", name, "' holds ", p[i], " at element ", i,
             " (pass --allow-nonfinite to load it anyway)");
  }
}

// The imported tensors into params (laid out by gpt_param_specs of the same config), then the bf16 copy.
void load_imported_weights(const ImportedModel& m, Parameters& params, bool allow_nonfinite) {
  const auto weights = imported_weights(m);
  if (!allow_nonfinite) check_finite(weights, m.source);
  Arena& a = params.master();
  LMF_CHECK(a.size() == weights.size(), m.source, ": the parameters hold ", a.size(), " tensors, the model ",
            weights.size());
  for (size_t i = 0; i < a.size(); ++i) {
    LMF_CHECK(a.spec(i).name == weights[i].first && a[i].numel() == weights[i].second.numel(), m.source,
              ": parameter ", i, " is '", a.spec(i).name, "', the model's '", weights[i].first, "'");
    tensor_from_host(a[i], weights[i].second.data);
  }
  params.sync_copy();
}

}  // namespace

ModelSource load_model_source(const std::string& path, bool allow_nonfinite) {
  std::error_code ec;
  if (!fs::exists(path, ec)) fail_not_found(path, ": not found (expected a checkpoint, a training out-dir, a Hugging Face model "
                                        "directory or a GGUF file)");
  ModelSource s;
  s.path = path;
  if (is_gguf_file(path) || is_hf_dir(path)) {
    auto m = std::make_shared<ImportedModel>(import_model(path));
    s.what = m->source;
    s.config = m->config;
    s.assets = {m->tokenizer_json, m->chat_template};
    s.load_weights = [m, allow_nonfinite](Parameters& params) mutable {
      LMF_CHECK(m != nullptr, "ModelSource::load_weights called twice");
      load_imported_weights(*m, params, allow_nonfinite);
      m.reset();
    };
    return s;
  }
  const fs::path p(path);
  if (!fs::is_directory(p, ec) || (!fs::exists(p / "model.safetensors", ec) && !fs::exists(p / "checkpoints" / "latest", ec) &&
                                   !fs::exists(p / "config.json", ec)))
    fail(path, ": not a checkpoint (no model.safetensors), a training out-dir (no checkpoints/latest), a Hugging Face "
               "model directory (no config.json) or a GGUF file");
  s.path = resolve_checkpoint(path);
  s.what = "checkpoint " + s.path;
  s.config = load_checkpoint_config(s.path);
  s.assets = load_checkpoint_assets(s.path);
  s.load_weights = [dir = s.path, allow_nonfinite](Parameters& params) {
    load_checkpoint_weights(dir, params, allow_nonfinite);
  };
  return s;
}

}  // namespace lmf
