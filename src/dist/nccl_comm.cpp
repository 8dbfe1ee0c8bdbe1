// nccl_comm.cpp: see nccl_comm.h.
#include "dist/nccl_comm.h"

#include <string>
#include <vector>

#include "core/check.h"

#ifdef LMF_WITH_NCCL
#include <cuda_runtime.h>
#include <nccl.h>

#include "core/cuda_context.h"
#endif

namespace lmf {

#ifdef LMF_WITH_NCCL
namespace {

class NcclCommunicator final : public Communicator {
 public:
  explicit NcclCommunicator(TcpStore& store) : rank_(store.rank()), world_(store.env().world_size) {
    ncclUniqueId id;
    const std::string key = "lmf/nccl/unique_id";
    if (rank_ == 0) {
      check(ncclGetUniqueId(&id), "ncclGetUniqueId");
      store.set(key, std::vector<char>(id.internal, id.internal + sizeof id.internal));
    } else {
      const std::vector<char> v = store.get(key);
      LMF_CHECK(v.size() == sizeof id.internal, "nccl: the unique id from rank 0 has ", v.size(), " bytes");
      std::copy(v.begin(), v.end(), id.internal);
    }
    check(ncclCommInitRank(&comm_, world_, id, rank_), "ncclCommInitRank");
    if (cudaMalloc(&scratch_, sizeof(float)) != cudaSuccess) fail("nccl: cudaMalloc of the barrier's 4 bytes failed");
    desc_ = "nccl " + std::to_string(NCCL_MAJOR) + "." + std::to_string(NCCL_MINOR) + ", " + std::to_string(world_) +
            " ranks";
  }
  ~NcclCommunicator() override {
    if (comm_) ncclCommDestroy(comm_);
    if (scratch_) cudaFree(scratch_);
  }

  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  const char* backend() const override { return desc_.c_str(); }

  void all_reduce_sum(Tensor t) override {
    LMF_CHECK(t.device == Device::cuda, "all_reduce_sum: the NCCL communicator moves GPU tensors ('", t.name, "')");
    check_f32(t, "all_reduce_sum");
    check(ncclAllReduce(t.data, t.data, static_cast<size_t>(t.numel()), ncclFloat32, ncclSum, comm_, cuda::stream()),
          "ncclAllReduce");
  }
  void broadcast(Tensor t, int root) override {
    LMF_CHECK(t.device == Device::cuda, "broadcast: the NCCL communicator moves GPU tensors ('", t.name, "')");
    check_f32(t, "broadcast");
    check(ncclBroadcast(t.data, t.data, static_cast<size_t>(t.numel()), ncclFloat32, root, comm_, cuda::stream()),
          "ncclBroadcast");
  }
  void barrier() override {
    check(ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, comm_, cuda::stream()), "barrier (ncclAllReduce)");
    if (cudaStreamSynchronize(cuda::stream()) != cudaSuccess) fail("barrier: the stream failed");
  }

 private:
  void check(ncclResult_t r, const char* what) const {
    if (r == ncclSuccess || r == ncclInProgress) return;
    fail("nccl: ", what, " on rank ", rank_, " of ", world_, ": ", ncclGetErrorString(r),
         comm_ ? std::string(" (") + ncclGetLastError(comm_) + ")" : std::string());
  }

  int rank_, world_;
  ncclComm_t comm_ = nullptr;
  void* scratch_ = nullptr;
  std::string desc_;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(TcpStore& store) {
  return std::make_unique<NcclCommunicator>(store);
}
bool nccl_available() { return true; }
#else
std::unique_ptr<Communicator> make_nccl_communicator(TcpStore&) {
  fail("this lmforge was built without NCCL (it needs the CUDA backend and NCCL's nccl.h / libnccl): a distributed "
       "run on the GPU needs it");
}
bool nccl_available() { return false; }
#endif

}  // namespace lmf
