#include "train/checkpoint.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>

#include "core/check.h"
#include "core/fsutil.h"
#include "core/json_util.h"
#include "train/safetensors.h"

namespace lmf {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

std::string step_dir_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "step_%06lld", static_cast<long long>(step));
  return buf;
}

// Every tensor in `file` must be one of `arena`'s (with prefix) and vice versa, with the right
// dtype and shape. Throws naming the first problem; reads nothing.
void check_arena(const SafetensorsFile& file, const Arena& arena, const std::string& prefix) {
  std::set<std::string> expected;
  for (size_t i = 0; i < arena.size(); ++i) expected.insert(prefix + arena.spec(i).name);
  for (const auto& e : file.entries())
    if (!expected.count(e.name)) fail(file.path(), ": unexpected tensor '", e.name, "' (not part of this model)");
  for (size_t i = 0; i < arena.size(); ++i) {
    std::string name = prefix + arena.spec(i).name;
    if (!file.find(name)) fail(file.path(), ": missing tensor '", name, "'");
  }
  for (size_t i = 0; i < arena.size(); ++i) file.check_entry(prefix + arena.spec(i).name, arena[i]);
}

void load_arena(const SafetensorsFile& file, Arena& arena, const std::string& prefix) {
  check_arena(file, arena, prefix);
  for (size_t i = 0; i < arena.size(); ++i) file.read_into(prefix + arena.spec(i).name, arena[i]);
}

}  // namespace

namespace {

// The f32 values of a serialized safetensors blob (every tensor lmforge saves is f32): the first
// non-finite one's tensor name, or "".
std::string first_nonfinite_tensor(const std::vector<std::pair<std::string, Tensor>>& tensors, const std::string& blob) {
  uint64_t header = 0;
  std::memcpy(&header, blob.data(), sizeof(header));
  size_t at = sizeof(header) + static_cast<size_t>(header);
  for (const auto& [name, t] : tensors) {
    const size_t n = t.nbytes();
    if (t.dtype == DType::f32) {
      const char* p = blob.data() + at;
      for (size_t i = 0; i < n; i += 4) {
        float v;
        std::memcpy(&v, p + i, 4);
        if (!std::isfinite(v)) return name;
      }
    }
    at += n;
  }
  return "";
}

void check_finite(const SafetensorsFile& f) {
  for (const SafetensorsEntry& e : f.entries()) {
    if (e.dtype != "F32") continue;
    const char* p = static_cast<const char*>(f.data(e));
    const size_t n = (e.end - e.begin) / 4;
    // Blocks without a branch per element (vectorised): an exponent of all ones is Inf or NaN.
    constexpr size_t kBlock = 4096;
    for (size_t b = 0; b < n; b += kBlock) {
      const size_t m = std::min(kBlock, n - b);
      uint32_t any = 0;
      for (size_t i = 0; i < m; ++i) {
        uint32_t bits;
        std::memcpy(&bits, p + 4 * (b + i), 4);
        any |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
      }
      if (!any) continue;
      for (size_t i = b; i < b + m; ++i) {
        float v;
        std::memcpy(&v, p + 4 * i, 4);
        if (!std::isfinite(v))
          fail(f.path(), ": tensor '", e.name, "' holds ", v, " at element ", i,
               " (a diverged run's weights; pass --allow-nonfinite to load them anyway)");
      }
    }
  }
}

std::string serialize_checked(const std::vector<std::pair<std::string, Tensor>>& tensors,
                              const std::map<std::string, std::string>& metadata, const std::string& what) {
  std::string blob = safetensors_serialize(tensors, metadata);
  const std::string bad = first_nonfinite_tensor(tensors, blob);
  if (!bad.empty()) fail(what, ": tensor '", bad, "' holds a non-finite value (NaN/Inf); no checkpoint is written");
  return blob;
}

constexpr const char* kTokenizerFile = "tokenizer.json";
constexpr const char* kChatTemplateFile = "chat_template.jinja";

}  // namespace

