// params.h: the owner of a model's weights (DESIGN.md section 2: each kind of state has one owner).
//
// One f32 arena of masters laid out by the model's spec table (checkpoints, the optimizer, norms and
// embeddings read it), and in bf16 plans one flat bf16 working copy with the same element offsets
// (element i of the copy is element i of master().flat_f32()), which the GEMMs read. The copy is
// rewritten from the masters by sync_copy() (after init and after loading) and by the fused AdamW
// launch (optim.h) after every step.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/arena.h"

namespace lmf {

class Parameters {
 public:
  // specs: the canonical order (docs/MODEL.md; also the checkpoint's). bf16_copy: plan the copy.
  Parameters(const std::vector<TensorSpec>& specs, Device device, bool bf16_copy);
  Parameters(const Parameters&) = delete;  // views point into the arenas: it stays where it was built
  Parameters& operator=(const Parameters&) = delete;

  Arena& master() { return master_; }
  const Arena& master() const { return master_; }
  bool has_copy() const { return !copy_views_.empty(); }
  Tensor flat_copy() const;  // (numel) bf16 view of the whole copy; absent without one
  // The master of `name`, or an absent Tensor.
  Tensor find(const std::string& name) const;
  // The bf16 copy of `name` (a view into the flat copy), or an absent Tensor (no such tensor, or no copy).
  Tensor find_copy(const std::string& name) const;
  Device device() const { return device_; }
  size_t bytes() const { return master_.bytes() + copy_.bytes(); }

  // Rewrites the bf16 copy from the masters (no-op without a copy).
  void sync_copy();
  // GPT-2 initialisation from the counter RNG (docs/MODEL.md), by name: biases and selection biases 0,
  // norm weights 1, output projections N(0, 0.02 / sqrt(2 n_layer)), other weights N(0, 0.02); the
  // rows >= real_vocab of tok_emb / lm_head stay 0. Computed on the host: identical on every device.
  // Then sync_copy().
  void init_gpt2(uint64_t seed, int n_layer, int64_t real_vocab);

 private:
  Device device_;
  Arena master_, copy_;
  std::vector<Tensor> copy_views_;  // per tensor of master_, at its element offset (bf16 plans)
};

}  // namespace lmf
