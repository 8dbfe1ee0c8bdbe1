// The run workflow (issue 24): strict flags, one trainer per out-dir, no clobbering, resume that
// restores the run, checkpoints that are never torn or non-finite, checked writes. Through the real
// binary where the CLI is the contract, through the Trainer where a process must hold a lock.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/fsutil.h"
#include "core/rng.h"
#include "data/shard.h"
#include "model/gpt.h"
#include "support/cli_util.h"
#include "support/test_util.h"
#include "train/checkpoint.h"
#include "train/safetensors.h"
#include "train/trainer.h"

namespace lmf {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using test::one_line_error;
using test::run_cli;
using test::RunResult;
using test::snapshot;

// A short CPU run's flags (tiny preset, small batch): a few seconds.
const char* kSmall = "train --preset tiny -B 2 -T 16 --eval-batches 1 --log-every 1 ";

// The training losses of metrics.jsonl in file order, as (step, loss) with the exact doubles.
std::vector<std::pair<int64_t, double>> losses_of(const std::string& out_dir) {
  std::vector<std::pair<int64_t, double>> v;
  std::istringstream in(read_file(out_dir + "/metrics.jsonl"));
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) {
      json j = json::parse(line);
      if (j.contains("loss")) v.emplace_back(j.at("step").get<int64_t>(), j.at("loss").get<double>());
    }
  return v;
}

std::string latest_of(const std::string& out_dir) {
  std::string s = read_file(out_dir + "/checkpoints/latest");
  while (!s.empty() && s.back() == '\n') s.pop_back();
  return s;
}

// kSmall's run as TrainOptions, for the tests that drive a Trainer in this process.
TrainOptions small_options(const std::string& out_dir, int64_t steps) {
  TrainOptions o;
  o.preset = "tiny";
  o.batch_size = 2;
  o.seq_len = 16;
  o.steps = steps;
  o.eval_batches = 1;
  o.out_dir = out_dir;
  return o;
}

class RunWorkflow : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = test::make_temp_dir("workflow"); }
  void TearDown() override { fs::remove_all(dir_); }
  std::string dir_;
};

TEST_F(RunWorkflow, FlagsParseStrictly) {
  const std::string out = " --out-dir " + dir_ + "/run";
  EXPECT_TRUE(one_line_error(run_cli("train --seed ''" + out, dir_), {"--seed", "empty"}));
  // the audit's heap overflow: a huge --steps sized the per-step loss buffer
  EXPECT_TRUE(one_line_error(run_cli("train --steps 4611686018427387904 -B 1 -T 8" + out, dir_), {"--steps=4611686018427387904"}));
  EXPECT_TRUE(one_line_error(run_cli("train --steps 99999999999999999999" + out, dir_), {"--steps", "out of range"}));
  EXPECT_TRUE(one_line_error(run_cli("train --lr 1e39" + out, dir_), {"--lr", "not a finite number"}));
  EXPECT_TRUE(one_line_error(run_cli("train --lr 1e400" + out, dir_), {"--lr", "not a finite number"}));
  EXPECT_TRUE(one_line_error(run_cli("train --min-lr -1" + out, dir_), {"--min-lr", ">= 0"}));
  EXPECT_TRUE(one_line_error(run_cli("train --batch-size 12abc" + out, dir_), {"--batch-size", "not an integer"}));
  EXPECT_TRUE(one_line_error(run_cli("train -B 20000000 -T 8" + out, dir_), {"--batch-size=20000000"}));
  RunResult typo = run_cli("train --stpes 3" + out, dir_);
  EXPECT_TRUE(one_line_error(typo, {"--stpes", "did you mean --steps?"}));
  EXPECT_EQ(typo.exit_code, 2);
  EXPECT_FALSE(fs::exists(dir_ + "/run")) << "a refused command created its out-dir";
  RunResult v = run_cli("--version", dir_);
  EXPECT_EQ(v.exit_code, 0);
  EXPECT_NE(v.out.find("lmforge "), std::string::npos) << v.out;
  EXPECT_NE(v.out.find("backends: cpu"), std::string::npos) << v.out;
}

TEST_F(RunWorkflow, ASecondTrainerOnAnOutDirInUseIsRefusedAndTouchesNothing) {
  // this process holds the out-dir through a Trainer that is set up (its lock taken, files written)
  const TrainOptions o = small_options(dir_ + "/run", 3);
  std::ostringstream log;
  Trainer first(o, log);
  first.run();
  const auto before = snapshot(dir_ + "/run");
  RunResult r = run_cli(std::string(kSmall) + "--steps 2 --out-dir " + dir_ + "/run --overwrite", dir_);
  EXPECT_TRUE(one_line_error(r, {"in use by another lmforge run", ("pid " + std::to_string(::getpid())).c_str()}));
  EXPECT_EQ(snapshot(dir_ + "/run"), before) << "the refused trainer changed the running one's files";
}

