// Launch validation on the CPU with synthetic device limits: every launch is checked against
// grid (x <= 2^31-1, y and z <= 65535), block and shared-memory limits before it is made, and the
// error names the op, shapes, grid, block, smem and device.
//
// Building a LaunchSpec (shape_text) and validating a launch that fits allocate nothing: counted
// here by wrapping the malloc family, as test_train does for a whole step.
#include <gtest/gtest.h>

#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "core/launch.h"

#include "support/alloc_counter.h"
using lmf::test::g_allocs;
using lmf::test::g_counting;

namespace lmf {
namespace {

DeviceLimits h100_like() {
  DeviceLimits l;
  l.device = 3;
  l.name = "Synthetic H100";
  return l;
}

TEST(LaunchValidation, AcceptsLaunchesWithinLimits) {
  DeviceLimits l = h100_like();
  EXPECT_EQ(launch_problem(l, {"op", "", {2147483647, 65535, 65535}, {1024, 1, 1}, 0}), "");
  EXPECT_EQ(launch_problem(l, {"op", "", {1, 1, 1}, {32, 32, 1}, 227 * 1024}), "");
}

TEST(LaunchValidation, RejectsEachLimit) {
  DeviceLimits l = h100_like();
  // the field report's failure: a grid.y computed from B*T overflowed 65535
  EXPECT_EQ(launch_problem(l, {"embedding_forward", "", {1, 70000, 1}, {256, 1, 1}, 0}),
            "grid.y=70000 exceeds the device limit 65535");
  EXPECT_EQ(launch_problem(l, {"op", "", {2147483648LL, 1, 1}, {256, 1, 1}, 0}),
            "grid.x=2147483648 exceeds the device limit 2147483647");
  EXPECT_EQ(launch_problem(l, {"op", "", {1, 1, 65536}, {1, 1, 1}, 0}), "grid.z=65536 exceeds the device limit 65535");
  EXPECT_EQ(launch_problem(l, {"op", "", {0, 1, 1}, {1, 1, 1}, 0}), "grid.x=0 must be >= 1");
  EXPECT_EQ(launch_problem(l, {"op", "", {1, 1, 1}, {2048, 1, 1}, 0}), "block.x=2048 exceeds the device limit 1024");
  EXPECT_EQ(launch_problem(l, {"op", "", {1, 1, 1}, {64, 1, 65}, 0}), "block.z=65 exceeds the device limit 64");
  EXPECT_EQ(launch_problem(l, {"op", "", {1, 1, 1}, {64, 32, 1}, 0}), "block has 2048 threads, the device allows 1024");
  EXPECT_EQ(launch_problem(l, {"op", "", {1, 1, 1}, {128, 1, 1}, 300 * 1024}),
            "dynamic shared memory 307200 bytes exceeds the device's opt-in limit 232448");
  // smaller synthetic device
  l.max_threads_per_block = 512;
  EXPECT_NE(launch_problem(l, {"op", "", {1, 1, 1}, {1024, 1, 1}, 0}), "");
}

TEST(LaunchValidation, DescriptionNamesEverything) {
  DeviceLimits l = h100_like();
  LaunchSpec s{"embedding_forward", "B=8 T=1024 C=768", {8192, 1, 1}, {256, 1, 1}, 4096};
  EXPECT_EQ(describe_launch(s, l),
            "op=embedding_forward shapes=(B=8 T=1024 C=768) grid=(8192,1,1) block=(256,1,1) smem=4096 device=3 "
            "(Synthetic H100)");
}

// shape_text gives the text the std::to_string / operator+ call sites it replaced gave.
TEST(ShapeText, MatchesToString) {
  const int64_t N = 8192, neg = -3, big = INT64_MIN;
  const int i = 768;
  const uint64_t u = UINT64_MAX;
  const size_t z = 4096;
  EXPECT_EQ(shape_text("N=", N, " C=", i).view(), "N=" + std::to_string(N) + " C=" + std::to_string(i));
  EXPECT_EQ(shape_text("a=", neg, " b=", big, " u=", u, " z=", z).view(),
            "a=" + std::to_string(neg) + " b=" + std::to_string(big) + " u=" + std::to_string(u) +
                " z=" + std::to_string(z));
  const std::string str = "S=";
  const std::string_view sv = " T=";
  const char* cs = " x=";
  EXPECT_EQ(shape_text(str, 5, sv, 6, cs, 0.5, " ", 1e-8f, " ", 'c', " ", true).view(), "S=5 T=6 x=0.5 1e-08 c true");
  EXPECT_EQ(std::string_view(shape_text("n=", 7).c_str()), "n=7");
  EXPECT_EQ(shape_text().view(), "");
  // a string literal converts (LaunchSpec{"op", "B=8 T=1024", ...})
  const ShapeText lit = "B=8 T=1024";
  EXPECT_EQ(lit.view(), "B=8 T=1024");
  EXPECT_EQ(ShapeText().view(), "");
}

TEST(ShapeText, CutsLongTextSafely) {
  const std::string long_text(300, 'x');
  const ShapeText t = shape_text("N=", 1, " ", long_text, " C=", 2);
  ASSERT_EQ(t.size, ShapeText::kCapacity - 1);
  EXPECT_EQ(t.c_str()[t.size], '\0');
  EXPECT_EQ(t.view(), "N=1 " + std::string(ShapeText::kCapacity - 1 - 4 - 3, 'x') + "...");
  // exactly full: kept whole, no mark
  const std::string fits(ShapeText::kCapacity - 1, 'y');
  EXPECT_EQ(shape_text(fits).view(), fits);
  EXPECT_EQ(ShapeText(long_text.c_str()).view(), std::string(ShapeText::kCapacity - 4, 'x') + "...");
}

TEST(ShapeText, BuildingAndValidatingALaunchAllocatesNothing) {
  DeviceLimits l = h100_like();
  const int64_t B = 8, T = 1024, NH = 12, NKV = 4, HS = 64;
  long problems = 0;
  g_allocs = 0;
  g_counting = true;
  for (int rep = 0; rep < 100; ++rep) {
    const LaunchSpec s{"attention_forward", shape_text("B=", B, " T=", T + rep, " NH=", NH, " NKV=", NKV, " HS=", HS),
                       {B * NH, 1, 1}, {256, 1, 1}, 0};
    problems += static_cast<long>(launch_problem(l, s).size());
    const LaunchSpec e{"adamw_update_flat", shape_text("n=", B * T * 768, " S=", 3), {1024, 1, 1}, {256, 1, 1}, 0};
    problems += static_cast<long>(launch_problem(l, e).size());
  }
  g_counting = false;
  EXPECT_EQ(problems, 0);
  EXPECT_EQ(g_allocs.load(), 0) << "heap allocations while building and validating launches";
  // the counter works: an allocation is seen
  g_counting = true;
  void* volatile p = std::malloc(16);
  g_counting = false;
  std::free(p);
  EXPECT_EQ(g_allocs.load(), 1);
  // and the failure message still names everything
  const LaunchSpec s{"attention_forward", shape_text("B=", B, " T=", T, " NH=", NH, " NKV=", NKV, " HS=", HS),
                     {1, 70000, 1}, {256, 1, 1}, 0};
  EXPECT_EQ(launch_problem(l, s), "grid.y=70000 exceeds the device limit 65535");
  EXPECT_EQ(describe_launch(s, l),
            "op=attention_forward shapes=(B=8 T=1024 NH=12 NKV=4 HS=64) grid=(1,70000,1) block=(256,1,1) smem=0 "
            "device=3 (Synthetic H100)");
}

}  // namespace
}  // namespace lmf
