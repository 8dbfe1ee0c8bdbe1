// bench_grouped_gemm: times the MoE grouped GEMMs (ops/grouped_gemm.h) at an MoE layer's shapes
// (8192 tokens x top-2 = 32768 rows, G = 8 experts of uneven size around 4096 rows, d_model 768,
// d_ff 3072) against cuBLASLt on one dense GEMM of the same total size (lmf::cuda::gemm, bf16 in,
// bf16 out for NT/NN, f32 out for TN), and prints a table: TFLOP/s of each and their ratio.
// Rows marked (mma.sync) time the fallback kernels (grouped_gemm_set_kernel).
// The last four rows: GPT-2's MLP GEMM at B=64 (65536 x 3072 x 768), cuBLASLt with its GELU_AUX_BIAS
// and DGELU epilogues against cuBLASLt without them, and the TMA kernel (one group) without them.
// Each timing: 3 warm-up calls, then the median of 5 runs of 20 back-to-back calls (CUDA events).
#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "core/bf16.h"
#include "core/device.h"
#include "ops/gemm_cuda.h"
#include "ops/grouped_gemm.h"

using namespace lmf;

namespace {

template <class F>
double time_ms(F&& f, std::vector<void*>& ev) {
  for (int i = 0; i < 3; ++i) f();
  device_synchronize();
  std::vector<double> runs;
  for (int r = 0; r < 5; ++r) {
    cuda_event_record(ev[0]);
    for (int i = 0; i < 20; ++i) f();
    cuda_event_record(ev[1]);
    device_synchronize();
    runs.push_back(cuda_event_elapsed_ms(ev[0], ev[1]) / 20);
  }
  std::sort(runs.begin(), runs.end());
  return runs[runs.size() / 2];
}

void* upload_random_bf16(size_t n, uint64_t seed, const char* what) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<bf16> h(n);
  for (auto& v : h) v = bf16(d(rng));
  void* p = device_alloc(n * sizeof(bf16), what);
  copy_to_device(p, h.data(), n * sizeof(bf16));
  return p;
}

}  // namespace

