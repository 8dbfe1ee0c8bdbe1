// gguf.h: GGUF files (llama.cpp's model format, versions 2 and 3, little-endian) read into lmforge.
//
// Layout (ggml's gguf.h; every integer little-endian, strings are u64 length + bytes, no terminator):
//   "GGUF" | u32 version | u64 tensor count | u64 metadata count
//   metadata: key string | u32 value type | value   (arrays: u32 element type | u64 count | elements)
//   tensor infos: name string | u32 n_dims | u64 ne[n_dims] | u32 ggml type | u64 offset
//   padding to general.alignment (default 32) | the data section (each tensor at its offset in it)
// Dimensions are listed fastest-varying first: ne = [ne0, ne1] is a row-major (ne1, ne0) matrix,
// i.e. already PyTorch's nn.Linear (out, in) layout for a weight with ne0 = in.
//
// GgufFile validates the whole structure against the file's size before anything is used: counts
// bounded by the bytes left, sizes overflow-checked, every string and array inside the file, tensor
// sizes from the type's block layout, offsets aligned, data inside the file, no two tensors overlapping
// (docs/ROBUSTNESS.md). Errors are one line naming the file (and key or tensor) and the problem.
//
// import_gguf() turns a `llama` GGUF into an ImportedModel (docs/GGUF.md): F32, F16, BF16, Q8_0, Q4_0
// and Q4_1 tensors dequantized to fp32, Q and K un-permuted back to the rotate-half layout, q/k/v
// and gate/up concatenated into lmforge's fused parameters, the byte-level BPE tokenizer rebuilt as a
// Hugging Face tokenizer.json, and the chat template.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "convert/imported.h"

namespace lmf {

// Metadata value types (gguf.h's gguf_type).
enum class GgufType : uint32_t {
  u8 = 0, i8 = 1, u16 = 2, i16 = 3, u32 = 4, i32 = 5, f32 = 6, boolean = 7, string = 8, array = 9,
  u64 = 10, i64 = 11, f64 = 12,
};
const char* gguf_type_name(GgufType t);  // "u32", "string", ...; "unknown" outside the enum

// ggml tensor types lmforge dequantizes (ggml.h's ggml_type values); the file may hold others, which
// are sized for validation (gguf_tensor_type_name knows them all) but refused by read_f32.
enum class GgmlType : uint32_t { f32 = 0, f16 = 1, q4_0 = 2, q4_1 = 3, q8_0 = 8, bf16 = 30 };
const char* gguf_tensor_type_name(uint32_t ggml_type);  // "Q4_K", ...; "unknown" when ggml has no such type

struct GgufKv {
  std::string key;
  GgufType type = GgufType::u8;
  GgufType elem = GgufType::u8;  // arrays: the elements' type
  uint64_t count = 0;            // arrays: the number of elements
  size_t value = 0;              // byte offset of the value in the file (arrays: of the first element)
};

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // GGUF order: fastest-varying first
  uint32_t type = 0;        // ggml type
  int64_t numel = 0;
  size_t offset = 0;        // byte offset in the file (the data section's start + the tensor's offset)
  size_t bytes = 0;
};

class GgufFile {
 public:
  static constexpr size_t kDefaultAlignment = 32;  // without general.alignment
  // Reads and validates the whole file (a regular file; see the header comment).
  explicit GgufFile(const std::string& path);
  // The same on bytes already in memory (`name` stands for the path in messages): the fuzz target.
  static GgufFile from_bytes(std::string bytes, const std::string& name);

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  size_t alignment() const { return alignment_; }
  size_t file_bytes() const { return bytes_.size(); }
  const std::vector<GgufKv>& metadata() const { return kvs_; }
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufKv* find(const std::string& key) const;
  const GgufTensorInfo* find_tensor(const std::string& name) const;

  // Typed metadata. Each throws one line naming the file and key when the key is missing or has
  // another type. Integers accept any integer type whose value lies in [lo, hi]; floats f32 or f64,
  // finite.
  int64_t get_int(const std::string& key, int64_t lo, int64_t hi) const;
  double get_float(const std::string& key) const;
  bool get_bool(const std::string& key) const;
  std::string get_string(const std::string& key) const;
  std::vector<std::string> get_string_array(const std::string& key) const;
  std::vector<int64_t> get_int_array(const std::string& key) const;  // any integer element type fitting int64

  // Tensor `t` as numel fp32 values in its own layout (row-major over reversed ne). F32, F16, BF16,
  // Q8_0, Q4_0 and Q4_1 (ggml's block layouts); another type is one line naming the tensor and type.
  void read_f32(const GgufTensorInfo& t, float* dst) const;

 private:
  GgufFile() = default;
  void parse();

  std::string path_;
  std::string bytes_;
  uint32_t version_ = 0;
  size_t alignment_ = kDefaultAlignment;
  std::vector<GgufKv> kvs_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, size_t> kv_index_, tensor_index_;
};

// The model in a `llama` GGUF file (any other general.architecture is one line naming it). Metadata
// that would change the math lmforge computes (RoPE scaling, partial rotary, experts, biases, ...) is
// an error naming it, never ignored. The config is validated (ModelConfig::validate) and the memory
// the fp32 weights need is checked before they are allocated.
ImportedModel import_gguf(const std::string& path);
ImportedModel import_gguf(const GgufFile& file);

// The Hugging Face tokenizer.json of the file's byte-level BPE tokenizer (tokenizer.ggml.model
// "gpt2"; pre-tokenizer from tokenizer.ggml.pre: gpt-2, smollm, llama-bpe, qwen2); "" when the file
// has no tokenizer.ggml.model. Another tokenizer model or pre-tokenizer is one line naming it.
std::string gguf_tokenizer_json(const GgufFile& file);

}  // namespace lmf
