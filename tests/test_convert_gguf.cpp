// test_convert_gguf.cpp: the GGUF importer (convert/gguf.h) against tools/make_gguf_fixtures.py.
//
// - Synthetic llama files (tests/fixtures/gguf/tiny_llama*.gguf, every tensor type F32, F16, BF16,
//   Q8_0, Q4_0, Q4_1 across their tensors, Q/K permuted as llama.cpp stores them): the imported
//   weights equal the reference's dequantized, un-permuted weights bit for bit, and the model's
//   logits match the float64 PyTorch reference to 1e-4 of the logits' scale.
// - The tokenizer.json rebuilt from GGUF metadata equals what `tokenizers` writes for the tokenizer
//   the file was made from (gpt-2, smollm, llama-bpe and qwen2 pre-tokenizers).
// - SmolLM2-135M-Instruct Q4_1 (scripts/fetch_smollm2.sh; skipped when absent): logits on three
//   prompts within 1e-3 of transformers' fp32 forward of the same file, the same greedy 32 tokens
//   through the serving engine, and the tokenizer.json checked by the fixture script.
// - Bad input: truncated, corrupt magic, bad version, unknown and unsupported tensor types, unknown
//   architecture, unsupported metadata, a tensor of the wrong shape: one line naming file and problem.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <variant>

#include "convert/gguf.h"
#include "core/fp16.h"
#include "core/fsutil.h"
#include "core/parallel.h"
#include "model/gpt.h"
#include "serve/engine.h"
#include "support/cli_util.h"
#include "support/fixture_tensor.h"
#include "support/test_util.h"
#include "train/safetensors.h"

namespace lmf {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// test::one_line_error (support/cli_util.h), printing the message of a passing check (the record of
// what users see).
::testing::AssertionResult one_line_error(const std::function<void()>& fn, const std::vector<std::string>& must_contain) {
  ::testing::AssertionResult r = test::one_line_error(fn, must_contain);
  if (r) std::printf("[ error    ] %s\n", r.message());
  return r;
}

std::string gguf_fixture(const std::string& name) { return test::fixture_path("gguf/" + name); }

using test::smollm2_path;

// The imported weights as a model's Parameters (fp32, CPU).
std::unique_ptr<Parameters> to_parameters(const ImportedModel& m) {
  auto p = std::make_unique<Parameters>(gpt_param_specs(m.config), Device::cpu, false);
  LMF_CHECK(m.tensors.size() == p->master().size(), m.tensors.size(), " tensors for ", p->master().size());
  for (const ImportedTensor& t : m.tensors) {
    const Tensor d = p->find(t.name);
    LMF_CHECK(d.defined() && static_cast<size_t>(d.numel()) == t.data.size(), "parameter ", t.name);
    std::memcpy(d.data, t.data.data(), t.data.size() * sizeof(float));
  }
  return p;
}

// Full forward of one sequence: logits (T, V).
std::vector<float> logits_of(const ModelConfig& c, Parameters& w, std::vector<int32_t> tokens, int64_t B = 1) {
  const int64_t T = static_cast<int64_t>(tokens.size()) / B;
  Model m(c, ModelPlan{B, T, false}, w, nullptr, std::make_unique<TokenEnds>(c));
  std::vector<float> logits(static_cast<size_t>(B * T * c.vocab_size));
  m.forward_values(test::tensor_of(logits, {B, T, c.vocab_size}, "logits"), test::tensor_of(tokens, {B, T}, "tokens"));
  return logits;
}

// ---- fp16 ------------------------------------------------------------------------------------------

TEST(GgufFp16, EveryHalfConvertsExactly) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const int sign = (h >> 15) ? -1 : 1, exp = static_cast<int>((h >> 10) & 31), mant = static_cast<int>(h & 1023);
    const float got = fp16_to_float(static_cast<uint16_t>(h));
    if (exp == 31) {
      if (mant == 0) ASSERT_EQ(got, sign * INFINITY) << h;
      else ASSERT_TRUE(std::isnan(got)) << h;
      continue;
    }
    const double want = sign * (exp == 0 ? std::ldexp(mant, -24) : std::ldexp(1024 + mant, exp - 25));
    ASSERT_EQ(static_cast<double>(got), want) << "half 0x" << std::hex << h;
    ASSERT_EQ(std::signbit(got), sign < 0) << h;
  }
}

// ---- synthetic files ---------------------------------------------------------------------------------

