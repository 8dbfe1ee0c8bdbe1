#include "convert/hf_layout.h"

#include <array>

#include "core/check.h"

namespace lmf {

const char* hf_arch_class(HfArch a) {
  switch (a) {
    case HfArch::gpt2: return "GPT2LMHeadModel";
    case HfArch::llama: return "LlamaForCausalLM";
    case HfArch::qwen2: return "Qwen2ForCausalLM";
    case HfArch::mixtral: return "MixtralForCausalLM";
    case HfArch::qwen2_moe: return "Qwen2MoeForCausalLM";
  }
  return "?";
}

const char* hf_arch_model_type(HfArch a) {
  switch (a) {
    case HfArch::gpt2: return "gpt2";
    case HfArch::llama: return "llama";
    case HfArch::qwen2: return "qwen2";
    case HfArch::mixtral: return "mixtral";
    case HfArch::qwen2_moe: return "qwen2_moe";
  }
  return "?";
}

std::string hf_default_prefix(HfArch a) { return a == HfArch::gpt2 ? "transformer." : "model."; }

namespace {

std::string layer(int i, const char* rest) { return "layers." + std::to_string(i) + "." + rest; }

class LayoutBuilder {
 public:
  HfLayout out;

  // Hugging Face tensor `hf` of `shape` is all of lmforge's `lmf` (transposed: GPT-2's Conv1D).
  void whole(const std::string& hf, std::vector<int64_t> shape, const std::string& lmf, bool transpose = false) {
    tensor(hf, std::move(shape));
    out.pieces.push_back({HfBlock{hf}, HfBlock{lmf}, transpose});
  }
  // ... is rows [row0, row0 + shape[0]) of slab `slab` of `lmf`.
  void rows(const std::string& hf, std::vector<int64_t> shape, const std::string& lmf, int64_t row0, int64_t slab = 0) {
    const int64_t n = shape[0];
    tensor(hf, std::move(shape));
    out.pieces.push_back({HfBlock{hf}, HfBlock{lmf, slab, row0, n}});
  }
  void tensor(const std::string& hf, std::vector<int64_t> shape) { out.hf_tensors.push_back({hf, std::move(shape)}); }
  void piece(HfBlock hf, HfBlock lmf) { out.pieces.push_back({std::move(hf), std::move(lmf)}); }
};

// The token embedding and, untied, the LM head: the first V rows of lmforge's padded (Vp, C) tensors.
void vocab_ends(LayoutBuilder& b, const ModelConfig& c, const std::string& embedding) {
  b.rows(embedding, {c.vocab_size, c.d_model}, "tok_emb.weight", 0);
  if (!c.tied_embeddings) b.rows("lm_head.weight", {c.vocab_size, c.d_model}, "lm_head.weight", 0);
}

void gpt2_layout(LayoutBuilder& b, const ModelConfig& c, const std::string& p) {
  const int64_t C = c.d_model, F = c.d_ff, Q = c.qkv_dim();
  auto norm = [&](const std::string& hf, const std::string& lmf) {
    b.whole(hf + ".weight", {C}, lmf + ".weight");
    b.whole(hf + ".bias", {C}, lmf + ".bias");
  };
  // Conv1D: weight (in, out) = lmforge's (out, in) transposed
  auto conv1d = [&](const std::string& hf, int64_t in, int64_t out, const std::string& lmf) {
    b.whole(hf + ".weight", {in, out}, lmf + ".weight", true);
    b.whole(hf + ".bias", {out}, lmf + ".bias");
  };
  vocab_ends(b, c, p + "wte.weight");
  b.whole(p + "wpe.weight", {c.context_length, C}, "pos_emb.weight");
  for (int i = 0; i < c.n_layer; ++i) {
    const std::string h = p + "h." + std::to_string(i) + ".";
    norm(h + "ln_1", layer(i, "norm1"));
    conv1d(h + "attn.c_attn", C, Q, layer(i, "attn.qkv"));
    conv1d(h + "attn.c_proj", C, C, layer(i, "attn.proj"));
    norm(h + "ln_2", layer(i, "norm2"));
    conv1d(h + "mlp.c_fc", C, F, layer(i, "mlp.fc"));
    conv1d(h + "mlp.c_proj", F, C, layer(i, "mlp.proj"));
  }
  norm(p + "ln_f", "norm_f");
}

// A SwiGLU FFN of width F: gate_proj / up_proj the row blocks [gate; up] of `w_in` (slab `slab`),
// down_proj (C, F) all of that slab of `w_out`. names: the Hugging Face gate, up and down weights.
void swiglu_layout(LayoutBuilder& b, const ModelConfig& c, const std::array<std::string, 3>& names, int64_t F,
                   const std::string& w_in, const std::string& w_out, int64_t slab) {
  b.rows(names[0], {F, c.d_model}, w_in, 0, slab);
  b.rows(names[1], {F, c.d_model}, w_in, F, slab);
  b.tensor(names[2], {c.d_model, F});
  b.piece(HfBlock{names[2]}, HfBlock{w_out, slab});
}

void moe_layout(LayoutBuilder& b, HfArch a, const ModelConfig& c, const std::string& h, int i) {
  const int64_t C = c.d_model, E = c.moe.experts, F = c.d_expert(), S = c.moe.shared;
  const bool mixtral = a == HfArch::mixtral;
  const std::string m = h + (mixtral ? "block_sparse_moe." : "mlp.");
  b.whole(m + "gate.weight", {E, C}, layer(i, "moe.router.weight"));
  for (int64_t e = 0; e < E; ++e) {
    const std::string x = m + "experts." + std::to_string(e) + ".";
    const std::array<std::string, 3> names =
        mixtral ? std::array<std::string, 3>{x + "w1.weight", x + "w3.weight", x + "w2.weight"}
                : std::array<std::string, 3>{x + "gate_proj.weight", x + "up_proj.weight", x + "down_proj.weight"};
    swiglu_layout(b, c, names, F, layer(i, "moe.experts.w_in"), layer(i, "moe.experts.w_out"), e);
  }
  if (S == 0) return;
  // One Hugging Face shared expert of width S F = S lmforge shared experts of width F, each gated by
  // the one gate row (SwiGLU is separable over its hidden units).
  const std::string gate = m + "shared_expert.gate_proj.weight", up = m + "shared_expert.up_proj.weight",
                    down = m + "shared_expert.down_proj.weight", sgate = m + "shared_expert_gate.weight";
  b.tensor(gate, {S * F, C});
  b.tensor(up, {S * F, C});
  b.tensor(down, {C, S * F});
  b.tensor(sgate, {1, C});
  const std::string w_in = layer(i, "moe.shared.w_in"), w_out = layer(i, "moe.shared.w_out");
  for (int64_t s = 0; s < S; ++s) {
    b.piece(HfBlock{gate, 0, s * F, F}, HfBlock{w_in, s, 0, F});
    b.piece(HfBlock{up, 0, s * F, F}, HfBlock{w_in, s, F, F});
    b.piece(HfBlock{down, 0, 0, -1, s * F, F}, HfBlock{w_out, s});
    b.piece(HfBlock{sgate}, HfBlock{layer(i, "moe.shared.gate"), 0, s, 1});
  }
}

// Llama, Qwen2, Mixtral, Qwen2-MoE: one naming scheme.
void llama_layout(LayoutBuilder& b, HfArch a, const ModelConfig& c, const std::string& p) {
  const int64_t C = c.d_model, HS = c.head_size(), NQ = c.n_head * HS, NK = c.n_kv_head * HS;
  vocab_ends(b, c, p + "embed_tokens.weight");
  for (int i = 0; i < c.n_layer; ++i) {
    const std::string h = p + "layers." + std::to_string(i) + ".", at = h + "self_attn.";
    b.whole(h + "input_layernorm.weight", {C}, layer(i, "norm1.weight"));
    for (const char* kind : {"weight", "bias"}) {
      const bool w = kind[0] == 'w';
      if (!w && !c.has_qkv_bias()) continue;
      auto shape = [&](int64_t rows) { return w ? std::vector<int64_t>{rows, C} : std::vector<int64_t>{rows}; };
      const std::string qkv = layer(i, w ? "attn.qkv.weight" : "attn.qkv.bias");
      b.rows(at + "q_proj." + kind, shape(NQ), qkv, 0);
      b.rows(at + "k_proj." + kind, shape(NK), qkv, NQ);
      b.rows(at + "v_proj." + kind, shape(NK), qkv, NQ + NK);
    }
    b.whole(at + "o_proj.weight", {C, NQ}, layer(i, "attn.proj.weight"));
    b.whole(h + "post_attention_layernorm.weight", {C}, layer(i, "norm2.weight"));
    if (c.is_moe_layer(i)) {
      moe_layout(b, a, c, h, i);
    } else {
      const std::string m = h + "mlp.";
      const std::array<std::string, 3> names = {m + "gate_proj.weight", m + "up_proj.weight", m + "down_proj.weight"};
      swiglu_layout(b, c, names, c.d_ff, layer(i, "mlp.fc.weight"), layer(i, "mlp.proj.weight"), 0);
    }
  }
  b.whole(p + "norm.weight", {C}, "norm_f.weight");
}

struct Dims {
  int64_t slabs, rows, cols;
};

Dims dims_of(const std::vector<int64_t>& s) {
  switch (s.size()) {
    case 1: return {1, s[0], 1};
    case 2: return {1, s[0], s[1]};
    case 3: return {s[0], s[1], s[2]};
    default: fail("hf layout: a tensor of ", s.size(), " dimensions");
  }
}

// The block's (rows, cols) inside a tensor of dims d, checked to lie inside it.
std::pair<int64_t, int64_t> block_extent(const HfBlock& b, const Dims& d) {
  const int64_t r = b.rows < 0 ? d.rows - b.row0 : b.rows, q = b.cols < 0 ? d.cols - b.col0 : b.cols;
  LMF_CHECK(b.slab >= 0 && b.slab < d.slabs && b.row0 >= 0 && r >= 0 && b.row0 + r <= d.rows && b.col0 >= 0 &&
                q >= 0 && b.col0 + q <= d.cols,
            "hf layout: block of '", b.name, "' outside its tensor");
  return {r, q};
}

}  // namespace

HfLayout hf_layout(HfArch a, const ModelConfig& c, const std::string& prefix) {
  LayoutBuilder b;
  if (a == HfArch::gpt2) gpt2_layout(b, c, prefix);
  else llama_layout(b, a, c, prefix);
  return std::move(b.out);
}

bool hf_copy_block(const float* src, const std::vector<int64_t>& sshape, const HfBlock& sb, float* dst,
                   const std::vector<int64_t>& dshape, const HfBlock& db, bool transpose, bool compare_only) {
  const Dims sd = dims_of(sshape), dd = dims_of(dshape);
  const auto [sr, sc] = block_extent(sb, sd);
  const auto [dr, dc] = block_extent(db, dd);
  LMF_CHECK(transpose ? (sr == dc && sc == dr) : (sr == dr && sc == dc), "hf layout: blocks of '", sb.name, "' and '",
            db.name, "' differ in shape");
  const float* s0 = src + (sb.slab * sd.rows + sb.row0) * sd.cols + sb.col0;
  float* d0 = dst + (db.slab * dd.rows + db.row0) * dd.cols + db.col0;
  for (int64_t r = 0; r < dr; ++r)
    for (int64_t q = 0; q < dc; ++q) {
      const float v = transpose ? s0[q * sd.cols + r] : s0[r * sd.cols + q];
      float& out = d0[r * dd.cols + q];
      if (!compare_only) out = v;
      else if (out != v) return false;
    }
  return true;
}

}  // namespace lmf
