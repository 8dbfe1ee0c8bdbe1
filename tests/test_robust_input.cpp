// Hostile input (issue 24): every parser of untrusted input refuses it in one lmf::Error line naming
// the file or field and the problem -- deep JSON, sizes that overflow, infinities, non-integers where
// integers belong, offsets beyond 2^63, FIFOs where files belong, models larger than the machine --
// and never crashes, hangs or allocates on the way. One test per finding of the audit; none of them
// depends on timing.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <string>

#include "core/arena.h"
#include "core/check.h"
#include "core/fsutil.h"
#include "core/json_util.h"
#include "core/memory.h"
#include "data/loader.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "model/config.h"
#include "model/gpt.h"
#include "serve/engine.h"
#include "serve/request.h"
#include "support/cli_util.h"
#include "support/test_util.h"
#include "train/checkpoint.h"
#include "train/safetensors.h"
#include "train/trainer.h"

namespace lmf {
namespace {

namespace fs = std::filesystem;

// fn must throw lmf::Error whose message is one line holding every string of `must_contain`.
using test::one_line_error;

std::string nested(size_t levels, const std::string& inner = "1") {
  return std::string(levels, '[') + inner + std::string(levels, ']');
}

// --- one JSON rule --------------------------------------------------------------------------

TEST(Json, DepthIsBoundedBeforeParsing) {
  EXPECT_EQ(json_depth_problem(nested(kJsonMaxDepth)), "");
  EXPECT_NE(json_depth_problem(nested(kJsonMaxDepth + 1)), "");
  EXPECT_NE(json_depth_problem(nested(100000)), "");
  // brackets inside strings, escaped quotes included, are text
  EXPECT_EQ(json_depth_problem("[\"" + std::string(1000, '[') + "\\\"" + std::string(1000, '{') + "\"]"), "");
  EXPECT_TRUE(one_line_error([] { json_parse(nested(100000), "x.json"); }, {"x.json", "invalid JSON", "nested deeper than 64"}));
  // a number beyond a double is a parse error, not an escaped exception of another type
  EXPECT_TRUE(one_line_error([] { json_parse("[1e400]", "x.json"); }, {"x.json", "invalid JSON"}));
  EXPECT_EQ(json_parse(nested(kJsonMaxDepth), "x").dump(), nested(kJsonMaxDepth));
}

TEST(Json, StrictIntegers) {
  using nlohmann::json;
  EXPECT_EQ(json_int64(json::parse("19")), 19);
  EXPECT_EQ(json_int64(json::parse("-3")), -3);
  EXPECT_FALSE(json_int64(json::parse("19.5")));
  EXPECT_FALSE(json_int64(json::parse("1e30")));
  EXPECT_FALSE(json_int64(json::parse("9223372036854775808")));  // 2^63
  EXPECT_FALSE(json_int64(json::parse("true")));
  EXPECT_EQ(json_uint64(json::parse("18446744073709551615")), UINT64_MAX);
  EXPECT_FALSE(json_uint64(json::parse("18446744073709551616")));  // 2^64 parses as a float
  EXPECT_FALSE(json_uint64(json::parse("-1")));
}

TEST(Errors, MessagesAreOneLine) {
  EXPECT_TRUE(one_line_error([] { fail("bad key 'a\nb\r'"); }, {"bad key 'a\\nb\\r'"}));
  EXPECT_TRUE(one_line_error([] { config_from_json("{\"a\\nb\": 1}", "c.json"); }, {"c.json", "unknown field 'a\\nb'"}));
  EXPECT_TRUE(one_line_error([] { checked_mul<int64_t>(int64_t{1} << 40, int64_t{1} << 40, "tensor 'w'"); },
                             {"tensor 'w'", "overflows"}));
}

// --- model config -----------------------------------------------------------------------------

TEST(ConfigInput, DeepJsonIsAnErrorNotAStackOverflow) {
  EXPECT_TRUE(one_line_error([] { config_from_json(nested(100000), "deep.json"); }, {"deep.json", "nested deeper"}));
  EXPECT_TRUE(one_line_error([] { config_from_json("{\"n_layer\": " + nested(100000) + "}", "deep.json"); },
                             {"deep.json", "nested deeper"}));
  // within the depth limit, a nested value in a field is a wrong type, with a short excerpt
  EXPECT_TRUE(one_line_error([] { config_from_json("{\"n_layer\": " + nested(60) + "}", "d.json"); },
                             {"d.json", "field 'n_layer'", "..."}));
}

TEST(ConfigInput, HugeSizesAreRangeErrors) {
  struct Case {
    std::string json, field;
  };
  const Case cases[] = {
      {R"({"d_model": 4611686018427387904, "n_head": 1})", "d_model=4611686018427387904"},
      {R"({"pad_vocab_multiple": 9223372036854775807})", "pad_vocab_multiple=9223372036854775807"},
      {R"({"context_length": 1099511627776})", "context_length=1099511627776"},
      {R"({"d_ff": 4611686018427387904})", "d_ff=4611686018427387904"},
      {R"({"n_layer": 100000})", "n_layer=100000"},
      {R"({"n_layer": 1000000000})", "n_layer=1000000000"},
      {R"({"n_head": 2000000000, "n_kv_head": 1})", "n_head=2000000000"},
      {R"({"moe": {"experts": 4, "d_expert": 4611686018427387904}})", "moe.d_expert=4611686018427387904"},
      {R"({"moe": {"experts": 4, "shared": 1000000}})", "moe.shared=1000000"},
      {R"({"moe": {"experts": 4, "every": 2000000000}})", "moe.every=2000000000"},
      {R"({"n_layer": 9223372036854775808})", "field 'n_layer'"},  // beyond int64: a range error of the field
      {R"({"vocab_size": 1e30})", "field 'vocab_size'"},          // a float where an integer belongs
  };
  for (const Case& c : cases) EXPECT_TRUE(one_line_error([&] { config_from_json(c.json, "big.json"); }, {"big.json", c.field}));
  // the largest config within the limits is valid: its sizes are computed without overflow
  ModelConfig m;
  m.vocab_size = ConfigLimits::vocab_size;
  m.pad_vocab_multiple = ConfigLimits::pad_vocab_multiple;
  m.context_length = ConfigLimits::context_length;
  m.n_layer = ConfigLimits::n_layer;
  m.n_head = m.n_kv_head = ConfigLimits::n_head;
  m.d_model = ConfigLimits::d_model;
  m.d_ff = ConfigLimits::d_ff;
  m.activation = ActivationKind::swiglu;
  m.moe.experts = ConfigLimits::experts;
  m.moe.top_k = ConfigLimits::top_k;
  m.moe.shared = ConfigLimits::shared;
  m.moe.d_expert = ConfigLimits::d_ff;
  EXPECT_NO_THROW(m.validate("max"));
  EXPECT_GT(gpt_param_count(m), int64_t{1} << 50);
  ModelPlan p;
  p.B = 1;
  p.T = 4;
  EXPECT_GT(gpt_plan_bytes(m, p), size_t{1} << 50);
  // ... but the reference attention's probabilities of the largest plan overflow, and say which tensor
  p.B = PlanLimits::tokens / m.context_length;
  p.T = m.context_length;
  EXPECT_TRUE(one_line_error([&] { Model::plan_bytes(m, p, TokenEnds(m)); }, {"arena 'activations'", "tensor 'layers.", ".probs'", "overflows"}));
}

TEST(ConfigInput, InfinitiesAreRejected) {
  for (const char* v : {"1e39", "1e400", "-1e39"})
    for (const std::string& key : {std::string("aux_coef"), std::string("z_coef"), std::string("capacity_factor")})
      EXPECT_TRUE(one_line_error(
          [&] { config_from_json(std::string(R"({"moe": {"experts": 4, ")") + key + "\": " + v + "}}", "inf.json"); },
          {"inf.json"}))
          << key << " " << v;
  EXPECT_TRUE(one_line_error([] { config_from_json(R"({"moe": {"experts": 4, "aux_coef": 1e39}})", "inf.json"); },
                             {"inf.json", "field 'aux_coef'"}));
  EXPECT_TRUE(one_line_error([] { config_from_json(R"({"rope_theta": 1e39})", "inf.json"); }, {"field 'rope_theta'"}));
  EXPECT_TRUE(one_line_error([] { config_from_json(R"({"norm_eps": 0})", "e.json"); }, {"norm_eps=0"}));
  EXPECT_TRUE(one_line_error([] { config_from_json(R"({"rope_theta": 0.5})", "r.json"); }, {"rope_theta=0.5"}));
  // set directly (not through JSON): validate() refuses a non-finite value even in a dense model
  ModelConfig c;
  c.moe.aux_coef = std::numeric_limits<float>::infinity();
  EXPECT_TRUE(one_line_error([&] { c.validate("cfg"); }, {"cfg", "moe.aux_coef=inf"}));
}

TEST(ConfigInput, ManyLayersAreRefusedBeforeAnyAllocation) {
  // n_layer 1e5 used to allocate 5.5 GB and then spin in a quadratic name lookup
  ModelConfig c = config_preset("test-gpt2");
  c.n_layer = 100000;
  ModelPlan p;
  p.B = 1;
  p.T = 4;
  const size_t arenas = arena_allocation_count();
  EXPECT_TRUE(one_line_error([&] { Gpt g(c, p); }, {"n_layer=100000", "[1, 500]"}));
  EXPECT_EQ(arena_allocation_count(), arenas);
  // the most layers a config may have plan, bind (name lookups are constant time) and fit the
  // optimizer's weight-decay table, also with every bias and an untied head (the most ranges)
  c.n_layer = ConfigLimits::n_layer;
  c.d_model = 8;
  c.n_head = c.n_kv_head = 2;
  c.d_ff = 8;
  c.tied_embeddings = false;
  Gpt g(c, p);
  EXPECT_EQ(g.params.master().size(), gpt_param_specs(c).size());
  const std::string last = "layers." + std::to_string(ConfigLimits::n_layer - 1) + ".mlp.proj.bias";
  const long i = g.params.master().find(last);
  ASSERT_GE(i, 0);
  EXPECT_EQ(g.params.master().spec(static_cast<size_t>(i)).name, last);
}

// The memory check compares what will be allocated: gpt_plan_bytes is exactly the arenas' bytes.
TEST(ConfigInput, PlannedBytesAreTheAllocatedBytes) {
  for (const char* preset : {"test-gpt2", "test-llama", "test-moe"})
    for (bool training : {true, false}) {
      const ModelConfig c = config_preset(preset);
      ModelPlan p;
      p.B = 3;
      p.T = 7;
      p.training = training;
      Gpt g(c, p);
      const size_t allocated = g.params.bytes() + (g.state ? g.state->bytes() : 0) + g.model.arena_bytes();
      EXPECT_EQ(gpt_plan_bytes(c, p), allocated) << preset << " training=" << training;
    }
}

TEST(ConfigInput, ModelLargerThanMemoryIsOneLineBeforeAllocating) {
  ModelConfig c = config_preset("test-gpt2");
  c.n_layer = ConfigLimits::n_layer;
  c.d_model = 65536;
  c.n_head = c.n_kv_head = 512;
  c.d_ff = 1 << 20;
  ModelPlan p;
  p.B = 1;
  p.T = 4;
  // training: the optimizer's i32 index is the first limit such a model meets
  EXPECT_TRUE(one_line_error([&] { Gpt g(c, p); }, {"parameters", "training supports at most 2147483647"}));
  p.training = false;  // an evaluation plan: only the memory stands in the way
  const size_t need = gpt_plan_bytes(c, p);
  ASSERT_GT(need, host_memory_available_bytes());
  const size_t arenas = arena_allocation_count();
  EXPECT_TRUE(one_line_error([&] { Gpt g(c, p); }, {"the model (", "needs", "of host memory", "is available"}));
  EXPECT_EQ(arena_allocation_count(), arenas);
  // one arena alone: the same check before its allocation
  EXPECT_TRUE(one_line_error([&] { Arena a("huge", {{"w", {int64_t{1} << 50}}}); }, {"arena 'huge'", "needs", "is available"}));
  EXPECT_TRUE(one_line_error([&] { arena_plan_bytes({{"w", {int64_t{1} << 62, 4}}}, "a"); }, {"tensor 'w'", "overflows"}));
}

TEST(ConfigInput, HugeKvCacheAndMaxTokensAreErrorsNotOverflows) {
  const ModelConfig c = config_preset("test-gpt2");
  Parameters params(gpt_param_specs(c), Device::cpu, false);
  EngineOptions o;
  o.max_seqs = 2;
  o.max_prefill_tokens = 8;
  o.kv_cache_gb = 1e300;  // used to be converted to an integer with undefined behaviour
  EXPECT_TRUE(one_line_error([&] { Engine e(c, params, o); }, {"arena 'kv_cache'", "needs", "is available"}));
  // a request's max_tokens near 2^63 (found by review, confirmed by the request fuzz target's UBSan)
  o.kv_cache_gb = 0;
  Engine e(c, params, o);
  RequestParams rp;
  rp.max_tokens = INT64_MAX;
  EXPECT_NE(e.problem({1, 2, 3}, rp).find("exceeds the model's context length"), std::string::npos);
  o.max_prefill_tokens = int64_t{1} << 62;
  EXPECT_TRUE(one_line_error([&] { Engine e(c, params, o); }, {"--max-prefill-tokens="}));
}

TEST(ConfigInput, TrainOptionsRanges) {
  TrainOptions o;
  EXPECT_EQ(train_options_problem(o), "");
  o.batch_size = int64_t{1} << 40;
  EXPECT_NE(train_options_problem(o).find("--batch-size="), std::string::npos);
  o = TrainOptions();
  o.steps = int64_t{1} << 50;
  EXPECT_NE(train_options_problem(o).find("--steps="), std::string::npos);
  o = TrainOptions();
  o.lr = std::numeric_limits<float>::infinity();
  EXPECT_NE(train_options_problem(o).find("--lr=inf"), std::string::npos);
  o = TrainOptions();
  o.beta2 = 1.0f;
  EXPECT_NE(train_options_problem(o).find("beta2=1"), std::string::npos);
}

// --- checkpoint state ----------------------------------------------------------------------

TEST(CheckpointInput, StateJsonFieldsAreStrict) {
  const CheckpointState ok =
      checkpoint_state_from_json(R"({"step": 19, "seed": 18446744073709551615, "data_position": 40, "options": {"lr": 1}})", "s");
  EXPECT_EQ(ok.step, 19);
  EXPECT_EQ(ok.seed, UINT64_MAX);
  EXPECT_EQ(ok.data_position, 40u);
  EXPECT_EQ(ok.options_json, R"({"lr":1})");
  struct Case {
    const char* json;
    const char* must;
  };
  const Case cases[] = {
      {R"({"step": 19.5, "seed": 1, "data_position": 0})", "'step' is 19.5"},
      {R"({"step": -1, "seed": 1, "data_position": 0})", "'step' is -1"},
      {R"({"step": 1e30, "seed": 1, "data_position": 0})", "'step' is 1e+30"},
      {R"({"step": 9223372036854775808, "seed": 1, "data_position": 0})", "'step'"},
      {R"({"step": "3", "seed": 1, "data_position": 0})", "'step' is \"3\""},
      {R"({"step": 1, "seed": -1, "data_position": 0})", "'seed' is -1"},
      {R"({"step": 1, "seed": 1.5, "data_position": 0})", "'seed' is 1.5"},
      {R"({"step": 1, "seed": 18446744073709551616, "data_position": 0})", "'seed'"},
      {R"({"step": 1, "seed": 1, "data_position": -5})", "'data_position' is -5"},
      {R"({"step": 1, "seed": 1, "data_position": 18446744073709551616})", "'data_position'"},
      {R"({"step": 1, "seed": 1})", "no 'data_position'"},
      {R"({"step": 1, "seed": 1, "data_position": 0, "options": [1]})", "'options'"},
      {R"([1, 2])", "not a JSON object"},
      {R"({"step": 1,)", "invalid JSON"},
  };
  for (const Case& c : cases)
    EXPECT_TRUE(one_line_error([&] { checkpoint_state_from_json(c.json, "ck/state.json"); }, {"ck/state.json", c.must}))
        << c.json;
  EXPECT_TRUE(one_line_error([] { checkpoint_state_from_json("{\"step\": 1, \"seed\": 1, \"data_position\": 0, \"options\": " +
                                                                  nested(100000) + "}", "ck/state.json"); },
                             {"ck/state.json", "nested deeper"}));
}

// A real checkpoint whose state.json or config.json is replaced: load_checkpoint validates the state
// before it reads any tensor.
class CheckpointFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = test::make_temp_dir("ckpt_input");
    cfg_ = config_preset("test-gpt2");
    plan_.B = 1;
    plan_.T = 4;
    gpt_ = std::make_unique<Gpt>(cfg_, plan_);
    gpt_->params.init_gpt2(1, cfg_.n_layer, cfg_.vocab_size);
    ckpt_ = save_checkpoint(dir_, cfg_, gpt_->params, *gpt_->state, {3, 1, 7, ""});
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string dir_, ckpt_;
  ModelConfig cfg_;
  ModelPlan plan_;
  std::unique_ptr<Gpt> gpt_;
};

TEST_F(CheckpointFiles, BadStateJsonIsRefusedBeforeAnyTensorIsRead) {
  EXPECT_EQ(load_checkpoint(ckpt_, gpt_->params, *gpt_->state).step, 3);
  const std::vector<float> before(static_cast<float*>(gpt_->params.master()[0].data),
                                  static_cast<float*>(gpt_->params.master()[0].data) + 16);
  gpt_->params.init_gpt2(2, cfg_.n_layer, cfg_.vocab_size);  // differs from the checkpoint's weights
  const std::vector<float> fresh(static_cast<float*>(gpt_->params.master()[0].data),
                                 static_cast<float*>(gpt_->params.master()[0].data) + 16);
  ASSERT_NE(before, fresh);
  for (const char* state : {R"({"step": 19.5, "seed": 1, "data_position": 7})", R"({"step": 3, "seed": 1, "data_position": -7})"}) {
    write_file_atomic(ckpt_ + "/state.json", state);
    EXPECT_TRUE(one_line_error([&] { load_checkpoint(ckpt_, gpt_->params, *gpt_->state); }, {"state.json"}));
    EXPECT_EQ(std::vector<float>(static_cast<float*>(gpt_->params.master()[0].data),
                                 static_cast<float*>(gpt_->params.master()[0].data) + 16),
              fresh)
        << "weights were read before the state was validated";
  }
  write_file_atomic(ckpt_ + "/state.json", "{\"step\": " + nested(100000) + "}");
  EXPECT_TRUE(one_line_error([&] { load_checkpoint(ckpt_, gpt_->params, *gpt_->state); }, {"state.json", "nested deeper"}));
}

TEST_F(CheckpointFiles, DeepConfigJsonAndBadLatestPointer) {
  write_file_atomic(ckpt_ + "/config.json", nested(100000));
  EXPECT_TRUE(one_line_error([&] { load_checkpoint_config(ckpt_); }, {"config.json", "nested deeper"}));
  write_file_atomic(dir_ + "/checkpoints/latest", "../../elsewhere\n");
  EXPECT_TRUE(one_line_error([&] { resolve_checkpoint(dir_); }, {"latest", "not the name of a checkpoint directory"}));
}

// --- safetensors ------------------------------------------------------------------------------

// A safetensors file: the header text as given, then `data` bytes.
std::string safetensors_bytes(const std::string& header, size_t data = 16) {
  std::string out(8, '\0');
  const uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);
  return out + header + std::string(data, '\0');
}

