// gguf.cpp: the GGUF reader, ggml's block dequantization, and the llama importer (convert/gguf.h,
// docs/GGUF.md).
#include "convert/gguf.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <unordered_map>
#include <unordered_set>

#include "core/bf16.h"
#include "core/check.h"
#include "core/fp16.h"
#include "core/fsutil.h"
#include "core/json_util.h"
#include "core/memory.h"
#include "core/parallel.h"
#include "model/gpt.h"

static_assert(std::endian::native == std::endian::little, "the GGUF reader assumes a little-endian host");

namespace lmf {

namespace {

constexpr uint32_t kGgufMagic = 0x46554747;  // "GGUF" read as a little-endian u32
constexpr int kMaxDims = 4;                  // GGML_MAX_DIMS
// The smallest metadata entry (key length, type, a one-byte value) and tensor info (name length,
// n_dims, one ne, type, offset): counts larger than the bytes left allow are refused up front.
constexpr size_t kMinKvBytes = 8 + 4 + 1;
constexpr size_t kMinTensorInfoBytes = 8 + 4 + 8 + 4 + 8;

// Block layout of every ggml type (gguf-py's GGML_QUANT_SIZES): elements per block, bytes per block.
struct TypeLayout {
  uint32_t id;
  const char* name;
  int64_t block;
  int64_t bytes;
};
constexpr TypeLayout kTypes[] = {
    {0, "F32", 1, 4},          {1, "F16", 1, 2},         {2, "Q4_0", 32, 18},      {3, "Q4_1", 32, 20},
    {6, "Q5_0", 32, 22},       {7, "Q5_1", 32, 24},      {8, "Q8_0", 32, 34},      {9, "Q8_1", 32, 40},
    {10, "Q2_K", 256, 84},     {11, "Q3_K", 256, 110},   {12, "Q4_K", 256, 144},   {13, "Q5_K", 256, 176},
    {14, "Q6_K", 256, 210},    {15, "Q8_K", 256, 292},   {16, "IQ2_XXS", 256, 66}, {17, "IQ2_XS", 256, 74},
    {18, "IQ3_XXS", 256, 98},  {19, "IQ1_S", 256, 50},   {20, "IQ4_NL", 32, 18},   {21, "IQ3_S", 256, 110},
    {22, "IQ2_S", 256, 82},    {23, "IQ4_XS", 256, 136}, {24, "I8", 1, 1},         {25, "I16", 1, 2},
    {26, "I32", 1, 4},         {27, "I64", 1, 8},        {28, "F64", 1, 8},        {29, "IQ1_M", 256, 56},
    {30, "BF16", 1, 2},        {34, "TQ1_0", 256, 54},   {35, "TQ2_0", 256, 66},   {39, "MXFP4", 32, 17},
    {40, "NVFP4", 64, 36},     {41, "Q1_0", 128, 18},
};

const TypeLayout* type_layout(uint32_t id) {
  for (const TypeLayout& t : kTypes)
    if (t.id == id) return &t;
  return nullptr;
}

// Bytes of one scalar metadata value; 0 for string and array (variable) and unknown types.
size_t scalar_bytes(uint32_t t) {
  switch (static_cast<GgufType>(t)) {
    case GgufType::u8: case GgufType::i8: case GgufType::boolean: return 1;
    case GgufType::u16: case GgufType::i16: return 2;
    case GgufType::u32: case GgufType::i32: case GgufType::f32: return 4;
    case GgufType::u64: case GgufType::i64: case GgufType::f64: return 8;
    default: return 0;
  }
}

bool is_integer(GgufType t) {
  switch (t) {
    case GgufType::u8: case GgufType::i8: case GgufType::u16: case GgufType::i16: case GgufType::u32:
    case GgufType::i32: case GgufType::u64: case GgufType::i64: return true;
    default: return false;
  }
}

template <class T>
T load(const char* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The integer of type t at p, as int64; false when it does not fit (a u64 >= 2^63).
bool load_int(GgufType t, const char* p, int64_t* out) {
  switch (t) {
    case GgufType::u8: *out = load<uint8_t>(p); return true;
    case GgufType::i8: *out = load<int8_t>(p); return true;
    case GgufType::u16: *out = load<uint16_t>(p); return true;
    case GgufType::i16: *out = load<int16_t>(p); return true;
    case GgufType::u32: *out = load<uint32_t>(p); return true;
    case GgufType::i32: *out = load<int32_t>(p); return true;
    case GgufType::i64: *out = load<int64_t>(p); return true;
    case GgufType::u64: {
      const uint64_t u = load<uint64_t>(p);
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
      *out = static_cast<int64_t>(u);
      return true;
    }
    default: return false;
  }
}

// A forward-only cursor over the file's bytes; every read is bounds-checked against the file size.
struct Cursor {
  const std::string& path;
  const std::string& bytes;
  size_t pos = 0;

  size_t left() const { return bytes.size() - pos; }
  void need(uint64_t n, const std::string& what) const {
    if (n > left())
      fail(path, ": truncated GGUF file: ", what, " needs ", n, " bytes at offset ", pos, " but ", left(), " are left");
  }
  template <class T>
  T read(const std::string& what) {
    need(sizeof(T), what);
    const T v = load<T>(bytes.data() + pos);
    pos += sizeof(T);
    return v;
  }
  // A GGUF string: u64 length + bytes.
  std::string str(const std::string& what) {
    const uint64_t n = read<uint64_t>(what);
    need(n, what);
    std::string s = bytes.substr(pos, static_cast<size_t>(n));
    pos += static_cast<size_t>(n);
    return s;
  }
  void skip_str(const std::string& what) {
    const uint64_t n = read<uint64_t>(what);
    need(n, what);
    pos += static_cast<size_t>(n);
  }
};

bool valid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    size_t n;
    uint32_t cp;
    if (c < 0x80) { ++i; continue; }
    if ((c & 0xe0) == 0xc0) { n = 1; cp = c & 0x1f; }
    else if ((c & 0xf0) == 0xe0) { n = 2; cp = c & 0x0f; }
    else if ((c & 0xf8) == 0xf0) { n = 3; cp = c & 0x07; }
    else return false;
    if (s.size() - i - 1 < n) return false;
    for (size_t k = 1; k <= n; ++k) {
      const unsigned char d = static_cast<unsigned char>(s[i + k]);
      if ((d & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3f);
    }
    // no overlong forms, no surrogates, nothing above U+10FFFF
    if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) || cp > 0x10ffff ||
        (cp >= 0xd800 && cp <= 0xdfff))
      return false;
    i += n + 1;
  }
  return true;
}

}  // namespace

