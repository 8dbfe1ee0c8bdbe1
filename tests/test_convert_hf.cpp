// Hugging Face import and export (convert/hf.h, convert/hf_export.h, convert/import.h) against the
// fixtures of tools/make_hf_fixtures.py: tiny random models of each family saved by transformers'
// save_pretrained, with transformers' fp32 logits on fixed tokens (tests/fixtures/hf/<family>/).
//
// - import -> lmforge's CPU forward: logits within 1e-4 of transformers' (max |diff| / max |ref|);
// - import -> checkpoint -> load: the same logits bitwise; export -> import: the same weights bitwise;
// - bad input (truncated safetensors, a tensor missing or of the wrong shape, an unknown model class,
//   an unsupported or unknown config field, no config.json, ...): one line naming the file, and through
//   `lmforge import` a non-zero exit with nothing written.
// transformers loading lmforge's export is checked by tools/make_hf_fixtures.py --roundtrip (it needs torch).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "convert/hf.h"
#include "convert/hf_export.h"
#include "convert/import.h"
#include "core/fsutil.h"
#include "model/gpt.h"
#include "support/cli_util.h"
#include "support/fixture_tensor.h"
#include "support/test_util.h"
#include "train/safetensors.h"

namespace lmf {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

const char* const kFamilies[] = {"gpt2", "llama", "qwen2", "mixtral", "qwen2_moe"};

std::string family_dir(const std::string& f) { return test::fixture_path("hf/" + f); }

struct Reference {
  std::vector<int32_t> tokens;  // (B, T)
  std::vector<float> logits;    // (B, T, V)
  int64_t B = 0, T = 0;
  explicit Reference(const std::string& family) {
    SafetensorsFile f(family_dir(family) + "/reference.safetensors");
    tokens = test::fixture_tensor<int32_t>(f, "tokens", "I32");
    logits = test::fixture_tensor<float>(f, "logits", "F32");
    B = f.find("tokens")->shape[0];
    T = f.find("tokens")->shape[1];
  }
};

// lmforge's fp32 CPU logits of `tokens` (B, T) for the model at `path` (anything load_model_source takes).
std::vector<float> logits_of(const std::string& path, const Reference& ref) {
  ModelSource src = load_model_source(path);
  Gpt g(src.config, ModelPlan{ref.B, ref.T, false});
  src.load_weights(g.params);
  const int64_t V = src.config.vocab_size;
  std::vector<float> out(static_cast<size_t>(ref.B * ref.T * V));
  std::vector<int32_t> tokens = ref.tokens;
  g.model.forward_values(test::tensor_of(out, {ref.B, ref.T, V}, "logits"),
                         test::tensor_of(tokens, {ref.B, ref.T}, "tokens"));
  return out;
}

double max_rel_err(const std::vector<float>& got, const std::vector<float>& ref) {
  double diff = 0, scale = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    diff = std::max(diff, std::fabs(static_cast<double>(got[i]) - ref[i]));
    scale = std::max(scale, std::fabs(static_cast<double>(ref[i])));
  }
  return diff / scale;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

class HfFamily : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override { tmp_ = test::make_temp_dir("convert_hf"); }
  void TearDown() override { fs::remove_all(tmp_); }
  std::string tmp_;
};

TEST_P(HfFamily, LogitsMatchTransformers) {
  const Reference ref(GetParam());
  const std::vector<float> got = logits_of(family_dir(GetParam()), ref);
  ASSERT_EQ(got.size(), ref.logits.size());
  const double err = max_rel_err(got, ref.logits);
  EXPECT_LE(err, 1e-4);
  std::printf("[ measured ] %s: logits max|diff| / max|ref| = %.2e (transformers fp32)\n", GetParam(), err);
}

TEST_P(HfFamily, CheckpointLoadsToTheSameLogitsBitwise) {
  const Reference ref(GetParam());
  const ImportedModel m = import_model(family_dir(GetParam()));
  write_imported_checkpoint(m, tmp_ + "/ckpt");
  EXPECT_TRUE(same_bits(logits_of(tmp_ + "/ckpt", ref), logits_of(family_dir(GetParam()), ref)));
  EXPECT_EQ(config_to_json(load_checkpoint_config(tmp_ + "/ckpt")), config_to_json(m.config));
  const ModelAssets a = load_checkpoint_assets(tmp_ + "/ckpt");
  EXPECT_EQ(a.tokenizer_json, m.tokenizer_json);
  EXPECT_EQ(a.chat_template, m.chat_template);
}

