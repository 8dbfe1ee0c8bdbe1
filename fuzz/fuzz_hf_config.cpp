// Fuzz target: a Hugging Face config.json (hf_config_from_json: `lmforge import`, and every command
// given a Hugging Face directory). An accepted config must export as the class it was read as, and
// the config.json that export writes must read back as the same lmforge config.
#include <cstddef>
#include <cstdint>
#include <string>

#include "convert/hf.h"
#include "convert/hf_export.h"
#include "fuzz_util.h"

using namespace lmf;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  fuzz::fuzz_run([&] {
    const HfModelConfig h = hf_config_from_json(text, "config.json");
    try {
      fuzz::fuzz_check(hf_arch_for(h.config, "fuzz") == h.arch, "an imported config exports as its own class");
      const HfModelConfig back = hf_config_from_json(hf_config_json(h.arch, h.config), "exported config.json");
      fuzz::fuzz_check(config_to_json(back.config) == config_to_json(h.config), "config survives export + import");
    } catch (const Error& e) {
      fuzz::fuzz_abort("an imported config did not export and read back", e.what());
    }
  });
  return 0;
}
