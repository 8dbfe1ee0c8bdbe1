// test_cuda_flash_attention.cpp: the bf16 flash attention op (ops/attention.h,
// flash_attention_forward/backward) with both kernel sets, lmforge's own (flash_attention.cu) and
// cuDNN's (flash_attention_cudnn.cpp), against the CPU fp32 reference (attention_forward/backward) run
// on the same bf16-rounded inputs, docs/MIXED_PRECISION.md.
//
// Checked per shape and per run (forward kernels, backward kernels, GradMode): out, lse (reference in
// double on the host), and the gradient in dqkv split into its q, k and v columns. Accumulate runs
// start dqkv at a nonzero bf16 baseline (the op must add, +=); Overwrite runs start it poisoned (NaN:
// every element must be written). out, lse and the delta scratch are poisoned first; each run is
// repeated and must give identical bits. Runs: lmforge (Accumulate and Overwrite), cudnn, and cuDNN's
// backward after lmforge's forward (the lse contract is shared). Shapes: T = 1, tails of every tile
// size (7, 65, 100, 200, 257), MHA and GQA, HS 32/64/128, the GPT-2 shape at B = 1; HS 80, 96, 112,
// 128, 256 at GQA group sizes 1, 2, 4, 8. Both kernel sets:
// batch invariance, a graph-captured run matching a direct one bitwise. Bad input: unsupported head
// size, bf16 tensors on the CPU, wrong dtypes, cudnn with Accumulate. Throughput at the GPT-2 training
// shape is printed (not checked).
// cuDNN runs need cudnn_attention_available(); without it they report SKIPPED, and with
// LMF_REQUIRE_CUDNN=1 in the environment (tools/gpu_check.sh sets it) they fail instead.
// The measured errors are printed on "measured" lines (the device script greps them).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "core/device.h"
#include "ops/attention.h"
#include "support/gpu_util.h"
#include "support/test_util.h"