int main() {
  if (!cuda_built() || cuda_device_count() == 0) {
    std::printf("bench_grouped_gemm: no CUDA device\n");
    return 0;
  }
  cuda_set_device(0);
  cuda_reserve_workspace(kGemmWorkspaceBytes);
  constexpr int G = 8;
  constexpr int64_t R = 32768, D = 768, F = 3072;

  // Uneven groups around R / G rows (fixed seed so runs compare), summing to R.
  std::mt19937_64 rng(1234);
  std::vector<int32_t> off(G + 1, 0);
  for (int g = 0; g < G; ++g) off[g + 1] = off[g] + static_cast<int32_t>(R / G - 600 + rng() % 1201);
  off[G] = static_cast<int32_t>(R);
  std::printf("rows per group:");
  for (int g = 0; g < G; ++g) std::printf(" %d", off[g + 1] - off[g]);
  std::printf("\n");
  void* doff = device_alloc(off.size() * sizeof(int32_t), "offsets");
  copy_to_device(doff, off.data(), off.size() * sizeof(int32_t));
  const auto* O = static_cast<const int32_t*>(doff);

  const int64_t big = R * F;  // largest row buffer (R, F)
  auto* A = static_cast<bf16*>(upload_random_bf16(big, 1, "A"));
  auto* B = static_cast<bf16*>(upload_random_bf16(std::max<int64_t>(G * D * F, big), 2, "B"));
  auto* C = static_cast<bf16*>(device_alloc(big * sizeof(bf16), "C"));
  auto* Cf = static_cast<float*>(device_alloc(G * D * F * sizeof(float), "C f32"));
  std::vector<void*> ev = cuda_event_pool_create(2);

  std::printf("%-30s %10s %10s %10s %10s %8s\n", "shape", "grouped_ms", "grouped_TF", "cublas_ms", "cublas_TF", "ratio");
  auto row = [&](const char* name, double flops, double ms_g, double ms_c) {
    std::printf("%-30s %10.4f %10.1f %10.4f %10.1f %8.3f\n", name, ms_g, flops / ms_g / 1e9, ms_c, flops / ms_c / 1e9,
                ms_c / ms_g);
    std::fflush(stdout);
  };
  // The default kernels, then the other choices for comparison.
  using K = cuda::GroupedGemmKernel;
  for (K kernel : {K::wgmma, K::mma_sync}) {
    cuda::grouped_gemm_set_kernel(kernel);
    const char* tag = kernel == K::wgmma ? "" : "(mma.sync)";
    for (auto [N, K] : {std::pair<int64_t, int64_t>{F, D}, {D, F}}) {
      const double flops = 2.0 * R * N * K;
      char name[64];
      // NT: C (R, N) = A (R, K) . B[g] (N, K)^T ; dense: C = A B^T with B (N, K).
      double g = time_ms([&] { cuda::grouped_gemm_nt(C, A, B, O, G, R, N, K); }, ev);
      double c = time_ms([&] { cuda::gemm("bench", false, true, R, N, K, 1.0f, A, K, B, K, 0.0f, C, N); }, ev);
      std::snprintf(name, sizeof name, "NT%s N=%lld K=%lld", tag, (long long)N, (long long)K);
      row(name, flops, g, c);
      // NN: C (R, N) = A (R, K) . B[g] (K, N).
      g = time_ms([&] { cuda::grouped_gemm_nn(C, A, B, O, G, R, N, K); }, ev);
      c = time_ms([&] { cuda::gemm("bench", false, false, R, N, K, 1.0f, A, K, B, N, 0.0f, C, N); }, ev);
      std::snprintf(name, sizeof name, "NN%s N=%lld K=%lld", tag, (long long)N, (long long)K);
      row(name, flops, g, c);
    }
    for (auto [M, N] : {std::pair<int64_t, int64_t>{F, D}, {D, F}}) {
      const double flops = 2.0 * R * M * N;
      // TN: C[g] (M, N) f32 = sum over the group's rows of A (R, M)^T B (R, N); dense: one (M, N) over all R.
      double g = time_ms([&] { cuda::grouped_gemm_tn(Cf, A, B, O, G, R, M, N, 0.0f); }, ev);
      double c = time_ms([&] { cuda::gemm("bench", true, false, M, N, R, 1.0f, A, M, B, N, 0.0f, Cf, N); }, ev);
      char name[64];
      std::snprintf(name, sizeof name, "TN%s M=%lld N=%lld", tag, (long long)M, (long long)N);
      row(name, flops, g, c);
      // beta = 1 (the training step's weight-gradient accumulation: C read and written once more)
      g = time_ms([&] { cuda::grouped_gemm_tn(Cf, A, B, O, G, R, M, N, 1.0f); }, ev);
      c = time_ms([&] { cuda::gemm("bench", true, false, M, N, R, 1.0f, A, M, B, N, 1.0f, Cf, N); }, ev);
      std::snprintf(name, sizeof name, "TN%s M=%lld N=%lld beta=1", tag, (long long)M, (long long)N);
      row(name, flops, g, c);
    }
  }
  cuda::grouped_gemm_set_kernel(K::wgmma);
  // Dense GPT-2 MLP shapes (one group): what the GELU epilogues cost cuBLASLt (their work runs after
  // each tile's main loop), and the TMA kernel on the same shape without them. docs/PERF.md has the
  // numbers and an attempt at overlapping such an epilogue in the TMA kernel.
  {
    const int64_t M = R * 2, N = F, Kd = D;  // 65536 rows: GPT-2's fc at B=64
    auto* Ad = static_cast<bf16*>(upload_random_bf16(M * Kd, 3, "A dense"));
    auto* Cd = static_cast<bf16*>(device_alloc(M * N * sizeof(bf16), "C dense"));
    auto* Xd = static_cast<bf16*>(device_alloc(M * N * sizeof(bf16), "aux dense"));
    auto* bias = static_cast<bf16*>(upload_random_bf16(N, 4, "bias"));
    std::vector<int32_t> o1 = {0, static_cast<int32_t>(M)};
    void* d1 = device_alloc(2 * sizeof(int32_t), "offsets 1");
    copy_to_device(d1, o1.data(), 2 * sizeof(int32_t));
    const double flops = 2.0 * M * N * Kd;
    const auto* O1 = static_cast<const int32_t*>(d1);
    // NT (fc forward, + bias and GELU_AUX_BIAS) and NN (mproj input gradient, DGELU): B is (N, K) / (K, N)
    for (bool nt : {true, false}) {
      const int64_t ldb = nt ? Kd : N;
      const auto epi = nt ? cuda::GemmEpilogue::gelu_aux : cuda::GemmEpilogue::dgelu;
      const double plain = time_ms([&] {
        cuda::gemm("bench", false, nt, M, N, Kd, 1.0f, Ad, Kd, B, ldb, 0.0f, Cd, N);
      }, ev);
      const double fused = time_ms([&] {
        cuda::gemm("bench", false, nt, M, N, Kd, 1.0f, Ad, Kd, B, ldb, 0.0f, Cd, N, nt ? bias : nullptr, epi, Xd, N);
      }, ev);
      const double tma = time_ms([&] {
        if (nt) cuda::grouped_gemm_nt(Cd, Ad, B, O1, 1, M, N, Kd);
        else cuda::grouped_gemm_nn(Cd, Ad, B, O1, 1, M, N, Kd);
      }, ev);
      row(nt ? "dense NT 65536x3072x768 gelu_aux / plain" : "dense NN 65536x3072x768 dgelu / plain", flops, fused, plain);
      row(nt ? "dense NT TMA kernel / cuBLASLt plain" : "dense NN TMA kernel / cuBLASLt plain", flops, tma, plain);
    }
    for (void* p : {static_cast<void*>(Ad), static_cast<void*>(Cd), static_cast<void*>(Xd), static_cast<void*>(bias), d1})
      device_free(p);
  }
  device_synchronize();
  cuda_event_pool_destroy(ev);
  for (void* p : {static_cast<void*>(A), static_cast<void*>(B), static_cast<void*>(C), static_cast<void*>(Cf), doff})
    device_free(p);
  return 0;
}
