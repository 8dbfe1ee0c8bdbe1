// Bad input through the real binary: each case must give exactly one line on stderr that names
// the thing and the problem, a non-zero exit, and leave every existing checkpoint file unchanged.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "data/shard.h"
#include "support/cli_util.h"
#include "support/test_util.h"
#include "core/fsutil.h"
#include "train/safetensors.h"

namespace lmf {
namespace {

namespace fs = std::filesystem;
using test::one_line_error;
using test::run_cli;
using test::RunResult;
using test::snapshot;

class BadInput : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = test::make_temp_dir("badinput");
    // A real run with a checkpoint that every case must leave untouched.
    RunResult r = run_cli("train --preset tiny -B 2 -T 16 --steps 2 --eval-batches 1 --out-dir " + dir_ + "/run", dir_);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    ckpt_ = dir_ + "/run/checkpoints/step_000002";
    ASSERT_TRUE(fs::exists(ckpt_ + "/model.safetensors"));
    before_ = snapshot(dir_ + "/run");
  }
  void TearDown() override {
    EXPECT_EQ(snapshot(dir_ + "/run"), before_) << "an existing checkpoint or metrics file changed";
    fs::remove_all(dir_);
  }
  // Copy of the checkpoint whose model.safetensors has `edit` applied to its tensor list.
  std::string corrupt_checkpoint(const std::string& name,
                                 const std::function<void(std::vector<std::pair<std::string, Tensor>>&)>& edit) {
    std::string bad = dir_ + "/" + name;
    fs::copy(ckpt_, bad, fs::copy_options::recursive);
    SafetensorsFile f(bad + "/model.safetensors");
    std::vector<std::pair<std::string, Tensor>> ts;
    std::vector<std::vector<char>> keep;
    for (const auto& e : f.entries()) {
      keep.emplace_back(static_cast<const char*>(f.data(e)), static_cast<const char*>(f.data(e)) + (e.end - e.begin));
      Tensor t;
      t.data = keep.back().data();
      t.dtype = DType::f32;
      t.ndim = static_cast<int>(e.shape.size());
      for (int i = 0; i < t.ndim; ++i) t.shape[i] = e.shape[i];
      ts.emplace_back(e.name, t);
    }
    edit(ts);
    write_file_atomic(bad + "/model.safetensors", safetensors_serialize(ts));
    return bad;
  }
  std::string dir_, ckpt_;
  std::map<std::string, std::string> before_;
};

TEST_F(BadInput, TruncatedShard) {
  std::vector<uint16_t> toks(1000, 65);
  write_shard(dir_ + "/trunc.bin", toks);
  fs::resize_file(dir_ + "/trunc.bin", fs::file_size(dir_ + "/trunc.bin") - 7);
  RunResult r = run_cli("train --data " + dir_ + "/trunc.bin --steps 1 --out-dir " + dir_ + "/run", dir_);
  EXPECT_TRUE(one_line_error(r, {"trunc.bin", "truncated"}));
}

TEST_F(BadInput, WrongMagicShard) {
  std::vector<uint16_t> toks(1000, 65);
  write_shard(dir_ + "/magic.bin", toks);
  std::fstream f(dir_ + "/magic.bin", std::ios::in | std::ios::out | std::ios::binary);
  int32_t wrong = 12345;
  f.write(reinterpret_cast<const char*>(&wrong), 4);
  f.close();
  RunResult r = run_cli("train --data " + dir_ + "/magic.bin --steps 1 --out-dir " + dir_ + "/run", dir_);
  EXPECT_TRUE(one_line_error(r, {"magic.bin", "magic 12345"}));
}

TEST_F(BadInput, ShardWithTokenOutsideVocab) {
  std::vector<uint16_t> toks(1000, 65);
  toks[500] = 300;
  write_shard(dir_ + "/vocab.bin", toks);
  RunResult r = run_cli("train --data " + dir_ + "/vocab.bin --steps 1 --out-dir " + dir_ + "/run", dir_);
  EXPECT_TRUE(one_line_error(r, {"vocab.bin", "token 300", "index 500"}));
}

TEST_F(BadInput, CheckpointMissingTensor) {
  std::string bad = corrupt_checkpoint("missing", [](auto& ts) {
    ts.erase(std::remove_if(ts.begin(), ts.end(), [](auto& p) { return p.first == "layers.1.attn.qkv.weight"; }),
             ts.end());
  });
  auto bad_before = snapshot(bad);
  RunResult r = run_cli("train --resume " + bad + " --steps 4 --out-dir " + dir_ + "/run", dir_);
  EXPECT_TRUE(one_line_error(r, {"model.safetensors", "missing tensor 'layers.1.attn.qkv.weight'"}));
  RunResult g = run_cli("generate --checkpoint " + bad + " -n 5", dir_);
  EXPECT_TRUE(one_line_error(g, {"missing tensor 'layers.1.attn.qkv.weight'"}));
  EXPECT_EQ(snapshot(bad), bad_before);
}