namespace lmf {
namespace {

using test::DeviceBuffer;
using test::from_bf16;
using test::randn;
using test::rel_l2_error;
using test::round_bf16;
using test::tensor_of;
using test::to_bf16;

// Error bounds, rel_l2_error (||got - ref|| / ||ref|| over a whole tensor, in double):
// - out: bf16 storage of out alone is up to 2^-9 (~2e-3) relative per element; P is rounded to bf16
//   as the operand of P V (2^-9 per term, averaging out over the sum). Expected a few 1e-3: 1e-2.
// - dq, dk, dv (the increments of dqkv): bf16 operands P and dS in the tensor-core products, delta
//   from the bf16 out, and the one rounding of dqkv + gradient to bf16 (the baseline is at most half
//   the gradient's RMS, so that rounding stays ~2^-9 of the gradient). Expected a few 1e-3: 1e-2.
// - lse: fp32 dot products of exact bf16 products, ex2.approx and log2f; absolute error ~1e-5 for
//   |lse| up to ~10. Bound: max |lse - ref| <= 1e-3.
constexpr double kOutBound = 1e-2, kGradBound = 1e-2, kLseAbsBound = 1e-3;

struct Dims {
  int64_t B, T, NH, NKV, HS;
  int64_t C3() const { return (NH + 2 * NKV) * HS; }
  int64_t CO() const { return NH * HS; }
  std::string str() const {
    return "B=" + std::to_string(B) + " T=" + std::to_string(T) + " NH=" + std::to_string(NH) +
           " NKV=" + std::to_string(NKV) + " HS=" + std::to_string(HS);
  }
};

struct GpuResult {
  std::vector<bf16> out, dqkv;
  std::vector<float> lse, delta;
};

bool same_bits(const void* a, const void* b, size_t bytes) { return std::memcmp(a, b, bytes) == 0; }

// Which kernels run the forward and the backward, and how the backward writes dqkv.
struct FlashRun {
  FlashKernels fwd, bwd;
  GradMode mode;
  std::string str() const {
    return std::string("fwd=") + flash_kernels_name(fwd) + " bwd=" + flash_kernels_name(bwd) +
           (mode == GradMode::Accumulate ? " accumulate" : " overwrite");
  }
};
constexpr FlashRun kLmforge{FlashKernels::lmforge, FlashKernels::lmforge, GradMode::Accumulate};
constexpr FlashRun kCudnn{FlashKernels::cudnn, FlashKernels::cudnn, GradMode::Overwrite};

// cuDNN runs happen when cuDNN is available; else they are skipped, or fail under LMF_REQUIRE_CUDNN=1.
bool cudnn_required() {
  const char* v = std::getenv("LMF_REQUIRE_CUDNN");
  return v != nullptr && std::string(v) == "1";
}
#define LMF_REQUIRE_CUDNN()                                                                           \
  do {                                                                                                \
    if (!cudnn_attention_available()) {                                                               \
      if (cudnn_required()) FAIL() << "LMF_REQUIRE_CUDNN=1 but cudnn_attention_available() is false"; \
      GTEST_SKIP() << "cuDNN attention not available in this build / on this machine";               \
    }                                                                                                 \
  } while (0)

// The runs to check at a shape: lmforge's kernels in both modes, and with cuDNN available and running
// the shape, its kernels and its backward after lmforge's forward (with LMF_REQUIRE_CUDNN=1 a missing
// cuDNN is a failure; a shape cuDNN refuses is printed, and is a failure where cudnn_must_run).
// Head sizes lmforge's kernels do not run (e.g. 256) are cuDNN's alone.
std::vector<FlashRun> runs_to_check(const Dims& d, bool cudnn_must_run) {
  const bool ours = flash_head_size_supported(FlashKernels::lmforge, d.HS);
  std::vector<FlashRun> r;
  if (ours) r = {kLmforge, {FlashKernels::lmforge, FlashKernels::lmforge, GradMode::Overwrite}};
  if (!cudnn_attention_available()) {
    EXPECT_FALSE(cudnn_required()) << "LMF_REQUIRE_CUDNN=1 but cudnn_attention_available() is false";
    return r;
  }
  const std::string why = cudnn_attention_problem(d.B, d.T, static_cast<int>(d.NH), static_cast<int>(d.NKV), d.HS);
  if (!why.empty()) {
    std::cout << "measured cudnn refuses " << d.str() << ": " << why << "\n";
    EXPECT_FALSE(cudnn_must_run) << why;
    return r;
  }
  r.push_back(kCudnn);
  if (ours) r.push_back({FlashKernels::lmforge, FlashKernels::cudnn, GradMode::Overwrite});
  return r;
}

// Forward then backward on the GPU; out, lse and delta poisoned first; dqkv starts at dqkv0 (Accumulate)
// or poisoned (Overwrite).
GpuResult run_gpu(const Dims& d, const std::vector<bf16>& qkv, const std::vector<bf16>& dout,
                  const std::vector<bf16>& dqkv0, const FlashRun& run = kLmforge) {
  const int64_t B = d.B, T = d.T, NH = d.NH;
  const int nh = static_cast<int>(d.NH), nkv = static_cast<int>(d.NKV);
  const size_t rows_f32 = static_cast<size_t>(B * NH * T) * sizeof(float);
  DeviceBuffer gqkv(qkv), gdout(dout), gdqkv(dqkv0), gout(static_cast<size_t>(B * T * d.CO()) * sizeof(bf16)),
      glse(rows_f32), gdelta(rows_f32);
  gout.poison();
  glse.poison();
  gdelta.poison();
  if (run.mode == GradMode::Overwrite) gdqkv.poison();
  const Tensor tqkv = gqkv.tensor(DType::bf16, {B, T, d.C3()}, "qkv");
  const Tensor tout = gout.tensor(DType::bf16, {B, T, d.CO()}, "out");
  const Tensor tlse = glse.tensor(DType::f32, {B, NH, T}, "lse");
  flash_attention_forward(tout, tlse, tqkv, nh, nkv, run.fwd);
  flash_attention_backward(gdqkv.tensor(DType::bf16, {B, T, d.C3()}, "dqkv"),
                           gdelta.tensor(DType::f32, {B, NH, T}, "delta"),
                           gdout.tensor(DType::bf16, {B, T, d.CO()}, "dout"), tqkv, tout, tlse, nh, nkv, run.mode,
                           run.bwd);
  return {gout.download<bf16>(), gdqkv.download<bf16>(), glse.download<float>(), gdelta.download<float>()};
}

// lse[b, h, t] = ln sum_{s <= t} exp(scale q_t . k_s) in double, scale = the op's fp32 1/sqrt(HS).
std::vector<double> reference_lse(const Dims& d, const std::vector<float>& qkv) {
  const int64_t C3 = d.C3(), group = d.NH / d.NKV;
  const double scale = static_cast<double>(1.0f / std::sqrt(static_cast<float>(d.HS)));
  std::vector<double> lse(static_cast<size_t>(d.B * d.NH * d.T)), s(static_cast<size_t>(d.T));
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < d.NH; ++h) {
      const int64_t kcol = (d.NH + h / group) * d.HS;
      for (int64_t t = 0; t < d.T; ++t) {
        const float* q = &qkv[static_cast<size_t>((b * d.T + t) * C3 + h * d.HS)];
        double mx = -INFINITY;
        for (int64_t j = 0; j <= t; ++j) {
          const float* k = &qkv[static_cast<size_t>((b * d.T + j) * C3 + kcol)];
          double dot = 0;
          for (int64_t i = 0; i < d.HS; ++i) dot += static_cast<double>(q[i]) * k[i];
          s[static_cast<size_t>(j)] = scale * dot;
          mx = std::max(mx, s[static_cast<size_t>(j)]);
        }
        double sum = 0;
        for (int64_t j = 0; j <= t; ++j) sum += std::exp(s[static_cast<size_t>(j)] - mx);
        lse[static_cast<size_t>((b * d.NH + h) * d.T + t)] = mx + std::log(sum);
      }
    }
  return lse;
}

// Column part of a (B, T, C3) buffer: 0 = q heads, 1 = k heads, 2 = v heads.
int part_of(const Dims& d, int64_t col) { return col < d.NH * d.HS ? 0 : col < (d.NH + d.NKV) * d.HS ? 1 : 2; }

std::vector<float> extract_part(const Dims& d, const std::vector<float>& m, int part) {
  std::vector<float> r;
  for (int64_t row = 0; row < d.B * d.T; ++row)
    for (int64_t c = 0; c < d.C3(); ++c)
      if (part_of(d, c) == part) r.push_back(m[static_cast<size_t>(row * d.C3() + c)]);
  return r;
}

void check_case(const Dims& d, bool cudnn_must_run = true) {
  const uint64_t seed = test::fresh_seed();
  const std::string what = d.str() + " seed=" + std::to_string(seed);
  const int64_t B = d.B, T = d.T, NH = d.NH;
  const int nh = static_cast<int>(d.NH), nkv = static_cast<int>(d.NKV);
  // Inputs rounded to bf16 once; the CPU reference runs on the rounded values.
  std::vector<float> qkv = round_bf16(randn(static_cast<size_t>(B * T * d.C3()), seed));
  std::vector<float> dout = round_bf16(randn(static_cast<size_t>(B * T * d.CO()), seed + 1));

  // CPU fp32 reference: out, probs (B, NH, T, T); gradient into zeros.
  std::vector<float> out_ref(static_cast<size_t>(B * T * d.CO())), probs(static_cast<size_t>(B * NH * T * T)),
      dprobs(probs.size()), grad(qkv.size(), 0.0f);
  attention_forward(tensor_of(out_ref, {B, T, d.CO()}, "out"), tensor_of(probs, {B, NH, T, T}, "probs"),
                    tensor_of(qkv, {B, T, d.C3()}, "qkv"), nh, nkv);
  attention_backward(tensor_of(grad, {B, T, d.C3()}, "dqkv"), tensor_of(dprobs, {B, NH, T, T}, "dprobs"),
                     tensor_of(dout, {B, T, d.CO()}, "dout"), tensor_of(qkv, {B, T, d.C3()}, "qkv"),
                     tensor_of(probs, {B, NH, T, T}, "probs"), nh, nkv);
  const std::vector<double> lse_ref = reference_lse(d, qkv);

  // Baseline of dqkv: bf16 values at half the RMS of each part's gradient (floor 1e-3), so that a
  // kernel that overwrote instead of adding misses by ~50%.
  double rms[3] = {0, 0, 0};
  for (int p = 0; p < 3; ++p) {
    const std::vector<float> g = extract_part(d, grad, p);
    double ss = 0;
    for (float v : g) ss += static_cast<double>(v) * v;
    rms[p] = std::max(std::sqrt(ss / static_cast<double>(std::max<size_t>(g.size(), 1))), 1e-3);
  }
  std::vector<float> dqkv0 = randn(qkv.size(), seed + 2);
  for (size_t i = 0; i < dqkv0.size(); ++i)
    dqkv0[i] *= static_cast<float>(0.5 * rms[part_of(d, static_cast<int64_t>(i % static_cast<size_t>(d.C3())))]);
  dqkv0 = round_bf16(dqkv0);

  for (const FlashRun& run : runs_to_check(d, cudnn_must_run)) {
    const std::string what_run = what + " " + run.str();
    const bool acc = run.mode == GradMode::Accumulate;
    const GpuResult gpu = run_gpu(d, to_bf16(qkv), to_bf16(dout), to_bf16(dqkv0), run);

    const double e_out = rel_l2_error(from_bf16(gpu.out), out_ref);
    double e_lse = 0;
    for (size_t i = 0; i < lse_ref.size(); ++i) {
      const double e = std::fabs(static_cast<double>(gpu.lse[i]) - lse_ref[i]);
      e_lse = std::isfinite(e) ? std::max(e_lse, e) : INFINITY;
    }
    const std::vector<float> got = from_bf16(gpu.dqkv);
    std::vector<float> inc(got.size());
    for (size_t i = 0; i < got.size(); ++i) inc[i] = acc ? got[i] - dqkv0[i] : got[i];
    double e_grad[3];
    for (int p = 0; p < 3; ++p) e_grad[p] = rel_l2_error(extract_part(d, inc, p), extract_part(d, grad, p));

    std::cout << "measured flash rel err " << d.str() << " " << run.str() << ": out " << e_out << " dq " << e_grad[0]
              << " dk " << e_grad[1] << " dv " << e_grad[2] << " (bound " << kOutBound << "), lse max abs " << e_lse
              << " (bound " << kLseAbsBound << ")\n";
    EXPECT_LE(e_out, kOutBound) << "out " << what_run;
    EXPECT_LE(e_lse, kLseAbsBound) << "lse " << what_run;
    EXPECT_LE(e_grad[0], kGradBound) << "dq " << what_run;
    EXPECT_LE(e_grad[1], kGradBound) << "dk " << what_run;
    EXPECT_LE(e_grad[2], kGradBound) << "dv " << what_run;
    if (run.bwd == FlashKernels::lmforge)  // the cuDNN backward keeps its own row sums
      for (size_t i = 0; i < gpu.delta.size(); ++i)
        ASSERT_TRUE(std::isfinite(gpu.delta[i])) << "delta[" << i << "] not written " << what_run;

    // Bitwise repeat: forward + backward again from the same inputs.
    const GpuResult again = run_gpu(d, to_bf16(qkv), to_bf16(dout), to_bf16(dqkv0), run);
    EXPECT_TRUE(same_bits(again.out.data(), gpu.out.data(), gpu.out.size() * sizeof(bf16))) << "out " << what_run;
    EXPECT_TRUE(same_bits(again.lse.data(), gpu.lse.data(), gpu.lse.size() * sizeof(float))) << "lse " << what_run;
    EXPECT_TRUE(same_bits(again.dqkv.data(), gpu.dqkv.data(), gpu.dqkv.size() * sizeof(bf16))) << "dqkv " << what_run;
    if (run.bwd == FlashKernels::lmforge)
      EXPECT_TRUE(same_bits(again.delta.data(), gpu.delta.data(), gpu.delta.size() * sizeof(float)))
          << "delta " << what_run;
  }
}

TEST(CudaFlashAttention, AwkwardSizesMatchCpu) {
  LMF_REQUIRE_GPU();
  const Dims cases[] = {{1, 1, 1, 1, 64}, {2, 7, 4, 2, 32}, {1, 100, 4, 1, 64}, {2, 257, 2, 2, 128},
                        {1, 200, 4, 2, 128}, {3, 65, 3, 3, 32}};
  for (const Dims& d : cases) check_case(d, d.T > 1);  // cuDNN 9 refuses T = 1
}

TEST(CudaFlashAttention, Gpt2ShapeMatchesCpu) {
  LMF_REQUIRE_GPU();
  check_case({1, 1024, 12, 12, 64});
}

// HS 64 (the GPT-2 head size) at tails of the 64-row tiles, several key tiles per query tile, GQA, B > 1.
TEST(CudaFlashAttention, Hs64TailsMatchCpu) {
  LMF_REQUIRE_GPU();
  const Dims cases[] = {{1, 63, 2, 2, 64}, {2, 130, 4, 2, 64}, {3, 65, 3, 1, 64}, {2, 320, 4, 4, 64}};
  for (const Dims& d : cases) check_case(d);
}

// The head sizes of real models (80, 96, 112, 128, 256) at every GQA group size 1, 2, 4, 8, at tile
// tails (T = 1, 33, 100, 129, 190 across the cases), both kernel sets where they run the size (256:
// cuDNN only; every case must run somewhere, and with LMF_REQUIRE_CUDNN=1 cuDNN must run each T > 1).
TEST(CudaFlashAttention, HeadSizesAndGroupsMatchCpu) {
  LMF_REQUIRE_GPU();
  const int64_t sizes[] = {80, 96, 112, 128, 256}, groups[] = {1, 2, 4, 8}, lengths[] = {33, 100, 129, 190};
  int i = 0;
  for (const int64_t hs : sizes)
    for (const int64_t g : groups) {
      const int64_t nkv = g == 8 ? 1 : 2, T = lengths[i++ % 4];
      const Dims d{g == 1 ? 2 : 1, T, g * nkv, nkv, hs};
      ASSERT_TRUE(flash_head_size_supported(FlashKernels::lmforge, hs) || cudnn_attention_available())
          << "HS=" << hs << " runs on neither kernel set here";
      check_case(d);
    }
  for (const int64_t hs : {80, 112}) check_case({1, 1, 2, 1, hs}, false);  // one row; cuDNN 9 refuses T = 1
}

// A sequence's outputs and gradient are bitwise the same alone (B = 1) and inside a batch of 3.
void check_batch_invariant(const FlashRun& run) {
  const Dims one{1, 200, 4, 2, 64}, three{3, 200, 4, 2, 64};
  const uint64_t seed = test::fresh_seed();
  const std::vector<bf16> qkv3 = to_bf16(randn(static_cast<size_t>(three.B * three.T * three.C3()), seed));
  const std::vector<bf16> dout3 = to_bf16(randn(static_cast<size_t>(three.B * three.T * three.CO()), seed + 1));
  const std::vector<bf16> dqkv3 = to_bf16(randn(qkv3.size(), seed + 2, 0.01f));
  const size_t n1 = static_cast<size_t>(one.T * one.C3()), o1 = static_cast<size_t>(one.T * one.CO());
  const GpuResult all = run_gpu(three, qkv3, dout3, dqkv3, run);
  for (int64_t b = 0; b < three.B; ++b) {
    const auto slice = [&](const std::vector<bf16>& v, size_t n) {
      return std::vector<bf16>(v.begin() + static_cast<int64_t>(n) * b, v.begin() + static_cast<int64_t>(n) * (b + 1));
    };
    const GpuResult alone = run_gpu(one, slice(qkv3, n1), slice(dout3, o1), slice(dqkv3, n1), run);
    EXPECT_TRUE(same_bits(alone.dqkv.data(), all.dqkv.data() + n1 * static_cast<size_t>(b), n1 * sizeof(bf16)))
        << "dqkv of sequence " << b << " " << run.str() << " seed=" << seed;
    EXPECT_TRUE(same_bits(alone.out.data(), all.out.data() + o1 * static_cast<size_t>(b), o1 * sizeof(bf16)))
        << "out of sequence " << b << " " << run.str() << " seed=" << seed;
  }
}

// lmforge's kernels: every sum's order depends only on T, HS and the group size.
TEST(CudaFlashAttention, BatchInvariant) {
  LMF_REQUIRE_GPU();
  check_batch_invariant(kLmforge);
}

// cuDNN's kernels (its plan may depend on B: measured here, not assumed).
TEST(CudaFlashAttention, CudnnBatchInvariant) {
  LMF_REQUIRE_GPU();
  LMF_REQUIRE_CUDNN();
  check_batch_invariant(kCudnn);
}

// cudnn_attention_autotune keeps every bit: outputs of the same buffers before and after tuning (the
// tuner runs the engine configs on the buffers of each plan's latest call, so they stay alive here).
TEST(CudaFlashAttention, CudnnTuneKeepsEveryBit) {
  LMF_REQUIRE_GPU();
  LMF_REQUIRE_CUDNN();
  const Dims d{2, 384, 4, 2, 64};
  const int nh = static_cast<int>(d.NH), nkv = static_cast<int>(d.NKV);
  const uint64_t seed = test::fresh_seed();
  const std::vector<bf16> qkv = to_bf16(randn(static_cast<size_t>(d.B * d.T * d.C3()), seed));
  const std::vector<bf16> dout = to_bf16(randn(static_cast<size_t>(d.B * d.T * d.CO()), seed + 1));
  const size_t rows_f32 = static_cast<size_t>(d.B * d.NH * d.T) * sizeof(float);
  DeviceBuffer gqkv(qkv), gdout(dout), gdqkv(qkv.size() * sizeof(bf16)),
      gout(static_cast<size_t>(d.B * d.T * d.CO()) * sizeof(bf16)), glse(rows_f32), gdelta(rows_f32);
  const Tensor tqkv = gqkv.tensor(DType::bf16, {d.B, d.T, d.C3()}, "qkv");
  const Tensor tout = gout.tensor(DType::bf16, {d.B, d.T, d.CO()}, "out");
  const Tensor tlse = glse.tensor(DType::f32, {d.B, d.NH, d.T}, "lse");
  auto run = [&] {
    gout.poison();
    glse.poison();
    gdqkv.poison();
    flash_attention_forward(tout, tlse, tqkv, nh, nkv, FlashKernels::cudnn);
    flash_attention_backward(gdqkv.tensor(DType::bf16, {d.B, d.T, d.C3()}, "dqkv"),
                             gdelta.tensor(DType::f32, {d.B, d.NH, d.T}, "delta"),
                             gdout.tensor(DType::bf16, {d.B, d.T, d.CO()}, "dout"), tqkv, tout, tlse, nh, nkv,
                             GradMode::Overwrite, FlashKernels::cudnn);
    return GpuResult{gout.download<bf16>(), gdqkv.download<bf16>(), glse.download<float>(), {}};
  };
  const GpuResult before = run();
  cudnn_attention_tune_begin();
  run();
  const AttentionTuneResult r = cudnn_attention_autotune();
  const GpuResult after = run();
  EXPECT_EQ(r.plans, 2) << "the forward and backward plans of " << d.str();
  EXPECT_GE(r.equal, r.plans) << "each plan's own engine config, run again, gives the same bits";
  EXPECT_TRUE(same_bits(before.out.data(), after.out.data(), before.out.size() * sizeof(bf16))) << "out " << d.str();
  EXPECT_TRUE(same_bits(before.lse.data(), after.lse.data(), before.lse.size() * sizeof(float))) << "lse " << d.str();
  EXPECT_TRUE(same_bits(before.dqkv.data(), after.dqkv.data(), before.dqkv.size() * sizeof(bf16)))
      << "dqkv " << d.str();
  EXPECT_EQ(cudnn_attention_autotune().plans, 0) << "the window closes";
  std::printf("[ measured ] cuDNN attention tuning, %s: %d plans, %d engine configs, %d same bits, %d changed\n",
              d.str().c_str(), r.plans, r.candidates, r.equal, r.changed);
}

// Throughput at the GPT-2 124M training shape (B=16, NH=12, T=1024, HS=64), printed only (FLOPs of
// the causal half: forward 4 B NH HS T(T+1)/2, backward counted as 2.5x the forward, as FlashAttention
// reports). The outputs must at least be finite.
TEST(CudaFlashAttention, Gpt2Throughput) {
  LMF_REQUIRE_GPU();
  std::vector<FlashKernels> sets = {FlashKernels::lmforge};
  if (cudnn_attention_available()) sets.push_back(FlashKernels::cudnn);
  for (const FlashKernels k : sets) {
  const GradMode mode = k == FlashKernels::cudnn ? GradMode::Overwrite : GradMode::Accumulate;
  const Dims d{16, 1024, 12, 12, 64};
  const int64_t B = d.B, T = d.T, NH = d.NH;
  const int nh = static_cast<int>(d.NH), nkv = static_cast<int>(d.NKV);
  const uint64_t seed = test::fresh_seed();
  DeviceBuffer gqkv(to_bf16(randn(static_cast<size_t>(B * T * d.C3()), seed))),
      gdout(to_bf16(randn(static_cast<size_t>(B * T * d.CO()), seed + 1))),
      gdqkv(static_cast<size_t>(B * T * d.C3()) * sizeof(bf16)), gout(static_cast<size_t>(B * T * d.CO()) * sizeof(bf16)),
      glse(static_cast<size_t>(B * NH * T) * sizeof(float)), gdelta(static_cast<size_t>(B * NH * T) * sizeof(float));
  const Tensor tqkv = gqkv.tensor(DType::bf16, {B, T, d.C3()}, "qkv");
  const Tensor tout = gout.tensor(DType::bf16, {B, T, d.CO()}, "out");
  const Tensor tlse = glse.tensor(DType::f32, {B, NH, T}, "lse");
  const Tensor tdqkv = gdqkv.tensor(DType::bf16, {B, T, d.C3()}, "dqkv");
  const Tensor tdelta = gdelta.tensor(DType::f32, {B, NH, T}, "delta");
  const Tensor tdout = gdout.tensor(DType::bf16, {B, T, d.CO()}, "dout");
  auto fwd = [&] { flash_attention_forward(tout, tlse, tqkv, nh, nkv, k); };
  auto bwd = [&] { flash_attention_backward(tdqkv, tdelta, tdout, tqkv, tout, tlse, nh, nkv, mode, k); };
  std::vector<void*> ev = cuda_event_pool_create(3);
  constexpr int kWarm = 3, kIters = 20;
  for (int i = 0; i < kWarm; ++i) {
    fwd();
    bwd();
  }
  cuda_event_record(ev[0]);
  for (int i = 0; i < kIters; ++i) fwd();
  cuda_event_record(ev[1]);
  for (int i = 0; i < kIters; ++i) bwd();
  cuda_event_record(ev[2]);
  device_synchronize();
  const double ms_fwd = cuda_event_elapsed_ms(ev[0], ev[1]) / kIters, ms_bwd = cuda_event_elapsed_ms(ev[1], ev[2]) / kIters;
  cuda_event_pool_destroy(ev);
  const double flop_fwd = 4.0 * static_cast<double>(B * NH * d.HS) * static_cast<double>(T * (T + 1) / 2);
  std::cout << "measured flash " << flash_kernels_name(k) << " fwd " << ms_fwd << " ms " << flop_fwd / (ms_fwd * 1e9)
            << " TFLOP/s, bwd " << ms_bwd << " ms " << 2.5 * flop_fwd / (ms_bwd * 1e9) << " TFLOP/s (" << d.str()
            << ")\n";
  for (float v : from_bf16(gout.download<bf16>())) ASSERT_TRUE(std::isfinite(v));
  for (float v : from_bf16(gdqkv.download<bf16>())) ASSERT_TRUE(std::isfinite(v));
  }
}

// The training step runs inside a CUDA graph capture (cudaStreamCaptureModeGlobal: no allocation, no
// host sync): forward + backward captured and replayed give the bits of a direct run. Every head size
// (HS 64 and 128 launch with more than 48 KiB of dynamic shared memory).
TEST(CudaFlashAttention, GraphCaptureMatchesDirectRun) {
  LMF_REQUIRE_GPU();
  std::vector<FlashRun> sets = {kLmforge};
  if (cudnn_attention_available()) sets.push_back(kCudnn);
  for (const FlashRun& run : sets)
  for (const int64_t HS : {32, 64, 128}) {
    const Dims d{2, 150, 4, 2, HS};
    const int64_t B = d.B, T = d.T, NH = d.NH;
    const int nh = static_cast<int>(d.NH), nkv = static_cast<int>(d.NKV);
    const uint64_t seed = test::fresh_seed();
    const std::vector<bf16> qkv = to_bf16(randn(static_cast<size_t>(B * T * d.C3()), seed));
    const std::vector<bf16> dout = to_bf16(randn(static_cast<size_t>(B * T * d.CO()), seed + 1));
    const std::vector<bf16> dqkv0 = to_bf16(randn(qkv.size(), seed + 2, 0.01f));
    const GpuResult direct = run_gpu(d, qkv, dout, dqkv0, run);  // also builds cuDNN's plans (not in a capture)

    const size_t rows_f32 = static_cast<size_t>(B * NH * T) * sizeof(float);
    DeviceBuffer gqkv(qkv), gdout(dout), gdqkv(dqkv0), gout(static_cast<size_t>(B * T * d.CO()) * sizeof(bf16)),
        glse(rows_f32), gdelta(rows_f32);
    const Tensor tqkv = gqkv.tensor(DType::bf16, {B, T, d.C3()}, "qkv");
    const Tensor tout = gout.tensor(DType::bf16, {B, T, d.CO()}, "out");
    const Tensor tlse = glse.tensor(DType::f32, {B, NH, T}, "lse");
    cuda_capture_begin();
    flash_attention_forward(tout, tlse, tqkv, nh, nkv, run.fwd);
    flash_attention_backward(gdqkv.tensor(DType::bf16, {B, T, d.C3()}, "dqkv"),
                             gdelta.tensor(DType::f32, {B, NH, T}, "delta"),
                             gdout.tensor(DType::bf16, {B, T, d.CO()}, "dout"), tqkv, tout, tlse, nh, nkv, run.mode,
                             run.bwd);
    void* graph = cuda_capture_end();
    gout.poison();
    glse.poison();
    gdelta.poison();
    gdqkv.upload(dqkv0);
    if (run.mode == GradMode::Overwrite) gdqkv.poison();
    cuda_graph_replay(graph);
    device_synchronize();
    cuda_graph_destroy(graph);
    const std::string what = d.str() + " " + run.str() + " seed=" + std::to_string(seed);
    const std::vector<bf16> out = gout.download<bf16>(), dqkv = gdqkv.download<bf16>();
    const std::vector<float> lse = glse.download<float>();
    EXPECT_TRUE(same_bits(out.data(), direct.out.data(), out.size() * sizeof(bf16))) << "out " << what;
    EXPECT_TRUE(same_bits(lse.data(), direct.lse.data(), lse.size() * sizeof(float))) << "lse " << what;
    EXPECT_TRUE(same_bits(dqkv.data(), direct.dqkv.data(), dqkv.size() * sizeof(bf16))) << "dqkv " << what;
  }
}

// Device buffers of one small call (B = 1, T = 5, NH = 2, NKV = 1) at head size HS, for the error tests.
struct SmallCall {
  static constexpr int64_t B = 1, T = 5, NH = 2, NKV = 1;
  int64_t HS, C3;
  DeviceBuffer qkv, dqkv, out, dout, lse, delta;
  explicit SmallCall(int64_t hs)
      : HS(hs), C3((NH + 2 * NKV) * hs), qkv(static_cast<size_t>(B * T * C3) * 2), dqkv(static_cast<size_t>(B * T * C3) * 2),
        out(static_cast<size_t>(B * T * NH * HS) * 2), dout(static_cast<size_t>(B * T * NH * HS) * 2),
        lse(static_cast<size_t>(B * NH * T) * 4), delta(static_cast<size_t>(B * NH * T) * 4) {}
};

// No GPU needed: the one rule for head sizes.
TEST(CudaFlashAttention, HeadSizeRule) {
  for (const int64_t hs : {32, 64, 80, 96, 112, 128})
    EXPECT_TRUE(flash_head_size_supported(FlashKernels::lmforge, hs)) << hs;
  for (const int64_t hs : {0, 8, 16, 48, 72, 136, 256}) EXPECT_FALSE(flash_head_size_supported(FlashKernels::lmforge, hs)) << hs;
  for (const int64_t hs : {8, 40, 72, 200, 256}) EXPECT_TRUE(flash_head_size_supported(FlashKernels::cudnn, hs)) << hs;
  for (const int64_t hs : {0, 4, 12, 100, 264}) EXPECT_FALSE(flash_head_size_supported(FlashKernels::cudnn, hs)) << hs;
}

TEST(CudaFlashAttention, UnsupportedHeadSizeIsAnError) {
  LMF_REQUIRE_GPU();
  SmallCall c(48);
  const int64_t B = c.B, T = c.T, NH = c.NH, NKV = c.NKV, HS = c.HS, C3 = c.C3;
  DeviceBuffer &qkv = c.qkv, &dqkv = c.dqkv, &out = c.out, &dout = c.dout, &lse = c.lse, &delta = c.delta;
  try {
    flash_attention_forward(out.tensor(DType::bf16, {B, T, NH * HS}, "out"), lse.tensor(DType::f32, {B, NH, T}, "lse"),
                            qkv.tensor(DType::bf16, {B, T, C3}, "qkv"), int(NH), int(NKV));
    ADD_FAILURE() << "forward with HS=48 did not throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("HS=48"), std::string::npos) << e.what();
  }
  EXPECT_THROW(flash_attention_backward(dqkv.tensor(DType::bf16, {B, T, C3}, "dqkv"),
                                        delta.tensor(DType::f32, {B, NH, T}, "delta"),
                                        dout.tensor(DType::bf16, {B, T, NH * HS}, "dout"),
                                        qkv.tensor(DType::bf16, {B, T, C3}, "qkv"),
                                        out.tensor(DType::bf16, {B, T, NH * HS}, "out"),
                                        lse.tensor(DType::f32, {B, NH, T}, "lse"), int(NH), int(NKV)),
               Error);
  // lse must be f32.
  EXPECT_THROW(flash_attention_forward(out.tensor(DType::bf16, {B, T, NH * 32}, "out"),
                                       lse.tensor(DType::bf16, {B, NH, T}, "lse"),
                                       qkv.tensor(DType::bf16, {B, T, (NH + 2 * NKV) * 32}, "qkv"), int(NH), int(NKV)),
               Error);
}

// cuDNN's backward writes dqkv: asking it to add is an error naming the tensor, before any work.
TEST(CudaFlashAttention, CudnnAccumulateIsAnError) {
  LMF_REQUIRE_GPU();
  LMF_REQUIRE_CUDNN();
  SmallCall c(64);
  const int64_t B = c.B, T = c.T, NH = c.NH, NKV = c.NKV, HS = c.HS, C3 = c.C3;
  DeviceBuffer &qkv = c.qkv, &dqkv = c.dqkv, &out = c.out, &dout = c.dout, &lse = c.lse, &delta = c.delta;
  try {
    flash_attention_backward(dqkv.tensor(DType::bf16, {B, T, C3}, "dqkv"), delta.tensor(DType::f32, {B, NH, T}, "delta"),
                             dout.tensor(DType::bf16, {B, T, NH * HS}, "dout"), qkv.tensor(DType::bf16, {B, T, C3}, "qkv"),
                             out.tensor(DType::bf16, {B, T, NH * HS}, "out"), lse.tensor(DType::f32, {B, NH, T}, "lse"),
                             int(NH), int(NKV), GradMode::Accumulate, FlashKernels::cudnn);
    ADD_FAILURE() << "cudnn backward with GradMode::Accumulate did not throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot add to it"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("'dqkv'"), std::string::npos) << e.what();
  }
}

