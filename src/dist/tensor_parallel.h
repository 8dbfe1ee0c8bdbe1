// tensor_parallel.h: Megatron-style tensor parallelism (docs/DISTRIBUTED.md): which share of the model
// each rank of a tensor-parallel group holds, and the moves between the full model and the shares.
//
// A rank runs the model of tp_local_config(): the same layers with n_head / tp query heads and
// n_kv_head / tp key-value heads (column-parallel QKV: each rank's rows of Q, K and V), the attention
// output projection's matching columns (row-parallel), d_ff / tp columns of the MLP's fc (gate and up
// for SwiGLU) and rows of its output projection, and padded_vocab / tp rows of the token tables
// (vocabulary-parallel embedding and LM head). MoE layers split inside each expert the same way (each
// expert's hidden width over the ranks; router replicated): the ranks of a group hold the same tokens,
// so every rank runs every routed expert on its rows with no all-to-all and the GEMMs keep their shape
// whatever the routing. Norms, the row-parallel layers' biases, positions, the router and the other
// ends' parameters are replicated. The block step sums the row-parallel outputs forward and the
// column-parallel input gradients backward (model/block.cpp `reduce`); the router's and the shared
// gates' gradients are partial on each rank and summed by reduce_partial_grads.
//
// The full model's parameters are the one format on disk: scatter() takes a rank's share out of them
// (initialisation, checkpoints, --init-from), gather() puts the shares back together on every rank of
// the group (checkpoints are written once, unsharded).
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/arena.h"
#include "core/comm.h"
#include "model/config.h"

namespace lmf {

// The config rank `rank` of a tp-way group runs (tp = 1: c itself). Throws one line naming the field
// when tp does not divide n_head, n_kv_head, d_ff, the experts' width or the padded vocabulary.
ModelConfig tp_local_config(const ModelConfig& c, int tp, int rank);

// How one parameter of the full model maps to a rank's share: the full tensor seen as (outer, mid,
// inner), the share takes, of each segment [begin, begin + len) along mid, its rank-th 1/tp part.
struct TpSplit {
  std::string name;
  bool replicated = true;
  bool partial_grad = false;  // replicated, but each rank's gradient is a partial sum over the group
  int64_t outer = 1, mid = 1, inner = 1;
  std::vector<std::pair<int64_t, int64_t>> segments;  // (begin, len) along mid, each split tp ways
  int64_t segment_rows() const;  // the segments' lengths summed (along mid, before the split)
};

class TensorParallel {
 public:
  // full: the full model's parameter specs; local: the rank's (model_param_specs of the local config).
  // sequence_parallel: the norms see only this rank's rows, so their gradients are partial sums too.
  TensorParallel(const ModelConfig& full_config, const std::vector<TensorSpec>& full,
                 const std::vector<TensorSpec>& local, int tp, int rank, bool sequence_parallel = false);
  int tp() const { return tp_; }
  int rank() const { return rank_; }
  const std::vector<TpSplit>& splits() const { return splits_; }

  // local = this rank's share of full (CPU arenas of the full and the local specs; f32).
  void scatter(const Arena& full, Arena& local) const;
  // full = every rank's share put together, on every rank of the group (zero, place this rank's,
  // sum over the group: exact, every other element is zero). CPU arenas.
  void gather(const Arena& local, Arena& full, Communicator& group) const;
  // The gradients that are partial sums on each rank (router, shared gates) summed over the group.
  void reduce_partial_grads(const Arena& grads, Communicator& group) const;
  // This rank's share of the full model's squared gradient norm (its shards whole, replicated tensors
  // divided by tp): the group's sum is the full model's, in double on the host.
  double grad_norm_sq_share(const Arena& grads) const;
  // The same over elements [lo, hi) of the arena's flat view, their values at g (ZeRO-1's slice).
  double grad_norm_sq_share(const Arena& layout, const float* g, int64_t lo, int64_t hi) const;

 private:
  int tp_, rank_;
  std::vector<TpSplit> splits_;  // in the local (= full) spec order
};

}  // namespace lmf
