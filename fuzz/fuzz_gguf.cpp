// Fuzz target: a GGUF file's bytes (GgufFile::from_bytes: header, metadata, tensor infos, sizes, the
// data layout), then the llama importer and the tokenizer.json builder on whatever parsed. Every
// accepted tensor's bytes lie inside the file (they are read here, so ASan sees any overrun), and an
// imported model has exactly the parameters of its config, each of its spec's size.
#include <cstddef>
#include <cstdint>
#include <string>

#include "convert/gguf.h"
#include "fuzz_util.h"
#include "model/gpt.h"

using namespace lmf;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::fuzz_run([&] {
    const GgufFile f = GgufFile::from_bytes(std::string(reinterpret_cast<const char*>(data), size), "fuzz.gguf");
    unsigned sum = 0;
    for (const GgufTensorInfo& t : f.tensors()) {
      fuzz::fuzz_check(t.offset <= f.file_bytes() && t.bytes <= f.file_bytes() - t.offset, "tensor inside the file");
      fuzz::fuzz_check(f.find_tensor(t.name) == &t, "find_tensor finds every tensor");
      for (size_t i = 0; i < t.bytes; ++i) sum += static_cast<unsigned char>(reinterpret_cast<const char*>(data)[t.offset + i]);
    }
    for (const GgufKv& kv : f.metadata()) fuzz::fuzz_check(f.find(kv.key) == &kv, "find finds every key");
    volatile unsigned keep = sum;
    (void)keep;
    fuzz::fuzz_run([&] { gguf_tokenizer_json(f); });
    const ImportedModel m = import_gguf(f);
    const std::vector<TensorSpec> specs = gpt_param_specs(m.config);
    fuzz::fuzz_check(m.tensors.size() == specs.size(), "one tensor per parameter");
    for (size_t i = 0; i < specs.size(); ++i)
      fuzz::fuzz_check(m.tensors[i].name == specs[i].name &&
                           static_cast<int64_t>(m.tensors[i].data.size()) == specs[i].numel(),
                       "parameter name and size");
  });
  return 0;
}
