// Core: checks, the CPU worker pool (parallel_for), bf16 rounding, Philox known-answer vectors,
// arenas, config JSON, safetensors.
#include <gtest/gtest.h>
#include <omp.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <thread>
#include <vector>

#include "core/arena.h"
#include "core/gpu_monitor.h"
#include "core/bf16.h"
#include "core/check.h"
#include "core/parallel.h"
#include "core/rng.h"
#include "model/config.h"
#include "model/gpt.h"
#include "ops/op_plans.h"
#include "support/test_util.h"
#include "core/fsutil.h"
#include "train/safetensors.h"

namespace lmf {
namespace {

TEST(Check, MessageNamesConditionAndValues) {
  int C = 7;
  try {
    LMF_CHECK(C % 8 == 0, "C=", C);
    FAIL() << "no throw";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("C % 8 == 0"), std::string::npos) << m;
    EXPECT_NE(m.find("C=7"), std::string::npos) << m;
    EXPECT_NE(m.find("test_core.cpp"), std::string::npos) << m;
  }
}

// parallel_for: every chunk [k grain, min(n, (k + 1) grain)) runs exactly once, for any thread count;
// a nested call runs inline on the calling thread; two callers at once both complete.
TEST(ParallelFor, EveryChunkOnceForAnyThreadCount) {
  const int saved = omp_get_max_threads();
  for (int threads : {1, 2, 3, 5}) {
    omp_set_num_threads(threads);
    for (int64_t n : {1, 7, 64, 1000}) {
      for (int64_t grain : {1, 3, 64, 5000}) {
        std::vector<std::atomic<int>> hits(n);
        std::atomic<int> bad{0};
        parallel_for(n, grain, [&](int64_t b, int64_t e) {
          if (b % grain != 0 || e != std::min(n, b + grain)) bad++;
          for (int64_t i = b; i < e; ++i) hits[i]++;
        });
        EXPECT_EQ(bad.load(), 0) << "threads=" << threads << " n=" << n << " grain=" << grain;
        for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "i=" << i << " n=" << n << " grain=" << grain;
      }
    }
  }
  omp_set_num_threads(saved);
}

// Many tiny jobs back to back with more workers than cores (workers are preempted between seeing a job
// and claiming from it): every job's chunks run exactly once, with that job's own arguments. The pool
// once let a worker delayed across the end of one job claim a chunk of the next before it was
// published (a crashed GEMM chunk in a 4-rank run, or a caller waiting forever): with that pool this
// test hung on the 2-core machine (3 runs of 3); with the fixed one 2M jobs take about 1.7 s.
TEST(ParallelFor, BackToBackTinyJobsOnAnOversubscribedMachine) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(8);
  std::atomic<int> wrong{0};
  for (int job = 0; job < 2000000; ++job) {
    const int64_t n = 2 + job % 3;
    int hits[4] = {0, 0, 0, 0};  // on this call's stack: a chunk run after the call returned writes garbage
    const int tag = job;
    parallel_for(n, 1, [&](int64_t b, int64_t e) {
      if (tag != job || e != b + 1 || b >= n) wrong++;
      __atomic_fetch_add(&hits[b], 1, __ATOMIC_RELAXED);
    });
    for (int64_t i = 0; i < n; ++i)
      if (__atomic_load_n(&hits[i], __ATOMIC_RELAXED) != 1) wrong++;
  }
  omp_set_num_threads(saved);
  EXPECT_EQ(wrong.load(), 0);
}

TEST(ParallelFor, NestedCallsRunInlineAndCallersMayOverlap) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(3);
  std::atomic<int> nested_inline{0}, total{0};
  EXPECT_FALSE(in_parallel_for());
  parallel_for(12, 1, [&](int64_t, int64_t) {
    const std::thread::id me = std::this_thread::get_id();
    bool same = true;
    parallel_for(10, 1, [&](int64_t, int64_t) {
      same = same && std::this_thread::get_id() == me;
      total++;
    });
    if (same && in_parallel_for()) nested_inline++;
  });
  EXPECT_EQ(nested_inline.load(), 12);
  EXPECT_EQ(total.load(), 120);
  std::atomic<int64_t> sum_a{0}, sum_b{0};
  auto caller = [](std::atomic<int64_t>* sum) {
    for (int rep = 0; rep < 200; ++rep)
      parallel_for(100, 7, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) *sum += i;
      });
  };
  std::thread a(caller, &sum_a), b(caller, &sum_b);
  a.join();
  b.join();
  EXPECT_EQ(sum_a.load(), 200 * 4950);
  EXPECT_EQ(sum_b.load(), 200 * 4950);
  omp_set_num_threads(saved);
}