TEST(SafetensorsInput, ShapesAndOffsetsMustBeIntegersThatFit) {
  auto parse = [](const std::string& header, size_t data = 16) {
    return SafetensorsFile::from_bytes(safetensors_bytes(header, data), "w.safetensors");
  };
  EXPECT_EQ(parse(R"({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}})").entries().size(), 1u);
  struct Case {
    std::string header, must;
  };
  const Case cases[] = {
      {R"({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 18446744073709551616]}})", "data offset 1.8446744073709552e+19"},
      {R"({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [18446744073709551616, 16]}})", "data offset"},
      {R"({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 9223372036854775808]}})", "data offset 9223372036854775808"},
      {R"({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 1e300]}})", "data offset"},
      {R"({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [-16, 0]}})", "data offset -16"},
      {R"({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0.5, 16]}})", "data offset 0.5"},
      {R"({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0]}})", "'data_offsets'"},
      {R"({"a": {"dtype": "F32", "shape": [2.5, 2], "data_offsets": [0, 16]}})", "shape entry 2.5"},
      {R"({"a": {"dtype": "F32", "shape": [18446744073709551616], "data_offsets": [0, 16]}})", "shape entry"},
      {R"({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}})", "shape entry -4"},
      {R"({"a": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 16]}})", "overflows"},
      {R"({"a": {"dtype": "F32", "shape": [4611686018427387904], "data_offsets": [0, 16]}})", "overflows"},
      {R"({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 32]}})", "outside the 16-byte data section"},
      {R"({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}})", "needs 12"},
      {R"({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 16]}})", "'shape'"},
      {R"({"a": {"dtype": 7, "shape": [2, 2], "data_offsets": [0, 16]}})", "'dtype'"},
      {R"({"a": [1]})", "not an object"},
  };
  for (const Case& c : cases)
    EXPECT_TRUE(one_line_error([&] { parse(c.header); }, {"w.safetensors", "tensor 'a'", c.must})) << c.header;
  EXPECT_TRUE(one_line_error([&] { parse(nested(100000)); }, {"w.safetensors", "safetensors header", "nested deeper"}));
  EXPECT_TRUE(one_line_error([&] { parse("{\"a\": " + nested(100000, "{}") + "}"); }, {"nested deeper"}));
}

