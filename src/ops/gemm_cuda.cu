// gemm_cuda.cu: cuBLASLt GEMMs with cached, deterministic plans (gemm_cuda.h).
//
// Layout: cuBLASLt is column-major, lmforge row-major. A row-major (R, C) matrix with leading
// dimension ld is the column-major (C, R) matrix with the same ld, so row-major C = op(A) op(B) is
// computed as the column-major C^T (N, M) = op(B)^T op(A)^T: cuBLASLt's "A" operand is our B and its
// "B" operand is our A, with the transposes carried over unchanged. The bias epilogue adds a vector
// along the rows of cuBLASLt's D (length N), i.e. bias[j] on column j of every row of our C.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <sstream>
#include <string>
#include <utility>

#include "core/cuda_check.h"
#include "core/cuda_launch.cuh"
#include "core/device.h"
#include "ops/op_plans.h"
#include "ops/gemm_cuda.h"

namespace lmf::cuda {
namespace {

// Reduction schemes a plan may use (see gemm_cuda.h, Numerics): none, or split-K reduced out of
// place in a fixed order.
constexpr int64_t kSplitKMaxOutput = int64_t{1} << 20;  // see init_preference
constexpr uint32_t kAllowedReductionSchemes =
    static_cast<uint32_t>(CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE) | static_cast<uint32_t>(CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE);

// The numeric configuration of a GEMM: fp32 (CUDA cores) or tf32 (tensor cores, fp32 accumulation),
// chosen by the caller's GemmMath. bf16 operands (CUDA_R_16BF A/B with f32 accumulation) become a new
// value here, with its own impl mask, and a typed entry point next to gemm() in gemm_cuda.h.
// bf16_c32 / bf16_c16: bf16 A and B, fp32 accumulation, C f32 or bf16 (mixed precision).
enum class GemmPrecision : uint8_t { f32, tf32, bf16_c32, bf16_c16 };

struct GemmTypes {
  cublasComputeType_t compute;
  cudaDataType_t scale, a, b, c;
  uint64_t impl_mask;  // CUBLASLT_MATMUL_PREF_IMPL_MASK: which numerical implementations may be chosen
};

GemmTypes gemm_types(GemmPrecision p) {
  switch (p) {
    case GemmPrecision::f32:
      // Plain fp32 FMA kernels only: no tensor-core op (TF32 would round the inputs to 10 bits).
      return {.compute = CUBLAS_COMPUTE_32F,
              .scale = CUDA_R_32F,
              .a = CUDA_R_32F,
              .b = CUDA_R_32F,
              .c = CUDA_R_32F,
              .impl_mask = ~static_cast<uint64_t>(CUBLASLT_NUMERICAL_IMPL_FLAGS_TENSOR_OP_MASK)};
    case GemmPrecision::tf32:
      // fp32 storage and accumulation, inputs rounded to TF32 (10-bit mantissa) on the tensor cores.
      return {.compute = CUBLAS_COMPUTE_32F_FAST_TF32,
              .scale = CUDA_R_32F,
              .a = CUDA_R_32F,
              .b = CUDA_R_32F,
              .c = CUDA_R_32F,
              .impl_mask = ~uint64_t{0}};
    case GemmPrecision::bf16_c32:
    case GemmPrecision::bf16_c16:
      // bf16 operands on the tensor cores, fp32 accumulation (CUBLAS_COMPUTE_32F) and fp32 scalars.
      return {.compute = CUBLAS_COMPUTE_32F,
              .scale = CUDA_R_32F,
              .a = CUDA_R_16BF,
              .b = CUDA_R_16BF,
              .c = p == GemmPrecision::bf16_c32 ? CUDA_R_32F : CUDA_R_16BF,
              .impl_mask = ~uint64_t{0}};
  }
  fail("gemm: unsupported GemmPrecision ", static_cast<int>(p));
}

// Everything the heuristic's choice depends on.
struct GemmKey {
  int device = -1;
  GemmPrecision prec = GemmPrecision::f32;
  bool trans_a = false, trans_b = false, bias = false;
  GemmEpilogue epilogue = GemmEpilogue::none;
  int64_t M = 0, N = 0, K = 0, lda = 0, ldb = 0, ldc = 0, ldaux = 0;
  int64_t batch = 1, stride_a = 0, stride_b = 0, stride_c = 0;  // strides 0 when batch == 1
  uint32_t align_a = 0, align_b = 0, align_c = 0, align_bias = 0, align_aux = 0;  // bytes, powers of two <= 256
  bool invariant = false;  // a batch-invariant plan (see build_plan)
  bool operator==(const GemmKey&) const = default;
};

// A cached plan: the descriptors (initialised in place, nothing allocated) and the chosen algorithm.
// cuBLASLt's operands: lt_a is our B, lt_b is our A, lt_c is our C (also D).
struct GemmPlan {
  GemmKey key;
  bool valid = false;
  cublasLtMatmulDescOpaque_t desc;
  cublasLtMatrixLayoutOpaque_t lt_a, lt_b, lt_c;
  cublasLtMatmulAlgo_t algo;
  size_t workspace = 0;
  // The latest call, for gemm_autotune() and gemm_tune_report(): its op, operands and scalars; calls
  // so far and in the current tuning window (epoch).
  const char* op = "";
  const void *a = nullptr, *b = nullptr, *bias = nullptr;
  void *c = nullptr, *aux = nullptr;
  float alpha = 1.0f, beta = 0.0f;
  uint64_t calls = 0, epoch = 0, epoch_calls = 0;
  bool tuned = false;
};

// A model's plan table (ops/op_plans.h); the process's default table serves calls made with no OpPlans
// bound. Descriptors live in place: nothing to free.
struct PlanCache {
  std::mutex mu;
  GemmPlan plans[kGemmPlanCapacity];
  int next = 0;  // slot replaced when the table is full (round robin: the oldest plan)
  uint64_t queries = 0;
  uint64_t epoch = 0;  // the tuning window (gemm_tune_begin); 0: none open
};

PlanCache& plan_cache() {
  const OpPlans* bound = op_plans_current();
  if (bound != nullptr && bound->gemm() != nullptr) return *static_cast<PlanCache*>(bound->gemm());
  static PlanCache c;
  return c;
}

// Largest power of two (<= 256) dividing the address; cuBLASLt assumes 256 unless told otherwise.
uint32_t alignment_of(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t low = a & (~a + 1);
  return (low == 0 || low > 256) ? 256u : static_cast<uint32_t>(low);
}

// The same for a leading dimension of ld elements of `elem` bytes (the offset between row starts).
uint32_t alignment_of_bytes(int64_t ld, size_t elem = sizeof(float)) {
  return alignment_of(reinterpret_cast<const void*>(static_cast<uintptr_t>(ld) * elem));
}

bool is_bf16(GemmPrecision p) { return p == GemmPrecision::bf16_c32 || p == GemmPrecision::bf16_c16; }
size_t ab_size(GemmPrecision p) { return is_bf16(p) ? 2 : 4; }
size_t c_size(GemmPrecision p) { return p == GemmPrecision::bf16_c16 ? 2 : 4; }

const char* precision_text(GemmPrecision p) {
  switch (p) {
    case GemmPrecision::f32: return "fp32";
    case GemmPrecision::tf32: return "tf32";
    case GemmPrecision::bf16_c32: return "bf16 A/B, f32 C";
    case GemmPrecision::bf16_c16: return "bf16 A/B/C";
  }
  return "?";
}

std::string describe(const GemmKey& k, float alpha, float beta) {
  std::ostringstream os;
  os << "C(" << k.M << "x" << k.N << ") = " << alpha << " * " << (k.trans_a ? "A^T" : "A") << " "
     << (k.trans_b ? "B^T" : "B") << " + " << beta << " * C" << (k.bias ? " + bias" : "") << " with M=" << k.M
     << " N=" << k.N << " K=" << k.K << " lda=" << k.lda << " ldb=" << k.ldb << " ldc=" << k.ldc
     << " align(A,B,C,bias)=(" << k.align_a << "," << k.align_b << "," << k.align_c << "," << k.align_bias << ")";
  if (k.batch != 1)
    os << " batch=" << k.batch << " strides(A,B,C)=(" << k.stride_a << "," << k.stride_b << "," << k.stride_c << ")";
  if (k.epilogue == GemmEpilogue::gelu_aux) os << " epilogue=gelu_aux ldaux=" << k.ldaux;
  if (k.epilogue == GemmEpilogue::dgelu) os << " epilogue=dgelu ldaux=" << k.ldaux;
  os << " " << precision_text(k.prec);
  return os.str();
}

template <class T>
void set_desc(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr, const T& v) {
  LMF_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d, attr, &v, sizeof(v)));
}
template <class T>
void set_layout(cublasLtMatrixLayout_t l, cublasLtMatrixLayoutAttribute_t attr, const T& v) {
  LMF_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, attr, &v, sizeof(v)));
}
template <class T>
void set_pref(cublasLtMatmulPreference_t p, cublasLtMatmulPreferenceAttributes_t attr, const T& v) {
  LMF_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(p, attr, &v, sizeof(v)));
}

