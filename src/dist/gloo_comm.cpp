// gloo_comm.cpp: see gloo_comm.h.
#include "dist/gloo_comm.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <thread>

#include "core/check.h"

#ifdef LMF_WITH_GLOO
#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/prefix_store.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>
#endif

namespace lmf {

#ifdef LMF_WITH_GLOO
namespace {

// Gloo's rendezvous through lmforge's store.
class StoreAdapter final : public gloo::rendezvous::Store {
 public:
  explicit StoreAdapter(TcpStore& s) : s_(s) {}
  void set(const std::string& key, const std::vector<char>& data) override { s_.set(key, data); }
  std::vector<char> get(const std::string& key) override { return s_.get(key); }
  void wait(const std::vector<std::string>& keys) override { wait(keys, s_.timeout()); }
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override {
    for (const std::string& k : keys) s_.get(k, timeout);
  }

 private:
  TcpStore& s_;
};

class GlooCommunicator final : public Communicator {
 public:
  GlooCommunicator(TcpStore& store, std::chrono::milliseconds timeout, const std::string& name,
                   const std::vector<int>& ranks)
      : store_(store), world_(static_cast<int>(ranks.size())), global_rank_(store.rank()) {
    const auto me = std::find(ranks.begin(), ranks.end(), store.rank());
    LMF_CHECK(me != ranks.end(), "gloo: rank ", store.rank(), " is not in group '", name, "'");
    rank_ = static_cast<int>(me - ranks.begin());
    // where this rank listens for its peers: LMF_GLOO_IFACE (a network interface) if set; loopback
    // when rank 0 is this host by loopback (one host); else Gloo's default, the address of this
    // host's name
    gloo::transport::tcp::attr attr;
    const std::string& m = store.env().master_addr;
    if (const char* iface = std::getenv("LMF_GLOO_IFACE")) attr.iface = iface;
    else if (m == "localhost" || m == "127.0.0.1" || m == "::1") attr.hostname = "127.0.0.1";
    try {
      device_ = gloo::transport::tcp::CreateDevice(attr);
      auto ctx = std::make_shared<gloo::rendezvous::Context>(rank_, world_);
      ctx->setTimeout(timeout);
      StoreAdapter adapter(store);
      gloo::rendezvous::PrefixStore prefix("lmf/gloo/" + name, adapter);
      ctx->connectFullMesh(prefix, device_);
      ctx_ = ctx;
    } catch (const gloo::Exception& e) {
      fail("gloo: rank ", global_rank_, " could not connect to the other ", world_ - 1, " ranks of group '", name,
           "': ", e.what());
    }
    desc_ = "gloo over tcp, " + std::to_string(world_) + " ranks";
  }

  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  const char* backend() const override { return desc_.c_str(); }

  void all_reduce_sum(Tensor t) override {
    check(t, "all_reduce_sum");
    run("all_reduce_sum", [&] {
      gloo::AllreduceOptions o(ctx_);
      float* p = t.f32();
      o.setOutput(p, static_cast<size_t>(t.numel()));
      o.setReduceFunction(static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::sum<float>));
      o.setTag(next_tag());
      gloo::allreduce(o);
    });
  }

  void all_reduce_max(Tensor t) override {
    check(t, "all_reduce_max");
    run("all_reduce_max", [&] {
      gloo::AllreduceOptions o(ctx_);
      o.setOutput(t.f32(), static_cast<size_t>(t.numel()));
      o.setReduceFunction(static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::max<float>));
      o.setTag(next_tag());
      gloo::allreduce(o);
    });
  }

  void all_gather(Tensor out, Tensor in) override {
    check(out, "all_gather");
    check(in, "all_gather");
    LMF_CHECK(out.numel() == in.numel() * world_, "all_gather: '", out.name, "' holds ", out.numel(),
              " elements, expected ", world_, " x ", in.numel(), " ('", in.name, "')");
    run("all_gather", [&] {
      gloo::AllgatherOptions o(ctx_);
      o.setInput(in.f32(), static_cast<size_t>(in.numel()));
      o.setOutput(out.f32(), static_cast<size_t>(out.numel()));
      o.setTag(next_tag());
      gloo::allgather(o);
    });
  }

