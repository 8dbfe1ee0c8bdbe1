#include "ops/op_plans.h"

namespace lmf {

namespace {
thread_local OpPlans* t_current = nullptr;  // the binding, not the plans: those live in their OpPlans
}  // namespace

#ifdef LMF_WITH_CUDA
OpPlans::OpPlans() : gemm_(detail::gemm_plans_new()), cudnn_(detail::cudnn_plans_new()) {}
OpPlans::~OpPlans() {
  detail::cudnn_plans_delete(cudnn_);
  detail::gemm_plans_delete(gemm_);
}
#else
OpPlans::OpPlans() = default;
OpPlans::~OpPlans() = default;
#endif

OpPlansScope::OpPlansScope(OpPlans& p) : prev_(t_current) { t_current = &p; }
OpPlansScope::~OpPlansScope() { t_current = prev_; }

OpPlans* op_plans_current() { return t_current; }

}  // namespace lmf