// The descriptors of p for key k (initialised in place; bias and aux only tell the heuristic their
// alignment, the call sets the real pointers).
void init_descriptors(GemmPlan& p, const GemmKey& k, const void* bias, const void* aux) {
  const GemmTypes t = gemm_types(k.prec);
  p.key = k;
  cublasLtMatmulDesc_t desc = &p.desc;
  LMF_CUBLAS_CHECK(cublasLtMatmulDescInit(desc, t.compute, t.scale));
  set_desc(desc, CUBLASLT_MATMUL_DESC_TRANSA, static_cast<int32_t>(k.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N));
  set_desc(desc, CUBLASLT_MATMUL_DESC_TRANSB, static_cast<int32_t>(k.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N));
  set_desc(desc, CUBLASLT_MATMUL_DESC_POINTER_MODE, static_cast<int32_t>(CUBLASLT_POINTER_MODE_HOST));
  cublasLtEpilogue_t epi = k.bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  if (k.epilogue == GemmEpilogue::gelu_aux) epi = CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
  if (k.epilogue == GemmEpilogue::dgelu) epi = CUBLASLT_EPILOGUE_DGELU;
  if (epi != CUBLASLT_EPILOGUE_DEFAULT) set_desc(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, static_cast<uint32_t>(epi));
  if (k.bias) {
    set_desc(desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, static_cast<int32_t>(t.c));
    // The heuristic reads the pointer's value (not the data) to learn its alignment.
    set_desc(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias);
  }
  if (k.epilogue != GemmEpilogue::none) {  // aux: the pre-activation, laid out like C (bf16)
    set_desc(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, aux);
    set_desc(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, static_cast<int64_t>(k.ldaux));
    set_desc(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE, static_cast<int32_t>(CUDA_R_16BF));
  }
  // Column-major views (see the file comment): our B as cuBLASLt's A, our A as its B, C^T as C/D.
  const auto u = [](int64_t v) { return static_cast<uint64_t>(v); };
  LMF_CUBLAS_CHECK(cublasLtMatrixLayoutInit(&p.lt_a, t.b, u(k.trans_b ? k.K : k.N), u(k.trans_b ? k.N : k.K), k.ldb));
  LMF_CUBLAS_CHECK(cublasLtMatrixLayoutInit(&p.lt_b, t.a, u(k.trans_a ? k.M : k.K), u(k.trans_a ? k.K : k.M), k.lda));
  LMF_CUBLAS_CHECK(cublasLtMatrixLayoutInit(&p.lt_c, t.c, u(k.N), u(k.M), k.ldc));
  if (k.batch != 1) {  // strided batch: the same count on every operand, each with its own offset
    const auto batch = static_cast<int32_t>(k.batch);
    const std::pair<cublasLtMatrixLayout_t, int64_t> layouts[] = {
        {&p.lt_a, k.stride_b}, {&p.lt_b, k.stride_a}, {&p.lt_c, k.stride_c}};
    for (const auto& [layout, stride] : layouts) {
      set_layout(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, batch);
      set_layout(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, stride);
    }
  }
}