TEST_P(HfFamily, ExportThenImportGivesTheSameWeightsBitwise) {
  const ImportedModel m = import_model(family_dir(GetParam()));
  write_imported_checkpoint(m, tmp_ + "/ckpt");
  const HfExportSummary s = export_hf(tmp_ + "/ckpt", tmp_ + "/hf");
  EXPECT_EQ(s.tokenizer, !m.tokenizer_json.empty());
  const ImportedModel back = import_model(tmp_ + "/hf");
  EXPECT_EQ(config_to_json(back.config), config_to_json(m.config));
  EXPECT_EQ(back.tokenizer_json, m.tokenizer_json);
  EXPECT_EQ(back.chat_template, m.chat_template);
  ASSERT_EQ(back.tensors.size(), m.tensors.size());
  for (size_t i = 0; i < m.tensors.size(); ++i) {
    EXPECT_EQ(back.tensors[i].name, m.tensors[i].name);
    EXPECT_TRUE(same_bits(back.tensors[i].data, m.tensors[i].data)) << m.tensors[i].name;
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, HfFamily, ::testing::ValuesIn(kFamilies),
                         [](const auto& info) { return std::string(info.param); });

// ---- edited copies of the fixtures ---------------------------------------------------------------

class HfEdited : public ::testing::Test {
 protected:
  void SetUp() override { tmp_ = test::make_temp_dir("convert_hf_bad"); }
  void TearDown() override { fs::remove_all(tmp_); }

  // A copy of fixture `family` under `name`.
  std::string copy(const std::string& family, const std::string& name) {
    const std::string d = tmp_ + "/" + name;
    fs::copy(family_dir(family), d, fs::copy_options::recursive);
    return d;
  }
  // config.json of `dir` with `edit` applied.
  static void edit_config(const std::string& dir, const std::function<void(json&)>& edit) {
    json j = json::parse(read_file(dir + "/config.json"));
    edit(j);
    write_file_atomic(dir + "/config.json", j.dump(2));
  }
  // An F32 safetensors file rewritten: each tensor renamed by `rename` ("" drops it).
  static void rewrite(const std::string& file, const std::function<std::string(const std::string&)>& rename) {
    const SafetensorsFile f(file);
    std::vector<std::pair<std::string, Tensor>> ts;
    for (const SafetensorsEntry& e : f.entries()) {
      const std::string name = rename(e.name);
      if (!name.empty()) ts.emplace_back(name, Tensor(const_cast<void*>(f.data(e)), DType::f32, e.shape));
    }
    write_file_atomic(file, safetensors_serialize(ts));
  }
  // An F32 safetensors file with one more tensor, `name` of `shape` (ones).
  static void add_tensor(const std::string& file, const std::string& name, const std::vector<int64_t>& shape) {
    const SafetensorsFile f(file);
    std::vector<std::pair<std::string, Tensor>> ts;
    for (const SafetensorsEntry& e : f.entries()) ts.emplace_back(e.name, Tensor(const_cast<void*>(f.data(e)), DType::f32, e.shape));
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::vector<float> ones(static_cast<size_t>(n), 1.0f);
    ts.emplace_back(name, Tensor(ones.data(), DType::f32, shape));
    write_file_atomic(file, safetensors_serialize(ts));
  }
  // import_hf(dir) fails with one line holding every one of `parts`.
  static ::testing::AssertionResult refused(const std::string& dir, const std::vector<std::string>& parts) {
    return test::one_line_error([&] { import_hf(dir); }, parts);
  }

  std::string tmp_;
};

TEST_F(HfEdited, Gpt2FilesWithoutTheTransformerPrefixImportTheSame) {
  // GPT-2's own hub checkpoint was saved from the base model: "h.0.attn.c_attn.weight", "wte.weight"
  const std::string d = copy("gpt2", "gpt2_noprefix");
  rewrite(d + "/model.safetensors", [](const std::string& n) { return n.rfind("transformer.", 0) == 0 ? n.substr(12) : n; });
  const Reference ref("gpt2");
  EXPECT_TRUE(same_bits(logits_of(d, ref), logits_of(family_dir("gpt2"), ref)));
}

TEST_F(HfEdited, GPT2CausalMaskBuffersAreIgnored) {
  const std::string d = copy("gpt2", "gpt2_buffers");
  add_tensor(d + "/model.safetensors", "transformer.h.0.attn.bias", {1, 1, 4, 4});
  add_tensor(d + "/model.safetensors", "transformer.h.0.attn.masked_bias", {1});
  EXPECT_NO_THROW(import_hf(d));
}

TEST_F(HfEdited, BadFilesGiveOneLineNamingTheFile) {
  {
    const std::string d = copy("mixtral", "truncated");
    const std::string bytes = read_file(d + "/model.safetensors");
    write_file_atomic(d + "/model.safetensors", bytes.substr(0, bytes.size() / 2));
    EXPECT_TRUE(refused(d, {d + "/model.safetensors"}));
  }
  {
    const std::string d = copy("gpt2", "missing_tensor");
    rewrite(d + "/model.safetensors", [](const std::string& n) { return n == "transformer.h.1.mlp.c_fc.weight" ? "" : n; });
    EXPECT_TRUE(refused(d, {d + "/model.safetensors", "missing tensor 'transformer.h.1.mlp.c_fc.weight'"}));
  }
  {
    const std::string d = copy("gpt2", "unexpected_tensor");
    add_tensor(d + "/model.safetensors", "transformer.h.0.attn.rotary", {4});
    EXPECT_TRUE(refused(d, {d + "/model.safetensors", "unexpected tensor 'transformer.h.0.attn.rotary'"}));
  }
  {
    const std::string d = copy("gpt2", "wrong_shape");
    edit_config(d, [](json& j) { j["n_inner"] = 100; });
    EXPECT_TRUE(refused(d, {d + "/model.safetensors", "transformer.h.0.mlp.c_fc.weight", "[32,128]", "[32,100]"}));
  }
  {
    const std::string d = copy("llama", "missing_shard");
    fs::remove(d + "/model-00003-of-00004.safetensors");
    EXPECT_TRUE(refused(d, {d + "/model-00003-of-00004.safetensors"}));
  }
  {
    const std::string d = copy("llama", "bad_index");
    json idx = json::parse(read_file(d + "/model.safetensors.index.json"));
    idx["weight_map"]["lm_head.weight"] = "../elsewhere.safetensors";
    write_file_atomic(d + "/model.safetensors.index.json", idx.dump());
    EXPECT_TRUE(refused(d, {d + "/model.safetensors.index.json", "lm_head.weight"}));
  }
  {
    const std::string d = copy("gpt2", "pickle_only");
    fs::rename(d + "/model.safetensors", d + "/pytorch_model.bin");
    EXPECT_TRUE(refused(d, {d, "pytorch_model.bin"}));
  }
  {
    const std::string d = copy("gpt2", "no_config");
    fs::remove(d + "/config.json");
    EXPECT_TRUE(refused(d, {d + "/config.json", "not found"}));
  }
  EXPECT_TRUE(refused(tmp_ + "/nothing", {tmp_ + "/nothing", "not found"}));
}

TEST_F(HfEdited, UnsupportedConfigFieldsAreNamed) {
  struct Case {
    const char* family;
    std::function<void(json&)> edit;
    std::vector<std::string> parts;
  };
  const Case cases[] = {
      {"llama", [](json& j) { j["architectures"] = {"BertForMaskedLM"}; }, {"'BertForMaskedLM' is not supported"}},
      {"llama", [](json& j) { j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 2.0}}; }, {"'rope_scaling'"}},
      {"llama", [](json& j) { j["rope_parameters"]["rope_type"] = "yarn"; }, {"'rope_parameters.rope_type'", "yarn"}},
      {"llama", [](json& j) { j["head_dim"] = 16; }, {"'head_dim'", "16"}},
      {"llama", [](json& j) { j["attention_bias"] = true; }, {"'attention_bias'"}},
      {"llama", [](json& j) { j["hidden_act"] = "gelu"; }, {"'hidden_act'"}},
      {"llama", [](json& j) { j["use_qk_norm"] = true; }, {"unknown field(s) 'use_qk_norm'"}},
      {"llama", [](json& j) { j["hidden_size"] = 32.5; }, {"'hidden_size'", "integer"}},
      {"llama", [](json& j) { j.erase("num_hidden_layers"); }, {"no field 'num_hidden_layers'"}},
      {"qwen2", [](json& j) { j["use_sliding_window"] = true; }, {"'use_sliding_window'"}},
      {"qwen2", [](json& j) { j["layer_types"][1] = "sliding_attention"; }, {"'layer_types'"}},
      {"mixtral", [](json& j) { j["sliding_window"] = 16; }, {"'sliding_window'"}},
      {"gpt2", [](json& j) { j["activation_function"] = "gelu"; }, {"'activation_function'", "tanh"}},
      {"gpt2", [](json& j) { j["scale_attn_by_inverse_layer_idx"] = true; }, {"'scale_attn_by_inverse_layer_idx'"}},
      {"qwen2_moe", [](json& j) { j["shared_expert_intermediate_size"] = 24; }, {"'shared_expert_intermediate_size'", "16"}},
      {"qwen2_moe", [](json& j) { j["mlp_only_layers"] = {2}; }, {"decoder_sparse_step", "mlp_only_layers"}},
  };
  int n = 0;
  for (const Case& c : cases) {
    const std::string d = copy(c.family, "case" + std::to_string(n++));
    edit_config(d, c.edit);
    std::vector<std::string> parts = c.parts;
    parts.push_back(d + "/config.json");
    EXPECT_TRUE(refused(d, parts));
  }
}

