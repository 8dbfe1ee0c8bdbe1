// Launch validation on the CPU with synthetic device limits: every launch is checked against
// grid (x <= 2^31-1, y and z <= 65535), block and shared-memory limits before it is made, and the
// error names the op, shapes, grid, block, smem and device.
#include <gtest/gtest.h>

#include "core/launch.h"

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

}  // namespace
}  // namespace lmf