// The preference every query uses: the workspace limit, out-of-place split-K only, the precision's
// implementations, and the operands' alignment.
void init_preference(cublasLtMatmulPreference_t pref, const GemmKey& k) {
  const GemmTypes t = gemm_types(k.prec);
  LMF_CUBLAS_CHECK(cublasLtMatmulPreferenceInit(pref));
  set_pref(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, static_cast<uint64_t>(kGemmWorkspaceBytes));
  // Split-K only with an out-of-place reduction: the partial products go to the workspace and a
  // separate kernel adds them in a fixed order, so the result is the same every run (in-place
  // split-K, which accumulates into C, is excluded). Tall-K weight gradients (768x768, K=16384)
  // need it to fill the GPU.
  // Outputs of kSplitKMaxOutput elements or more have tiles enough to fill the GPU: no split-K there
  // (bf16; on the H200 the heuristic split the 768 x 3072 weight gradients over K = 16,384 in two, at
  // 107-110 us, where one pass takes 100-102).
  // Batch-invariant plans: never (a split's partial sums would depend on the grid, hence on M).
  const bool may_split = !k.invariant && (!is_bf16(k.prec) || k.M * k.N < kSplitKMaxOutput);
  set_pref(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
           may_split ? kAllowedReductionSchemes : static_cast<uint32_t>(CUBLASLT_REDUCTION_SCHEME_NONE));
  set_pref(pref, CUBLASLT_MATMUL_PREF_IMPL_MASK, t.impl_mask);
  set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, k.align_b);  // cuBLASLt's A is our B
  set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, k.align_a);
  set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, k.align_c);
  set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, k.align_c);
}

// Fails unless algo honours the preference's masks (belt and braces: cuBLASLt should never offer one).
void check_algo(const cublasLtMatmulAlgo_t& algo, const GemmKey& k) {
  const GemmTypes t = gemm_types(k.prec);
  uint32_t scheme = 0;
  int32_t splitk = 1;
  uint64_t impl = 0;
  size_t written = 0;
  LMF_CUBLAS_CHECK(cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme,
                                                        sizeof(scheme), &written));
  LMF_CUBLAS_CHECK(cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk,
                                                        sizeof(splitk), &written));
  LMF_CUBLAS_CHECK(cublasLtMatmulAlgoCapGetAttribute(&algo, CUBLASLT_ALGO_CAP_NUMERICAL_IMPL_FLAGS, &impl,
                                                     sizeof(impl), &written));
  LMF_CHECK((scheme & ~kAllowedReductionSchemes) == 0, "cuBLASLt chose reduction scheme ", scheme, " (split-K ",
            splitk, ") outside the allowed out-of-place schemes: results could be nondeterministic");
  LMF_CHECK(!k.invariant || (scheme == CUBLASLT_REDUCTION_SCHEME_NONE && splitk <= 1), "cuBLASLt chose split-K ",
            splitk, " (reduction scheme ", scheme, ") for a batch-invariant plan");
  LMF_CHECK((impl & ~t.impl_mask) == 0, "cuBLASLt chose an algorithm with numerical implementation flags 0x", std::hex,
            impl, " outside the allowed mask 0x", t.impl_mask, " (tensor cores in an fp32 GEMM)");
}

// Batch-invariant plans (GemmKey::invariant, ops/op_plans.h) query the heuristic for their signature with
// M replaced by this and every operand's alignment capped at 16 bytes (what any lmforge tensor has), and
// no split-K: so every M of one weight shape (N, K, transposes, leading dimensions, epilogue) runs the
// same kernel configuration, whose K loop, and so each row's summation order, does not depend on M.
constexpr int64_t kInvariantM = 4096;
constexpr uint32_t kInvariantAlign = 16;

// The signature the heuristic is asked about for k (k itself, unless batch-invariant).
GemmKey query_key(const GemmKey& k) {
  if (!k.invariant) return k;
  GemmKey q = k;
  q.M = kInvariantM;
  for (uint32_t* a : {&q.align_a, &q.align_b, &q.align_c, &q.align_bias, &q.align_aux})
    *a = std::min(*a, kInvariantAlign);
  return q;
}