TEST_F(BadInput, CheckpointMisShapedTensor) {
  std::string bad = corrupt_checkpoint("misshaped", [](auto& ts) {
    for (auto& [name, t] : ts)
      if (name == "layers.0.mlp.fc.weight") { t.shape[0] = t.shape[0] / 2; t.shape[1] = t.shape[1] * 2; }
  });
  RunResult r = run_cli("train --resume " + bad + " --steps 4 --out-dir " + dir_ + "/run", dir_);
  EXPECT_TRUE(one_line_error(r, {"tensor 'layers.0.mlp.fc.weight' has shape (256, 256), expected (512, 128)"}));
}

TEST_F(BadInput, TruncatedCheckpointFile) {
  std::string bad = dir_ + "/truncated_ckpt";
  fs::copy(ckpt_, bad, fs::copy_options::recursive);
  fs::resize_file(bad + "/model.safetensors", fs::file_size(bad + "/model.safetensors") - 100);
  RunResult r = run_cli("train --resume " + bad + " --steps 4 --out-dir " + dir_ + "/run", dir_);
  EXPECT_TRUE(one_line_error(r, {"model.safetensors", "outside"}));
}

TEST_F(BadInput, ConfigWhoseHeadsDoNotDivideDModel) {
  std::ofstream(dir_ + "/bad.json") << R"({"vocab_size": 256, "d_model": 100, "n_head": 3, "n_layer": 1})";
  RunResult r = run_cli("train --config " + dir_ + "/bad.json --steps 1 --out-dir " + dir_ + "/run", dir_);
  EXPECT_TRUE(one_line_error(r, {"bad.json", "n_head=3 does not divide d_model=100"}));
}

TEST_F(BadInput, ConfigWithNonIntegerValues) {
  std::ofstream(dir_ + "/frac.json") << R"({"vocab_size": 256, "n_layer": 1.9})";
  EXPECT_TRUE(one_line_error(run_cli("train --config " + dir_ + "/frac.json --out-dir " + dir_ + "/run", dir_),
                             {"frac.json", "field 'n_layer'", "1.9"}));
  std::ofstream(dir_ + "/bool.json") << R"({"n_head": true})";
  EXPECT_TRUE(one_line_error(run_cli("train --config " + dir_ + "/bool.json --out-dir " + dir_ + "/run", dir_),
                             {"bool.json", "field 'n_head'"}));
}

TEST_F(BadInput, ConfigWithUnknownFieldAndInvalidJson) {
  std::ofstream(dir_ + "/typo.json") << R"({"vocab_size": 256, "n_heads": 4})";
  EXPECT_TRUE(one_line_error(run_cli("train --config " + dir_ + "/typo.json --out-dir " + dir_ + "/run", dir_),
                             {"typo.json", "unknown field 'n_heads'"}));
  std::ofstream(dir_ + "/broken.json") << R"({"vocab_size": 256,)";
  EXPECT_TRUE(one_line_error(run_cli("train --config " + dir_ + "/broken.json --out-dir " + dir_ + "/run", dir_),
                             {"broken.json", "invalid JSON"}));
}

// Issue 24's hostile inputs through the binary: one line each, nothing written.
TEST_F(BadInput, HostileFilesGiveOneLine) {
  const std::string out = " --steps 1 --out-dir " + dir_ + "/run";
  ASSERT_EQ(::mkfifo((dir_ + "/fifo.bin").c_str(), 0600), 0);  // nobody writes: opening it must not wait
  EXPECT_TRUE(one_line_error(run_cli("train --data " + dir_ + "/fifo.bin" + out, dir_), {"fifo.bin", "is a FIFO"}));
  std::ofstream(dir_ + "/deep.json") << std::string(100000, '[') << std::string(100000, ']');
  EXPECT_TRUE(one_line_error(run_cli("train --config " + dir_ + "/deep.json" + out, dir_), {"deep.json", "nested deeper"}));
  std::ofstream(dir_ + "/inf.json") << R"({"moe": {"experts": 4, "aux_coef": 1e39}})";
  EXPECT_TRUE(one_line_error(run_cli("train --config " + dir_ + "/inf.json" + out, dir_), {"inf.json", "field 'aux_coef'"}));
  std::ofstream(dir_ + "/layers.json") << R"({"n_layer": 100000})";
  EXPECT_TRUE(one_line_error(run_cli("train --config " + dir_ + "/layers.json" + out, dir_), {"layers.json", "n_layer=100000"}));
  std::ofstream(dir_ + "/huge.json") << R"({"d_model": 4611686018427387904})";
  EXPECT_TRUE(one_line_error(run_cli("train --config " + dir_ + "/huge.json" + out, dir_), {"huge.json", "d_model="}));
  // a model whose activations need a PiB on any machine: refused before allocating
  std::ofstream(dir_ + "/big.json") << R"({"d_model": 4096, "n_head": 32, "n_layer": 1, "d_ff": 16384, "context_length": 128})";
  EXPECT_TRUE(one_line_error(run_cli("train --config " + dir_ + "/big.json -B 16777215 -T 128" + out, dir_),
                             {"the model (", "needs", "of host memory", "is available"}));
  // a checkpoint whose state.json has a fractional step or a negative data position
  for (const char* state : {R"({"step": 19.5, "seed": 1337, "data_position": 2})", R"({"step": 2, "seed": 1337, "data_position": -2})"}) {
    const std::string bad = dir_ + "/badstate";
    fs::remove_all(bad);
    fs::copy(ckpt_, bad, fs::copy_options::recursive);
    write_file_atomic(bad + "/state.json", state);
    EXPECT_TRUE(one_line_error(run_cli("train --resume " + bad + " --steps 4 --out-dir " + dir_ + "/run", dir_),
                               {"state.json", "invalid checkpoint state"}));
  }
}

