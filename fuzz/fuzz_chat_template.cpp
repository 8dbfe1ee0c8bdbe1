// Fuzz target: a chat template (serve/chat_template.h). The whole input is the template's source; it is
// parsed, then rendered for a four-turn conversation and for none. A refusal must be lmf::Error
// (ChatTemplateRaised included) with a one-line message; tighter limits than the defaults keep every
// input fast (a timeout is a finding: some work is not counted by the bounds). An accepted template's
// text stays under max_output_bytes and renders the same twice.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "fuzz_util.h"
#include "serve/chat_template.h"

using namespace lmf;

namespace {
ChatTemplateLimits fuzz_limits() {
  ChatTemplateLimits l;
  l.max_loop_iterations = 20000;
  l.max_steps = 300000;
  l.max_output_bytes = 1 << 20;
  l.max_work_bytes = 32 << 20;
  return l;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const ChatTemplateLimits lim = fuzz_limits();
  static const std::vector<ChatMessage> conv = {{"system", "Be brief."},
                                                {"user", "Hi {{ x }} \xc3\xa9"},
                                                {"assistant", "<think>\nhm\n</think>\n\nHello!"},
                                                {"user", "  Bye\n"}};
  const std::string src(reinterpret_cast<const char*>(data), size);
  std::optional<ChatTemplate> t;
  fuzz::fuzz_run([&] { t.emplace(src, lim); });
  if (!t) return 0;
  const bool clocked = src.find("strftime") != std::string::npos;  // the time may change between renders
  fuzz::fuzz_run([&] {
    const std::string out = t->render(conv, true, "<s>", "</s>", {{"date_string", "26 Jul 2024"}});
    fuzz::fuzz_check(out.size() <= lim.max_output_bytes, "the text is within max_output_bytes");
    if (!clocked) fuzz::fuzz_check(t->render(conv, true, "<s>", "</s>", {{"date_string", "26 Jul 2024"}}) == out, "rendering is deterministic");
  });
  fuzz::fuzz_run([&] { t->render({}, false, "", ""); });
  return 0;
}
