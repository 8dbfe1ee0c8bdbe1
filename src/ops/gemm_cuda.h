// gemm_cuda.h: the one place lmforge calls cuBLASLt (the GPU twin of ops/blas.h).
//
// Same argument convention as lmf::blas_sgemm: row-major C (M, N) = alpha op(A) op(B) + beta C,
// op(X) = X or X^T, leading dimensions in elements. Optionally + bias[j] on every row of C (the
// cuBLASLt BIAS epilogue, fused into the GEMM kernel). C is updated in place (C and D are the same
// matrix); with beta == 0 C is not read, so it may hold garbage (NaN) on entry.
//
// Numerics (DESIGN.md section 5):
// - fp32 in, fp32 out, with the caller's GemmMath (ops/gemm_math.h): GemmMath::fp32: CUBLAS_COMPUTE_32F
//   on CUDA cores only (tensor-core implementations are excluded and the chosen algorithm is checked),
//   so results match the CPU within fp32 rounding; GemmMath::tf32: CUBLAS_COMPUTE_32F_FAST_TF32, inputs
//   rounded to TF32 on the tensor cores, fp32 accumulation. bf16 operands come with mixed precision.
// - Deterministic: split-K is allowed only with cuBLASLt's out-of-place reductions (partials in the
//   workspace, added by a separate kernel in a fixed order; in-place split-K is excluded and the
//   chosen scheme is checked), and the algorithm for a signature is chosen once and reused, so the
//   same call gives bitwise identical results every time (the GPU tests run every GEMM shape twice).
//   NOT batch-invariant by default: the heuristic may pick a different tile or split for a different M.
//   Batch-invariant plans (an OpPlans bound with batch_invariant(), ops/op_plans.h; --batch-invariant)
//   pin both for the GEMMs whose rows are the batch's (A not transposed): one algorithm per weight
//   shape, the first of the heuristic's candidates for M = 4096 (alignments capped at 16 bytes, split-K
//   excluded) that cublasLtMatmulAlgoCheck accepts at M = 1 and at the plan's M; gemm_autotune leaves
//   them alone.
//
// Plans: the algorithm of each signature (precision, transposes, M, N, K, leading dimensions, the
// alignment of every operand's rows, bias or not, batch count and strides) is chosen by
// cublasLtMatmulAlgoGetHeuristic on its first call and cached, with its descriptors, in a fixed
// table of kGemmPlanCapacity entries: the table of the OpPlans bound to the calling thread (each Model
// owns one; ops/op_plans.h), or the process's default table when none is bound. Only that first call queries (host-side work inside cuBLASLt;
// lmforge allocates nothing for it). The model's shapes are fixed at set-up, so after the first step
// (or a warm-up at set-up) every step reuses cached plans: no query inside a captured or timed step.
// When the table is full the oldest plan is replaced; the heuristic is a pure function of the
// signature, so a re-query picks the same algorithm again.
//
// Workspace: every GEMM takes kGemmWorkspaceBytes of lmf::cuda_workspace() (reserve it at set-up with
// cuda_reserve_workspace; a smaller reservation fails on the first GEMM, naming the op). The workspace
// is shared with other launchers; everything runs on lmforge's one stream, so uses never overlap.
//
// Each GEMM counts as one launch in cuda_launch_count(). Errors name the caller's op, the transposes,
// M, N, K, the leading dimensions and what cuBLASLt said.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdio>

#include "core/bf16.h"
#include "ops/gemm_math.h"