const char* gguf_type_name(GgufType t) {
  switch (t) {
    case GgufType::u8: return "u8";
    case GgufType::i8: return "i8";
    case GgufType::u16: return "u16";
    case GgufType::i16: return "i16";
    case GgufType::u32: return "u32";
    case GgufType::i32: return "i32";
    case GgufType::f32: return "f32";
    case GgufType::boolean: return "bool";
    case GgufType::string: return "string";
    case GgufType::array: return "array";
    case GgufType::u64: return "u64";
    case GgufType::i64: return "i64";
    case GgufType::f64: return "f64";
  }
  return "unknown";
}

const char* gguf_tensor_type_name(uint32_t ggml_type) {
  const TypeLayout* t = type_layout(ggml_type);
  return t ? t->name : "unknown";
}

// ---- the file ------------------------------------------------------------------------------------

GgufFile::GgufFile(const std::string& path) : path_(path), bytes_(read_regular_file(path, "GGUF file")) { parse(); }

GgufFile GgufFile::from_bytes(std::string bytes, const std::string& name) {
  GgufFile f;
  f.path_ = name;
  f.bytes_ = std::move(bytes);
  f.parse();
  return f;
}

namespace {

// The metadata entry at the cursor; its value is skipped, checked to lie inside the file.
GgufKv read_kv(Cursor& c, uint64_t i) {
  GgufKv kv;
  kv.key = c.str(detail::concat("the key of metadata entry ", i));
  const std::string what = "metadata key '" + excerpt(kv.key) + "'";
  const uint32_t type = c.read<uint32_t>(what);
  kv.type = static_cast<GgufType>(type);
  if (type == static_cast<uint32_t>(GgufType::string)) {
    kv.value = c.pos;
    c.skip_str(what);
  } else if (type == static_cast<uint32_t>(GgufType::array)) {
    const uint32_t elem = c.read<uint32_t>(what);
    kv.elem = static_cast<GgufType>(elem);
    kv.count = c.read<uint64_t>(what);
    kv.value = c.pos;
    if (elem == static_cast<uint32_t>(GgufType::array)) fail(c.path, ": ", what, " is an array of arrays, which lmforge does not read");
    if (elem == static_cast<uint32_t>(GgufType::string)) {
      if (kv.count > c.left() / 8)
        fail(c.path, ": truncated GGUF file: ", what, " has ", kv.count, " strings but ", c.left(), " bytes are left");
      for (uint64_t k = 0; k < kv.count; ++k) c.skip_str(what);
    } else {
      const size_t sz = scalar_bytes(elem);
      if (sz == 0) fail(c.path, ": ", what, " is an array of unknown type ", elem);
      if (kv.count > c.left() / sz)
        fail(c.path, ": truncated GGUF file: ", what, " has ", kv.count, " elements of ", sz, " bytes but ", c.left(),
             " bytes are left");
      c.pos += static_cast<size_t>(kv.count) * sz;
    }
  } else {
    const size_t sz = scalar_bytes(type);
    if (sz == 0) fail(c.path, ": ", what, " has unknown value type ", type);
    kv.value = c.pos;
    c.need(sz, what);
    c.pos += sz;
  }
  return kv;
}

// The tensor info at the cursor, sized from its type's block layout; its offset is still relative
// to the data section.
GgufTensorInfo read_tensor_info(Cursor& c, uint64_t i, size_t alignment) {
  GgufTensorInfo t;
  t.name = c.str(detail::concat("the name of tensor ", i));
  const std::string what = "tensor '" + excerpt(t.name) + "'";
  const uint32_t n_dims = c.read<uint32_t>(what);
  if (n_dims < 1 || n_dims > kMaxDims) fail(c.path, ": ", what, " has ", n_dims, " dimensions (1 to ", kMaxDims, " are allowed)");
  t.numel = 1;
  for (uint32_t d = 0; d < n_dims; ++d) {
    const uint64_t ne = c.read<uint64_t>(what);
    if (ne > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      fail(c.path, ": ", what, " has dimension ", d, " = ", ne, ", too large");
    t.ne.push_back(static_cast<int64_t>(ne));
    t.numel = checked_mul(t.numel, static_cast<int64_t>(ne), c.path, ": ", what, " element count");
  }
  t.type = c.read<uint32_t>(what);
  const uint64_t offset = c.read<uint64_t>(what);
  const TypeLayout* L = type_layout(t.type);
  if (!L) fail(c.path, ": ", what, " has unknown ggml type ", t.type);
  if (t.ne[0] % L->block != 0)
    fail(c.path, ": ", what, " of type ", L->name, " has ne0 = ", t.ne[0], ", not a multiple of its block size ", L->block);
  t.bytes = static_cast<size_t>(checked_mul(t.numel / L->block, L->bytes, c.path, ": ", what, " byte size"));
  if (offset % alignment != 0)
    fail(c.path, ": ", what, " is at data offset ", offset, ", not a multiple of the alignment ", alignment);
  t.offset = static_cast<size_t>(offset);
  return t;
}

// The data section starts at the first multiple of the alignment after the tensor infos (header_end);
// every tensor lies inside it (its offset is made absolute) and no two overlap.
void place_tensors(std::vector<GgufTensorInfo>& ts, size_t header_end, size_t alignment, size_t file_bytes,
                   const std::string& path) {
  if (ts.empty()) return;
  const size_t data_start = (header_end + alignment - 1) / alignment * alignment;
  if (data_start > file_bytes)
    fail(path, ": truncated GGUF file: the tensor data would start at byte ", data_start, " but the file has ", file_bytes);
  const size_t data_bytes = file_bytes - data_start;
  for (GgufTensorInfo& t : ts) {
    if (t.offset > data_bytes || t.bytes > data_bytes - t.offset)
      fail(path, ": truncated GGUF file: tensor '", excerpt(t.name), "' (", t.bytes, " bytes at data offset ", t.offset,
           ") ends past the ", data_bytes, " bytes of tensor data");
    t.offset += data_start;
  }
  std::vector<const GgufTensorInfo*> order;
  for (const GgufTensorInfo& t : ts)
    if (t.bytes > 0) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](const auto* a, const auto* b) { return a->offset < b->offset; });
  for (size_t k = 1; k < order.size(); ++k)
    if (order[k - 1]->offset + order[k - 1]->bytes > order[k]->offset)
      fail(path, ": corrupt GGUF file: tensors '", excerpt(order[k - 1]->name), "' and '", excerpt(order[k]->name),
           "' overlap");
}

}  // namespace

