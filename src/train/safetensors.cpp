#include "train/safetensors.h"

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>

#include "core/check.h"
#include "core/fsutil.h"

namespace lmf {

using json = nlohmann::json;

namespace {

size_t dtype_bytes(const std::string& d) {
  if (d == "F64" || d == "I64" || d == "U64") return 8;
  if (d == "F32" || d == "I32" || d == "U32") return 4;
  if (d == "F16" || d == "BF16" || d == "I16" || d == "U16") return 2;
  if (d == "I8" || d == "U8" || d == "BOOL" || d == "F8_E4M3" || d == "F8_E5M2") return 1;
  return 0;
}

std::string shape_string(const std::vector<int64_t>& s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + ")";
}

}  // namespace

const char* safetensors_dtype(DType t) {
  switch (t) {
    case DType::f32: return "F32";
    case DType::bf16: return "BF16";
    case DType::i32: return "I32";
    case DType::u16: return "U16";
  }
  return "?";
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  bytes_ = read_file(path, "safetensors file");
  if (bytes_.size() < 8) fail(path, ": not a safetensors file (", bytes_.size(), " bytes)");
  uint64_t n = 0;
  std::memcpy(&n, bytes_.data(), 8);
  if (n > bytes_.size() - 8) fail(path, ": safetensors header size ", n, " exceeds the file size ", bytes_.size());
  data_start_ = 8 + n;
  json h;
  try {
    h = json::parse(bytes_.begin() + 8, bytes_.begin() + 8 + static_cast<long>(n));
  } catch (const json::exception& e) {
    fail(path, ": safetensors header is not valid JSON (", e.what(), ")");
  }
  if (!h.is_object()) fail(path, ": safetensors header is not a JSON object");
  const size_t data_bytes = bytes_.size() - data_start_;
  for (auto it = h.begin(); it != h.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it->is_object()) fail(path, ": __metadata__ is not an object");
      for (auto m = it->begin(); m != it->end(); ++m)
        if (m->is_string()) metadata_[m.key()] = m->get<std::string>();
      continue;
    }
    SafetensorsEntry e;
    e.name = it.key();
    try {
      e.dtype = it->at("dtype").get<std::string>();
      e.shape = it->at("shape").get<std::vector<int64_t>>();
      auto off = it->at("data_offsets").get<std::vector<size_t>>();
      if (off.size() != 2) throw std::runtime_error("data_offsets");
      e.begin = off[0];
      e.end = off[1];
    } catch (const std::exception&) {
      fail(path, ": tensor '", e.name, "' has a malformed header entry");
    }
    size_t el = dtype_bytes(e.dtype);
    if (el == 0) fail(path, ": tensor '", e.name, "' has unknown dtype ", e.dtype);
    size_t numel = 1;
    for (int64_t d : e.shape) {
      if (d < 0) fail(path, ": tensor '", e.name, "' has negative dimension in shape ", shape_string(e.shape));
      numel *= static_cast<size_t>(d);
    }
    if (e.end < e.begin || e.end > data_bytes)
      fail(path, ": tensor '", e.name, "' data [", e.begin, ", ", e.end, ") lies outside the ", data_bytes,
           "-byte data section (file truncated?)");
    if (e.end - e.begin != numel * el)
      fail(path, ": tensor '", e.name, "' has ", e.end - e.begin, " bytes but ", e.dtype, " ", shape_string(e.shape),
           " needs ", numel * el);
    entries_.push_back(std::move(e));
  }
  std::sort(entries_.begin(), entries_.end(), [](const auto& a, const auto& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < entries_.size(); ++i)
    if (entries_[i].begin < entries_[i - 1].end)
      fail(path, ": tensors '", entries_[i - 1].name, "' and '", entries_[i].name, "' overlap");
}

const SafetensorsEntry* SafetensorsFile::find(const std::string& name) const {
  for (const auto& e : entries_)
    if (e.name == name) return &e;
  return nullptr;
}

void SafetensorsFile::read_into(const std::string& name, const Tensor& dst) const {
  check_entry(name, dst);
  tensor_from_host(dst, data(*find(name)));
}

void SafetensorsFile::check_entry(const std::string& name, const Tensor& dst) const {
  const SafetensorsEntry* e = find(name);
  if (!e) fail(path_, ": missing tensor '", name, "'");
  std::vector<int64_t> want(dst.shape.begin(), dst.shape.begin() + dst.ndim);
  if (e->dtype != safetensors_dtype(dst.dtype))
    fail(path_, ": tensor '", name, "' has dtype ", e->dtype, ", expected ", safetensors_dtype(dst.dtype));
  if (e->shape != want)
    fail(path_, ": tensor '", name, "' has shape ", shape_string(e->shape), ", expected ", shape_string(want));
}

std::string safetensors_serialize(const std::vector<std::pair<std::string, Tensor>>& tensors,
                                  const std::map<std::string, std::string>& metadata) {
  json h = json::object();
  size_t off = 0;
  for (const auto& [name, t] : tensors) {
    std::vector<int64_t> shape(t.shape.begin(), t.shape.begin() + t.ndim);
    h[name] = {{"dtype", safetensors_dtype(t.dtype)}, {"shape", shape}, {"data_offsets", {off, off + t.nbytes()}}};
    off += t.nbytes();
  }
  if (!metadata.empty()) h["__metadata__"] = metadata;
  std::string header = h.dump();
  while ((header.size() + 8) % 8 != 0) header.push_back(' ');
  std::string out(8, '\0');
  uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);
  out += header;
  size_t pos = out.size();
  out.resize(out.size() + off);
  for (const auto& [name, t] : tensors) {  // works for host and device tensors
    tensor_to_host(out.data() + pos, t);
    pos += t.nbytes();
  }
  return out;
}

}  // namespace lmf