TEST_F(HfEdited, Qwen2MoeGatesThatDifferDoNotExport) {
  ImportedModel m = import_model(family_dir("qwen2_moe"));
  for (ImportedTensor& t : m.tensors)
    if (t.name == "layers.1.moe.shared.gate") t.data[t.shape[1] + 3] += 1.0f;  // shared expert 1's gate
  write_imported_checkpoint(m, tmp_ + "/ckpt");
  try {
    export_hf(tmp_ + "/ckpt", tmp_ + "/hf");
    ADD_FAILURE() << "exported";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layers.1.moe.shared.gate"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(tmp_ + "/hf"));
}

TEST(HfExport, ConfigsWithoutAHuggingFaceClassAreRefused) {
  ModelConfig c = config_preset("test-gpt2");
  c.norm = NormKind::rmsnorm;
  EXPECT_THROW(hf_arch_for(c, "x"), Error);
  try {
    hf_arch_for(c, "model x");
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("GPT2LMHeadModel would need norm=layernorm"), std::string::npos) << e.what();
  }
  c = config_preset("test-llama");
  EXPECT_EQ(hf_arch_for(c, "x"), HfArch::llama);
  c.qkv_bias = true;
  EXPECT_EQ(hf_arch_for(c, "x"), HfArch::qwen2);
  c = config_preset("test-moe");  // GELU experts
  EXPECT_THROW(hf_arch_for(c, "x"), Error);
}