// Two trainers started together: exactly one runs; the other gets one line (the lock is held, or --
// when the first has already finished -- the out-dir holds a run), whichever order they reach it in.
TEST_F(RunWorkflow, TwoTrainersStartedTogetherOnOneOutDir) {
  const std::string run = dir_ + "/run", bin = test::lmforge_binary();
  const std::string one = bin + " " + kSmall + "--steps 4 --out-dir " + run;
  const std::string cmd = "(" + one + " >" + dir_ + "/a.out 2>" + dir_ + "/a.err; echo $? >" + dir_ + "/a.rc) & (" +
                          one + " >" + dir_ + "/b.out 2>" + dir_ + "/b.err; echo $? >" + dir_ + "/b.rc) & wait";
  ASSERT_EQ(std::system(("bash -c '" + cmd + "'").c_str()), 0);
  const int a = std::atoi(read_file(dir_ + "/a.rc").c_str()), b = std::atoi(read_file(dir_ + "/b.rc").c_str());
  EXPECT_TRUE((a == 0) != (b == 0)) << "exit codes " << a << " and " << b;
  const std::string err = read_file(dir_ + (a == 0 ? "/b.err" : "/a.err"));
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
  EXPECT_TRUE(err.find("in use by another lmforge run") != std::string::npos ||
              err.find("already holds a run") != std::string::npos) << err;
  EXPECT_EQ(losses_of(run).size(), 4u) << "the run that ran has all its records, and only those";
  EXPECT_EQ(latest_of(run), "step_000004");
}

TEST_F(RunWorkflow, ANewRunIntoAUsedOutDirIsRefusedUnlessOverwrite) {
  const std::string run = dir_ + "/run";
  ASSERT_EQ(run_cli(std::string(kSmall) + "--steps 2 --out-dir " + run, dir_).exit_code, 0);
  const auto before = snapshot(run);
  EXPECT_TRUE(one_line_error(run_cli(std::string(kSmall) + "--steps 3 --out-dir " + run, dir_),
                             {"already holds a run", "--overwrite"}));
  EXPECT_EQ(snapshot(run), before) << "a refused run changed the existing files";
  RunResult r = run_cli(std::string(kSmall) + "--steps 3 --out-dir " + run + " --overwrite", dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("replaced the previous run"), std::string::npos);
  EXPECT_EQ(latest_of(run), "step_000003");
  EXPECT_FALSE(fs::exists(run + "/checkpoints/step_000002")) << "--overwrite kept the old run's checkpoint";
  EXPECT_EQ(losses_of(run).size(), 3u);
}