// The --attention flag: auto, lmforge, cudnn; anything else names the flag. No GPU needed.
TEST(CudaFlashAttention, KernelsFlag) {
  const FlashShape gpt2{16, 1024, 12, 12, 64}, one_token{1, 1, 1, 1, 64};
  EXPECT_EQ(flash_kernels_from_flag("lmforge", true, gpt2, "--attention"), FlashKernels::lmforge);
  EXPECT_EQ(flash_kernels_from_flag("cudnn", false, gpt2, "--attention"), FlashKernels::cudnn);
  EXPECT_EQ(flash_kernels_from_flag("auto", false, gpt2, "--attention"), FlashKernels::lmforge);
  EXPECT_EQ(flash_kernels_from_flag("auto", true, gpt2, "--attention"),
            cudnn_attention_available() ? FlashKernels::cudnn : FlashKernels::lmforge);
  // auto consults the shape (cuDNN 9 refuses T = 1)
  const bool cudnn_one = cudnn_attention_available() && cudnn_attention_problem(1, 1, 1, 1, 64).empty();
  EXPECT_EQ(flash_kernels_from_flag("auto", true, one_token, "--attention"),
            cudnn_one ? FlashKernels::cudnn : FlashKernels::lmforge);
  try {
    flash_kernels_from_flag("flash3", true, gpt2, "--attention");
    ADD_FAILURE() << "--attention=flash3 did not throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--attention: unknown attention kernels 'flash3'"), std::string::npos)
        << e.what();
  }
}