TEST(SafetensorsInput, FromAFileTheSameChecksAndRegularFilesOnly) {
  const std::string d = test::make_temp_dir("st_input");
  write_file_atomic(d + "/w.safetensors",
                    safetensors_bytes(R"({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 18446744073709551616]}})"));
  EXPECT_TRUE(one_line_error([&] { SafetensorsFile f(d + "/w.safetensors"); }, {"w.safetensors", "data offset"}));
  ASSERT_EQ(::mkfifo((d + "/fifo.safetensors").c_str(), 0600), 0);
  EXPECT_TRUE(one_line_error([&] { SafetensorsFile f(d + "/fifo.safetensors"); }, {"fifo.safetensors", "is a FIFO"}));
  fs::remove_all(d);
}

// --- data shards ----------------------------------------------------------------------------

TEST(ShardInput, FifoOrDirectoryAsDataIsOneLineWithoutWaiting) {
  const std::string d = test::make_temp_dir("shard_input");
  ASSERT_EQ(::mkfifo((d + "/fifo.bin").c_str(), 0600), 0);  // nobody ever writes to it
  EXPECT_TRUE(one_line_error([&] { Shard s(d + "/fifo.bin"); }, {"fifo.bin", "data shard is a FIFO, not a regular file"}));
  EXPECT_TRUE(one_line_error([&] { DataLoader l({d + "/fifo.bin"}, 1, 4, 1, 256); }, {"fifo.bin", "is a FIFO"}));
  EXPECT_TRUE(one_line_error([&] { DataLoader l({d + "/*.bin"}, 1, 4, 1, 256); }, {"fifo.bin", "is a FIFO"}));
  fs::create_directory(d + "/dir.bin");
  EXPECT_TRUE(one_line_error([&] { Shard s(d + "/dir.bin"); }, {"dir.bin", "is a directory"}));
  EXPECT_TRUE(one_line_error([&] { read_file(d + "/dir.bin", "config file"); }, {"dir.bin", "is a directory"}));
  EXPECT_TRUE(one_line_error([&] { Shard s("/dev/null"); }, {"/dev/null", "is a character device"}));
  fs::remove_all(d);
}