TEST_F(BadInput, UnknownFlagAndBadValues) {
  RunResult r = run_cli("train --learning-rate 3 --out-dir " + dir_ + "/run", dir_);
  EXPECT_TRUE(one_line_error(r, {"--learning-rate"}));
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_TRUE(one_line_error(run_cli("train --steps abc --out-dir " + dir_ + "/run", dir_), {"--steps"}));
  EXPECT_TRUE(one_line_error(run_cli("train --batch-size 0 --out-dir " + dir_ + "/run", dir_), {"--batch-size=0"}));
  EXPECT_TRUE(one_line_error(run_cli("train --seq-len 4096 --out-dir " + dir_ + "/run", dir_), {"--seq-len=4096"}));
  EXPECT_TRUE(one_line_error(run_cli("generate --checkpoint " + dir_ + "/run --top-p 1.5", dir_), {"--top-p"}));
  EXPECT_TRUE(one_line_error(run_cli("train --grad-clip nan --out-dir " + dir_ + "/run", dir_), {"--grad-clip", "'nan' is not a finite number"}));
  EXPECT_TRUE(one_line_error(run_cli("train --eval-batches 0 --out-dir " + dir_ + "/run", dir_), {"--eval-batches=0"}));
  // bf16 is a GPU mode: on the CPU (this test's --device) it is refused in one line
  EXPECT_TRUE(one_line_error(run_cli("train --device cpu --precision bf16 --out-dir " + dir_ + "/run", dir_),
                             {"--precision=bf16", "needs the GPU"}));
  EXPECT_TRUE(one_line_error(run_cli("train --precision fp16 --out-dir " + dir_ + "/run", dir_), {"--precision=fp16"}));
  EXPECT_TRUE(one_line_error(run_cli("train --device cpu --cuda-graph on --out-dir " + dir_ + "/run", dir_),
                             {"--cuda-graph=on", "needs the GPU"}));
  EXPECT_TRUE(one_line_error(run_cli("train --cuda-graph maybe --out-dir " + dir_ + "/run", dir_),
                             {"--cuda-graph=maybe", "auto, on or off"}));
  for (const char* flag : {"--tune", "--gemm-tune"})  // the flag and its alias
    EXPECT_TRUE(one_line_error(run_cli(std::string("train ") + flag + " maybe --out-dir " + dir_ + "/run", dir_),
                               {"--tune=maybe", "must be on or off"}))
        << flag;
  EXPECT_TRUE(one_line_error(run_cli("train --device cpu --attention cudnn --out-dir " + dir_ + "/run", dir_),
                             {"--attention=cudnn", "--precision bf16 on --device cuda"}));
  EXPECT_TRUE(one_line_error(run_cli("train --attention flash3 --out-dir " + dir_ + "/run", dir_),
                             {"--attention", "unknown attention kernels 'flash3'"}));
  EXPECT_TRUE(one_line_error(run_cli("train --batch-invariant --attention cudnn --out-dir " + dir_ + "/run", dir_),
                             {"--attention=cudnn", "--batch-invariant", "lmforge"}));
  EXPECT_TRUE(one_line_error(run_cli("generate --checkpoint " + dir_ + "/nowhere", dir_), {"nowhere", "not found"}));
  EXPECT_TRUE(one_line_error(run_cli("plot --metrics " + dir_ + "/nowhere", dir_), {"--metrics", "nowhere", "not found"}));
  EXPECT_TRUE(one_line_error(run_cli("check-invariance --device cpu --checkpoint " + dir_ + "/run --batches 2,x", dir_),
                             {"--batches", "'x' is not a batch size"}));
  EXPECT_TRUE(one_line_error(run_cli("check-invariance --device cpu --checkpoint " + dir_ + "/run --batches 0", dir_),
                             {"--batches", "0 is not in [1, 1024]"}));
  EXPECT_TRUE(one_line_error(run_cli("check-invariance --device cpu --checkpoint " + dir_ + "/run --prompt-len 200", dir_),
                             {"--prompt-len=200", "context length (128)"}));
}

}  // namespace
}  // namespace lmf