ModelAssets load_checkpoint_assets(const std::string& dir) {
  ModelAssets a;
  const fs::path tok = fs::path(dir) / kTokenizerFile, tmpl = fs::path(dir) / kChatTemplateFile;
  if (fs::exists(tok)) a.tokenizer_json = read_regular_file(tok.string(), "tokenizer");
  if (fs::exists(tmpl)) a.chat_template = read_regular_file(tmpl.string(), "chat template");
  return a;
}

void write_model_files(const std::string& dir, const ModelConfig& config,
                       const std::vector<std::pair<std::string, Tensor>>& weights, const ModelAssets& assets,
                       const std::string& what) {
  const std::string config_json = config_to_json(config);
  const std::string blob = serialize_checked(weights, {{"format", "pt"}, {"lmforge_config", config_json}}, what);
  write_file_atomic((fs::path(dir) / "model.safetensors").string(), blob);
  write_file_atomic((fs::path(dir) / "config.json").string(), config_json + "\n");
  if (!assets.tokenizer_json.empty()) write_file_atomic((fs::path(dir) / kTokenizerFile).string(), assets.tokenizer_json);
  if (!assets.chat_template.empty()) write_file_atomic((fs::path(dir) / kChatTemplateFile).string(), assets.chat_template);
}

int64_t checkpoint_step(const std::string& name) {
  if (name.rfind("step_", 0) != 0) return -1;
  size_t i = 5;
  int64_t v = 0;
  if (i >= name.size() || !std::isdigit(static_cast<unsigned char>(name[i]))) return -1;
  for (; i < name.size() && std::isdigit(static_cast<unsigned char>(name[i])); ++i) {
    if (v > (INT64_MAX - 9) / 10) return -1;
    v = v * 10 + (name[i] - '0');
  }
  if (i == name.size()) return v;
  if (name.compare(i, 2, ".v") != 0 || i + 2 >= name.size()) return -1;
  for (size_t j = i + 2; j < name.size(); ++j)
    if (!std::isdigit(static_cast<unsigned char>(name[j]))) return -1;
  return v;
}

namespace {
int64_t checkpoint_version(const std::string& name) {
  const size_t at = name.find(".v");
  return at == std::string::npos ? 1 : std::atoll(name.c_str() + at + 2);
}
}  // namespace

std::vector<std::string> list_checkpoints(const std::string& out_dir) {
  const fs::path root = fs::path(out_dir) / "checkpoints";
  std::vector<std::pair<std::pair<int64_t, int64_t>, std::string>> found;
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return {};
  for (const auto& e : fs::directory_iterator(root)) {
    const std::string name = e.path().filename().string();
    const int64_t step = checkpoint_step(name);
    if (step >= 0 && e.is_directory()) found.push_back({{step, checkpoint_version(name)}, name});
  }
  std::sort(found.begin(), found.end());
  std::vector<std::string> out;
  for (const auto& f : found) out.push_back(f.second);
  return out;
}

int clean_interrupted_saves(const std::string& out_dir) {
  const fs::path root = fs::path(out_dir) / "checkpoints";
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return 0;
  int n = 0;
  std::vector<fs::path> gone;
  for (const auto& e : fs::directory_iterator(root)) {
    const std::string name = e.path().filename().string();
    const bool tmp_dir = name.size() > 1 && name[0] == '.' && name.rfind(".step_", 0) == 0 &&
                         (name.size() > 4 && (name.compare(name.size() - 4, 4, ".tmp") == 0 ||
                                              name.compare(name.size() - 4, 4, ".old") == 0));
    const bool tmp_file = name.find(".tmp.") != std::string::npos;  // write_file_atomic's temporaries
    if (tmp_dir || tmp_file) gone.push_back(e.path());
  }
  for (const fs::path& p : gone) {
    fs::remove_all(p);
    ++n;
  }
  if (n > 0) fsync_dir(root.string());
  return n;
}

