#include "core/comm.h"

namespace lmf {

Communicator& single_rank() {
  static SingleRank r;  // stateless: nothing in it changes
  return r;
}

}  // namespace lmf
