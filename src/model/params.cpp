#include "model/params.h"

#include <algorithm>
#include <cmath>

#include "core/rng.h"
#include "ops/optim.h"

namespace lmf {

Parameters::Parameters(const std::vector<TensorSpec>& specs, Device device, bool bf16_copy)
    : device_(device), master_("params", specs, device) {
  if (!bf16_copy) return;
  // One flat bf16 block with the f32 arena's element offsets, so that element i of the flat f32
  // view and element i of the flat bf16 view are the same weight: the fused AdamW launch and the
  // cast write the copy by flat index. (A bf16 arena of its own would pad each tensor to a
  // different number of elements.)
  const int64_t n = master_.flat_f32().numel();
  copy_ = Arena("params_bf16", {{"flat", {n}, DType::bf16}}, device);
  auto* base = static_cast<bf16*>(copy_.base());
  copy_views_.reserve(master_.size());
  for (size_t k = 0; k < master_.size(); ++k) {
    Tensor t = master_[k];
    t.data = base + master_.offset_elems(k);
    t.dtype = DType::bf16;
    copy_views_.push_back(t);
  }
}

Tensor Parameters::flat_copy() const { return has_copy() ? copy_.flat(DType::bf16) : Tensor(); }

Tensor Parameters::find(const std::string& name) const {
  const long i = master_.find(name);
  return i < 0 ? Tensor() : master_[static_cast<size_t>(i)];
}

Tensor Parameters::find_copy(const std::string& name) const {
  const long i = master_.find(name);
  return i < 0 || !has_copy() ? Tensor() : copy_views_[static_cast<size_t>(i)];
}

void Parameters::sync_copy() {
  if (has_copy()) cast_to_bf16(copy_.flat(DType::bf16), master_.flat_f32());
}

void Parameters::init_gpt2(uint64_t seed, int n_layer, int64_t real_vocab) {
  const double std_base = 0.02, std_proj = 0.02 / std::sqrt(2.0 * n_layer);
  std::vector<float> host;
  for (size_t k = 0; k < master_.size(); ++k) {
    Tensor t = master_[k];
    const std::string& name = master_.spec(k).name;
    host.assign(static_cast<size_t>(t.numel()), 0.0f);
    float* w = host.data();
    const int64_t n = t.numel();
    if (name.ends_with(".bias") || name.ends_with(".selection_bias")) {
      std::fill(w, w + n, 0.0f);
    } else if (name.find("norm") != std::string::npos) {
      std::fill(w, w + n, 1.0f);
    } else {
      const bool proj = name.ends_with("attn.proj.weight") || name.ends_with("mlp.proj.weight") || name.ends_with(".w_out");
      // the time-series point embedding reads one value (fan-in 1): PyTorch's nn.Linear(1, .) default
      // U(-1, 1) has this std; at 0.02 SiLU(gate) * up is ~ x^2 times one direction, which RMSNorm
      // then makes the same for every input
      const double sd = name == "ts_embed.weight" ? 1.0 / std::sqrt(3.0) : proj ? std_proj : std_base;
      for (int64_t j = 0; j < n; ++j) w[j] = static_cast<float>(sd * rng_normal(seed, k + 1, static_cast<uint64_t>(j)));
      if (name == "tok_emb.weight" || name == "lm_head.weight")  // padded vocab rows stay zero
        std::fill(w + real_vocab * t.dim(-1), w + n, 0.0f);
    }
    tensor_from_host(t, host.data());
  }
  sync_copy();
}

}  // namespace lmf
