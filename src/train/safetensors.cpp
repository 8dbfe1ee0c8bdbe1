#include "train/safetensors.h"

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>
#include <optional>
#include <string_view>

#include "core/check.h"
#include "core/fsutil.h"
#include "core/json_util.h"

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
  for (size_t i = 0; i < s.size() && i < 8; ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  if (s.size() > 8) r += ", ... " + std::to_string(s.size()) + " dims";
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
  bytes_ = FileBytes::map(path, "safetensors file");
  view_ = bytes_->view();
  parse();
}

SafetensorsFile SafetensorsFile::from_bytes(std::string bytes, const std::string& name) {
  SafetensorsFile f;
  f.path_ = name;
  f.bytes_ = FileBytes::own(std::move(bytes));
  f.view_ = f.bytes_->view();
  f.parse();
  return f;
}

void SafetensorsFile::parse() {
  const std::string& path = path_;
  if (view_.size() < 8) fail(path, ": not a safetensors file (", view_.size(), " bytes)");
  uint64_t n = 0;
  std::memcpy(&n, view_.data(), 8);
  if (n > view_.size() - 8) fail(path, ": safetensors header size ", n, " exceeds the file size ", view_.size());
  data_start_ = 8 + n;
  const json h = json_parse(view_.substr(8, n), path + ": safetensors header");
  if (!h.is_object()) fail(path, ": safetensors header is not a JSON object");
  const size_t data_bytes = view_.size() - data_start_;
  for (auto it = h.begin(); it != h.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it->is_object()) fail(path, ": __metadata__ is not an object");
      for (auto m = it->begin(); m != it->end(); ++m)
        if (m->is_string()) metadata_[m.key()] = m->get<std::string>();
      continue;
    }
    SafetensorsEntry e;
    e.name = it.key();
    auto bad = [&](const auto&... msg) { fail(path, ": tensor '", excerpt(e.name), "' ", msg...); };
    if (!it->is_object()) bad("has a malformed header entry (not an object)");
    const json* dtype = it->contains("dtype") ? &it->at("dtype") : nullptr;
    const json* shape = it->contains("shape") ? &it->at("shape") : nullptr;
    const json* offsets = it->contains("data_offsets") ? &it->at("data_offsets") : nullptr;
    if (!dtype || !dtype->is_string()) bad("has a malformed header entry ('dtype' is not a string)");
    if (!shape || !shape->is_array()) bad("has a malformed header entry ('shape' is not an array)");
    if (!offsets || !offsets->is_array() || offsets->size() != 2)
      bad("has a malformed header entry ('data_offsets' is not an array of two integers)");
    e.dtype = dtype->get<std::string>();
    const size_t el = dtype_bytes(e.dtype);
    if (el == 0) bad("has unknown dtype ", excerpt(e.dtype));
    // Shapes and offsets: JSON integers in [0, 2^63); a float (19.5, 1e30) or anything larger would
    // otherwise be converted with undefined behaviour.
    size_t numel = 1;
    for (const json& d : *shape) {
      const std::optional<int64_t> v = json_int64(d);
      if (!v || *v < 0) bad("has a shape entry ", json_excerpt(d), " that is not an integer in [0, 2^63)");
      e.shape.push_back(*v);
      numel = checked_mul(numel, static_cast<size_t>(*v), path, ": tensor '", excerpt(e.name), "' element count");
    }
    std::optional<int64_t> off[2];
    for (int k = 0; k < 2; ++k) {
      off[k] = json_int64((*offsets)[static_cast<size_t>(k)]);
      if (!off[k] || *off[k] < 0)
        bad("has a data offset ", json_excerpt((*offsets)[static_cast<size_t>(k)]), " that is not an integer in [0, 2^63)");
    }
    e.begin = static_cast<size_t>(*off[0]);
    e.end = static_cast<size_t>(*off[1]);
    if (e.end < e.begin || e.end > data_bytes)
      bad("data [", e.begin, ", ", e.end, ") lies outside the ", data_bytes, "-byte data section (file truncated?)");
    const size_t need = checked_mul(numel, el, path, ": tensor '", excerpt(e.name), "' byte size");
    if (e.end - e.begin != need)
      bad("has ", e.end - e.begin, " bytes but ", e.dtype, " ", shape_string(e.shape), " needs ", need);
    entries_.push_back(std::move(e));
  }
  std::sort(entries_.begin(), entries_.end(), [](const auto& a, const auto& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < entries_.size(); ++i)
    if (entries_[i].begin < entries_[i - 1].end)
      fail(path, ": tensors '", excerpt(entries_[i - 1].name), "' and '", excerpt(entries_[i].name), "' overlap");
  for (size_t i = 0; i < entries_.size(); ++i) index_.emplace(entries_[i].name, i);
}

const SafetensorsEntry* SafetensorsFile::find(const std::string& name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &entries_[it->second];
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