TEST(ShardInput, HeaderFieldsAreRangeChecked) {
  std::string bytes(kShardHeaderBytes + 8, '\0');
  auto set = [&](int i, int32_t v) { std::memcpy(bytes.data() + 4 * i, &v, 4); };
  set(0, kShardMagic);
  set(1, kShardVersion);
  set(2, 4);
  EXPECT_EQ(shard_token_count(bytes.data(), bytes.size(), "s.bin"), 4);
  set(2, -1);
  EXPECT_TRUE(one_line_error([&] { shard_token_count(bytes.data(), bytes.size(), "s.bin"); }, {"s.bin", "negative token count -1"}));
  set(2, INT32_MAX);
  EXPECT_TRUE(one_line_error([&] { shard_token_count(bytes.data(), bytes.size(), "s.bin"); }, {"s.bin", "truncated", "2147483647"}));
  set(2, 3);
  EXPECT_TRUE(one_line_error([&] { shard_token_count(bytes.data(), bytes.size(), "s.bin"); }, {"s.bin", "trailing bytes"}));
  set(1, 3);
  EXPECT_TRUE(one_line_error([&] { shard_token_count(bytes.data(), bytes.size(), "s.bin"); }, {"s.bin", "version 3"}));
  set(1, kShardVersionWide);  // uint32 tokens: 3 x 4 bytes is not 8
  EXPECT_TRUE(one_line_error([&] { shard_token_count(bytes.data(), bytes.size(), "s.bin"); }, {"s.bin", "truncated"}));
  set(2, 2);
  EXPECT_EQ(shard_token_count(bytes.data(), bytes.size(), "s.bin"), 2);
  EXPECT_TRUE(one_line_error([&] { shard_token_count(bytes.data(), 100, "s.bin"); }, {"s.bin", "truncated", "100 bytes"}));
}