void GgufFile::parse() {
  Cursor c{path_, bytes_};
  if (bytes_.size() < 4) fail(path_, ": not a GGUF file (", bytes_.size(), " bytes; a GGUF file starts with 'GGUF')");
  const uint32_t magic = c.read<uint32_t>("the magic");
  if (magic != kGgufMagic) {
    char hex[16];
    std::snprintf(hex, sizeof hex, "0x%08x", __builtin_bswap32(magic));
    fail(path_, ": not a GGUF file (its first 4 bytes are ", hex, ", not 'GGUF')");
  }
  version_ = c.read<uint32_t>("the version");
  if (version_ != 2 && version_ != 3) {
    const uint32_t swapped = __builtin_bswap32(version_);
    fail(path_, ": GGUF version ", version_, " is not supported (versions 2 and 3 are)",
         swapped == 2 || swapped == 3 ? "; it looks like a big-endian file, which lmforge does not read" : "");
  }
  const uint64_t n_tensors = c.read<uint64_t>("the tensor count");
  const uint64_t n_kv = c.read<uint64_t>("the metadata count");
  if (n_kv > c.left() / kMinKvBytes || n_tensors > c.left() / kMinTensorInfoBytes ||
      n_kv * kMinKvBytes + n_tensors * kMinTensorInfoBytes > c.left())
    fail(path_, ": truncated or corrupt GGUF file: ", n_kv, " metadata entries and ", n_tensors,
         " tensors cannot fit in the ", c.left(), " bytes after the header");

  kvs_.reserve(static_cast<size_t>(n_kv));
  for (uint64_t i = 0; i < n_kv; ++i) {
    GgufKv kv = read_kv(c, i);
    if (!kv_index_.emplace(kv.key, kvs_.size()).second) fail(path_, ": metadata key '", excerpt(kv.key), "' appears twice");
    kvs_.push_back(std::move(kv));
  }
  if (find("general.alignment")) {
    const int64_t a = get_int("general.alignment", 1, int64_t{1} << 30);
    if (!std::has_single_bit(static_cast<uint64_t>(a))) fail(path_, ": general.alignment ", a, " is not a power of two");
    alignment_ = static_cast<size_t>(a);
  }
  tensors_.reserve(static_cast<size_t>(n_tensors));
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensorInfo t = read_tensor_info(c, i, alignment_);
    if (!tensor_index_.emplace(t.name, tensors_.size()).second) fail(path_, ": tensor '", excerpt(t.name), "' appears twice");
    tensors_.push_back(std::move(t));
  }
  place_tensors(tensors_, c.pos, alignment_, bytes_.size(), path_);
}

const GgufKv* GgufFile::find(const std::string& key) const {
  auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kvs_[it->second];
}

const GgufTensorInfo* GgufFile::find_tensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

namespace {
const GgufKv& require(const GgufFile& f, const std::string& key) {
  const GgufKv* kv = f.find(key);
  if (!kv) fail(f.path(), ": metadata key '", key, "' is missing");
  return *kv;
}
[[noreturn]] void wrong_type(const GgufFile& f, const GgufKv& kv, const char* expected) {
  if (kv.type == GgufType::array)
    fail(f.path(), ": metadata key '", excerpt(kv.key), "' is an array of ", gguf_type_name(kv.elem), ", expected ", expected);
  fail(f.path(), ": metadata key '", excerpt(kv.key), "' is a ", gguf_type_name(kv.type), ", expected ", expected);
}
}  // namespace

int64_t GgufFile::get_int(const std::string& key, int64_t lo, int64_t hi) const {
  const GgufKv& kv = require(*this, key);
  int64_t v = 0;
  if (!is_integer(kv.type)) wrong_type(*this, kv, "an integer");
  if (!load_int(kv.type, bytes_.data() + kv.value, &v) || v < lo || v > hi) {
    const std::string shown = kv.type == GgufType::u64 ? std::to_string(load<uint64_t>(bytes_.data() + kv.value)) : std::to_string(v);
    fail(path_, ": metadata key '", key, "' = ", shown, " is out of range [", lo, ", ", hi, "]");
  }
  return v;
}