class GgufSynthetic : public ::testing::TestWithParam<const char*> {
 protected:
  std::string name() const { return GetParam(); }
  SafetensorsFile ref() const { return SafetensorsFile(gguf_fixture(name() + ".safetensors")); }
};

TEST_P(GgufSynthetic, WeightsEqualTheDequantizedReference) {
  const ImportedModel m = import_gguf(gguf_fixture(name() + ".gguf"));
  const SafetensorsFile r = ref();
  EXPECT_EQ(config_to_json(m.config), config_to_json(config_from_json(r.metadata().at("config"), name())));
  EXPECT_EQ(m.source, "gguf llama (" + gguf_fixture(name() + ".gguf") + ")");
  size_t n = 0;
  for (const ImportedTensor& t : m.tensors) {
    const std::vector<float> want = test::fixture_tensor<float>(r, "param." + t.name, "F32");
    ASSERT_EQ(t.data.size(), want.size()) << t.name;
    EXPECT_EQ(std::memcmp(t.data.data(), want.data(), want.size() * sizeof(float)), 0) << t.name << " differs";
    n += want.size();
  }
  std::printf("[ measured ] %s: %zu tensors, %zu values bitwise equal to the reference\n", name().c_str(),
              m.tensors.size(), n);
}

TEST_P(GgufSynthetic, LogitsMatchTheTorchReference) {
  const ImportedModel m = import_gguf(gguf_fixture(name() + ".gguf"));
  const SafetensorsFile r = ref();
  auto w = to_parameters(m);
  const std::vector<int32_t> tokens = test::fixture_tensor<int32_t>(r, "tokens", "I32");
  const std::vector<float> want = test::fixture_tensor<float>(r, "ref.logits", "F32");
  const int64_t B = r.find("tokens")->shape[0];
  const std::vector<float> got = logits_of(m.config, *w, tokens, B);
  double worst = 0;
  EXPECT_TRUE(test::close_to_tensor_scale("logits", got.data(), test::to_double(want).data(), want.size(), 1e-4, 0,
                                          &worst));
  std::printf("[ measured ] %s: logits max |err| %.2e of max|logit| (tolerance 1e-4)\n", name().c_str(), worst);
}

TEST_P(GgufSynthetic, TokenizerAndChatTemplate) {
  const ImportedModel m = import_gguf(gguf_fixture(name() + ".gguf"));
  EXPECT_EQ(json::parse(m.tokenizer_json), json::parse(read_file(gguf_fixture(name() + ".tokenizer.json"))));
  EXPECT_NE(m.chat_template.find("<|im_start|>"), std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(Files, GgufSynthetic, ::testing::Values("tiny_llama", "tiny_llama_tied"),
                         [](const auto& info) { return std::string(info.param) == "tiny_llama" ? "Untied" : "Tied"; });

TEST(GgufSynthetic, FilesHoldEveryTensorType) {
  std::set<std::string> types;
  for (const char* f : {"tiny_llama.gguf", "tiny_llama_tied.gguf"}) {
    const GgufFile g(gguf_fixture(f));
    EXPECT_EQ(g.version(), 3u);
    for (const GgufTensorInfo& t : g.tensors()) types.insert(gguf_tensor_type_name(t.type));
  }
  EXPECT_EQ(types, (std::set<std::string>{"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"}));
  EXPECT_EQ(GgufFile(gguf_fixture("tiny_llama_tied.gguf")).alignment(), 64u);
}

// Every pre-tokenizer: the JSON equals what `tokenizers` wrote for the tokenizer the file came from.
class GgufTokenizer : public ::testing::TestWithParam<const char*> {};

TEST_P(GgufTokenizer, JsonEqualsTokenizers) {
  const std::string n = GetParam();
  const std::string got = gguf_tokenizer_json(GgufFile(gguf_fixture(n + ".gguf")));
  EXPECT_EQ(json::parse(got), json::parse(read_file(gguf_fixture(n + ".tokenizer.json"))));
}

INSTANTIATE_TEST_SUITE_P(Pre, GgufTokenizer,
                         ::testing::Values("tokenizer_gpt2", "tiny_llama", "tiny_llama_tied", "tokenizer_qwen2"),
                         [](const auto& info) {
                           const std::string p = info.param;
                           return p == "tokenizer_gpt2" ? "Gpt2" : p == "tiny_llama" ? "SmolLM" : p == "tiny_llama_tied" ? "Llama3" : "Qwen2";
                         });

// ---- SmolLM2-135M-Instruct Q4_1 ------------------------------------------------------------------------

class GgufSmolLM2 : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string path = smollm2_path();
    if (path.empty()) return;
    const auto t0 = std::chrono::steady_clock::now();
    model_ = new ImportedModel(import_gguf(path));
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("[ measured ] import_gguf(%s): %.3f s (%d threads)\n", path.c_str(), s, cpu_threads());
  }
  static void TearDownTestSuite() {
    delete model_;
    model_ = nullptr;
  }
  void SetUp() override {
    if (!model_)
      GTEST_SKIP() << "third_party/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf is absent: run scripts/fetch_smollm2.sh";
  }
  static ImportedModel* model_;
};
ImportedModel* GgufSmolLM2::model_ = nullptr;

