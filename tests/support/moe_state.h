// moe_state.h: the saved-state buffers of an MoE layer for the CPU tests (tests/test_ops_moe.cpp,
// tests/test_moe_vs_torch.cpp), header-only: host vectors sized from the config and the MoeState
// (ops/moe.h) viewing them, shared experts included when the config has them.
#pragma once
#include <cstdint>
#include <vector>

#include "ops/moe.h"
#include "support/test_util.h"

namespace lmf::test {

// Saved-state buffers for N tokens, and the MoeState over them.
struct StateBuf {
  std::vector<float> logits, scores, topk_w, pre, act, y, s_pre, s_act, s_y, s_g;
  std::vector<int32_t> topk_idx, slot_row, counts, offsets, perm;
  MoeState st;
  StateBuf(const MoeConfig& cfg, int64_t N) {
    const int64_t E = cfg.E, K = cfg.K, R = moe_rows(cfg, N), Fi = moe_f_in(cfg);
    logits.resize(N * E);
    scores.resize(N * E);
    topk_w.resize(N * K);
    topk_idx.resize(N * K);
    slot_row.resize(N * K);
    counts.resize(E);
    offsets.resize(E + 1);
    perm.resize(R);
    pre.resize(R * Fi);
    act.resize(R * cfg.F);
    y.resize(R * cfg.C);
    st.logits = test::tensor_of(logits, {N, E}, "moe_logits");
    st.scores = test::tensor_of(scores, {N, E}, "moe_scores");
    st.topk_idx = test::tensor_of(topk_idx, {N, K}, "moe_topk_idx");
    st.topk_w = test::tensor_of(topk_w, {N, K}, "moe_topk_w");
    st.slot_row = test::tensor_of(slot_row, {N, K}, "moe_slot_row");
    st.counts = test::tensor_of(counts, {E}, "moe_counts");
    st.offsets = test::tensor_of(offsets, {E + 1}, "moe_offsets");
    st.perm = test::tensor_of(perm, {R}, "moe_perm");
    st.pre = test::tensor_of(pre, {R, Fi}, "moe_pre");
    st.act = test::tensor_of(act, {R, cfg.F}, "moe_act");
    st.y = test::tensor_of(y, {R, cfg.C}, "moe_y");
    const int64_t S = cfg.n_shared;
    if (S > 0) {
      s_pre.resize(S * N * Fi);
      s_act.resize(S * N * cfg.F);
      s_y.resize(S * N * cfg.C);
      st.shared_pre = test::tensor_of(s_pre, {S, N, Fi}, "moe_shared_pre");
      st.shared_act = test::tensor_of(s_act, {S, N, cfg.F}, "moe_shared_act");
      st.shared_y = test::tensor_of(s_y, {S, N, cfg.C}, "moe_shared_y");
      if (cfg.shared_gate) {
        s_g.resize(S * N);
        st.shared_g = test::tensor_of(s_g, {S, N}, "moe_shared_g");
      }
    }
  }
};

}  // namespace lmf::test