// qkv_bias alone (Qwen2): the QKV bias gets its gradient without the other biases present.
TEST(QkvBias, GradientMatchesFiniteDifferences) {
  ModelConfig c = config_preset("test-llama");
  c.qkv_bias = true;
  const int64_t B = 2, T = 8;
  Gpt g(c, ModelPlan{B, T, true});
  g.params.init_gpt2(7, c.n_layer, c.vocab_size);
  ASSERT_FALSE(g.params.find("layers.0.attn.proj.bias").defined());
  const Tensor bias = g.params.find("layers.1.attn.qkv.bias");
  std::vector<float> b = test::randn(static_cast<size_t>(bias.numel()), 3, 0.5f);
  tensor_from_host(bias, b.data());
  std::vector<int32_t> in = test::randint(B * T, 4, static_cast<int32_t>(c.vocab_size)),
                       tg = test::randint(B * T, 5, static_cast<int32_t>(c.vocab_size));
  const Tensor tin = test::tensor_of(in, {B, T}, "tokens"), ttg = test::tensor_of(tg, {B, T}, "targets");
  g.state->zero_grad();
  g.model.forward_backward(tin, ttg);
  const float* grad = g.state->grads().get("layers.1.attn.qkv.bias").f32();
  double scale = 0;
  for (int64_t i = 0; i < bias.numel(); ++i) scale = std::max(scale, std::fabs(static_cast<double>(grad[i])));
  ASSERT_GT(scale, 0);
  for (int64_t i : {0L, 9L, 33L, bias.numel() - 1}) {  // q, q, k, v elements
    const float h = 1e-2f, v = b[static_cast<size_t>(i)];
    auto loss_at = [&](float x) {
      b[static_cast<size_t>(i)] = x;
      tensor_from_host(bias, b.data());
      return g.model.forward_loss(tin, ttg);
    };
    const double fd = (loss_at(v + h) - loss_at(v - h)) / (2.0 * h);
    loss_at(v);
    EXPECT_NEAR(grad[i], fd, 2e-3 * scale + 1e-5) << "element " << i;
  }
}

// ---- through the binary --------------------------------------------------------------------------

class HfCli : public HfEdited {};