TEST_F(GgufSmolLM2, Config) {
  const ModelConfig& c = model_->config;
  EXPECT_EQ(c.n_layer, 30);
  EXPECT_EQ(c.d_model, 576);
  EXPECT_EQ(c.n_head, 9);
  EXPECT_EQ(c.n_kv_head, 3);
  EXPECT_EQ(c.d_ff, 1536);
  EXPECT_EQ(c.vocab_size, 49152);
  EXPECT_EQ(c.context_length, 8192);
  EXPECT_EQ(c.rope_theta, 100000.0f);
  EXPECT_TRUE(c.tied_embeddings);
  EXPECT_NE(model_->chat_template.find("<|im_start|>"), std::string::npos);
}

TEST_F(GgufSmolLM2, LogitsMatchTransformers) {
  const SafetensorsFile r(gguf_fixture("smollm2_ref.safetensors"));
  const ModelConfig& c = model_->config;
  auto w = to_parameters(*model_);
  const int64_t V = c.vocab_size, K = 20;
  for (int p = 0; p < 3; ++p) {
    const std::string pre = "p" + std::to_string(p) + ".";
    const std::vector<int32_t> tokens = test::fixture_tensor<int32_t>(r, pre + "tokens", "I32");
    const int64_t T = static_cast<int64_t>(tokens.size());
    const std::vector<float> got = logits_of(c, *w, tokens);
    // the whole last row
    const std::vector<float> last = test::fixture_tensor<float>(r, pre + "last_logits", "F32");
    double worst_last = 0;
    EXPECT_TRUE(test::close_to_tensor_scale(pre + "last_logits", got.data() + (T - 1) * V,
                                            test::to_double(last).data(), static_cast<size_t>(V), 1e-3, 0, &worst_last));
    // transformers' top 20 at every position, relative to that row's largest |logit|
    const std::vector<int32_t> top_ids = test::fixture_tensor<int32_t>(r, pre + "top_ids", "I32");
    const std::vector<float> top = test::fixture_tensor<float>(r, pre + "top_logits", "F32");
    double worst_top = 0;
    int64_t same_argmax = 0;
    for (int64_t t = 0; t < T; ++t) {
      const float* row = got.data() + t * V;
      double scale = 0;
      for (int64_t k = 0; k < K; ++k) scale = std::max(scale, std::fabs(static_cast<double>(top[t * K + k])));
      for (int64_t k = 0; k < K; ++k)
        worst_top = std::max(worst_top, std::fabs(row[top_ids[t * K + k]] - top[t * K + k]) / scale);
      same_argmax += std::max_element(row, row + V) - row == top_ids[t * K];
    }
    EXPECT_LE(worst_top, 1e-3) << pre << "top-20 logits";
    EXPECT_EQ(same_argmax, T) << pre << "argmax differs at some position";
    std::printf("[ measured ] prompt %d (%lld tokens): last-position logits max |err| %.2e, top-20 at every "
                "position %.2e of max|logit| (tolerance 1e-3); argmax equal at %lld/%lld positions\n",
                p, static_cast<long long>(T), worst_last, worst_top, static_cast<long long>(same_argmax),
                static_cast<long long>(T));
  }
}