// Fills p for key k: descriptors, then one heuristic query with split-K reductions forbidden.
// Batch-invariant keys take the first of the heuristic's candidates for the query signature (in its
// order) that runs both at M = 1 and at k's M (cublasLtMatmulAlgoCheck): so every M of a weight shape
// takes the same algorithm, whichever M built its plan first.
void build_plan(GemmPlan& p, const GemmKey& k, const void* bias, const void* aux) {
  constexpr int kInvariantCandidates = 8;
  p.valid = false;
  const GemmKey q = query_key(k);
  init_descriptors(p, q, bias, aux);  // the query's descriptors first (the same as k's unless invariant)
  cublasLtMatmulPreferenceOpaque_t pref_storage;
  cublasLtMatmulPreference_t pref = &pref_storage;
  init_preference(pref, q);
  cublasLtMatmulHeuristicResult_t r[kInvariantCandidates];
  std::memset(r, 0, sizeof(r));
  int found = 0;
  ++plan_cache().queries;
  LMF_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(blaslt(), &p.desc, &p.lt_a, &p.lt_b, &p.lt_c, &p.lt_c, pref,
                                                  k.invariant ? kInvariantCandidates : 1, r, &found));
  LMF_CHECK(found >= 1 && r[0].state == CUBLAS_STATUS_SUCCESS, "cuBLASLt heuristic found no algorithm (returned ",
            found, ", state ", static_cast<int>(r[0].state), ")");
  int pick = 0;
  size_t workspace = r[0].workspaceSize;
  if (k.invariant) {
    GemmKey one = q;
    one.M = 1;
    GemmPlan at_one;
    init_descriptors(at_one, one, bias, aux);
    init_descriptors(p, k, bias, aux);
    auto runs = [&](GemmPlan& d, const cublasLtMatmulAlgo_t& algo, size_t& ws) {
      cublasLtMatmulHeuristicResult_t chk;
      std::memset(&chk, 0, sizeof(chk));
      const cublasStatus_t st = cublasLtMatmulAlgoCheck(blaslt(), &d.desc, &d.lt_a, &d.lt_b, &d.lt_c, &d.lt_c, &algo, &chk);
      ws = std::max(ws, chk.workspaceSize);
      return st == CUBLAS_STATUS_SUCCESS && chk.workspaceSize <= kGemmWorkspaceBytes;
    };
    pick = -1;
    for (int i = 0; i < found && pick < 0; ++i) {
      size_t ws = r[i].workspaceSize;
      if (r[i].state != CUBLAS_STATUS_SUCCESS || r[i].workspaceSize > kGemmWorkspaceBytes) continue;
      try {
        check_algo(r[i].algo, k);
      } catch (const Error&) {
        continue;
      }
      if (runs(at_one, r[i].algo, ws) && runs(p, r[i].algo, ws)) pick = i, workspace = ws;
    }
    LMF_CHECK(pick >= 0, "none of cuBLASLt's ", found, " candidates for this batch-invariant weight shape (queried at M=",
              kInvariantM, ") runs at both M=1 and M=", k.M);
  }
  LMF_CHECK(workspace <= kGemmWorkspaceBytes, "cuBLASLt algorithm needs ", workspace,
            " bytes of workspace, more than kGemmWorkspaceBytes=", kGemmWorkspaceBytes);
  check_algo(r[pick].algo, k);
  p.algo = r[pick].algo;
  p.workspace = workspace;
  p.calls = p.epoch = p.epoch_calls = 0;
  p.tuned = false;
  p.valid = true;
}

// The cached plan for k, building it on the first call. Called with the cache locked.
GemmPlan& find_plan(PlanCache& c, const GemmKey& k, const void* bias, const void* aux) {
  for (GemmPlan& p : c.plans)
    if (p.valid && p.key == k) return p;
  for (GemmPlan& p : c.plans)
    if (!p.valid) {
      build_plan(p, k, bias, aux);
      return p;
    }
  GemmPlan& p = c.plans[c.next];
  c.next = (c.next + 1) % kGemmPlanCapacity;
  build_plan(p, k, bias, aux);
  return p;
}

void gemm_run(const char* op, const GemmKey& k, float alpha, const void* A, const void* B, float beta, void* C,
              const void* bias, const void* aux) {
  void* ws = cuda_workspace(kGemmWorkspaceBytes, op);
  PlanCache& c = plan_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  GemmPlan& p = find_plan(c, k, bias, aux);
  p.op = op;
  p.a = A, p.b = B, p.c = C, p.bias = bias, p.aux = const_cast<void*>(aux);
  p.alpha = alpha, p.beta = beta;
  ++p.calls;
  if (p.epoch != c.epoch) p.epoch = c.epoch, p.epoch_calls = 0;
  ++p.epoch_calls;
  if (k.bias) set_desc(&p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias);
  if (k.epilogue != GemmEpilogue::none) set_desc(&p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, aux);
  LMF_CUBLAS_CHECK(cublasLtMatmul(blaslt(), &p.desc, &alpha, B, &p.lt_a, A, &p.lt_b, &beta, C, &p.lt_c, C, &p.lt_c,
                                  &p.algo, ws, kGemmWorkspaceBytes, stream()));
  count_launch();
}

}  // namespace

