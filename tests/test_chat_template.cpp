// Chat templates (serve/chat_template.h) against transformers' renderer: tools/make_chat_fixtures.py
// rendered 12 real templates x 10 conversations x add_generation_prompt, and 231 feature snippets, with
// jinja2 configured as transformers configures it. Every rendering must be byte-identical; where jinja2
// raised, the renderer must throw too (raise_exception: ChatTemplateRaised with the same message).
// Then what the fixtures cannot show: hostile templates (deep nesting, huge loops, exponential output)
// end in a one-line lmf::Error quickly, and what the subset leaves out is refused by name.
#include <gtest/gtest.h>

#include <chrono>
#include <ctime>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "core/check.h"
#include "core/fsutil.h"
#include "serve/chat_template.h"
#include "support/test_util.h"

namespace lmf {
namespace {

using nlohmann::json;

json load_fixture(const std::string& name) { return json::parse(read_file(test::fixture_path("chat/" + name))); }

std::vector<ChatMessage> messages_of(const json& conv) {
  std::vector<ChatMessage> out;
  for (const auto& m : conv) out.push_back({m.at("role").get<std::string>(), m.at("content").get<std::string>()});
  return out;
}

std::map<std::string, std::string> extra_of(const json& j) {
  std::map<std::string, std::string> out;
  for (auto it = j.begin(); it != j.end(); ++it) out[it.key()] = it.value().get<std::string>();
  return out;
}

// Where two renderings first differ, with some context, escaped.
std::string first_difference(const std::string& got, const std::string& want) {
  size_t k = 0;
  while (k < got.size() && k < want.size() && got[k] == want[k]) ++k;
  auto around = [&](const std::string& s) { return json(s.substr(k > 20 ? k - 20 : 0, 60)).dump(); };
  return "at byte " + std::to_string(k) + ": got " + around(got) + ", jinja2 " + around(want);
}

// Renders and checks one fixture case: "expected" text, "raises" (raise_exception's message) or "error".
::testing::AssertionResult check_case(const std::string& what, const std::string& tmpl, const std::vector<ChatMessage>& msgs,
                                      bool agp, const std::string& bos, const std::string& eos,
                                      const std::map<std::string, std::string>& extra, const json& c) {
  try {
    const std::string got = ChatTemplate(tmpl).render(msgs, agp, bos, eos, extra);
    if (c.contains("expected")) {
      const std::string want = c["expected"].get<std::string>();
      if (got == want) return ::testing::AssertionSuccess();
      return ::testing::AssertionFailure() << what << ": differs " << first_difference(got, want);
    }
    return ::testing::AssertionFailure() << what << ": rendered " << json(got).dump() << " but jinja2 raised "
                                         << (c.contains("raises") ? c["raises"] : c["error"]).dump();
  } catch (const ChatTemplateRaised& e) {
    if (c.contains("raises") && e.message == c["raises"].get<std::string>() &&
        std::string(e.what()) == "chat template: " + e.message)
      return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << what << ": raise_exception(" << json(e.message).dump() << "), jinja2 gave "
                                         << c.dump();
  } catch (const Error& e) {
    if (std::string(e.what()).find('\n') != std::string::npos)
      return ::testing::AssertionFailure() << what << ": a multi-line error";
    if (c.contains("error")) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << what << ": threw '" << e.what() << "', jinja2 gave " << c.dump();
  }
}

TEST(ChatTemplate, RealTemplatesMatchTransformers) {
  const json doc = load_fixture("templates.json");
  int matched = 0, total = 0;
  for (const auto& c : doc.at("cases")) {
    const std::string tname = c.at("template").get<std::string>(), cname = c.at("conversation").get<std::string>();
    const json& tok = doc.at("special_tokens").at(tname);
    const bool agp = c.at("add_generation_prompt").get<bool>();
    const std::string what = tname + " x " + cname + (agp ? " + generation prompt" : "");
    const auto r = check_case(what, doc.at("templates").at(tname).get<std::string>(),
                              messages_of(doc.at("conversations").at(cname)), agp, tok.at("bos_token").get<std::string>(),
                              tok.at("eos_token").get<std::string>(), extra_of(tok.at("extra")), c);
    EXPECT_TRUE(r);
    matched += static_cast<bool>(r);
    ++total;
  }
  EXPECT_EQ(total, 240);
  std::printf("chat templates: %d of %d fixture cases match transformers\n", matched, total);
}

TEST(ChatTemplate, SnippetsMatchJinja) {
  const json doc = load_fixture("snippets.json");
  const json& ctx = doc.at("context");
  const json convs = load_fixture("templates.json").at("conversations");
  const auto msgs = messages_of(convs.at(ctx.at("conversation").get<std::string>()));
  int matched = 0, total = 0;
  for (const auto& s : doc.at("snippets")) {
    const std::string tmpl = s.at("template").get<std::string>();
    const auto r = check_case(json(tmpl).dump(), tmpl, msgs, ctx.at("add_generation_prompt").get<bool>(),
                              ctx.at("bos_token").get<std::string>(), ctx.at("eos_token").get<std::string>(),
                              extra_of(ctx.at("extra")), s);
    EXPECT_TRUE(r);
    matched += static_cast<bool>(r);
    ++total;
  }
  EXPECT_GE(total, 200);
  std::printf("chat templates: %d of %d snippets match jinja2\n", matched, total);
}

std::string render1(const std::string& tmpl, const ChatTemplateLimits& lim = {}) {
  return ChatTemplate(tmpl, lim).render({{"user", "hi"}, {"assistant", "hello"}}, true, "<s>", "</s>");
}

// The error a template gives (parsing or rendering), "" if none; it must be one line and fast.
std::string error_of(const std::string& tmpl, const ChatTemplateLimits& lim = {}) {
  const auto t0 = std::chrono::steady_clock::now();
  std::string msg;
  try {
    render1(tmpl, lim);
  } catch (const Error& e) {
    msg = e.what();
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_LT(s, 5.0) << "took " << s << " s: " << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  return msg;
}

std::string repeat(const std::string& s, int n) {
  std::string out;
  for (int k = 0; k < n; ++k) out += s;
  return out;
}

TEST(ChatTemplate, ErrorsNameTheLineAndTheProblem) {
  EXPECT_EQ(error_of("{% for m in messages %}\n{{ m.role }}\n{{ m.content | wordwrap }}\n{% endfor %}"),
            "chat template: line 3: filter 'wordwrap' is not supported");
  EXPECT_EQ(error_of("a\n{% if true %}\nb"), "chat template: line 2: '{% if %}' is not closed (expected '{% endif %}')");
  EXPECT_EQ(error_of("{{ x is foo }}"), "chat template: line 1: test 'foo' is not supported");
  EXPECT_EQ(error_of("\n\n{% include 'other.jinja' %}"), "chat template: line 3: tag 'include' is not supported");
  EXPECT_EQ(error_of("{% do x.append(1) %}"), "chat template: line 1: tag 'do' is not supported");
  EXPECT_EQ(error_of("{% frobnicate %}"), "chat template: line 1: unknown tag 'frobnicate'");
  EXPECT_EQ(error_of("{{ 'a' ~ }}"), "chat template: line 1: expected an expression, got '}}'");
  EXPECT_EQ(error_of("{{ 'open"), "chat template: line 1: string literal is not closed");
  EXPECT_EQ(error_of("x {{ y"), "chat template: line 1: '{{' is not closed by '}}'");
  EXPECT_EQ(error_of("{# no end"), "chat template: line 1: comment '{#' is not closed by '#}'");
  EXPECT_EQ(error_of("{{ '%s' % 1 }}"), "chat template: line 1: string formatting with '%' is not supported");
  EXPECT_EQ(error_of("{{ 2 ** 100 }}"), "chat template: line 1: integer overflow (Python's big integers are not supported)");
  EXPECT_EQ(error_of("{% for x in y recursive %}{% endfor %}"), "chat template: line 1: recursive for loops are not supported");
  EXPECT_EQ(error_of("{{ 'a'.format(1) }}"), "chat template: line 1: method str.format() is not supported");
  EXPECT_EQ(error_of("{{ messages.append(1) }}"),
            "chat template: line 1: method list.append() is not supported (lists and dicts cannot be changed in a chat template)");
  EXPECT_EQ(error_of("{{ 'x' | safe }}"), "chat template: line 1: filter 'safe' is not supported");
  EXPECT_EQ(error_of("{{ 'x'.upper }}"), "chat template: line 1: cannot render a method as text");
  EXPECT_EQ(error_of("{{ cycler('a') }}"), "chat template: line 1: cycler() is not supported");
  EXPECT_EQ(error_of("{{ 5 | items | list }}"), "chat template: line 1: filter 'items' needs a dict (got int)");
  EXPECT_EQ(error_of("{{ messages | select }}"), "chat template: line 1: cannot render a generator as text (add '| list')");
  EXPECT_EQ(error_of("{{ (-8) ** 0.5 }}"), "chat template: line 1: a negative number to a fractional power is complex");
  EXPECT_EQ(error_of("\n{{ missing.attr }}"), "chat template: line 2: 'missing' is undefined");
  EXPECT_EQ(error_of("{{ 1 / 0 }}"), "chat template: line 1: division by zero");
  EXPECT_EQ(error_of("{{ '\\N{DASH}' }}"), "chat template: line 1: string literal: \\N{...} escapes are not supported");
  // control characters from the template stay escaped in the one-line message
  EXPECT_EQ(error_of("{{ x | \n\nbad\x01 }}").find("chat template: line 3:"), 0u);
}

TEST(ChatTemplate, RaiseExceptionCarriesTheMessage) {
  try {
    render_chat_template("{% if messages[0].role != 'system' %}{{ raise_exception('roles must alternate: ' + messages[0].role) }}{% endif %}",
                         {{"user", "x"}}, false, "", "");
    FAIL() << "no exception";
  } catch (const ChatTemplateRaised& e) {
    EXPECT_EQ(e.message, "roles must alternate: user");
    EXPECT_STREQ(e.what(), "chat template: roles must alternate: user");
  }
  // a message with a newline is kept whole in `message`, escaped in what()
  try {
    render_chat_template("{{ raise_exception('a\\nb') }}", {}, false, "", "");
    FAIL() << "no exception";
  } catch (const ChatTemplateRaised& e) {
    EXPECT_EQ(e.message, "a\nb");
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos);
  }
}

TEST(ChatTemplate, DeepNestingIsRefused) {
  const int n = 10000;
  const std::vector<std::string> hostile = {
      repeat("{% if true %}", n) + "x" + repeat("{% endif %}", n),
      repeat("{% for x in [1] %}", n) + repeat("{% endfor %}", n),
      "{{ " + repeat("(", n) + "1" + repeat(")", n) + " }}",
      "{{ " + repeat("[", n) + repeat("]", n) + " }}",
      "{{ " + repeat("{'a': ", n) + "1" + repeat("}", n) + " }}",
      "{{ " + repeat("not ", n) + "x }}",
      "{{ " + repeat("-", n) + "1 }}",
      "{{ x" + repeat(" | trim", n) + " }}",
      "{{ x" + repeat(".a", n) + " }}",
      "{{ x" + repeat("[0]", n) + " }}",
      "{{ 1" + repeat(" + 1", n) + " }}",
      "{{ x" + repeat(" or x", n) + " }}",
      "{{ " + repeat("1 if x else ", n) + "2 }}",
      "{{ f" + repeat("()", n) + " }}",
      repeat("{% macro m() %}", n) + repeat("{% endmacro %}", n),
      repeat("{% set x %}", n) + repeat("{% endset %}", n),
  };
  ChatTemplateLimits big;  // let the text through: it is the nesting that must be refused
  big.max_template_bytes = 1 << 20;
  for (const std::string& t : hostile) {
    const std::string msg = error_of(t, big);
    EXPECT_NE(msg.find("deeper than"), std::string::npos) << t.substr(0, 40) << ": " << msg;
  }
  // evaluation depth: unbounded macro recursion, and a value nested in itself through a namespace
  EXPECT_NE(error_of("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}").find("max_render_depth"), std::string::npos);
  EXPECT_NE(error_of("{% set ns = namespace(l=[]) %}{% for i in range(1000) %}{% set ns.l = [ns.l] %}{% endfor %}{{ ns.l }}")
                .find("values nested deeper than"),
            std::string::npos);
  EXPECT_NE(error_of("{% set ns = namespace() %}{% set ns.self = [ns] %}").find("cannot hold a namespace"), std::string::npos);
}

TEST(ChatTemplate, HugeWorkIsRefused) {
  // loops
  EXPECT_NE(error_of("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
                .find("max_loop_iterations"),
            std::string::npos);
  EXPECT_NE(error_of("{% for i in range(1000000000) %}{% endfor %}").find("range() of more than 100000 items"),
            std::string::npos);
  // strings and lists that double
  EXPECT_NE(error_of("{% set ns = namespace(s='x') %}{% for i in range(100) %}{% set ns.s = ns.s + ns.s %}{% endfor %}")
                .find("max_output_bytes"),
            std::string::npos);
  EXPECT_NE(error_of("{{ 'x' * 1000000000000 }}").find("max_output_bytes"), std::string::npos);
  EXPECT_NE(error_of("{{ [1] * 1000000000000 }}").find("max_output_bytes"), std::string::npos);
  EXPECT_NE(error_of("{{ 'ab' | replace('', 'xxxxxxxxxxxxxxxxxxxxxxxx') | replace('', 'xxxxxxxxxxxxxxxxxxxxxx') | replace('', 'xxxxxxxxxxxxxxxxxxxxxx') | replace('', 'xxxxxxxxxxxxxxxxxxxxxx') | replace('', 'xxxxxxxxxxxxxxxxxxxxxx') | replace('', 'xxxx') }}")
                .find("max_output_bytes"),
            std::string::npos);
  // a list shared 10 times per level, 30 levels: 10^30 elements when printed
  std::string t = "{% set l0 = [1, 2] %}";
  for (int k = 1; k <= 30; ++k)
    t += "{% set l" + std::to_string(k) + " = " + "[" + repeat("l" + std::to_string(k - 1) + ", ", 10) + "] %}";
  const std::string msg = error_of(t + "{{ l30 }}");
  EXPECT_TRUE(msg.find("max_output_bytes") != std::string::npos || msg.find("max_steps") != std::string::npos) << msg;
  std::string u = "{% set a0 = [1, 2] %}{% set b0 = [1, 2] %}";  // equal, never identical: 10^30 comparisons
  for (int k = 1; k <= 30; ++k)
    for (const char* v : {"a", "b"})
      u += std::string("{% set ") + v + std::to_string(k) + " = " + "[" + repeat(v + std::to_string(k - 1) + ", ", 10) + "] %}";
  EXPECT_NE(error_of(u + "{{ a30 == b30 }}").find("max_steps"), std::string::npos);
  EXPECT_NE(error_of(u + "{{ a30 in [b30] }}").find("max_steps"), std::string::npos);
  EXPECT_NE(error_of(t + "{{ l30 | tojson }}").find("max_"), std::string::npos);
  // many quadratic copies: each step copies 1 MiB
  EXPECT_NE(error_of("{% set ns = namespace(s='x' * 1048576) %}{% for i in range(10000) %}{% set ns.t = ns.s + 'y' %}{% endfor %}")
                .find("max_work_bytes"),
            std::string::npos);
  // template size
  ChatTemplateLimits small;
  small.max_template_bytes = 100;
  EXPECT_NE(error_of(std::string(101, 'x'), small).find("max_template_bytes"), std::string::npos);
  // every bound is configurable
  ChatTemplateLimits tight;
  tight.max_output_bytes = 10;
  EXPECT_NE(error_of("{{ 'x' * 11 }}", tight).find("max_output_bytes"), std::string::npos);
  EXPECT_EQ(render1("{{ 'x' * 10 }}", tight), "xxxxxxxxxx");
  tight = {};
  tight.max_loop_iterations = 5;
  EXPECT_EQ(render1("{% for i in range(5) %}{{ i }}{% endfor %}", tight), "01234");
  EXPECT_NE(error_of("{% for i in range(6) %}{% endfor %}", tight).find("max_loop_iterations"), std::string::npos);
  tight = {};
  tight.max_steps = 1000;
  EXPECT_NE(error_of("{% for i in range(1000) %}{{ i }}{% endfor %}", tight).find("max_steps"), std::string::npos);
}

TEST(ChatTemplate, ExtraVariablesAndGlobals) {
  const std::string t = "{{ date_string }}|{{ bos_token }}|{{ tools is none }}|{{ add_generation_prompt }}";
  EXPECT_EQ(render_chat_template(t, {}, false, "<s>", "</s>", {{"date_string", "26 Jul 2024"}}),
            "26 Jul 2024|<s>|True|False");
  EXPECT_THROW(render_chat_template(t, {}, false, "", "", {{"messages", "x"}}), Error);
  // strftime_now is the real local time, as in transformers
  char year[8];
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  localtime_r(&now, &tm);
  std::strftime(year, sizeof year, "%Y", &tm);
  EXPECT_EQ(render_chat_template("{{ strftime_now('%Y') }}", {}, false, "", ""), year);
}

TEST(ChatTemplate, ParsedOnceRendersOnManyThreads) {
  const json doc = load_fixture("templates.json");
  const ChatTemplate t(doc.at("templates").at("llama3_2").get<std::string>());
  const auto msgs = messages_of(doc.at("conversations").at("system_multi"));
  const std::map<std::string, std::string> extra{{"date_string", "26 Jul 2024"}};
  const std::string want = t.render(msgs, true, "<|begin_of_text|>", "<|eot_id|>", extra);
  std::vector<std::string> got(4);
  std::vector<std::thread> threads;
  for (int k = 0; k < 4; ++k)
    threads.emplace_back([&, k] {
      for (int i = 0; i < 50; ++i) got[k] = t.render(msgs, true, "<|begin_of_text|>", "<|eot_id|>", extra);
    });
  for (auto& th : threads) th.join();
  for (const auto& g : got) EXPECT_EQ(g, want);
}

TEST(ChatTemplate, LongConversationRendersQuickly) {
  // 5,000 turns of 1 KiB through Llama-3's template: linear work, well inside the bounds
  const json doc = load_fixture("templates.json");
  std::vector<ChatMessage> msgs;
  for (int k = 0; k < 5000; ++k) msgs.push_back({k % 2 ? "assistant" : "user", std::string(1024, 'a' + k % 26)});
  const auto t0 = std::chrono::steady_clock::now();
  const std::string out = ChatTemplate(doc.at("templates").at("llama3_2").get<std::string>())
                              .render(msgs, true, "<|begin_of_text|>", "<|eot_id|>", {{"date_string", "1 Jan 2025"}});
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GT(out.size(), 5000u * 1024);
  EXPECT_LT(s, 2.0);
}

}  // namespace
}  // namespace lmf