// Greedy decoding through the serving engine (as `lmforge generate` does), 32 tokens per prompt.
TEST_F(GgufSmolLM2, GreedyContinuationMatchesTransformers) {
  const SafetensorsFile r(gguf_fixture("smollm2_ref.safetensors"));
  ModelConfig c = model_->config;
  c.context_length = 128;  // the KV cache this test needs (RoPE does not depend on it)
  auto w = to_parameters(*model_);
  EngineOptions o;
  o.max_seqs = 3;
  o.max_prefill_tokens = 64;
  Engine e(c, *w, o);
  RequestParams rp;
  rp.sample.temperature = 0;
  rp.max_tokens = 32;
  std::vector<std::vector<int32_t>> want(3), got(3);
  for (int p = 0; p < 3; ++p) {
    want[p] = test::fixture_tensor<int32_t>(r, "p" + std::to_string(p) + ".greedy", "I32");
    e.add(p, test::fixture_tensor<int32_t>(r, "p" + std::to_string(p) + ".tokens", "I32"), rp);
  }
  while (!e.idle())
    for (const EngineEvent& ev : e.step()) got[static_cast<size_t>(ev.id)].push_back(ev.out.token);
  for (int p = 0; p < 3; ++p) EXPECT_EQ(got[p], want[p]) << "prompt " << p;
}

// The tokenizer.json, written for tools/make_gguf_fixtures.py check-tokenizer; once that script has
// checked it against transformers (smollm2_tokenizer.json), its hash must not change.
TEST_F(GgufSmolLM2, Tokenizer) {
  const std::string& tj = model_->tokenizer_json;
  const json j = json::parse(tj);
  EXPECT_EQ(j.at("model").at("vocab").size(), 49152u);
  EXPECT_EQ(j.at("pre_tokenizer").at("pretokenizers").at(0).at("type"), "Digits");
  const std::string dir = test::make_temp_dir("gguf_smollm2");
  write_file_atomic(dir + "/tokenizer.json", tj);
  std::printf("[ written  ] %s/tokenizer.json (tools/make_gguf_fixtures.py check-tokenizer --tokenizer-json ...)\n",
              dir.c_str());
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char ch : tj) h = (h ^ ch) * 0x100000001b3ull;
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
  const json check = json::parse(read_file(gguf_fixture("smollm2_tokenizer.json")));
  EXPECT_EQ(check.at("fnv1a64"), hex) << "the tokenizer.json changed since tools/make_gguf_fixtures.py checked it";
  EXPECT_EQ(check.at("identical_with_gpt2_split"), check.at("lines"));
}

// ---- bad input -------------------------------------------------------------------------------------------

std::string tiny_bytes() { return read_file(gguf_fixture("tiny_llama.gguf")); }

std::string le64(uint64_t v) { return std::string(reinterpret_cast<const char*>(&v), 8); }
std::string le32(uint32_t v) { return std::string(reinterpret_cast<const char*>(&v), 4); }

// Byte offset just past the GGUF string `s` (u64 length + bytes) in `b`.
size_t after_string(const std::string& b, const std::string& s) {
  const size_t at = b.find(le64(s.size()) + s);
  LMF_CHECK(at != std::string::npos, "no string ", s);
  return at + 8 + s.size();
}

// The tensor info of `name`: offsets of its ne[0], its type and its data offset.
struct InfoAt {
  size_t ne0, type, offset;
};
InfoAt tensor_info_at(const std::string& b, const std::string& name) {
  const size_t p = after_string(b, name);
  uint32_t n_dims;
  std::memcpy(&n_dims, b.data() + p, 4);
  return {p + 4, p + 4 + 8 * n_dims, p + 8 + 8 * n_dims};
}

// The bad files of one test, in a temporary directory removed at the end.
class GgufBadInput : public ::testing::Test {
 protected:
  void TearDown() override { fs::remove_all(dir_); }
  std::string write_temp(const std::string& bytes, const std::string& tag) const {
    const std::string path = dir_ + "/" + tag + ".gguf";
    std::ofstream(path, std::ios::binary) << bytes;
    return path;
  }
  const std::string dir_ = test::make_temp_dir("gguf_bad");
};

// A GGUF file with metadata only (version 3, no tensors): each value a string, a u32 or an f32.
struct Kv {
  std::string key;
  std::variant<std::string, uint32_t, float> value;
};
std::string gguf_of(const std::vector<Kv>& kvs) {
  auto str = [](const std::string& x) { return le64(x.size()) + x; };
  std::string b = "GGUF" + le32(3) + le64(0) + le64(kvs.size());
  for (const Kv& kv : kvs) {
    b += str(kv.key);
    if (const auto* v = std::get_if<std::string>(&kv.value)) b += le32(8) + str(*v);
    else if (const auto* u = std::get_if<uint32_t>(&kv.value)) b += le32(4) + le32(*u);
    else b += le32(6) + std::string(reinterpret_cast<const char*>(&std::get<float>(kv.value)), 4);
  }
  return b;
}