namespace {

GemmPrecision fp_precision(GemmMath m) { return m == GemmMath::tf32 ? GemmPrecision::tf32 : GemmPrecision::f32; }

struct GemmExtra {  // the mixed-precision additions to a call
  GemmEpilogue epilogue = GemmEpilogue::none;
  const void* aux = nullptr;
  int64_t ldaux = 0;
};

void gemm_impl(const char* op, GemmPrecision prec, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
               float alpha, const void* A, int64_t lda, int64_t stride_a, const void* B, int64_t ldb, int64_t stride_b,
               float beta, void* C, int64_t ldc, int64_t stride_c, int64_t batch, const void* bias,
               const GemmExtra& ex = {}) {
  if (M == 0 || N == 0) return;
  GemmKey k;
  k.device = cuda_limits().device;
  k.prec = prec;
  k.epilogue = ex.epilogue;
  k.ldaux = ex.epilogue == GemmEpilogue::none ? 0 : ex.ldaux;
  k.trans_a = trans_a;
  k.trans_b = trans_b;
  k.bias = bias != nullptr;
  k.M = M, k.N = N, k.K = K, k.lda = lda, k.ldb = ldb, k.ldc = ldc;
  // A single matrix has one plan whatever strides the caller passed.
  const bool batched = batch != 1;
  k.batch = batch;
  k.stride_a = batched ? stride_a : 0;
  k.stride_b = batched ? stride_b : 0;
  k.stride_c = batched ? stride_c : 0;
  // Alignment of every row start: the pointer's, the leading dimension's and, batched, the stride's
  // (in bytes; a stride of 0 constrains nothing).
  const size_t ea = ab_size(prec), ec = c_size(prec);
  k.align_a = std::min({alignment_of(A), alignment_of_bytes(lda, ea), alignment_of_bytes(k.stride_a, ea)});
  k.align_b = std::min({alignment_of(B), alignment_of_bytes(ldb, ea), alignment_of_bytes(k.stride_b, ea)});
  k.align_c = std::min({alignment_of(C), alignment_of_bytes(ldc, ec), alignment_of_bytes(k.stride_c, ec)});
  k.align_bias = bias ? alignment_of(bias) : 0;
  k.align_aux = k.epilogue == GemmEpilogue::none ? 0 : std::min(alignment_of(ex.aux), alignment_of_bytes(k.ldaux, 2));
  // batch-invariant plans for the GEMMs whose rows are the batch's (A not transposed: forward layers, the
  // LM head, activation gradients); weight gradients (A^T: M is a weight dimension) keep their plans
  k.invariant = batch == 1 && !trans_a && batch_invariant_now();
  // Row-major operands: A is (M, K) or (K, M) when transposed, B (K, N) or (N, K), C (M, N).
  const int64_t a_cols = trans_a ? M : K, b_cols = trans_b ? K : N;
  const uint32_t min_ab = static_cast<uint32_t>(ea), min_c = static_cast<uint32_t>(ec);
  const bool ok = M > 0 && N > 0 && K > 0 && M <= INT32_MAX && N <= INT32_MAX && K <= INT32_MAX && lda >= a_cols &&
                  ldb >= b_cols && ldc >= N && A && B && C && k.align_a >= min_ab && k.align_b >= min_ab &&
                  k.align_c >= min_c && (!bias || k.align_bias >= min_c);
  if (!ok)
    fail(op, ": invalid GEMM ", describe(k, alpha, beta), " (need 1 <= M, N, K <= INT32_MAX, lda >= ", a_cols,
         ", ldb >= ", b_cols, ", ldc >= N, non-null pointers aligned to their element size)");
  if (k.epilogue != GemmEpilogue::none) {
    // cuBLASLt's GELU epilogues: bf16 D and aux, aux rows (cuBLASLt's columns) a multiple of 8 elements.
    const bool eok = prec == GemmPrecision::bf16_c16 && batch == 1 && ex.aux && k.ldaux >= N && k.ldaux % 8 == 0 &&
                     beta == 0.0f && (k.epilogue == GemmEpilogue::gelu_aux) == (bias != nullptr);
    if (!eok)
      fail(op, ": invalid GEMM epilogue ", describe(k, alpha, beta),
           " (gelu_aux needs a bias, dgelu none; both need bf16 C, beta 0, no batch, aux with ldaux >= N and a "
           "multiple of 8)");
  }
  // Batched: the C_i must not overlap (each is written by its own tiles); A_i, B_i may be shared.
  const bool batch_ok = !batched || (batch >= 1 && batch <= INT32_MAX && stride_a >= 0 && stride_b >= 0 &&
                                     stride_c >= (M - 1) * ldc + N);
  if (!batch_ok)
    fail(op, ": invalid batched GEMM ", describe(k, alpha, beta),
         " (need 1 <= batch <= INT32_MAX, strides >= 0, stride_c >= (M - 1) ldc + N = ", (M - 1) * ldc + N, ")");
  try {
    gemm_run(op, k, alpha, A, B, beta, C, bias, ex.aux);
  } catch (const Error& e) {
    fail(op, ": cuBLASLt GEMM ", describe(k, alpha, beta), " failed: ", e.what());
  }
}

}  // namespace

void gemm(const char* op, GemmMath math, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
          const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc,
          const float* bias) {
  gemm_impl(op, fp_precision(math), trans_a, trans_b, M, N, K, alpha, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1, bias);
}

void gemm(const char* op, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const bf16* A,
          int64_t lda, const bf16* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  gemm_impl(op, GemmPrecision::bf16_c32, trans_a, trans_b, M, N, K, alpha, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1,
            nullptr);
}

void gemm(const char* op, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const bf16* A,
          int64_t lda, const bf16* B, int64_t ldb, float beta, bf16* C, int64_t ldc, const bf16* bias,
          GemmEpilogue epilogue, bf16* aux, int64_t ldaux) {
  gemm_impl(op, GemmPrecision::bf16_c16, trans_a, trans_b, M, N, K, alpha, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1,
            bias, GemmExtra{epilogue, aux, ldaux});
}

void gemm_strided_batched(const char* op, GemmMath math, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                          float alpha, const float* A, int64_t lda, int64_t stride_a, const float* B, int64_t ldb, int64_t stride_b,
                          float beta, float* C, int64_t ldc, int64_t stride_c, int64_t batch) {
  if (batch == 0) return;
  gemm_impl(op, fp_precision(math), trans_a, trans_b, M, N, K, alpha, A, lda, stride_a, B, ldb, stride_b, beta, C, ldc,
            stride_c, batch, nullptr);
}

uint64_t gemm_plan_queries() {
  PlanCache& c = plan_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return c.queries;
}

namespace {

template <class T>
T algo_config(const cublasLtMatmulAlgo_t& a, cublasLtMatmulAlgoConfigAttributes_t attr) {
  T v{};
  size_t written = 0;
  LMF_CUBLAS_CHECK(cublasLtMatmulAlgoConfigGetAttribute(&a, attr, &v, sizeof(v), &written));
  return v;
}

// "algo/tile/stages/splitK/swizzle/cluster" of an algorithm, to tell candidates apart in the report.
std::string algo_text(const cublasLtMatmulAlgo_t& a) {
  std::ostringstream os;
  os << algo_config<int32_t>(a, CUBLASLT_ALGO_CONFIG_ID) << "/" << algo_config<uint32_t>(a, CUBLASLT_ALGO_CONFIG_TILE_ID)
     << "/" << algo_config<uint32_t>(a, CUBLASLT_ALGO_CONFIG_STAGES_ID) << "/"
     << algo_config<int32_t>(a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM) << "/"
     << algo_config<uint32_t>(a, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING) << "/"
     << algo_config<uint16_t>(a, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID);
  return os.str();
}

// Elements spanned by a row-major operand of `rows` rows of leading dimension ld, batched.
size_t span(int64_t rows, int64_t ld, int64_t batch, int64_t stride) {
  return static_cast<size_t>(rows * ld + (batch - 1) * stride);
}

// --- Tuning (gemm_autotune) ------------------------------------------------------------------------

uint64_t g_tune_epoch_counter = 0;

__device__ __forceinline__ uint64_t mix64(uint64_t x) {  // splitmix64's finaliser
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// The (rows, cols) elements of a matrix with leading dimension ld (gaps between rows untouched) get a
// pattern in [-1, 1) from (seed, index): bits of an f32 (uint32_t) or of a bf16 (uint16_t).
template <class W>
__global__ void tune_fill_kernel(W* p, int64_t rows, int64_t cols, int64_t ld, uint64_t seed) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const float x = static_cast<float>(mix64(seed * 0x9e3779b97f4a7c15ull + i) >> 40) * 0x1p-23f - 1.0f;
    const uint32_t bits = __float_as_uint(x);
    p[(i / cols) * ld + i % cols] = static_cast<W>(sizeof(W) == 4 ? bits : (bits >> 16));
  }
}