// No GPU needed: the op entries refuse bf16 tensors on the CPU (the CPU stays the fp32 reference)
// and f32 activations (the flash kernels are bf16 only).
TEST(CudaFlashAttention, CpuTensorsAreAnError) {
  const int64_t B = 1, T = 3, NH = 2, NKV = 2, HS = 32, C3 = (NH + 2 * NKV) * HS;
  std::vector<bf16> qkv(static_cast<size_t>(B * T * C3)), out(static_cast<size_t>(B * T * NH * HS)),
      dqkv(qkv.size()), dout(out.size());
  std::vector<float> lse(static_cast<size_t>(B * NH * T)), delta(lse.size()), qkv_f32(qkv.size()),
      out_f32(out.size());
  const Tensor tqkv(qkv.data(), DType::bf16, {B, T, C3}, "qkv"), tout(out.data(), DType::bf16, {B, T, NH * HS}, "out");
  const Tensor tlse(lse.data(), DType::f32, {B, NH, T}, "lse");
  try {
    flash_attention_forward(tout, tlse, tqkv, int(NH), int(NKV));
    ADD_FAILURE() << "forward on CPU bf16 tensors did not throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("flash_attention_forward: bf16 tensors run on the GPU only"),
              std::string::npos)
        << e.what();
  }
  try {
    flash_attention_backward(Tensor(dqkv.data(), DType::bf16, {B, T, C3}, "dqkv"),
                             Tensor(delta.data(), DType::f32, {B, NH, T}, "delta"),
                             Tensor(dout.data(), DType::bf16, {B, T, NH * HS}, "dout"), tqkv, tout, tlse, int(NH),
                             int(NKV));
    ADD_FAILURE() << "backward on CPU bf16 tensors did not throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("flash_attention_backward: bf16 tensors run on the GPU only"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(flash_attention_forward(tensor_of(out_f32, {B, T, NH * HS}, "out"), tlse,
                                       tensor_of(qkv_f32, {B, T, C3}, "qkv"), int(NH), int(NKV)),
               Error);
}

}  // namespace
}  // namespace lmf