TEST(Bf16, RoundToNearestEven) {
  auto bits = [](float f) { return bf16::from_float(f); };
  EXPECT_EQ(bits(1.0f), 0x3f80);
  // 1 + 2^-8 is exactly halfway between 1 and 1 + 2^-7: ties to even (1.0)
  EXPECT_EQ(bits(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  // 1 + 3*2^-8 is halfway between 1+2^-7 (odd) and 1+2^-6 (even): rounds up to even
  EXPECT_EQ(bits(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  // just above halfway rounds up
  EXPECT_EQ(bits(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)), 0x3f81);
  EXPECT_EQ(bits(-2.0f), 0xc000);
  EXPECT_EQ(bits(INFINITY), 0x7f80);
  EXPECT_TRUE(std::isnan(bf16::to_float(bits(NAN))));
  EXPECT_EQ(bf16::to_float(0x3f81), 1.0f + std::ldexp(1.0f, -7));
  // the largest finite float rounds to infinity (RNE overflow)
  EXPECT_EQ(bits(3.4028235e38f), 0x7f80);
}

TEST(Philox, KnownAnswerVectors) {
  // Random123 known-answer tests for philox4x32-10 (counter words c0..c3, key words k0, k1).
  auto a = philox4x32(0, 0, 0);
  EXPECT_EQ(a[0], 0x6627e8d5u);
  EXPECT_EQ(a[1], 0xe169c58du);
  EXPECT_EQ(a[2], 0xbc57ac4cu);
  EXPECT_EQ(a[3], 0x9b00dbd8u);
  auto b = philox4x32(~0ull, ~0ull, ~0ull);
  EXPECT_EQ(b[0], 0x408f276du);
  EXPECT_EQ(b[1], 0x41c83b0eu);
  EXPECT_EQ(b[2], 0xa20bc7c6u);
  EXPECT_EQ(b[3], 0x6d5451fdu);
  // counter (0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), key (0xa4093822, 0x299f31d0)
  auto c = philox4x32(0x299f31d0a4093822ull, 0x0370734413198a2eull, 0x85a308d3243f6a88ull);
  EXPECT_EQ(c[0], 0xd16cfe09u);
  EXPECT_EQ(c[1], 0x94fdccebu);
  EXPECT_EQ(c[2], 0x5001e420u);
  EXPECT_EQ(c[3], 0x24126ea1u);
}

TEST(Philox, NormalHasUnitMoments) {
  const int n = 200000;
  double s = 0, s2 = 0;
  for (int i = 0; i < n; ++i) {
    double x = rng_normal(42, 1, i);
    s += x;
    s2 += x * x;
  }
  EXPECT_NEAR(s / n, 0.0, 0.01);
  EXPECT_NEAR(s2 / n, 1.0, 0.01);
}

TEST(Arena, CarvesAlignedZeroedSlicesOnce) {
  size_t before = arena_allocation_count();
  Arena a("test", {{"a", {3}}, {"b", {5, 7}}, {"c", {2}, DType::i32}});
  EXPECT_EQ(arena_allocation_count(), before + 1);
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(reinterpret_cast<uintptr_t>(a[i].data) % Arena::kAlign, 0u);
    for (size_t j = 0; j < a[i].nbytes(); ++j) EXPECT_EQ(static_cast<char*>(a[i].data)[j], 0);
  }
  EXPECT_EQ(a.get("b").shape_str(), "(5, 7)");
  EXPECT_THROW(a.get("nope"), Error);
  EXPECT_THROW(a.flat_f32(), Error);  // not all f32
}

TEST(Tensor, CheckShapeNamesTheTensor) {
  float x[6];
  Tensor t(x, DType::f32, {2, 3}, "qkv");
  EXPECT_NO_THROW(check_shape(t, {2, 3}, "op"));
  try {
    check_shape(t, {3, 2}, "attention_forward");
    FAIL();
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "attention_forward: tensor 'qkv' has shape (2, 3), expected (3, 2)");
  }
  EXPECT_THROW(t.view({4, 2}), Error);
  EXPECT_THROW(t.i32(), Error);
}

TEST(Config, JsonRoundTripAndPresets) {
  for (const auto& name : config_preset_names()) {
    ModelConfig c = config_preset(name);
    ModelConfig d = config_from_json(config_to_json(c), name);
    EXPECT_EQ(config_to_json(c), config_to_json(d)) << name;
  }
  // GPT-2 124M: 124,475,904 parameters with the padded vocab 50304 (llm.c's count)
  EXPECT_EQ(gpt_param_count(config_preset("gpt2-124m")), 124475904);
  EXPECT_EQ(config_preset("gpt2-124m").padded_vocab(), 50304);
  EXPECT_THROW(config_preset("gpt5"), Error);
  EXPECT_THROW(config_from_json(R"({"n_head": 4, "n_kv_head": 3, "d_model": 12})", "x"), Error);
  EXPECT_THROW(config_from_json(R"({"norm": "batchnorm"})", "x"), Error);
  EXPECT_THROW(config_from_json(R"({"d_model": "big"})", "x"), Error);
}

TEST(Safetensors, RoundTripAndValidation) {
  std::string d = test::make_temp_dir("st");
  std::vector<float> a = test::randn(12, 1);
  std::vector<int32_t> b = {1, 2, 3};
  std::string bytes = safetensors_serialize({{"a", test::tensor_of(a, {3, 4}, "a")}, {"b", test::tensor_of(b, {3}, "b")}},
                                            {{"k", "v"}});
  write_file_atomic(d + "/x.safetensors", bytes);
  SafetensorsFile f(d + "/x.safetensors");
  ASSERT_EQ(f.entries().size(), 2u);
  EXPECT_EQ(f.metadata().at("k"), "v");
  std::vector<float> a2(12);
  f.read_into("a", test::tensor_of(a2, {3, 4}, "a"));
  EXPECT_EQ(a, a2);
  EXPECT_THROW(f.read_into("a", test::tensor_of(a2, {4, 3}, "a")), Error);
  EXPECT_THROW(f.read_into("c", test::tensor_of(a2, {3, 4}, "c")), Error);
  // header size pointing past the end
  std::string broken = bytes;
  broken[0] = static_cast<char>(0xff);
  broken[1] = static_cast<char>(0xff);
  write_file_atomic(d + "/y.safetensors", broken);
  EXPECT_THROW(SafetensorsFile(d + "/y.safetensors"), Error);
  std::filesystem::remove_all(d);
}

// Without the NVIDIA driver (CI, CPU machines) the monitor reports itself unavailable and every
// reading is n/a; it never throws. On a GPU machine the GPU tests print its readings.
TEST(GpuMonitor, MissingNvmlReadsAsNotAvailable) {
  GpuMonitor m(0);
  const GpuMonitor::Sample s = m.read();
  if (!m.available()) {
    EXPECT_EQ(s.sm_util, -1);
    EXPECT_EQ(s.hbm_util, -1);
    EXPECT_EQ(s.mem_ctrl_util, -1);
    EXPECT_EQ(m.status().rfind("n/a", 0), 0u) << m.status();
  } else {
    EXPECT_GE(s.sm_util, 0);
    EXPECT_LE(s.sm_util, 100);
  }
  EXPECT_EQ(format_util(-1), "n/a");
  EXPECT_EQ(format_util(std::nan("")), "n/a");
  EXPECT_EQ(format_util(87.54), "87.5%");
}

// OpPlansScope binds a model's library plans to the thread, nests, and restores the previous binding.
TEST(OpPlans, ScopesBindNestAndRestore) {
  EXPECT_EQ(op_plans_current(), nullptr);
  OpPlans a, b;
  {
    const OpPlansScope sa(a);
    EXPECT_EQ(op_plans_current(), &a);
    {
      const OpPlansScope sb(b);
      EXPECT_EQ(op_plans_current(), &b);
    }
    EXPECT_EQ(op_plans_current(), &a);
  }
  EXPECT_EQ(op_plans_current(), nullptr);
}

}  // namespace
}  // namespace lmf