// Order-independent digest of the same elements: out[0] += sum of mix(index) * (bits + 1) (mod 2^64),
// out[1] += elements that are not finite, out[2] += elements equal to zero. Integer sums: the same
// bits give the same digest whatever the block order.
template <class W>
__global__ void tune_digest_kernel(const W* p, int64_t rows, int64_t cols, int64_t ld, unsigned long long* out) {
  unsigned long long h = 0, bad = 0, zero = 0;
  const int64_t n = rows * cols;
  constexpr uint32_t kExp = sizeof(W) == 4 ? 0x7f800000u : 0x7f80u, kAbs = sizeof(W) == 4 ? 0x7fffffffu : 0x7fffu;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const uint32_t bits = p[(i / cols) * ld + i % cols];
    h += mix64(static_cast<uint64_t>(i)) * (bits + 1ull);
    bad += (bits & kExp) == kExp;
    zero += (bits & kAbs) == 0;
  }
  for (int o = 16; o > 0; o >>= 1) {
    h += __shfl_down_sync(0xffffffffu, h, o);
    bad += __shfl_down_sync(0xffffffffu, bad, o);
    zero += __shfl_down_sync(0xffffffffu, zero, o);
  }
  if ((threadIdx.x & 31) == 0) {
    atomicAdd(out, h);
    atomicAdd(out + 1, bad);
    atomicAdd(out + 2, zero);
  }
}

constexpr int64_t kTuneGrid = 1024, kTuneBlock = 256;

struct Digest {
  unsigned long long hash = 0, nonfinite = 0, zeros = 0;
  bool operator==(const Digest& o) const { return hash == o.hash && nonfinite == o.nonfinite && zeros == o.zeros; }
};

// One plan's tuning: its operands are the buffers of its latest call; C (and a gelu_aux plan's aux,
// which it writes) are overwritten, A, B, bias and a dgelu plan's aux only read.
class PlanTuner {
 public:
  PlanTuner(const GemmPlan& p, unsigned long long* counters, void* ws) : p_(p), counters_(counters), ws_(ws) {
    init_descriptors(t_, p.key, p.bias, p.aux);
    if (p.key.bias) set_desc(&t_.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, p.bias);
    if (p.key.epilogue != GemmEpilogue::none) set_desc(&t_.desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, p.aux);
  }

  // The result's digest (C, and aux where the plan writes it) from C filled with a fixed pattern.
  Digest check(const cublasLtMatmulAlgo_t& algo, float beta) {
    fill_c(beta == 0.0f ? 2 : 1);
    call(algo, beta);
    LMF_CUDA_CHECK(cudaMemsetAsync(counters_, 0, 3 * sizeof(unsigned long long), stream()));
    digest_c();
    if (p_.key.epilogue == GemmEpilogue::gelu_aux)
      launch({"gemm_autotune", shape_text("aux"), {kTuneGrid, 1, 1}, {kTuneBlock, 1, 1}, 0}, tune_digest_kernel<uint16_t>,
             static_cast<const uint16_t*>(p_.aux), p_.key.M, p_.key.N, p_.key.ldaux, counters_);
    Digest d;
    LMF_CUDA_CHECK(cudaMemcpyAsync(&d, counters_, sizeof(d), cudaMemcpyDeviceToHost, stream()));
    LMF_CUDA_CHECK(cudaStreamSynchronize(stream()));
    return d;
  }

  double time_us(const cublasLtMatmulAlgo_t& algo, cudaEvent_t e0, cudaEvent_t e1, int reps = 10) {
    for (int i = 0; i < 3; ++i) call(algo, p_.beta);
    LMF_CUDA_CHECK(cudaEventRecord(e0, stream()));
    for (int i = 0; i < reps; ++i) call(algo, p_.beta);
    LMF_CUDA_CHECK(cudaEventRecord(e1, stream()));
    LMF_CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0.0f;
    LMF_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    return 1e3 * ms / reps;
  }

  int candidates(cublasLtMatmulHeuristicResult_t* r, int n) {
    cublasLtMatmulPreferenceOpaque_t pref;
    init_preference(&pref, p_.key);
    int found = 0;
    LMF_CUBLAS_CHECK(
        cublasLtMatmulAlgoGetHeuristic(blaslt(), &t_.desc, &t_.lt_a, &t_.lt_b, &t_.lt_c, &t_.lt_c, &pref, n, r, &found));
    return found;
  }

 private:
  void call(const cublasLtMatmulAlgo_t& algo, float beta) {
    LMF_CUBLAS_CHECK(cublasLtMatmul(blaslt(), &t_.desc, &p_.alpha, p_.b, &t_.lt_a, p_.a, &t_.lt_b, &beta, p_.c,
                                    &t_.lt_c, p_.c, &t_.lt_c, &algo, ws_, kGemmWorkspaceBytes, stream()));
  }
  void fill_c(uint64_t seed) {
    const GemmKey& k = p_.key;
    const LaunchSpec spec{"gemm_autotune", shape_text("M=", k.M, " N=", k.N), {kTuneGrid, 1, 1}, {kTuneBlock, 1, 1}, 0};
    if (c_size(k.prec) == 4)
      launch(spec, tune_fill_kernel<uint32_t>, static_cast<uint32_t*>(p_.c), k.M, k.N, k.ldc, seed);
    else
      launch(spec, tune_fill_kernel<uint16_t>, static_cast<uint16_t*>(p_.c), k.M, k.N, k.ldc, seed);
  }
  void digest_c() {
    const GemmKey& k = p_.key;
    const LaunchSpec spec{"gemm_autotune", shape_text("M=", k.M, " N=", k.N), {kTuneGrid, 1, 1}, {kTuneBlock, 1, 1}, 0};
    if (c_size(k.prec) == 4)
      launch(spec, tune_digest_kernel<uint32_t>, static_cast<const uint32_t*>(p_.c), k.M, k.N, k.ldc, counters_);
    else
      launch(spec, tune_digest_kernel<uint16_t>, static_cast<const uint16_t*>(p_.c), k.M, k.N, k.ldc, counters_);
  }