double GgufFile::get_float(const std::string& key) const {
  const GgufKv& kv = require(*this, key);
  double v;
  if (kv.type == GgufType::f32) v = load<float>(bytes_.data() + kv.value);
  else if (kv.type == GgufType::f64) v = load<double>(bytes_.data() + kv.value);
  else wrong_type(*this, kv, "a float");
  if (!std::isfinite(v)) fail(path_, ": metadata key '", key, "' = ", v, " is not finite");
  return v;
}

bool GgufFile::get_bool(const std::string& key) const {
  const GgufKv& kv = require(*this, key);
  if (kv.type != GgufType::boolean) wrong_type(*this, kv, "a bool");
  const uint8_t b = load<uint8_t>(bytes_.data() + kv.value);
  if (b > 1) fail(path_, ": metadata key '", key, "' is a bool of value ", int{b}, " (0 or 1 expected)");
  return b == 1;
}

std::string GgufFile::get_string(const std::string& key) const {
  const GgufKv& kv = require(*this, key);
  if (kv.type != GgufType::string) wrong_type(*this, kv, "a string");
  Cursor c{path_, bytes_, kv.value};
  return c.str(key);
}

std::vector<std::string> GgufFile::get_string_array(const std::string& key) const {
  const GgufKv& kv = require(*this, key);
  if (kv.type != GgufType::array || kv.elem != GgufType::string) wrong_type(*this, kv, "an array of strings");
  Cursor c{path_, bytes_, kv.value};
  std::vector<std::string> out;
  out.reserve(static_cast<size_t>(kv.count));  // bounded by the file size (parse)
  for (uint64_t i = 0; i < kv.count; ++i) out.push_back(c.str(key));
  return out;
}

std::vector<int64_t> GgufFile::get_int_array(const std::string& key) const {
  const GgufKv& kv = require(*this, key);
  if (kv.type != GgufType::array || !is_integer(kv.elem)) wrong_type(*this, kv, "an array of integers");
  const size_t sz = scalar_bytes(static_cast<uint32_t>(kv.elem));
  std::vector<int64_t> out(static_cast<size_t>(kv.count));
  for (size_t i = 0; i < out.size(); ++i)
    if (!load_int(kv.elem, bytes_.data() + kv.value + i * sz, &out[i]))
      fail(path_, ": metadata key '", key, "' element ", i, " does not fit a signed 64-bit integer");
  return out;
}

// ---- dequantization (ggml's block layouts, ggml-common.h) ------------------------------------------

namespace {

constexpr int64_t kQK = 32;  // elements per Q4_0 / Q4_1 / Q8_0 block

// Q8_0: fp16 d, 32 x int8 q; x = q d.
void dequant_q8_0(const char* src, float* dst, int64_t blocks) {
  for (int64_t b = 0; b < blocks; ++b, src += 34, dst += kQK) {
    const float d = fp16_to_float(load<uint16_t>(src));
    for (int64_t j = 0; j < kQK; ++j) dst[j] = static_cast<float>(static_cast<int8_t>(src[2 + j])) * d;
  }
}

// Q4_0: fp16 d, 16 bytes; element j < 16 is the low nibble of byte j, element j + 16 its high
// nibble; x = (q - 8) d.
void dequant_q4_0(const char* src, float* dst, int64_t blocks) {
  for (int64_t b = 0; b < blocks; ++b, src += 18, dst += kQK) {
    const float d = fp16_to_float(load<uint16_t>(src));
    for (int64_t j = 0; j < kQK / 2; ++j) {
      const uint8_t q = static_cast<uint8_t>(src[2 + j]);
      dst[j] = static_cast<float>(static_cast<int>(q & 0x0f) - 8) * d;
      dst[j + kQK / 2] = static_cast<float>(static_cast<int>(q >> 4) - 8) * d;
    }
  }
}

// Q4_1: fp16 d, fp16 m, 16 bytes of nibbles as Q4_0; x = q d + m. (q d is exact in fp32 -- 4 bits
// times an 11-bit significand -- so a fused multiply-add gives the same bits as numpy's q * d + m.)
void dequant_q4_1(const char* src, float* dst, int64_t blocks) {
  for (int64_t b = 0; b < blocks; ++b, src += 20, dst += kQK) {
    const float d = fp16_to_float(load<uint16_t>(src));
    const float m = fp16_to_float(load<uint16_t>(src + 2));
    for (int64_t j = 0; j < kQK / 2; ++j) {
      const uint8_t q = static_cast<uint8_t>(src[4 + j]);
      dst[j] = static_cast<float>(q & 0x0f) * d + m;
      dst[j + kQK / 2] = static_cast<float>(q >> 4) * d + m;
    }
  }
}

void dequant_f16(const char* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_float(load<uint16_t>(src + 2 * i));
}

void dequant_bf16(const char* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = bf16::to_float(load<uint16_t>(src + 2 * i));
  }
}

void dequant_f32(const char* src, float* dst, int64_t n) { std::memcpy(dst, src, static_cast<size_t>(n) * 4); }

// The dequantizer of a ggml type: fn(src, dst, blocks) writes blocks x block-size floats; null when
// lmforge does not read the type.
using DequantFn = void (*)(const char*, float*, int64_t);
DequantFn dequant_fn(uint32_t type) {
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::f32: return dequant_f32;
    case GgmlType::f16: return dequant_f16;
    case GgmlType::bf16: return dequant_bf16;
    case GgmlType::q8_0: return dequant_q8_0;
    case GgmlType::q4_0: return dequant_q4_0;
    case GgmlType::q4_1: return dequant_q4_1;
  }
  return nullptr;
}

