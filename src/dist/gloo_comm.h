// gloo_comm.h: the CPU communicator (docs/DISTRIBUTED.md): Gloo's collectives over TCP between the
// ranks of a run, wired up through the rendezvous store (dist/store.h). Gloo's ring all-reduce
// reduces each chunk in a fixed ring order and passes the result on, so every rank gets the same bits
// and a run is bitwise reproducible at a given world size. A collective that waits longer than the
// timeout (a rank hung or died) throws one line naming the collective and the wait.
//
// Built when Debian's libgloo-dev is found (LMF_WITH_GLOO); without it, make_gloo_communicator says
// how to get it.
#pragma once
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "core/comm.h"
#include "dist/store.h"

namespace lmf {

// A communicator over `ranks` (every rank of store.env() when empty), connected as a full mesh under
// the store prefix `name`: collective over those ranks (each of them calls it with the same name and
// ranks); its rank() is the position in `ranks`.
std::unique_ptr<Communicator> make_gloo_communicator(TcpStore& store, std::chrono::milliseconds timeout,
                                                     const std::string& name = "world",
                                                     const std::vector<int>& ranks = {});
bool gloo_available();

}  // namespace lmf
