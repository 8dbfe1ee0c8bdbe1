// Fuzz target: model config JSON (config_from_json: a --config file, a checkpoint's config.json).
// An accepted config must round-trip through config_to_json, and its parameter count and the bytes of
// a one-token plan must be computable (no overflow is possible within ConfigLimits).
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz_util.h"
#include "model/config.h"
#include "model/gpt.h"

using namespace lmf;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  fuzz::fuzz_run([&] {
    const ModelConfig c = config_from_json(text, "fuzz.json");
    const std::string once = config_to_json(c);
    fuzz::fuzz_check(config_to_json(config_from_json(once, "round trip")) == once, "config round trip");
    fuzz::fuzz_check(gpt_param_count(c) > 0, "parameter count");
    fuzz::fuzz_check(gpt_active_param_count(c) <= gpt_param_count(c), "active parameters <= parameters");
    ModelPlan p;
    p.B = 1;
    p.T = 1;
    for (bool training : {true, false}) {
      p.training = training;
      try {
        fuzz::fuzz_check(gpt_plan_bytes(c, p) > 0, "plan bytes");
      } catch (const Error& e) {
        fuzz::fuzz_abort("a valid config's one-token plan could not be sized", e.what());
      }
    }
  });
  return 0;
}
