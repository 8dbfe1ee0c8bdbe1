// nccl_comm.h: the GPU communicator (docs/DISTRIBUTED.md): NCCL's collectives on lmforge's one stream,
// so they order with the step's kernels and a CUDA graph captures them with the step. The ranks meet
// through the rendezvous store (dist/store.h): rank 0 makes NCCL's unique id and the others read it.
// Errors name the collective and NCCL's message. Built with CUDA when NCCL is found (LMF_WITH_NCCL).
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "core/comm.h"
#include "dist/store.h"

namespace lmf {

// A communicator over `ranks` (every rank of store.env() when empty; the first makes the unique id,
// kept under the store key of `name`): collective over those ranks; selects no device (the caller did).
std::unique_ptr<Communicator> make_nccl_communicator(TcpStore& store, const std::string& name = "world",
                                                     const std::vector<int>& ranks = {});
bool nccl_available();

}  // namespace lmf
