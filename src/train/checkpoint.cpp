#include "train/checkpoint.h"

#include <cstdio>
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
                            TrainingState& train, const CheckpointState& state) {
  fs::path root = fs::path(out_dir) / "checkpoints";
  fs::create_directories(root);
  const std::string name = step_dir_name(state.step);
  fs::path final_dir = root / name;
  fs::path tmp_dir = root / ("." + name + ".tmp");
  fs::remove_all(tmp_dir);
  fs::create_directories(tmp_dir);

  const Arena &p = params.master(), &m = train.adam_m(), &v = train.adam_v();
  std::vector<std::pair<std::string, Tensor>> weights, opt;
  for (size_t i = 0; i < p.size(); ++i) weights.emplace_back(p.spec(i).name, p[i]);
  for (size_t i = 0; i < m.size(); ++i) opt.emplace_back("m." + m.spec(i).name, m[i]);
  for (size_t i = 0; i < v.size(); ++i) opt.emplace_back("v." + v.spec(i).name, v[i]);
  write_file_atomic((tmp_dir / "model.safetensors").string(),
                    safetensors_serialize(weights, {{"format", "pt"}, {"lmforge_config", config_to_json(config)}}));
  write_file_atomic((tmp_dir / "optimizer.safetensors").string(), safetensors_serialize(opt));
  write_file_atomic((tmp_dir / "config.json").string(), config_to_json(config) + "\n");
  json st = {{"step", state.step},
             {"seed", state.seed},
             {"data_position", state.data_position},
             {"options", state.options_json.empty() ? json::object() : json_parse(state.options_json, "training options")}};
  write_file_atomic((tmp_dir / "state.json").string(), st.dump(2) + "\n");

  // Move into place. If a checkpoint of this step exists (a rerun), it is replaced only after the
  // new one is complete.
  fs::path old_dir = root / ("." + name + ".old");
  fs::remove_all(old_dir);
  if (fs::exists(final_dir)) {
    // Re-saving a step (a rerun): the old copy moves aside, the complete new one takes its name, and
    // if that rename fails the old copy is put back, so `latest` never names a missing directory
    // for longer than the two renames.
    fs::rename(final_dir, old_dir);
    try {
      fs::rename(tmp_dir, final_dir);
    } catch (...) {
      fs::rename(old_dir, final_dir);  // put the previous checkpoint back
      throw;
    }
  } else {
    fs::rename(tmp_dir, final_dir);
  }
  fsync_dir(root.string());
  write_file_atomic((root / "latest").string(), name + "\n");
  fs::remove_all(old_dir);
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
  if (!fs::exists(p)) fail(path, ": checkpoint not found");
  fail(path, ": not a checkpoint (no model.safetensors) and no checkpoints/latest inside");
}

ModelConfig load_checkpoint_config(const std::string& dir) {
  fs::path f = fs::path(dir) / "config.json";
  if (!fs::exists(f)) fail(f.string(), ": checkpoint has no config.json");
  return config_from_json(read_regular_file(f.string(), "checkpoint config"), f.string());
}

void load_checkpoint_weights(const std::string& dir, Parameters& params) {
  SafetensorsFile f((fs::path(dir) / "model.safetensors").string());
  load_arena(f, params.master(), "");
  params.sync_copy();
}

CheckpointState load_checkpoint(const std::string& dir, Parameters& params, TrainingState& train) {
  Arena &m = train.adam_m(), &v = train.adam_v();
  // Validate everything before touching the model.
  SafetensorsFile mf((fs::path(dir) / "model.safetensors").string());
  fs::path of = fs::path(dir) / "optimizer.safetensors";
  if (!fs::exists(of)) fail(of.string(), ": checkpoint has no optimizer state");
  SafetensorsFile opt(of.string());
  fs::path sf = fs::path(dir) / "state.json";
  const CheckpointState st = checkpoint_state_from_json(read_regular_file(sf.string(), "checkpoint state"), sf.string());
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