// Metadata that would change the model's math or the tokenizer's splits is refused, naming it.
TEST_F(GgufBadInput, MetadataThatChangesTheMath) {
  const std::vector<Kv> base = {{"general.architecture", std::string("llama")}, {"llama.block_count", 1u},
                                {"llama.embedding_length", 64u}, {"llama.feed_forward_length", 64u},
                                {"llama.attention.head_count", 4u}, {"llama.context_length", 64u}, {"llama.vocab_size", 100u},
                                {"llama.attention.layer_norm_rms_epsilon", 1e-5f}};
  struct Case {
    Kv kv;
    const char* says;
  };
  const std::vector<Case> cases = {
      {{"llama.rope.scaling.type", std::string("linear")}, "llama.rope.scaling.type 'linear' is not supported"},
      {{"llama.rope.scaling.factor", 8.0f}, "llama.rope.scaling.factor 8 is not supported"},
      {{"llama.expert_count", 8u}, "mixture-of-experts"},
      {{"llama.rope.dimension_count", 8u}, "llama.rope.dimension_count = 8 differs from the head size 16"},
      {{"llama.attention.head_count_kv", 3u}, "n_kv_head"},
      {{"llama.attention.layer_norm_epsilon", 1e-5f}, "metadata key 'llama.attention.layer_norm_epsilon' is not supported"},
  };
  for (const Case& c : cases) {
    std::vector<Kv> kvs = base;
    kvs.push_back(c.kv);
    const std::string path = write_temp(gguf_of(kvs), "metadata");
    EXPECT_TRUE(one_line_error([&] { import_gguf(path); }, {path, c.says}));
  }
  std::vector<Kv> no_eps(base.begin(), base.end() - 1);
  EXPECT_TRUE(one_line_error([&] { import_gguf(GgufFile::from_bytes(gguf_of(no_eps), "e.gguf")); },
                             {"e.gguf", "metadata key 'llama.attention.layer_norm_rms_epsilon' is missing"}));
  const std::vector<Case> tokenizers = {
      {{"tokenizer.ggml.model", std::string("llama")}, "tokenizer.ggml.model 'llama' is not supported"},
      {{"tokenizer.ggml.pre", std::string("deepseek-llm")}, "tokenizer.ggml.pre 'deepseek-llm' is not supported"},
  };
  for (const Case& c : tokenizers) {
    std::vector<Kv> kvs = {{"tokenizer.ggml.model", std::string("gpt2")}, {"tokenizer.ggml.pre", std::string("gpt-2")}};
    for (Kv& kv : kvs)
      if (kv.key == c.kv.key) kv = c.kv;
    EXPECT_TRUE(one_line_error([&] { gguf_tokenizer_json(GgufFile::from_bytes(gguf_of(kvs), "tok.gguf")); },
                               {"tok.gguf", c.says}));
  }
}

// Every cut before the end of the last tensor's data (the writer pads the file after it).
TEST_F(GgufBadInput, TruncatedAnywhere) {
  const std::string b = tiny_bytes();
  size_t end = 0;
  const GgufFile whole = GgufFile::from_bytes(b, "tiny");
  for (const GgufTensorInfo& t : whole.tensors()) end = std::max(end, t.offset + t.bytes);
  size_t cuts = 0;
  for (size_t n = 0; n < end; n += n < 8192 ? 3 : 97) {
    ASSERT_TRUE(test::one_line_error([&] { import_gguf(GgufFile::from_bytes(b.substr(0, n), "cut.gguf")); }, {"cut.gguf"}))
        << "cut at " << n;
    ++cuts;
  }
  const std::string path = write_temp(b.substr(0, end - 1), "truncated");
  EXPECT_TRUE(one_line_error([&] { import_gguf(path); }, {path, "truncated GGUF file", "output.weight"}));
  std::printf("[ measured ] %zu truncations of a %zu-byte file: each one line naming the file\n", cuts, b.size());
}