// --- HTTP request bodies ----------------------------------------------------------------------

TEST(RequestInput, BodiesAreParsedWithTheSameRulesAndGive400) {
  ByteTokenizer tok;
  CompletionLimits lim{"m", 256, 5, [](const std::vector<int32_t>& p, const RequestParams& rp) {
                         return static_cast<int64_t>(p.size()) + rp.max_tokens > 64 ? std::string("too long") : std::string();
                       }};
  auto status = [&](const std::string& body, std::string* message = nullptr) {
    try {
      parse_completion(body, lim, tok);
      return 200;
    } catch (const HttpError& e) {
      if (message) *message = e.message;
      return e.status;
    }
  };
  EXPECT_EQ(status(R"({"model": "m", "prompt": "ab", "max_tokens": 4})"), 200);
  std::string m;
  EXPECT_EQ(status(R"({"model": "m", "prompt": )" + nested(100000) + "}", &m), 400);
  EXPECT_NE(m.find("nested deeper"), std::string::npos) << m;
  EXPECT_EQ(status(nested(100000)), 400);
  for (const char* body : {R"({"model": "m", "prompt": "a", "max_tokens": 18446744073709551615})",
                           R"({"model": "m", "prompt": "a", "max_tokens": 1e30})",
                           R"({"model": "m", "prompt": "a", "top_k": 18446744073709551615})",
                           R"({"model": "m", "prompt": "a", "logprobs": 18446744073709551615})",
                           R"({"model": "m", "prompt": "a", "temperature": 1e300})",
                           R"({"model": "m", "prompt": "a", "top_p": 1e400})",
                           R"({"model": "m", "prompt": [1, 18446744073709551615]})",
                           R"({"model": "m", "prompt": "a", "n": 18446744073709551617})",
                           R"({"model": "m", "prompt": "a", "seed": 1.5})"})
    EXPECT_EQ(status(body), 400) << body;
}

}  // namespace
}  // namespace lmf