CheckpointState checkpoint_state_from_json(const std::string& text, const std::string& where) {
  const json j = json_parse(text, where);
  if (!j.is_object()) fail(where, ": invalid checkpoint state (not a JSON object)");
  auto field = [&](const char* key) -> const json& {
    if (!j.contains(key)) fail(where, ": invalid checkpoint state (no '", key, "')");
    return j.at(key);
  };
  auto bad = [&](const char* key, const json& v, const char* rule) {
    fail(where, ": invalid checkpoint state ('", key, "' is ", json_excerpt(v), ", must be ", rule, ")");
  };
  CheckpointState st;
  const json& step = field("step");
  const std::optional<int64_t> s = json_int64(step);
  if (!s || *s < 0) bad("step", step, "an integer >= 0");
  st.step = *s;
  const json& seed = field("seed");
  const std::optional<uint64_t> sd = json_uint64(seed);
  if (!sd) bad("seed", seed, "an integer in [0, 2^64)");
  st.seed = *sd;
  const json& pos = field("data_position");
  const std::optional<int64_t> p = json_int64(pos);
  if (!p || *p < 0) bad("data_position", pos, "an integer in [0, 2^63)");
  st.data_position = static_cast<uint64_t>(*p);
  if (j.contains("options")) {
    if (!j.at("options").is_object()) bad("options", j.at("options"), "an object");
    st.options_json = j.at("options").dump(-1, ' ', false, json::error_handler_t::replace);
  }
  return st;
}

std::string save_checkpoint(const std::string& out_dir, const ModelConfig& config, Parameters& params,
                            TrainingState& train, const CheckpointState& state, int64_t keep_last,
                            const ModelAssets& assets) {
  fs::path root = fs::path(out_dir) / "checkpoints";
  fs::create_directories(root);
  const std::string base = step_dir_name(state.step);
  std::string name = base;
  for (int64_t v = 2; fs::exists(root / name); ++v) name = base + ".v" + std::to_string(v);
  const fs::path final_dir = root / name;
  const fs::path tmp_dir = root / ("." + name + ".tmp");

  const Arena &p = params.master(), &m = train.adam_m(), &v = train.adam_v();
  std::vector<std::pair<std::string, Tensor>> weights, opt;
  for (size_t i = 0; i < p.size(); ++i) weights.emplace_back(p.spec(i).name, p[i]);
  for (size_t i = 0; i < m.size(); ++i) opt.emplace_back("m." + m.spec(i).name, m[i]);
  for (size_t i = 0; i < v.size(); ++i) opt.emplace_back("v." + v.spec(i).name, v[i]);
  // serialized (and checked finite) before anything is written; the model's weights by write_model_files
  const std::string what = "step " + std::to_string(state.step);
  const std::string opt_blob = serialize_checked(opt, {}, what);
  json st = {{"step", state.step},
             {"seed", state.seed},
             {"data_position", state.data_position},
             {"options", state.options_json.empty() ? json::object() : json_parse(state.options_json, "training options")}};

  fs::remove_all(tmp_dir);
  fs::create_directories(tmp_dir);
  try {
    write_model_files(tmp_dir.string(), config, weights, assets, what);
  } catch (const Error&) {  // a non-finite weight: nothing of this save stays
    std::error_code ec;
    fs::remove_all(tmp_dir, ec);
    throw;
  }
  write_file_atomic((tmp_dir / "optimizer.safetensors").string(), opt_blob);
  write_file_atomic((tmp_dir / "state.json").string(), st.dump(2) + "\n");
  // Into place under a name nothing else has, then `latest` switches atomically; what it supersedes
  // goes only after that, so `latest` names a complete checkpoint at every moment.
  rename_path(tmp_dir.string(), final_dir.string());
  fsync_dir(root.string());
  write_file_atomic((root / "latest").string(), name + "\n");
  std::vector<std::string> all = list_checkpoints(out_dir);
  std::vector<std::string> remove;
  for (const std::string& c : all)
    if (c != name && checkpoint_step(c) == state.step) remove.push_back(c);  // older versions of this step
  if (keep_last > 0) {
    int64_t kept = 0;
    for (auto it = all.rbegin(); it != all.rend(); ++it) {
      if (checkpoint_step(*it) == state.step && *it != name) continue;
      if (++kept > keep_last) remove.push_back(*it);
    }
  }
  for (const std::string& c : remove) fs::remove_all(root / c);
  return final_dir.string();
}

