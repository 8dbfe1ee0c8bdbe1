// Fuzz target: a checkpoint's state.json (checkpoint_state_from_json, read by --resume before any
// tensor). An accepted state has a non-negative step and a data position below 2^63, and what it
// keeps of the options is JSON that parses again.
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/json_util.h"
#include "fuzz_util.h"
#include "train/checkpoint.h"

using namespace lmf;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  fuzz::fuzz_run([&] {
    const CheckpointState st = checkpoint_state_from_json(text, "fuzz/state.json");
    fuzz::fuzz_check(st.step >= 0, "step >= 0");
    fuzz::fuzz_check(st.data_position < (uint64_t{1} << 63), "data_position < 2^63");
    if (!st.options_json.empty()) {
      try {
        fuzz::fuzz_check(json_parse(st.options_json, "options").is_object(), "options is an object");
      } catch (const Error& e) {
        fuzz::fuzz_abort("the kept options do not parse again", e.what());
      }
    }
  });
  return 0;
}
