// Fuzz target: a safetensors file's bytes (SafetensorsFile::from_bytes: the header JSON, shapes,
// offsets, sizes). Every accepted entry's bytes lie inside the data (they are read here, so ASan sees
// any overrun), and copying a small tensor out with read_into works for the entry's own dtype and shape.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz_util.h"
#include "train/safetensors.h"

using namespace lmf;

namespace {
bool lmforge_dtype(const std::string& d, DType* out) {
  if (d == "F32") *out = DType::f32;
  else if (d == "BF16") *out = DType::bf16;
  else if (d == "I32") *out = DType::i32;
  else if (d == "U16") *out = DType::u16;
  else return false;
  return true;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::fuzz_run([&] {
    const SafetensorsFile f =
        SafetensorsFile::from_bytes(std::string(reinterpret_cast<const char*>(data), size), "fuzz.safetensors");
    unsigned sum = 0;
    for (const SafetensorsEntry& e : f.entries()) {
      fuzz::fuzz_check(e.begin <= e.end, "begin <= end");
      const auto* p = static_cast<const unsigned char*>(f.data(e));
      for (size_t i = 0; i < e.end - e.begin; ++i) sum += p[i];  // inside the file, or ASan says so
      fuzz::fuzz_check(f.find(e.name) != nullptr, "find() finds every entry");
      DType dt;
      if (!lmforge_dtype(e.dtype, &dt) || e.shape.empty() || e.shape.size() > static_cast<size_t>(Tensor::kMaxDims) ||
          e.end - e.begin > (size_t{1} << 16))
        continue;
      std::vector<char> buf(e.end - e.begin + 1);
      Tensor t;
      t.data = buf.data();
      t.dtype = dt;
      t.ndim = static_cast<int>(e.shape.size());
      for (int i = 0; i < t.ndim; ++i) t.shape[i] = e.shape[static_cast<size_t>(i)];
      if (f.find(e.name) != &e) continue;  // a duplicate name: read_into reads the first
      f.read_into(e.name, t);
    }
    volatile unsigned keep = sum;
    (void)keep;
  });
  return 0;
}