std::string resolve_checkpoint(const std::string& path) {
  fs::path p(path);
  if (fs::exists(p / "model.safetensors")) return p.string();
  fs::path latest = p / "checkpoints" / "latest";
  if (fs::exists(latest)) {
    std::string name = read_regular_file(latest.string(), "checkpoint pointer");
    while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
    if (name.empty() || name == "." || name == ".." || name.find_first_of("/\\") != std::string::npos)
      fail(latest.string(), ": '", excerpt(name), "' is not the name of a checkpoint directory");
    fs::path d = p / "checkpoints" / name;
    if (!fs::exists(d / "model.safetensors")) fail(latest.string(), ": points at '", name, "' which has no model.safetensors");
    return d.string();
  }
  if (!fs::exists(p)) fail_not_found(path, ": checkpoint not found");
  fail(path, ": not a checkpoint (no model.safetensors) and no checkpoints/latest inside");
}

ModelConfig load_checkpoint_config(const std::string& dir) {
  fs::path f = fs::path(dir) / "config.json";
  if (!fs::exists(f)) fail(f.string(), ": checkpoint has no config.json");
  return config_from_json(read_regular_file(f.string(), "checkpoint config"), f.string());
}

void load_checkpoint_weights(const std::string& dir, Parameters& params, bool allow_nonfinite) {
  SafetensorsFile f((fs::path(dir) / "model.safetensors").string());
  check_arena(f, params.master(), "");
  if (!allow_nonfinite) check_finite(f);
  load_arena(f, params.master(), "");
  params.sync_copy();
}

CheckpointState read_checkpoint_state(const std::string& dir) {
  fs::path sf = fs::path(dir) / "state.json";
  return checkpoint_state_from_json(read_regular_file(sf.string(), "checkpoint state"), sf.string());
}

CheckpointState load_checkpoint(const std::string& dir, Parameters& params, TrainingState& train, bool allow_nonfinite) {
  Arena &m = train.adam_m(), &v = train.adam_v();
  // Validate everything before touching the model.
  SafetensorsFile mf((fs::path(dir) / "model.safetensors").string());
  fs::path of = fs::path(dir) / "optimizer.safetensors";
  if (!fs::exists(of)) fail(of.string(), ": checkpoint has no optimizer state");
  SafetensorsFile opt(of.string());
  const CheckpointState st = read_checkpoint_state(dir);
  // optimizer file holds m.* and v.*: every one present with the parameter's shape, nothing else
  std::set<std::string> expected;
  for (size_t i = 0; i < m.size(); ++i) {
    expected.insert("m." + m.spec(i).name);
    expected.insert("v." + v.spec(i).name);
  }
  for (const auto& e : opt.entries())
    if (!expected.count(e.name)) fail(opt.path(), ": unexpected tensor '", e.name, "'");
  check_arena(mf, params.master(), "");
  for (size_t i = 0; i < m.size(); ++i) {
    opt.check_entry("m." + m.spec(i).name, m[i]);
    opt.check_entry("v." + v.spec(i).name, v[i]);
  }
  if (!allow_nonfinite) {
    check_finite(mf);
    check_finite(opt);
  }
  // Everything is valid: only now copy.
  load_arena(mf, params.master(), "");
  for (size_t i = 0; i < m.size(); ++i) {
    opt.read_into("m." + m.spec(i).name, m[i]);
    opt.read_into("v." + v.spec(i).name, v[i]);
  }
  params.sync_copy();  // bf16 plans: the GEMMs' weight copy follows the loaded masters
  return st;
}

}  // namespace lmf
