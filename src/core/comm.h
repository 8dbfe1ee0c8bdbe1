// comm.h: the communicator seam (DESIGN.md section 7, docs/DISTRIBUTED.md).
//
// Data parallelism sums the gradients of its ranks (and their losses, for the log); tensor
// parallelism (later) sums a row-parallel layer's partial outputs forward and a column-parallel
// layer's input gradients backward, inside the block step. Every collective is over the ranks of one
// group, in place, and gives every rank the same bits. Implementations: SingleRank (world size 1:
// the identity), the Gloo communicator on the CPU (dist/gloo_comm.h), NCCL on GPUs
// (dist/nccl_comm.h).
#pragma once
#include "core/tensor.h"

namespace lmf {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  // t = sum over the group's ranks of t, in place (f32; every rank gets the same bits).
  virtual void all_reduce_sum(Tensor t) = 0;
  // t = element-wise max over the group's ranks of t, in place (f32).
  virtual void all_reduce_max(Tensor t) = 0;
  // out (world_size * n) = every rank's in (n), in rank order (f32, contiguous).
  virtual void all_gather(Tensor out, Tensor in) = 0;
  // out (n) = sum over the ranks of their in's rank()-th slice of n (in: world_size * n, f32); `in` is
  // the collective's scratch (its values afterwards are unspecified).
  virtual void reduce_scatter_sum(Tensor out, Tensor in) = 0;
  // t = root's t on every rank.
  virtual void broadcast(Tensor t, int root) = 0;
  virtual void barrier() = 0;
  // A short description for the log ("gloo over tcp, 4 ranks").
  virtual const char* backend() const = 0;
};

// World size 1: every collective is the identity.
class SingleRank final : public Communicator {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  void all_reduce_sum(Tensor) override {}
  void all_reduce_max(Tensor) override {}
  void all_gather(Tensor out, Tensor in) override;
  void reduce_scatter_sum(Tensor out, Tensor in) override;
  void broadcast(Tensor, int) override {}
  void barrier() override {}
  const char* backend() const override { return "single process"; }
};

// The process's single-rank communicator (stateless).
Communicator& single_rank();

}  // namespace lmf
