// comm.h: the communicator seam for tensor parallelism (DESIGN.md section 7).
//
// A block step calls its communicator where a row-parallel layer's partial output would be summed
// across ranks (the attention and MLP output projections, forward) and where a column-parallel
// layer's input gradient would be (the QKV and first MLP projections, backward). The single-rank
// communicator does nothing; an NCCL implementation sums in place over the ranks of its group.
#pragma once
#include "core/tensor.h"

namespace lmf {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  // t = sum over the group's ranks of t, in place (every rank gets the same bits).
  virtual void all_reduce_sum(Tensor t) = 0;
};

// World size 1: every reduction is the identity.
class SingleRank final : public Communicator {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  void all_reduce_sum(Tensor) override {}
};

// The process's single-rank communicator (stateless).
Communicator& single_rank();

}  // namespace lmf