  const GemmPlan& p_;
  unsigned long long* counters_;
  void* ws_;
  GemmPlan t_;  // descriptors with the latest call's bias and aux pointers
};

}  // namespace

void gemm_tune_begin() {
  PlanCache& c = plan_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.epoch = ++g_tune_epoch_counter;
}

GemmTuneResult gemm_autotune(int candidates) {
  GemmTuneResult res;
  PlanCache& c = plan_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  if (c.epoch == 0) return res;
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  LMF_CUDA_CHECK(cudaStreamIsCapturing(stream(), &capturing));
  if (capturing != cudaStreamCaptureStatusNone) fail("gemm_autotune: called inside a CUDA-graph capture");
  candidates = std::clamp(candidates, 1, kGemmTuneCandidatesMax);
  static cublasLtMatmulHeuristicResult_t r[kGemmTuneCandidatesMax];
  void* ws = cuda_workspace(kGemmWorkspaceBytes, "gemm_autotune");
  unsigned long long* counters = nullptr;
  cudaEvent_t e0 = nullptr, e1 = nullptr;
  LMF_CUDA_CHECK(cudaStreamSynchronize(stream()));
  LMF_CUDA_CHECK(cudaMalloc(&counters, 3 * sizeof(unsigned long long)));
  LMF_CUDA_CHECK(cudaEventCreate(&e0));
  LMF_CUDA_CHECK(cudaEventCreate(&e1));
  for (GemmPlan& p : c.plans) {
    // batch-invariant plans keep the algorithm of their weight shape: a candidate equal at this M may not be at others
    if (!p.valid || p.tuned || p.epoch != c.epoch || !is_bf16(p.key.prec) || p.key.batch != 1 || p.key.invariant)
      continue;
    p.tuned = true;
    ++res.plans;
    PlanTuner t(p, counters, ws);
    // The reference: the heuristic's algorithm at beta 0 and, without an epilogue (which needs beta 0),
    // at beta 1: a plan runs at both (a weight gradient's first backward writes, later ones add).
    // Data with values that are not finite or mostly zero could hide a different summation, so such a
    // plan keeps its choice.
    const bool both = p.key.epilogue == GemmEpilogue::none;
    const Digest ref0 = t.check(p.algo, 0.0f);
    const Digest ref1 = both ? t.check(p.algo, 1.0f) : ref0;
    const unsigned long long elems = static_cast<unsigned long long>(p.key.M * p.key.N);
    if (ref0.nonfinite != 0 || ref1.nonfinite != 0 || ref0.zeros > elems / 8) {
      ++res.skipped;
      continue;
    }
    const int found = t.candidates(r, candidates);
    const double before = t.time_us(p.algo, e0, e1);
    double best = before;
    int best_i = -1;
    for (int i = 0; i < found; ++i) {
      if (r[i].state != CUBLAS_STATUS_SUCCESS || r[i].workspaceSize > kGemmWorkspaceBytes) continue;
      if (std::memcmp(&r[i].algo, &p.algo, sizeof(p.algo)) == 0) continue;
      try {
        check_algo(r[i].algo, p.key);
      } catch (const Error&) {
        continue;
      }
      ++res.candidates;
      if (!(t.check(r[i].algo, 0.0f) == ref0)) continue;
      if (both && !(t.check(r[i].algo, 1.0f) == ref1)) continue;
      ++res.equal;
      const double us = t.time_us(r[i].algo, e0, e1);
      if (us < best) best = us, best_i = i;
    }
    // A switch must gain 2%: below that the timing's noise decides (harmless for the results, which are
    // the same bits, but it would make the choice vary from run to run).
    if (best_i >= 0 && best < 0.98 * before) {
      p.algo = r[best_i].algo;
      p.workspace = r[best_i].workspaceSize;
      ++res.changed;
      res.saved_ms += static_cast<double>(p.epoch_calls) * (before - best) / 1e3;
    }
  }
  c.epoch = 0;
  LMF_CUDA_CHECK(cudaEventDestroy(e0));
  LMF_CUDA_CHECK(cudaEventDestroy(e1));
  LMF_CUDA_CHECK(cudaFree(counters));
  return res;
}