  // Gloo's option-style API has no reduce-scatter: the all-reduce of `in`, then this rank's slice.
  void reduce_scatter_sum(Tensor out, Tensor in) override {
    check(out, "reduce_scatter_sum");
    LMF_CHECK(in.numel() == out.numel() * world_, "reduce_scatter_sum: '", in.name, "' holds ", in.numel(),
              " elements, expected ", world_, " x ", out.numel(), " ('", out.name, "')");
    all_reduce_sum(in);
    const int64_t n = out.numel();
    std::memcpy(out.f32(), in.f32() + static_cast<int64_t>(rank_) * n, static_cast<size_t>(n) * sizeof(float));
  }

  void broadcast(Tensor t, int root) override {
    check(t, "broadcast");
    LMF_CHECK(root >= 0 && root < world_, "broadcast: root ", root, " outside [0, ", world_, ")");
    run("broadcast", [&] {
      gloo::BroadcastOptions o(ctx_);
      o.setOutput(t.f32(), static_cast<size_t>(t.numel()));
      o.setRoot(root);
      o.setTag(next_tag());
      gloo::broadcast(o);
    });
  }

  void barrier() override {
    run("barrier", [&] {
      gloo::BarrierOptions o(ctx_);
      o.setTag(next_tag());
      gloo::barrier(o);
    });
  }

 private:
  static void check(const Tensor& t, const char* op) {
    LMF_CHECK(t.device == Device::cpu, op, ": the Gloo communicator moves CPU tensors ('", t.name, "' is on ",
              device_name(t.device), ")");
    check_f32(t, op);
  }
  template <class F>
  void run(const char* op, F&& f) {
    try {
      f();
    } catch (const gloo::Exception& e) {
      std::string what = e.what();
      if (auto nl = what.find('\n'); nl != std::string::npos) what.resize(nl);
      // a peer that died: the rendezvous knows which (dist/store.h); give it a moment to notice
      for (int i = 0; i < 20; ++i) {
        std::optional<std::vector<char>> dead;
        try {
          dead = store_.try_get("lmf/dead");
        } catch (const std::exception&) {
          fail(op, " (gloo): rank 0 died or exited (the rendezvous closed); rank ", global_rank_, " stops (", what, ")");
        }
        if (dead) {
          uint64_t r = 0;
          std::memcpy(&r, dead->data(), std::min<size_t>(8, dead->size()));
          fail(op, " (gloo): rank ", r, " died or exited with an error; rank ", global_rank_, " stops (", what, ")");
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
      fail(op, " (gloo): rank ", global_rank_, " (", rank_, " of ", world_, " in its group) failed: ", what,
           " (a rank hung, died or ran another configuration)");
    }
  }
  uint32_t next_tag() { return tag_++; }

  TcpStore& store_;
  int rank_ = 0, world_;
  int global_rank_;  // this process's rank in the run (the messages' numbering)
  uint32_t tag_ = 1;
  std::shared_ptr<gloo::transport::Device> device_;
  std::shared_ptr<gloo::Context> ctx_;
  std::string desc_;
};

}  // namespace

std::unique_ptr<Communicator> make_gloo_communicator(TcpStore& store, std::chrono::milliseconds timeout,
                                                     const std::string& name, const std::vector<int>& ranks) {
  std::vector<int> all = ranks;
  if (all.empty())
    for (int r = 0; r < store.env().world_size; ++r) all.push_back(r);
  return std::make_unique<GlooCommunicator>(store, timeout, name, all);
}

bool gloo_available() { return true; }
#else
std::unique_ptr<Communicator> make_gloo_communicator(TcpStore&, std::chrono::milliseconds, const std::string&,
                                                     const std::vector<int>&) {
  fail("this lmforge was built without Gloo, the CPU collective library (apt-get install libgloo-dev, then "
       "rebuild): a distributed run on the CPU needs it");
}

bool gloo_available() { return false; }
#endif

}  // namespace lmf
