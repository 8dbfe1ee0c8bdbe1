// op_plans.h: who owns the plans the GPU libraries choose (DESIGN.md section 1; docs/ARCHITECTURE.md).
//
// cuBLASLt's algorithm per GEMM signature and cuDNN's attention plans (and what --tune picked among
// their candidates) are state: each Model owns one OpPlans. While an OpPlansScope is alive, the GEMMs
// (ops/gemm_cuda.h) and cuDNN attention calls (ops/attention.h) this thread issues, and the tuners
// (gemm_autotune, cudnn_attention_autotune), use that object's tables; with none bound they use the
// process's default tables (op-level tests and tools). Two models never share a plan or a tuning
// result. Scopes nest; nothing is allocated by binding one. A CPU-only build keeps no plans.
#pragma once

namespace lmf {

class OpPlans {
 public:
  OpPlans();
  ~OpPlans();
  OpPlans(const OpPlans&) = delete;
  OpPlans& operator=(const OpPlans&) = delete;

  void* gemm() const { return gemm_; }    // the cuBLASLt plan table (gemm_cuda.cu), or null
  void* cudnn() const { return cudnn_; }  // the cuDNN plan cache (flash_attention_cudnn.cpp), or null

  // Batch-invariant choices (ModelPlan::batch_invariant; set by the owner before the first call): the
  // plans of GEMMs whose rows are the batch's (A not transposed) take one algorithm per weight shape for
  // every M, with no split-K, and are never re-tuned (ops/gemm_cuda.cu). The switch the GEMM launcher
  // reads; batch_invariant_now() below.
  bool batch_invariant() const { return batch_invariant_; }
  void set_batch_invariant(bool on) { batch_invariant_ = on; }

 private:
  void* gemm_ = nullptr;
  void* cudnn_ = nullptr;
  bool batch_invariant_ = false;
};

class OpPlansScope {
 public:
  explicit OpPlansScope(OpPlans& p);
  ~OpPlansScope();
  OpPlansScope(const OpPlansScope&) = delete;
  OpPlansScope& operator=(const OpPlansScope&) = delete;

 private:
  OpPlans* prev_;
};

// The innermost bound OpPlans of this thread, or nullptr (the default tables).
OpPlans* op_plans_current();
// Whether the bound OpPlans asks for batch-invariant choices (false with none bound).
inline bool batch_invariant_now() {
  const OpPlans* p = op_plans_current();
  return p != nullptr && p->batch_invariant();
}

// Implemented by the libraries' wrappers in CUDA builds (gemm_cuda.cu, flash_attention_cudnn.cpp).
namespace detail {
void* gemm_plans_new();
void gemm_plans_delete(void* p);
void* cudnn_plans_new();
void cudnn_plans_delete(void* p);
}  // namespace detail

}  // namespace lmf