void check_readable(const std::string& path, const GgufTensorInfo& t) {
  if (!dequant_fn(t.type))
    fail(path, ": tensor '", excerpt(t.name), "' has type ", gguf_tensor_type_name(t.type), ", which lmforge does not "
         "read (F32, F16, BF16, Q8_0, Q4_0 and Q4_1 are read)");
}

}  // namespace

void GgufFile::read_f32(const GgufTensorInfo& t, float* dst) const {
  check_readable(path_, t);
  const TypeLayout* L = type_layout(t.type);
  const DequantFn fn = dequant_fn(t.type);
  // blocks of L->block elements, L->bytes each; chunks of whole blocks on the CPU's threads
  const int64_t blocks = t.numel / L->block;
  const char* src = bytes_.data() + t.offset;
  parallel_for(blocks, grain_for(blocks, 4096 / L->block), [&](int64_t b, int64_t e) {
    fn(src + b * L->bytes, dst + b * L->block, e - b);
  });
}

// ---- the tokenizer -----------------------------------------------------------------------------------

namespace {

using nlohmann::json;

// tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
enum TokenType : int64_t { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };

json byte_level(bool add_prefix_space, bool trim_offsets, bool use_regex) {
  return {{"type", "ByteLevel"}, {"add_prefix_space", add_prefix_space}, {"trim_offsets", trim_offsets},
          {"use_regex", use_regex}};
}

json split_isolated(const char* regex) {
  return {{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", "Isolated"}, {"invert", false}};
}

// The pre-tokenizer patterns of the Hugging Face tokenizers that llama.cpp's pre types stand for.
constexpr const char* kLlama3Regex =
    R"re((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)re";
constexpr const char* kQwen2Regex =
    R"re((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)re";

struct PreTokenizer {
  json normalizer, pre_tokenizer;
  bool ignore_merges = false;
};

// tokenizer.ggml.pre -> what the model's own tokenizer.json says (llama.cpp's llama-vocab.cpp uses
// the same splits).
PreTokenizer pre_tokenizer_for(const std::string& pre, const std::string& path) {
  PreTokenizer p;
  if (pre == "gpt-2") {
    p.pre_tokenizer = byte_level(false, true, true);
  } else if (pre == "smollm") {  // SmolLM / SmolLM2: single digits, then GPT-2's split
    p.pre_tokenizer = {{"type", "Sequence"},
                       {"pretokenizers", json::array({{{"type", "Digits"}, {"individual_digits", true}},
                                                      byte_level(false, true, true)})}};
  } else if (pre == "llama-bpe") {  // Llama 3
    p.pre_tokenizer = {{"type", "Sequence"},
                       {"pretokenizers", json::array({split_isolated(kLlama3Regex), byte_level(false, true, false)})}};
    p.ignore_merges = true;
  } else if (pre == "qwen2") {
    p.normalizer = {{"type", "NFC"}};
    p.pre_tokenizer = {{"type", "Sequence"},
                       {"pretokenizers", json::array({split_isolated(kQwen2Regex), byte_level(false, false, false)})}};
  } else {
    fail(path, ": tokenizer.ggml.pre '", excerpt(pre), "' is not supported (gpt-2, smollm, llama-bpe and qwen2 are)");
  }
  return p;
}

json special_token_ref(const std::string& content, int64_t type_id) {
  return {{"SpecialToken", {{"id", content}, {"type_id", type_id}}}};
}

json sequence_ref(const char* id, int64_t type_id) { return {{"Sequence", {{"id", id}, {"type_id", type_id}}}}; }

// BOS (and EOS) around each sequence, as Llama 3's tokenizer.json does; ByteLevel (GPT-2's, no
// tokens added) otherwise.
json post_processor(const std::vector<std::string>& tokens, int64_t bos, int64_t eos) {
  if (bos < 0 && eos < 0) return byte_level(true, false, true);
  json single = json::array(), pair = json::array(), specials = json::object();
  auto add = [&](json& seq, const char* id, int64_t type_id) {
    if (bos >= 0) seq.push_back(special_token_ref(tokens[static_cast<size_t>(bos)], type_id));
    seq.push_back(sequence_ref(id, type_id));
    if (eos >= 0) seq.push_back(special_token_ref(tokens[static_cast<size_t>(eos)], type_id));
  };
  add(single, "A", 0);
  add(pair, "A", 0);
  add(pair, "B", 1);
  for (int64_t id : {bos, eos})
    if (id >= 0) {
      const std::string& t = tokens[static_cast<size_t>(id)];
      specials[t] = {{"id", t}, {"ids", {id}}, {"tokens", {t}}};
    }
  return {{"type", "TemplateProcessing"}, {"single", single}, {"pair", pair}, {"special_tokens", specials}};
}

struct Vocabulary {
  json vocab = json::object(), added = json::array();
  std::unordered_map<std::string, int64_t> ids;
};

// The BPE vocabulary (token -> id) and the added tokens (control and unknown tokens special,
// user-defined ones not); tokens must be valid UTF-8 and distinct.
Vocabulary vocabulary(const std::vector<std::string>& tokens, const std::vector<int64_t>& types, const std::string& path) {
  Vocabulary v;
  v.ids.reserve(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) {
    const std::string& t = tokens[i];
    if (!valid_utf8(t)) fail(path, ": tokenizer.ggml.tokens: token ", i, " is not valid UTF-8");
    auto [it, fresh] = v.ids.emplace(t, static_cast<int64_t>(i));
    if (!fresh) fail(path, ": tokenizer.ggml.tokens: token ", i, " '", excerpt(t), "' is also token ", it->second);
    v.vocab[t] = i;
    const int64_t ty = types[i];
    if (ty < kNormal || ty > kByte) fail(path, ": tokenizer.ggml.token_type of token ", i, " is ", ty, " (1 to 6 are defined)");
    if (ty == kControl || ty == kUnknown || ty == kUserDefined)
      v.added.push_back({{"id", i}, {"content", t}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
                         {"normalized", false}, {"special", ty != kUserDefined}});
  }
  return v;
}

// "a b" merges as [a, b] pairs, split at the first space after the first character (as llama.cpp
// does); both parts and their concatenation must be tokens (else `tokenizers` would refuse the file).
json merge_pairs(const std::vector<std::string>& merges, const std::unordered_map<std::string, int64_t>& ids,
                 const std::string& path) {
  json out = json::array();
  for (size_t i = 0; i < merges.size(); ++i) {
    const std::string& m = merges[i];
    const size_t sp = m.size() > 1 ? m.find(' ', 1) : std::string::npos;
    if (sp == std::string::npos || sp + 1 >= m.size())
      fail(path, ": tokenizer.ggml.merges: merge ", i, " '", excerpt(m), "' is not two tokens separated by a space");
    std::string a = m.substr(0, sp), b = m.substr(sp + 1);
    for (const std::string* part : {&a, &b})
      if (!ids.count(*part)) fail(path, ": tokenizer.ggml.merges: merge ", i, ": '", excerpt(*part), "' is not a token");
    if (!ids.count(a + b)) fail(path, ": tokenizer.ggml.merges: merge ", i, ": its result '", excerpt(a + b), "' is not a token");
    out.push_back({std::move(a), std::move(b)});
  }
  return out;
}

}  // namespace

std::string gguf_tokenizer_json(const GgufFile& f) {
  const std::string& path = f.path();
  if (!f.find("tokenizer.ggml.model")) return "";
  const std::string model = f.get_string("tokenizer.ggml.model");
  if (model != "gpt2")
    fail(path, ": tokenizer.ggml.model '", excerpt(model), "' is not supported (lmforge reads byte-level BPE "
         "tokenizers, 'gpt2')");
  if (f.find("tokenizer.ggml.add_space_prefix") && f.get_bool("tokenizer.ggml.add_space_prefix"))
    fail(path, ": tokenizer.ggml.add_space_prefix is true, which a byte-level BPE tokenizer does not support");
  if (!f.find("tokenizer.ggml.pre"))
    fail(path, ": metadata key 'tokenizer.ggml.pre' is missing (it says how text is split before BPE)");
  const PreTokenizer pre = pre_tokenizer_for(f.get_string("tokenizer.ggml.pre"), path);

  const std::vector<std::string> tokens = f.get_string_array("tokenizer.ggml.tokens");
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n == 0) fail(path, ": tokenizer.ggml.tokens is empty");
  std::vector<int64_t> types(tokens.size(), kNormal);
  if (f.find("tokenizer.ggml.token_type")) {
    types = f.get_int_array("tokenizer.ggml.token_type");
    if (types.size() != tokens.size())
      fail(path, ": tokenizer.ggml.token_type has ", types.size(), " entries for ", n, " tokens");
  }
  auto token_id = [&](const char* key) -> int64_t {
    return f.find(key) ? f.get_int(key, 0, n - 1) : -1;
  };
  auto flag = [&](const char* key) { return f.find(key) ? f.get_bool(key) : false; };
  const int64_t bos = token_id("tokenizer.ggml.bos_token_id"), eos = token_id("tokenizer.ggml.eos_token_id");
  token_id("tokenizer.ggml.unknown_token_id");  // range-checked; byte-level BPE never needs it
  token_id("tokenizer.ggml.padding_token_id");
  const bool add_bos = flag("tokenizer.ggml.add_bos_token"), add_eos = flag("tokenizer.ggml.add_eos_token");
  if (add_bos && bos < 0) fail(path, ": tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id is missing");
  if (add_eos && eos < 0) fail(path, ": tokenizer.ggml.add_eos_token is true but tokenizer.ggml.eos_token_id is missing");

  Vocabulary v = vocabulary(tokens, types, path);
  json merges = merge_pairs(f.get_string_array("tokenizer.ggml.merges"), v.ids, path);
  json model_json = {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr},
                     {"continuing_subword_prefix", nullptr}, {"end_of_word_suffix", nullptr}, {"fuse_unk", false},
                     {"byte_fallback", false}, {"ignore_merges", pre.ignore_merges}, {"vocab", std::move(v.vocab)},
                     {"merges", std::move(merges)}};
  json doc = {{"version", "1.0"},
              {"truncation", nullptr},
              {"padding", nullptr},
              {"added_tokens", std::move(v.added)},
              {"normalizer", pre.normalizer},
              {"pre_tokenizer", pre.pre_tokenizer},
              {"post_processor", post_processor(tokens, add_bos ? bos : -1, add_eos ? eos : -1)},
              {"decoder", byte_level(true, true, true)},
              {"model", std::move(model_json)}};
  return doc.dump();  // every string was checked to be UTF-8
}