TEST_F(HfCli, ImportRefusalsExitNonZeroAndWriteNothing) {
  const std::string trunc = copy("gpt2", "trunc");
  const std::string bytes = read_file(trunc + "/model.safetensors");
  write_file_atomic(trunc + "/model.safetensors", bytes.substr(0, 100));
  const std::string unknown = copy("llama", "unknown");
  edit_config(unknown, [](json& j) { j["architectures"] = {"FalconForCausalLM"}; });
  const std::string no_config = copy("qwen2", "no_config");
  fs::remove(no_config + "/config.json");
  const std::string scaled = copy("llama", "scaled");
  edit_config(scaled, [](json& j) { j["rope_scaling"] = {{"rope_type", "dynamic"}, {"factor", 4.0}}; });
  for (const auto& [dir, what] : std::vector<std::pair<std::string, std::string>>{
           {trunc, trunc + "/model.safetensors"},
           {unknown, "FalconForCausalLM"},
           {no_config, no_config + "/config.json"},
           {scaled, "rope_scaling"}}) {
    const test::RunResult r = test::run_cli("import --from " + dir + " --out " + tmp_ + "/out", tmp_);
    EXPECT_TRUE(test::one_line_error(r, {what.c_str()}));
    EXPECT_FALSE(fs::exists(tmp_ + "/out")) << dir;
  }
}

TEST_F(HfCli, ImportRefusesANonEmptyOutUnlessOverwrite) {
  fs::create_directories(tmp_ + "/out");
  write_file_atomic(tmp_ + "/out/keep.txt", "mine");
  const test::RunResult r = test::run_cli("import --from " + family_dir("gpt2") + " --out " + tmp_ + "/out", tmp_);
  EXPECT_TRUE(test::one_line_error(r, {"--overwrite"}));
  EXPECT_EQ(read_file(tmp_ + "/out/keep.txt"), "mine");
  const test::RunResult ok = test::run_cli("import --from " + family_dir("gpt2") + " --out " + tmp_ + "/out --overwrite", tmp_);
  EXPECT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_NE(ok.out.find("GPT2LMHeadModel"), std::string::npos) << ok.out;
  EXPECT_FALSE(fs::exists(tmp_ + "/out/keep.txt"));
  EXPECT_TRUE(fs::exists(tmp_ + "/out/model.safetensors"));
}

TEST_F(HfCli, GenerateAndTrainTakeAHuggingFaceDirectory) {
  // llama's vocabulary (300) holds the byte tokenizer's 256 ids
  const std::string gen = "generate --prompt Hello -n 6 --temperature 0 --device cpu --checkpoint ";
  const test::RunResult direct = test::run_cli(gen + family_dir("llama"), tmp_);
  ASSERT_EQ(direct.exit_code, 0) << direct.err;
  ASSERT_EQ(test::run_cli("import --from " + family_dir("llama") + " --out " + tmp_ + "/ckpt", tmp_).exit_code, 0);
  const test::RunResult imported = test::run_cli(gen + tmp_ + "/ckpt", tmp_);
  ASSERT_EQ(imported.exit_code, 0) << imported.err;
  EXPECT_EQ(direct.out, imported.out);

  const test::RunResult train = test::run_cli("train --init-from " + family_dir("llama") +
                                                  " -B 2 -T 16 --steps 2 --eval-batches 1 --device cpu --out-dir " + tmp_ + "/run",
                                              tmp_);
  ASSERT_EQ(train.exit_code, 0) << train.err;
  EXPECT_NE(train.out.find("initialised from hf LlamaForCausalLM"), std::string::npos) << train.out;
  const std::string ck = resolve_checkpoint(tmp_ + "/run");
  EXPECT_EQ(config_to_json(load_checkpoint_config(ck)), config_to_json(import_model(family_dir("llama")).config));
  EXPECT_EQ(load_checkpoint_assets(ck).tokenizer_json, read_file(family_dir("llama") + "/tokenizer.json"));
  // the fine-tuned checkpoint exports (with its tokenizer)
  const test::RunResult ex = test::run_cli("export --to hf --checkpoint " + tmp_ + "/run --out " + tmp_ + "/hf", tmp_);
  ASSERT_EQ(ex.exit_code, 0) << ex.err;
  EXPECT_TRUE(fs::exists(tmp_ + "/hf/tokenizer.json"));

  EXPECT_TRUE(test::one_line_error(
      test::run_cli("train --init-from " + family_dir("llama") + " --resume " + tmp_ + "/run --steps 3", tmp_),
      {"--init-from"}));
}

}  // namespace
}  // namespace lmf
