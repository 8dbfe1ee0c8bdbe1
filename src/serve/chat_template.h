// chat_template.h: renders a model's chat template -- the Jinja2 template a Hugging Face model ships in
// tokenizer_config.json (`chat_template`) or GGUF metadata (`tokenizer.chat_template`) -- into the
// prompt text, byte for byte as transformers' apply_chat_template(..., tokenize=False) does.
//
// A focused Jinja2 subset (docs/CHAT.md lists it): text, {{ }}, {% if/elif/else %}, {% for %} (loop.*,
// `if` filter, else, break/continue), {% set %} (names, tuples, namespace attributes, blocks), macros,
// {% with %}, comments, whitespace control, Python-like values and operators, the common filters,
// tests and string/dict methods, and the globals HF defines (raise_exception, strftime_now) plus
// range/namespace/dict. Rendering follows HF's environment: trim_blocks, lstrip_blocks, a single
// trailing newline of the template dropped, Jinja's scoping (a set inside a loop body stays there).
//
// The template is untrusted (docs/ROBUSTNESS.md): its size, nesting depth, loop iterations, evaluation
// steps, output and every string or list it builds are bounded (ChatTemplateLimits), so a hostile
// template is a one-line lmf::Error, never a hang, a deep recursion or an allocation beyond the limits.
// Anything outside the subset is refused with a line number ("chat template: line 3: filter 'wordwrap'
// is not supported"), never rendered differently from Jinja.
//
// Thread safety: a parsed ChatTemplate is immutable; render() may run on many threads at once.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/check.h"

namespace lmf {

struct ChatMessage {
  std::string role, content;
};

// Thrown when the template calls raise_exception(msg) (e.g. "Conversation roles must alternate
// user/assistant/user/assistant/..."): a problem with the conversation, not with the template.
// what() is "chat template: " + msg; message is msg as the template gave it.
struct ChatTemplateRaised : Error {
  explicit ChatTemplateRaised(const std::string& msg) : Error("chat template: " + msg), message(msg) {}
  std::string message;
};

struct ChatTemplateLimits {
  size_t max_template_bytes = 256 << 10;   // the template's source
  int max_depth = 64;                       // nesting of blocks, of expressions, and of values (lists in lists)
  int max_render_depth = 500;               // evaluation recursion at render time (macros calling macros)
  int64_t max_loop_iterations = 1'000'000;  // per render, every loop together
  int64_t max_steps = 20'000'000;           // per render: expressions evaluated + statements run
  size_t max_output_bytes = 64u << 20;      // the rendered text, and any one string a template builds
  size_t max_work_bytes = 1u << 30;         // per render: bytes of every string and list built
};

class ChatTemplate {
 public:
  // Parses `source`; throws lmf::Error naming the line and problem when it is malformed or uses what
  // the subset does not support.
  explicit ChatTemplate(const std::string& source, const ChatTemplateLimits& limits = {});
  ~ChatTemplate();
  ChatTemplate(ChatTemplate&&) noexcept;
  ChatTemplate& operator=(ChatTemplate&&) noexcept;

  // The variables are those HF passes: messages (a list of {'role', 'content'} dicts),
  // add_generation_prompt, bos_token, eos_token, tools = none, documents = none, and `extra` (string
  // variables such as date_string; a name among the others is refused). Throws ChatTemplateRaised for
  // raise_exception, lmf::Error for anything else.
  std::string render(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                     const std::string& bos_token, const std::string& eos_token,
                     const std::map<std::string, std::string>& extra = {}) const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// Parses and renders once (ChatTemplate(tmpl).render(...)).
std::string render_chat_template(const std::string& tmpl, const std::vector<ChatMessage>& messages,
                                 bool add_generation_prompt, const std::string& bos_token,
                                 const std::string& eos_token, const std::map<std::string, std::string>& extra = {});

}  // namespace lmf