void gemm_tune_report(std::FILE* out, double steps, int candidates) {
  // Static storage: a copy of the table (nvcc rejects std::vector of the opaque cuBLASLt structs here).
  static GemmPlan plans[kGemmPlanCapacity];
  static cublasLtMatmulHeuristicResult_t r[kGemmTuneCandidatesMax];
  candidates = std::clamp(candidates, 1, kGemmTuneCandidatesMax);
  int n = 0;
  {
    PlanCache& c = plan_cache();
    std::lock_guard<std::mutex> lock(c.mu);
    for (const GemmPlan& p : c.plans)
      if (p.valid && p.calls > 0 && is_bf16(p.key.prec)) plans[n++] = p;
  }
  std::sort(plans, plans + n, [](const GemmPlan& a, const GemmPlan& b) { return std::strcmp(a.op, b.op) < 0; });
  std::fprintf(out, "gemm report: %d bf16 plans, up to %d heuristic candidates each, 20 timed calls per candidate\n", n,
               candidates);
  std::fprintf(out, "%-28s %-44s %7s %9s %9s %4s %9s %-22s %-22s %9s\n", "op", "shape", "calls", "chosen_us", "best_us",
               "idx", "saved_ms", "chosen algo", "best algo", "beta0_us");
  cudaEvent_t e0, e1;
  LMF_CUDA_CHECK(cudaEventCreate(&e0));
  LMF_CUDA_CHECK(cudaEventCreate(&e1));
  double total_saved = 0.0, total_chosen = 0.0;
  void* ws = cuda_workspace(kGemmWorkspaceBytes, "gemm_tune_report");
  for (int pi = 0; pi < n; ++pi) {
    const GemmPlan& p = plans[pi];
    const GemmKey& k = p.key;
    const size_t ea = ab_size(k.prec), ec = c_size(k.prec);
    const size_t na = span(k.trans_a ? k.K : k.M, k.lda, k.batch, k.stride_a);
    const size_t nb = span(k.trans_b ? k.N : k.K, k.ldb, k.batch, k.stride_b);
    const size_t nc = span(k.M, k.ldc, k.batch, k.stride_c);
    void *A = nullptr, *B = nullptr, *C = nullptr, *bias = nullptr, *aux = nullptr;
    LMF_CUDA_CHECK(cudaMalloc(&A, na * ea));
    LMF_CUDA_CHECK(cudaMalloc(&B, nb * ea));
    LMF_CUDA_CHECK(cudaMalloc(&C, nc * ec));
    LMF_CUDA_CHECK(cudaMemset(A, 0x3c, na * ea));  // small finite values (bf16 0x3c3c ~ 0.011)
    LMF_CUDA_CHECK(cudaMemset(B, 0x3c, nb * ea));
    LMF_CUDA_CHECK(cudaMemset(C, 0x3c, nc * ec));
    if (k.bias) {
      LMF_CUDA_CHECK(cudaMalloc(&bias, k.N * 4));
      LMF_CUDA_CHECK(cudaMemset(bias, 0, k.N * 4));
    }
    if (k.epilogue != GemmEpilogue::none) {
      LMF_CUDA_CHECK(cudaMalloc(&aux, k.M * k.ldaux * 2));
      LMF_CUDA_CHECK(cudaMemset(aux, 0x3c, k.M * k.ldaux * 2));
    }
    static GemmPlan t;
    init_descriptors(t, k, bias, aux);
    cublasLtMatmulPreferenceOpaque_t pref_storage;
    init_preference(&pref_storage, k);
    int found = 0;
    LMF_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(blaslt(), &t.desc, &t.lt_a, &t.lt_b, &t.lt_c, &t.lt_c,
                                                    &pref_storage, candidates, r, &found));
    const float alpha = 1.0f;
    auto time_us = [&](const cublasLtMatmulAlgo_t& algo, float beta) {
      auto call = [&] {
        LMF_CUBLAS_CHECK(cublasLtMatmul(blaslt(), &t.desc, &alpha, B, &t.lt_a, A, &t.lt_b, &beta, C, &t.lt_c, C,
                                        &t.lt_c, &algo, ws, kGemmWorkspaceBytes, stream()));
      };
      for (int i = 0; i < 3; ++i) call();
      LMF_CUDA_CHECK(cudaEventRecord(e0, stream()));
      for (int i = 0; i < 20; ++i) call();
      LMF_CUDA_CHECK(cudaEventRecord(e1, stream()));
      LMF_CUDA_CHECK(cudaEventSynchronize(e1));
      float ms = 0.0f;
      LMF_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
      return 1e3 * ms / 20.0;
    };
    const double chosen = time_us(p.algo, p.beta);
    double best = chosen;
    int best_idx = -1;
    cublasLtMatmulAlgo_t best_algo = p.algo;
    for (int i = 0; i < found; ++i) {
      if (r[i].state != CUBLAS_STATUS_SUCCESS || r[i].workspaceSize > kGemmWorkspaceBytes) continue;
      try {
        check_algo(r[i].algo, k);
      } catch (const Error&) {
        continue;  // not deterministic, never a candidate
      }
      const double us = time_us(r[i].algo, p.beta);
      if (us < best) best = us, best_idx = i, best_algo = r[i].algo;
    }
    const double beta0 = p.beta != 0.0f ? time_us(p.algo, 0.0f) : chosen;
    const double calls = static_cast<double>(p.calls) / steps;
    const double saved = calls * (chosen - best) / 1e3;
    total_saved += saved;
    total_chosen += calls * chosen / 1e3;
    std::ostringstream shape;
    shape << (k.trans_a ? "T" : "N") << (k.trans_b ? "T" : "N") << " " << k.M << "x" << k.N << "x" << k.K
          << (k.bias ? " bias" : "") << (k.epilogue == GemmEpilogue::gelu_aux ? " gelu_aux" : "")
          << (k.epilogue == GemmEpilogue::dgelu ? " dgelu" : "")
          << (k.prec == GemmPrecision::bf16_c32 ? " f32C" : "")
          << " b=" << p.beta;
    if (k.batch != 1) shape << " batch=" << k.batch;
    std::fprintf(out, "%-28s %-44s %7.1f %9.1f %9.1f %4d %9.3f %-22s %-22s %9.1f\n", p.op, shape.str().c_str(), calls,
                 chosen, best, best_idx, saved, algo_text(p.algo).c_str(), algo_text(best_algo).c_str(), beta0);
    for (void* q : {A, B, C, bias, aux})
      if (q) LMF_CUDA_CHECK(cudaFree(q));
  }
  std::fprintf(out, "gemm report: chosen algorithms %.3f ms/step, fastest candidates would save %.3f ms/step\n",
               total_chosen, total_saved);
  LMF_CUDA_CHECK(cudaEventDestroy(e0));
  LMF_CUDA_CHECK(cudaEventDestroy(e1));
}

}  // namespace lmf::cuda

namespace lmf::detail {
void* gemm_plans_new() { return new cuda::PlanCache(); }
void gemm_plans_delete(void* p) { delete static_cast<cuda::PlanCache*>(p); }
}  // namespace lmf::detail