// ---- the llama importer -----------------------------------------------------------------------------

namespace {

// llama.* keys whose meaning lmforge implements (or checks); any other llama.* key could change the
// math (RoPE scaling, experts, logit scaling, ...) and is refused rather than ignored.
bool known_llama_key(const std::string& k) {
  static const std::unordered_set<std::string> known = {
      "llama.context_length", "llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
      "llama.attention.head_count", "llama.attention.head_count_kv", "llama.attention.layer_norm_rms_epsilon",
      "llama.rope.freq_base", "llama.rope.dimension_count", "llama.vocab_size", "llama.attention.key_length",
      "llama.attention.value_length", "llama.rope.scaling.type", "llama.rope.scaling.factor",
      "llama.expert_count", "llama.expert_used_count"};
  return known.count(k) > 0;
}

ModelConfig llama_config(const GgufFile& f) {
  const std::string& path = f.path();
  for (const GgufKv& kv : f.metadata())
    if (kv.key.rfind("llama.", 0) == 0 && !known_llama_key(kv.key))
      fail(path, ": metadata key '", excerpt(kv.key), "' is not supported (lmforge would ignore what it changes)");
  if (f.find("llama.rope.scaling.type")) {
    const std::string t = f.get_string("llama.rope.scaling.type");
    if (t != "none") fail(path, ": llama.rope.scaling.type '", excerpt(t), "' is not supported (only 'none' is)");
  }
  if (f.find("llama.rope.scaling.factor") && f.get_float("llama.rope.scaling.factor") != 1.0)
    fail(path, ": llama.rope.scaling.factor ", f.get_float("llama.rope.scaling.factor"), " is not supported (only 1 is)");
  for (const char* k : {"llama.expert_count", "llama.expert_used_count"})
    if (f.find(k) && f.get_int(k, 0, INT64_MAX) != 0)
      fail(path, ": ", k, " = ", f.get_int(k, 0, INT64_MAX), ": mixture-of-experts llama files are not supported");

  const int64_t kInt = std::numeric_limits<int>::max();
  ModelConfig c;
  c.n_layer = static_cast<int>(f.get_int("llama.block_count", 1, ConfigLimits::n_layer));
  c.d_model = f.get_int("llama.embedding_length", 1, ConfigLimits::d_model);
  c.d_ff = f.get_int("llama.feed_forward_length", 1, ConfigLimits::d_ff);
  c.n_head = static_cast<int>(f.get_int("llama.attention.head_count", 1, ConfigLimits::n_head));
  c.n_kv_head = f.find("llama.attention.head_count_kv")
                    ? static_cast<int>(f.get_int("llama.attention.head_count_kv", 1, ConfigLimits::n_head))
                    : c.n_head;
  c.context_length = f.get_int("llama.context_length", 1, ConfigLimits::context_length);
  c.norm = NormKind::rmsnorm;
  c.norm_eps = static_cast<float>(f.get_float("llama.attention.layer_norm_rms_epsilon"));
  c.activation = ActivationKind::swiglu;
  c.positions = PositionKind::rope;
  c.rope_theta = f.find("llama.rope.freq_base") ? static_cast<float>(f.get_float("llama.rope.freq_base")) : 10000.0f;
  c.bias = false;
  c.tied_embeddings = f.find_tensor("output.weight") == nullptr;
  if (c.d_model % c.n_head != 0) fail(path, ": llama.embedding_length ", c.d_model, " is not a multiple of llama.attention.head_count ", c.n_head);
  const int64_t HS = c.d_model / c.n_head;
  for (const char* k : {"llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length"})
    if (f.find(k) && f.get_int(k, 0, kInt) != HS)
      fail(path, ": ", k, " = ", f.get_int(k, 0, kInt), " differs from the head size ", HS,
           " (embedding_length / head_count), which lmforge does not support");
  // the vocabulary: the tokenizer's tokens, else llama.vocab_size, else the embedding's rows
  const int64_t vocab_key = f.find("llama.vocab_size") ? f.get_int("llama.vocab_size", 1, INT64_MAX) : 0;
  if (f.find("tokenizer.ggml.tokens")) {
    const GgufKv& kv = *f.find("tokenizer.ggml.tokens");
    if (kv.type != GgufType::array || kv.elem != GgufType::string)
      f.get_string_array("tokenizer.ggml.tokens");  // throws naming the type
    c.vocab_size = static_cast<int64_t>(kv.count);
  } else if (vocab_key > 0) {
    c.vocab_size = vocab_key;
  } else if (const GgufTensorInfo* e = f.find_tensor("token_embd.weight"); e && e->ne.size() == 2) {
    c.vocab_size = e->ne[1];
  } else {
    fail(path, ": nothing gives the vocabulary size (no tokenizer.ggml.tokens, llama.vocab_size or 2-D token_embd.weight)");
  }
  if (vocab_key > 0 && vocab_key != c.vocab_size)
    fail(path, ": llama.vocab_size = ", vocab_key, " but the tokenizer has ", c.vocab_size, " tokens");
  c.validate(path);
  return c;
}

std::string shape_str(const std::vector<int64_t>& ne) {
  std::string s = "[";
  for (size_t i = 0; i < ne.size(); ++i) s += (i ? ", " : "") + std::to_string(ne[i]);
  return s + "]";
}

// The GGUF tensors of a llama model and their ne (GGUF order: (out, in) matrices are [in, out]).
std::vector<std::pair<std::string, std::vector<int64_t>>> llama_tensor_table(const ModelConfig& c) {
  const int64_t C = c.d_model, HS = c.head_size(), V = c.vocab_size, F = c.d_ff;
  std::vector<std::pair<std::string, std::vector<int64_t>>> t = {{"token_embd.weight", {C, V}}};
  for (int i = 0; i < c.n_layer; ++i) {
    const std::string b = "blk." + std::to_string(i) + ".";
    t.push_back({b + "attn_norm.weight", {C}});
    t.push_back({b + "attn_q.weight", {C, c.n_head * HS}});
    t.push_back({b + "attn_k.weight", {C, c.n_kv_head * HS}});
    t.push_back({b + "attn_v.weight", {C, c.n_kv_head * HS}});
    t.push_back({b + "attn_output.weight", {c.n_head * HS, C}});
    t.push_back({b + "ffn_norm.weight", {C}});
    t.push_back({b + "ffn_gate.weight", {C, F}});
    t.push_back({b + "ffn_up.weight", {C, F}});
    t.push_back({b + "ffn_down.weight", {F, C}});
  }
  t.push_back({"output_norm.weight", {C}});
  if (!c.tied_embeddings) t.push_back({"output.weight", {C, V}});
  return t;
}

// Rows of Q or K as llama.cpp's converter stores them (each head's rows interleaved: row 2i + j of a
// head is row j HS/2 + i of the Hugging Face layout) back to rotate-half order. src, dst: (heads HS, C).
void unpermute_rows(const float* src, float* dst, int64_t heads, int64_t HS, int64_t C) {
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < HS / 2; ++i)
      for (int64_t j = 0; j < 2; ++j)
        std::memcpy(dst + (h * HS + j * (HS / 2) + i) * C, src + (h * HS + 2 * i + j) * C, static_cast<size_t>(C) * 4);
}

