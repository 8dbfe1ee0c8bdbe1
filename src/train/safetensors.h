// safetensors.h: the safetensors format (Hugging Face), so weights open in other tools:
//   u64 little-endian header size N | N bytes of JSON header | raw little-endian tensor data
// The header maps each name to {"dtype", "shape", "data_offsets": [begin, end)} relative to the
// data start, plus an optional "__metadata__" string->string map.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/fsutil.h"
#include "core/tensor.h"

namespace lmf {

struct SafetensorsEntry {
  std::string name;
  std::string dtype;  // "F32", "F64", "I32", "BF16", "U16", ...
  std::vector<int64_t> shape;
  size_t begin = 0, end = 0;  // byte offsets into the data section
};

class SafetensorsFile {
 public:
  // Reads and validates the whole file: header JSON (nesting bounded, core/json_util.h), every shape
  // entry and offset a non-negative JSON integer (no floats, nothing >= 2^63), offsets inside the
  // data section, byte sizes (overflow-checked) matching dtype x shape, no overlap. Errors name the
  // file and the tensor. The path must be a regular file.
  explicit SafetensorsFile(const std::string& path);
  // The same checks on a file's bytes already in memory (`name` stands for the path in messages).
  static SafetensorsFile from_bytes(std::string bytes, const std::string& name);

  const std::string& path() const { return path_; }
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  const SafetensorsEntry* find(const std::string& name) const;
  const void* data(const SafetensorsEntry& e) const { return view_.data() + data_start_ + e.begin; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // Copies tensor `name` into `dst`, checking it exists with dst's dtype and shape (errors name
  // the file, the tensor, the expected and the found shape/dtype).
  void read_into(const std::string& name, const Tensor& dst) const;
  // The checks of read_into() without copying.
  void check_entry(const std::string& name, const Tensor& like) const;

 private:
  SafetensorsFile() = default;
  void parse();  // validates bytes_ and fills the table

  std::string path_;
  std::shared_ptr<const FileBytes> bytes_;  // the file, memory-mapped (or the bytes given)
  std::string_view view_;
  size_t data_start_ = 0;
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, size_t> index_;  // name -> entry
  std::map<std::string, std::string> metadata_;
};

// Serialises tensors (in the given order) with optional metadata.
std::string safetensors_serialize(const std::vector<std::pair<std::string, Tensor>>& tensors,
                                  const std::map<std::string, std::string>& metadata = {});

const char* safetensors_dtype(DType t);  // DType -> "F32", ...

}  // namespace lmf
