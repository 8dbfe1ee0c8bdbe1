// nccl_comm.cpp: see nccl_comm.h.
#include "dist/nccl_comm.h"

#include <algorithm>
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
  NcclCommunicator(TcpStore& store, const std::string& name, const std::vector<int>& ranks)
      : world_(static_cast<int>(ranks.size())) {
    const auto me = std::find(ranks.begin(), ranks.end(), store.rank());
    LMF_CHECK(me != ranks.end(), "nccl: rank ", store.rank(), " is not in group '", name, "'");
    rank_ = static_cast<int>(me - ranks.begin());
    ncclUniqueId id;
    const std::string key = "lmf/nccl/" + name + "/unique_id";
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
  void all_reduce_max(Tensor t) override {
    LMF_CHECK(t.device == Device::cuda, "all_reduce_max: the NCCL communicator moves GPU tensors ('", t.name, "')");
    check_f32(t, "all_reduce_max");
    check(ncclAllReduce(t.data, t.data, static_cast<size_t>(t.numel()), ncclFloat32, ncclMax, comm_, cuda::stream()),
          "ncclAllReduce (max)");
  }
  void all_gather(Tensor out, Tensor in) override {
    LMF_CHECK(out.device == Device::cuda && in.device == Device::cuda,
              "all_gather: the NCCL communicator moves GPU tensors ('", in.name, "')");
    check_f32(out, "all_gather");
    check_f32(in, "all_gather");
    LMF_CHECK(out.numel() == in.numel() * world_, "all_gather: '", out.name, "' holds ", out.numel(),
              " elements, expected ", world_, " x ", in.numel());
    check(ncclAllGather(in.data, out.data, static_cast<size_t>(in.numel()), ncclFloat32, comm_, cuda::stream()),
          "ncclAllGather");
  }
  void reduce_scatter_sum(Tensor out, Tensor in) override {
    LMF_CHECK(out.device == Device::cuda && in.device == Device::cuda,
              "reduce_scatter_sum: the NCCL communicator moves GPU tensors ('", in.name, "')");
    check_f32(out, "reduce_scatter_sum");
    check_f32(in, "reduce_scatter_sum");
    LMF_CHECK(in.numel() == out.numel() * world_, "reduce_scatter_sum: '", in.name, "' holds ", in.numel(),
              " elements, expected ", world_, " x ", out.numel());
    check(ncclReduceScatter(in.data, out.data, static_cast<size_t>(out.numel()), ncclFloat32, ncclSum, comm_,
                            cuda::stream()),
          "ncclReduceScatter");
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

  int rank_ = 0, world_;
  ncclComm_t comm_ = nullptr;
  void* scratch_ = nullptr;
  std::string desc_;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(TcpStore& store, const std::string& name,
                                                     const std::vector<int>& ranks) {
  std::vector<int> all = ranks;
  if (all.empty())
    for (int r = 0; r < store.env().world_size; ++r) all.push_back(r);
  return std::make_unique<NcclCommunicator>(store, name, all);
}
bool nccl_available() { return true; }
#else
std::unique_ptr<Communicator> make_nccl_communicator(TcpStore&, const std::string&, const std::vector<int>&) {
  fail("this lmforge was built without NCCL (it needs the CUDA backend and NCCL's nccl.h / libnccl): a distributed "
       "run on the GPU needs it");
}
bool nccl_available() { return false; }
#endif

}  // namespace lmf