namespace lmf {

inline constexpr size_t kGemmWorkspaceBytes = size_t{32} << 20;  // 32 MiB
inline constexpr int kGemmPlanCapacity = 256;

namespace cuda {  // launchers (gemm_cuda.cu); A, B, C, bias are device pointers

// Row-major C (M, N) = alpha op(A) op(B) + beta C [+ bias broadcast over the M rows]
// op(A): (M, K), op(B): (K, N); A is (M, lda) or (K, lda) when trans_a, B is (K, ldb) or (N, ldb)
// when trans_b; bias: (N) or nullptr. `op` names the calling op in errors ("linear_forward").
// M or N == 0 is a no-op; K >= 1. math: fp32 or tf32 (plans are keyed by it, so the two never share an
// algorithm).
void gemm(const char* op, GemmMath math, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
          const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc,
          const float* bias = nullptr);

// Strided-batched form: for i in [0, batch), C_i = alpha op(A_i) op(B_i) + beta C_i with
// X_i = X + i * stride_x (elements). One cuBLASLt call (CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT /
// STRIDED_BATCH_OFFSET); same numerics, determinism and plan cache as gemm() (the batch count and
// strides are part of the plan's signature, and the strides' alignment joins each operand's). A and B
// strides may be 0 (a shared operand); the C_i must not overlap: stride_c >= (M - 1) ldc + N when
// batch > 1. batch == 1 is exactly gemm() (strides ignored); batch == 0 is a no-op.
void gemm_strided_batched(const char* op, GemmMath math, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                          float alpha, const float* A, int64_t lda, int64_t stride_a, const float* B, int64_t ldb,
                          int64_t stride_b, float beta, float* C, int64_t ldc, int64_t stride_c, int64_t batch);

// bf16 operands (mixed precision): A and B bf16, fp32 accumulation (CUBLAS_COMPUTE_32F), alpha/beta
// fp32; C (also D) f32 or bf16, chosen by the overload. Same plan cache, determinism rules and
// workspace as the fp32 gemm(); the GemmMath mode does not apply (bf16 always runs on tensor cores).
// Epilogues (bf16 C only; `bias` is bf16 of length N, `aux` is (M, ldaux) bf16):
//   none       C = alpha op(A) op(B) + beta C [+ bias]
//   gelu_aux   aux = op(A) op(B) + bias (pre-activation, stored); C = gelu_tanh(aux); needs bias, beta == 0
//   dgelu      C = (alpha op(A) op(B)) * gelu_tanh'(aux); aux as stored by gelu_aux; no bias, beta == 0
enum class GemmEpilogue : uint8_t { none, gelu_aux, dgelu };
void gemm(const char* op, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const bf16* A,
          int64_t lda, const bf16* B, int64_t ldb, float beta, float* C, int64_t ldc);
void gemm(const char* op, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const bf16* A,
          int64_t lda, const bf16* B, int64_t ldb, float beta, bf16* C, int64_t ldc, const bf16* bias = nullptr,
          GemmEpilogue epilogue = GemmEpilogue::none, bf16* aux = nullptr, int64_t ldaux = 0);
// Heuristic queries made so far (plan-cache misses), for tests and set-up telemetry.
// Of the bound OpPlans' table (ops/op_plans.h), or the default one; so do the tuners below.
uint64_t gemm_plan_queries();

// Tuning. cuBLASLt's heuristic picks one algorithm per signature; another of its candidates is often a
// few percent faster on the same shape (`lmforge_bench --gemm-report` lists them). gemm_tune_begin()
// opens a window; gemm_autotune(), after a full training step, tunes every bf16 plan called in the
// window and closes it. For each plan it runs the heuristic's algorithm and each candidate on the
// latest call's own buffers and keeps a candidate only if its result has the same bits (a digest of C,
// and of aux for gelu_aux, at beta 0 and, without an epilogue, at beta 1, from C filled with a fixed
// pattern); of those it takes the fastest if it gains >= 2%. Candidates with another summation order (another
// split-K, say) differ in bits and are never taken, so tuning never changes a result: runs stay
// bitwise reproducible whatever the timing picks. Plans whose data is not finite or mostly zero keep
// the heuristic's choice.
// Contract: call gemm_autotune() between steps, when the outputs (C, gelu_aux's aux) of the plans called
// in the window are dead (after the optimizer step, before the next forward); it synchronises,
// allocates 24 bytes and times up to `candidates` algorithms per plan (~1 s for GPT-2 124M). Never
// inside a CUDA-graph capture (an error).
struct GemmTuneResult {
  int plans = 0;       // plans tuned (called in the window, bf16, not batched)
  int skipped = 0;     // of which kept their choice because the data could not tell results apart
  int candidates = 0;  // other deterministic candidates tried
  int equal = 0;       // of which gave the same bits
  int changed = 0;     // plans that took a faster candidate
  double saved_ms = 0;  // sum over changed plans of (calls in the window) x (time saved per call)
};
void gemm_tune_begin();
GemmTuneResult gemm_autotune(int candidates = 16);

// Diagnostic (lmforge_bench --gemm-report): for every cached bf16 plan that has been called, times the
// plan's algorithm and up to `candidates` of cuBLASLt's heuristic candidates (deterministic ones only)
// on scratch buffers of the plan's shapes, and prints a line per plan: calls per step (calls so far /
// `steps`), the chosen and the fastest time, and the f32-C plans' time at beta 0. Allocates and
// synchronises: call it between steps, never inside one.
inline constexpr int kGemmTuneCandidatesMax = 32;
void gemm_tune_report(std::FILE* out, double steps, int candidates = 16);

}  // namespace cuda
}  // namespace lmf