TEST_F(RunWorkflow, ResumeWithNoFlagsRestoresTheRunAndContinuesBitwise) {
  // the user's own shard, batch, lr and out-dir: none of them given again on resume
  std::vector<uint16_t> toks(20000);
  for (size_t i = 0; i < toks.size(); ++i) toks[i] = static_cast<uint16_t>(rng_u64(7, 1, i) % 256);
  write_shard(dir_ + "/mine_train.bin", toks);
  const std::string run = dir_ + "/run";
  const std::string flags = "train --preset tiny --data " + dir_ + "/mine_train.bin -B 3 -T 24 --lr 2e-3 --warmup 2 " +
                            "--steps 8 --checkpoint-every 4 --eval-batches 1 --log-every 1 --out-dir " + run;
  ASSERT_EQ(run_cli(flags, dir_).exit_code, 0);
  const auto full = losses_of(run);
  ASSERT_EQ(full.size(), 8u);
  // resume from the step-4 checkpoint with no other flag, from another working directory
  const std::string elsewhere = dir_ + "/elsewhere";
  fs::create_directories(elsewhere);
  RunResult r = run_cli("train --resume " + run + "/checkpoints/step_000004", elsewhere);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("batch_size=3"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("mine_train.bin"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("moved what came after it"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(elsewhere + "/out")) << "resume wrote to the default out-dir";
  // metrics stay in step order; the continuation's losses are the uninterrupted run's, bitwise
  const auto resumed = losses_of(run);
  ASSERT_EQ(resumed.size(), 8u);
  for (size_t i = 0; i < resumed.size(); ++i) {
    EXPECT_EQ(resumed[i].first, static_cast<int64_t>(i + 1));
    EXPECT_EQ(resumed[i].second, full[i].second) << "step " << i + 1;
  }
  EXPECT_EQ(latest_of(run), "step_000008");
  // the abandoned continuation was moved aside, not lost
  int aside = 0;
  for (const auto& e : fs::recursive_directory_iterator(run + "/superseded"))
    aside += e.path().filename() == "step_000008" ? 1 : 0;
  EXPECT_EQ(aside, 1);
}

TEST_F(RunWorkflow, AResumeThatChangesTheRunIsRefusedUnlessAllowed) {
  const std::string run = dir_ + "/run";
  ASSERT_EQ(run_cli(std::string(kSmall) + "--steps 2 --out-dir " + run, dir_).exit_code, 0);
  const auto before = snapshot(run);
  EXPECT_TRUE(one_line_error(run_cli("train --resume " + run + " --steps 4 -B 8", dir_),
                             {"--batch-size=8", "differs from the run being resumed", "--allow-change"}));
  write_shard(dir_ + "/other.bin", std::vector<uint16_t>(5000, 65));
  EXPECT_TRUE(one_line_error(run_cli("train --resume " + run + " --steps 4 --data " + dir_ + "/other.bin", dir_),
                             {"--data=", "differs from the run being resumed"}));
  EXPECT_TRUE(one_line_error(run_cli("train --resume " + run, dir_), {"step_000002", "--steps N"}));
  EXPECT_TRUE(one_line_error(run_cli("train --resume " + run + " --steps 4 --preset test-llama", dir_),
                             {"--preset test-llama", "differs from the model"}));
  EXPECT_EQ(snapshot(run), before);
  RunResult r = run_cli("train --resume " + run + " --steps 4 -B 3 --allow-change", dir_);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(latest_of(run), "step_000004");
}

TEST_F(RunWorkflow, KeepLastKeepsTheNewestCheckpoints) {
  const std::string run = dir_ + "/run";
  ASSERT_EQ(run_cli(std::string(kSmall) + "--steps 6 --checkpoint-every 1 --keep-last 2 --out-dir " + run, dir_).exit_code,
            0);
  EXPECT_EQ(list_checkpoints(run), (std::vector<std::string>{"step_000005", "step_000006"}));
  EXPECT_EQ(latest_of(run), "step_000006");
}

TEST_F(RunWorkflow, ADivergedRunStopsAtItsFirstNonFiniteStepAndSavesNothingNonFinite) {
  const std::string run = dir_ + "/run";
  RunResult r = run_cli("train --preset tiny -B 2 -T 16 --eval-batches 1 --steps 40 --lr 1e6 --log-every 10 "
                        "--checkpoint-every 1 --out-dir " + run, dir_);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("is not finite"), std::string::npos) << r.err;
  // the step named is the first whose loss or gradient norm is not finite: every checkpoint before
  // it holds finite values only, and none exists from it on
  const size_t at = r.err.find("step ");
  ASSERT_NE(at, std::string::npos) << r.err;
  const int64_t bad = std::atoll(r.err.c_str() + at + 5);
  ASSERT_GE(bad, 1);
  for (const std::string& c : list_checkpoints(run)) {
    EXPECT_LT(checkpoint_step(c), bad) << c;
    SafetensorsFile f(run + "/checkpoints/" + c + "/model.safetensors");
    for (const SafetensorsEntry& e : f.entries()) {
      const float* p = static_cast<const float*>(f.data(e));
      for (size_t i = 0; i < (e.end - e.begin) / 4; ++i) ASSERT_TRUE(std::isfinite(p[i])) << c << " " << e.name;
    }
  }
}

TEST_F(RunWorkflow, ACheckpointWithNonFiniteWeightsLoadsOnlyWhenAllowed) {
  const std::string run = dir_ + "/run";
  ASSERT_EQ(run_cli(std::string(kSmall) + "--steps 2 --out-dir " + run, dir_).exit_code, 0);
  // poison one weight of the saved model
  const std::string path = run + "/checkpoints/step_000002/model.safetensors";
  std::string bytes = read_file(path);
  SafetensorsFile f(path);
  const SafetensorsEntry& e = f.entries().front();
  uint64_t header = 0;
  std::memcpy(&header, bytes.data(), 8);
  const size_t off = 8 + header + e.begin;
  const float nan = std::nanf("");
  std::memcpy(&bytes[off], &nan, 4);
  write_file_atomic(path, bytes);
  EXPECT_TRUE(one_line_error(run_cli("generate --checkpoint " + run + " -n 4", dir_),
                             {"model.safetensors", e.name.c_str(), "--allow-nonfinite"}));
  EXPECT_TRUE(one_line_error(run_cli("train --resume " + run + " --steps 4", dir_), {"--allow-nonfinite"}));
  EXPECT_EQ(run_cli("generate --checkpoint " + run + " -n 4 --allow-nonfinite", dir_).exit_code, 0);
}

TEST_F(RunWorkflow, AFailedMetricsWriteStopsTheRun) {
  // fault point 1 is the first metrics record (step 0's validation loss): a full disk there
  RunResult r = run_cli(std::string(kSmall) + "--steps 3 --out-dir " + dir_ + "/run", dir_, "LMF_FAULT=enospc@1");
  EXPECT_TRUE(one_line_error(r, {"metrics.jsonl", "No space left on device"}));
}

TEST_F(RunWorkflow, ReSavingAStepIsSafeAtEveryWriteAndRename) {
  const TrainOptions o = small_options(dir_ + "/run", 2);
  std::ostringstream log;
  Trainer t(o, log);
  t.run();  // saves step 2
  const std::string good = latest_of(o.out_dir);
  // re-save the same step with a failure injected at each fault point in turn: `latest` must name a
  // complete checkpoint after every one of them
  for (int n = 1; n <= 12; ++n) {
    set_fault_injection("enospc@" + std::to_string(n));
    bool failed = false;
    try {
      t.save();
    } catch (const Error&) {
      failed = true;
    }
    set_fault_injection("");
    const std::string name = latest_of(o.out_dir);
    const std::string d = o.out_dir + "/checkpoints/" + name;
    for (const char* f : {"model.safetensors", "optimizer.safetensors", "config.json", "state.json"})
      EXPECT_TRUE(fs::exists(d + "/" + f)) << "fault " << n << ": latest names " << name << " without " << f;
    EXPECT_EQ(checkpoint_step(name), 2);
    if (!failed) break;  // past the last fault point
  }
  // the last, successful save left one version of the step, the one `latest` names
  EXPECT_EQ(list_checkpoints(o.out_dir), std::vector<std::string>{latest_of(o.out_dir)});
  EXPECT_NE(latest_of(o.out_dir), good);
}

TEST_F(RunWorkflow, InterruptedSaveLeftoversAreCleanedAtStart) {
  const std::string run = dir_ + "/run";
  ASSERT_EQ(run_cli(std::string(kSmall) + "--steps 2 --out-dir " + run, dir_).exit_code, 0);
  fs::create_directories(run + "/checkpoints/.step_000003.tmp");
  fs::create_directories(run + "/checkpoints/.step_000002.old");
  std::ofstream(run + "/checkpoints/latest.tmp.12345") << "step_000003\n";
  RunResult r = run_cli("train --resume " + run + " --steps 3", dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("removed 3 leftovers"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(run + "/checkpoints/.step_000003.tmp"));
  EXPECT_FALSE(fs::exists(run + "/checkpoints/latest.tmp.12345"));
}

TEST_F(RunWorkflow, ValidationShardsBesideTheTrainingOnesAreFound) {
  std::ofstream(dir_ + "/text.txt") << std::string(30000, 'a') + std::string(3000, 'b');
  ASSERT_EQ(run_cli("prepare --input " + dir_ + "/text.txt --out-dir " + dir_ + "/data", dir_).exit_code, 0);
  RunResult r = run_cli(std::string(kSmall) + "--steps 2 --data " + dir_ + "/data/text_train.bin --out-dir " + dir_ + "/run",
                        dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("text_val.bin"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("found beside the training shards"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("val_loss="), std::string::npos) << r.out;
  // the log line and the records carry the time
  EXPECT_NE(r.out.find(" eta="), std::string::npos) << r.out;
  json first = json::parse(read_file(dir_ + "/run/metrics.jsonl").substr(0, read_file(dir_ + "/run/metrics.jsonl").find('\n')));
  EXPECT_TRUE(first.contains("time")) << first.dump();
  // prepare on a directory names the problem
  EXPECT_TRUE(one_line_error(run_cli("prepare --input " + dir_ + "/data --out-dir " + dir_ + "/d2", dir_),
                             {"is a directory"}));
}

TEST_F(RunWorkflow, PlotLeavesOnlyTheImageAndPrintsNothingBeforeAnError) {
  const std::string run = dir_ + "/run";
  ASSERT_EQ(run_cli(std::string(kSmall) + "--steps 2 --out-dir " + run, dir_).exit_code, 0);
  RunResult bad = run_cli("plot --metrics " + run + " --out " + dir_ + "/curves.txt", dir_);
  EXPECT_TRUE(one_line_error(bad, {"--out", ".svg or .png"}));
  EXPECT_EQ(bad.out, "") << "plot printed before its error";
  RunResult ok = run_cli("plot --metrics " + run, dir_);
  if (ok.err.find("gnuplot is not installed") != std::string::npos) GTEST_SKIP() << "gnuplot is not installed";
  ASSERT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_TRUE(fs::exists(run + "/curves.svg"));
  EXPECT_FALSE(fs::exists(run + "/curves.dat"));
  EXPECT_FALSE(fs::exists(run + "/curves.gp"));
}

}  // namespace
}  // namespace lmf