TEST_F(GgufBadInput, MagicAndVersion) {
  std::string b = tiny_bytes();
  b[0] = 'X';
  std::string path = write_temp(b, "magic");
  EXPECT_TRUE(one_line_error([&] { import_gguf(path); }, {path, "not a GGUF file"}));
  b = tiny_bytes();
  b.replace(4, 4, le32(4));
  path = write_temp(b, "version");
  EXPECT_TRUE(one_line_error([&] { import_gguf(path); }, {path, "GGUF version 4 is not supported"}));
  b.replace(4, 4, le32(3u << 24));
  EXPECT_TRUE(one_line_error([&] { GgufFile::from_bytes(b, "be.gguf"); }, {"be.gguf", "big-endian"}));
  EXPECT_TRUE(one_line_error([&] { import_gguf(dir_); }, {"is a directory"}));
}

TEST_F(GgufBadInput, TensorTypes) {
  std::string b = tiny_bytes();
  const InfoAt q = tensor_info_at(b, "blk.0.attn_q.weight");  // Q4_0
  b.replace(q.type, 4, le32(99));
  std::string path = write_temp(b, "unknown_type");
  EXPECT_TRUE(one_line_error([&] { import_gguf(path); }, {path, "tensor 'blk.0.attn_q.weight'", "unknown ggml type 99"}));
  b.replace(q.type, 4, le32(20));  // IQ4_NL: Q4_0's block size, a type lmforge does not dequantize
  path = write_temp(b, "iq4_nl");
  EXPECT_TRUE(one_line_error([&] { import_gguf(path); },
                             {path, "tensor 'blk.0.attn_q.weight' has type IQ4_NL, which lmforge does not read"}));
}

TEST_F(GgufBadInput, ArchitectureMetadataAndShapes) {
  std::string b = tiny_bytes();
  const size_t arch = after_string(b, "general.architecture") + 4 + 8;  // type, length
  ASSERT_EQ(b.substr(arch, 5), "llama");
  b.replace(arch, 5, "gemma");
  std::string path = write_temp(b, "arch");
  EXPECT_TRUE(one_line_error([&] { import_gguf(path); }, {path, "general.architecture is 'gemma'"}));

  b = tiny_bytes();
  b.replace(after_string(b, "llama.vocab_size") - 16, 16, "llama.logit_scal");
  path = write_temp(b, "metadata");
  EXPECT_TRUE(one_line_error([&] { import_gguf(path); }, {path, "metadata key 'llama.logit_scal' is not supported"}));

  b = tiny_bytes();
  b.replace(tensor_info_at(b, "blk.0.attn_norm.weight").ne0, 8, le64(16));
  path = write_temp(b, "shape");
  EXPECT_TRUE(one_line_error([&] { import_gguf(path); },
                             {path, "tensor 'blk.0.attn_norm.weight' has ne [16], expected [32]"}));

  b = tiny_bytes();
  const InfoAt up = tensor_info_at(b, "blk.0.ffn_up.weight");
  b.replace(up.ne0, 8, le64(31));  // Q4_1 rows of 31 elements
  EXPECT_TRUE(one_line_error([&] { GgufFile::from_bytes(b, "blocks.gguf"); },
                             {"blocks.gguf", "tensor 'blk.0.ffn_up.weight'", "not a multiple of its block size 32"}));
}

TEST_F(GgufBadInput, HostileCountsAndOverlap) {
  // counts that would allocate without bound if trusted: refused against the bytes left
  std::string b = tiny_bytes();
  b.replace(8, 8, le64(uint64_t{1} << 60));
  EXPECT_TRUE(one_line_error([&] { GgufFile::from_bytes(b, "n.gguf"); }, {"n.gguf", "cannot fit"}));
  b = tiny_bytes();
  const size_t tokens = after_string(b, "tokenizer.ggml.tokens") + 4 + 4;  // type, element type
  b.replace(tokens, 8, le64(uint64_t{1} << 62));
  EXPECT_TRUE(one_line_error([&] { GgufFile::from_bytes(b, "t.gguf"); }, {"t.gguf", "tokenizer.ggml.tokens"}));
  b = tiny_bytes();
  b.replace(tensor_info_at(b, "output.weight").ne0, 8, le64(uint64_t{1} << 62));
  EXPECT_TRUE(one_line_error([&] { GgufFile::from_bytes(b, "ne.gguf"); }, {"ne.gguf", "output.weight"}));
  b = tiny_bytes();  // output.weight's data placed over token_embd.weight's
  b.replace(tensor_info_at(b, "output.weight").offset, 8, b.substr(tensor_info_at(b, "token_embd.weight").offset, 8));
  EXPECT_TRUE(one_line_error([&] { GgufFile::from_bytes(b, "o.gguf"); }, {"o.gguf", "overlap"}));
}

}  // namespace
}  // namespace lmf