// Every tensor of the file is one of the model's, at the shape the config says, of a type lmforge
// reads; none is missing.
void check_llama_tensors(const GgufFile& f, const ModelConfig& c) {
  const std::string& path = f.path();
  const auto table = llama_tensor_table(c);
  std::unordered_map<std::string, const std::vector<int64_t>*> want;
  for (const auto& [name, ne] : table) want[name] = &ne;
  for (const GgufTensorInfo& t : f.tensors()) {
    auto it = want.find(t.name);
    if (it == want.end()) fail(path, ": tensor '", excerpt(t.name), "' is not part of a llama model lmforge reads");
    if (t.ne != *it->second)
      fail(path, ": tensor '", t.name, "' has ne ", shape_str(t.ne), ", expected ", shape_str(*it->second),
           " (GGUF order, fastest-varying first)");
    check_readable(path, t);
  }
  for (const auto& [name, ne] : table)
    if (!f.find_tensor(name)) fail(path, ": tensor '", name, "' is missing");
}

// The fp32 weights under lmforge's names and layouts, in gpt_param_specs order (docs/GGUF.md has the
// table). Allocated from the spec table once the memory they need is known to be there.
std::vector<ImportedTensor> read_llama_weights(const GgufFile& f, const ModelConfig& c) {
  const std::string& path = f.path();
  const std::vector<TensorSpec> specs = gpt_param_specs(c);
  size_t floats = 0;
  for (const TensorSpec& s : specs) floats = checked_add(floats, static_cast<size_t>(s.numel()), path, ": parameters");
  check_memory_fits(checked_mul(floats, sizeof(float), path, ": parameter bytes"), Device::cpu,
                    path + ": the model's fp32 weights");
  std::vector<ImportedTensor> out;
  out.reserve(specs.size());
  std::unordered_map<std::string, float*> at;
  for (const TensorSpec& s : specs) {
    out.push_back({s.name, s.shape, std::vector<float>(static_cast<size_t>(s.numel()), 0.0f)});
    at[s.name] = out.back().data.data();
  }
  auto read = [&](const std::string& name, float* dst) { f.read_f32(*f.find_tensor(name), dst); };
  const int64_t C = c.d_model, HS = c.head_size(), F = c.d_ff;
  read("token_embd.weight", at.at("tok_emb.weight"));  // rows V..Vp-1 stay 0
  std::vector<float> tmp(static_cast<size_t>(c.n_head * HS * C));
  for (int i = 0; i < c.n_layer; ++i) {
    const std::string b = "blk." + std::to_string(i) + ".", l = "layers." + std::to_string(i) + ".";
    read(b + "attn_norm.weight", at.at(l + "norm1.weight"));
    float* qkv = at.at(l + "attn.qkv.weight");  // rows [q; k; v]
    read(b + "attn_q.weight", tmp.data());
    unpermute_rows(tmp.data(), qkv, c.n_head, HS, C);
    read(b + "attn_k.weight", tmp.data());
    unpermute_rows(tmp.data(), qkv + c.n_head * HS * C, c.n_kv_head, HS, C);
    read(b + "attn_v.weight", qkv + (c.n_head + c.n_kv_head) * HS * C);
    read(b + "attn_output.weight", at.at(l + "attn.proj.weight"));
    read(b + "ffn_norm.weight", at.at(l + "norm2.weight"));
    float* fc = at.at(l + "mlp.fc.weight");  // rows [gate; up] (ops/activation.h)
    read(b + "ffn_gate.weight", fc);
    read(b + "ffn_up.weight", fc + F * C);
    read(b + "ffn_down.weight", at.at(l + "mlp.proj.weight"));
  }
  read("output_norm.weight", at.at("norm_f.weight"));
  if (!c.tied_embeddings) read("output.weight", at.at("lm_head.weight"));
  return out;
}

}  // namespace

ImportedModel import_gguf(const std::string& path) { return import_gguf(GgufFile(path)); }

ImportedModel import_gguf(const GgufFile& f) {
  const std::string& path = f.path();
  const std::string arch = f.get_string("general.architecture");
  if (arch != "llama") fail(path, ": general.architecture is '", excerpt(arch), "'; lmforge imports 'llama' GGUF files");
  ImportedModel m;
  m.config = llama_config(f);
  m.source = "gguf llama (" + path + ")";
  check_llama_tensors(f, m.config);
  m.tokenizer_json = gguf_tokenizer_json(f);
  if (f.find("tokenizer.chat_template")) {
    m.chat_template = f.get_string("tokenizer.chat_template");
    if (!valid_utf8(m.chat_template)) fail(path, ": tokenizer.chat_template is not valid UTF-8");
  }
  m.tensors = read_llama_weights(f, m.config);
  return m;
}

}  // namespace lmf
