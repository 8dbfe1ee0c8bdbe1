// hf_layout.h: how a Hugging Face checkpoint's tensors map onto lmforge's parameters, as one table used
// in both directions (import: convert/hf.h; export: convert/hf_export.h).
//
// A table entry (HfPiece) says that a block of one Hugging Face tensor is a block of one lmforge
// parameter, possibly transposed. Every tensor is seen as (slabs, rows, cols): a 1-D tensor (n) as
// (1, n, 1), a 2-D (r, c) as (1, r, c), a 3-D (e, r, c) as itself. So
//   GPT-2's Conv1D weight c_attn (C, 3C) is attn.qkv.weight (3C, C) transposed;
//   Llama's q_proj, k_proj, v_proj are row blocks of attn.qkv.weight ([q; k; v], docs/MODEL.md);
//   gate_proj / up_proj are the row blocks [gate; up] of mlp.fc.weight (ops/activation.h's SwiGLU);
//   expert e's w1 / w3 (Mixtral) are rows [0, F) and [F, 2F) of slab e of moe.experts.w_in;
//   a Qwen2-MoE shared expert of width S F is S lmforge shared experts of width F (row / column
//   blocks of its gate_proj, up_proj, down_proj), each with a copy of the one shared_expert_gate row.
// Import copies every piece Hugging Face -> lmforge (rows V..Vp-1 of the padded vocabulary stay 0);
// export copies lmforge -> Hugging Face, and where several pieces write one Hugging Face block (the
// shared gate's copies) they must agree.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/arena.h"
#include "model/config.h"

namespace lmf {

// The model classes of transformers that lmforge reads and writes.
enum class HfArch { gpt2, llama, qwen2, mixtral, qwen2_moe };

const char* hf_arch_class(HfArch a);       // "GPT2LMHeadModel", "LlamaForCausalLM", ...
const char* hf_arch_model_type(HfArch a);  // config.json's model_type: "gpt2", "llama", ...

// A block of a tensor seen as (slabs, rows, cols); a count of -1 means "all".
struct HfBlock {
  std::string name;
  int64_t slab = 0;
  int64_t row0 = 0, rows = -1;
  int64_t col0 = 0, cols = -1;
};

struct HfPiece {
  HfBlock hf;              // in the Hugging Face tensor
  HfBlock lmf;             // in the lmforge parameter
  bool transpose = false;  // lmf block = hf block^T (GPT-2's Conv1D)
};

struct HfLayout {
  std::vector<TensorSpec> hf_tensors;  // every tensor the Hugging Face checkpoint holds, with its shape
  std::vector<HfPiece> pieces;
};

// The table for model class `a` of config `c` (already validated). prefix: the Hugging Face names'
// base-model prefix, "transformer." (GPT-2) or "model." (the others); "" for files saved from the base
// model (GPT-2's own hub checkpoint).
HfLayout hf_layout(HfArch a, const ModelConfig& c, const std::string& prefix);
// The prefix save_pretrained writes for `a`.
std::string hf_default_prefix(HfArch a);

// Copies (or, with compare_only, compares) block `sb` of `src` (shape sshape) into block `db` of
// `dst` (shape dshape), transposed when asked. Returns false when compare_only and a value differs.
bool hf_copy_block(const float* src, const std::vector<int64_t>& sshape, const HfBlock& sb, float* dst,
                   const std::vector<int64_t>& dshape, const HfBlock& db, bool transpose, bool compare_only = false);

}  // namespace lmf
