// bpe.cpp: byte-level BPE from a tokenizer.json (bpe.h has the steps and what is refused).
#include "data/bpe.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <cctype>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <nlohmann/json.hpp>
#include <queue>
#include <thread>

#include "core/check.h"
#include "core/fsutil.h"
#include "core/json_util.h"
#include "core/utf8.h"

namespace lmf {

using nlohmann::json;

// ---- UTF-8 -------------------------------------------------------------------------------------

namespace {

// Length of the well-formed sequence starting at s[i] (Unicode table 3-7), or -k: the first k bytes
// are a maximal invalid subpart.
int utf8_sequence(std::string_view s, size_t i) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = b(i);
  if (c < 0x80) return 1;
  int len;
  unsigned char lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) len = 2;
  else if (c == 0xE0) len = 3, lo = 0xA0;
  else if (c >= 0xE1 && c <= 0xEC) len = 3;
  else if (c == 0xED) len = 3, hi = 0x9F;
  else if (c >= 0xEE && c <= 0xEF) len = 3;
  else if (c == 0xF0) len = 4, lo = 0x90;
  else if (c >= 0xF1 && c <= 0xF3) len = 4;
  else if (c == 0xF4) len = 4, hi = 0x8F;
  else return -1;
  for (int k = 1; k < len; ++k) {
    if (i + k >= s.size()) return -k;
    const unsigned char x = b(i + k);
    if (x < (k == 1 ? lo : 0x80) || x > (k == 1 ? hi : 0xBF)) return -k;
  }
  return len;
}

uint32_t decode_cp(std::string_view s, size_t i, int len) {
  const auto b = [&](size_t k) { return static_cast<uint32_t>(static_cast<unsigned char>(s[k])); };
  switch (len) {
    case 1: return b(i);
    case 2: return ((b(i) & 0x1F) << 6) | (b(i + 1) & 0x3F);
    case 3: return ((b(i) & 0x0F) << 12) | ((b(i + 1) & 0x3F) << 6) | (b(i + 2) & 0x3F);
    default: return ((b(i) & 0x07) << 18) | ((b(i + 1) & 0x3F) << 12) | ((b(i + 2) & 0x3F) << 6) | (b(i + 3) & 0x3F);
  }
}

bool is_ascii(std::string_view s) {
  for (char c : s)
    if (static_cast<unsigned char>(c) >= 0x80) return false;
  return true;
}

}  // namespace

std::string utf8_replace_invalid(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {  // fast path: nothing to replace
    const int n = utf8_sequence(s, i);
    if (n < 0) break;
    i += static_cast<size_t>(n);
  }
  if (i == s.size()) return std::string(s);
  std::string out(s.substr(0, i));
  while (i < s.size()) {
    const int n = utf8_sequence(s, i);
    if (n > 0) {
      out.append(s.substr(i, static_cast<size_t>(n)));
      i += static_cast<size_t>(n);
    } else {
      out += "\xEF\xBF\xBD";
      i += static_cast<size_t>(-n);
    }
  }
  return out;
}

// ---- byte-level characters (GPT-2's bytes_to_unicode) ------------------------------------------------

namespace {

struct ByteLevelMap {
  std::string chars[256];        // byte -> UTF-8 of its character
  std::unordered_map<uint32_t, unsigned char> byte_of;  // character -> byte
  ByteLevelMap() {
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const uint32_t cp = printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + n++);
      append_utf8(chars[b], cp);
      byte_of[cp] = static_cast<unsigned char>(b);
    }
  }
};

const ByteLevelMap& byte_level() {
  static const ByteLevelMap m;
  return m;
}

// A byte-level token's text -> its bytes (characters outside the map stand for their own UTF-8).
std::string byte_level_bytes(std::string_view token) {
  const ByteLevelMap& m = byte_level();
  std::string out;
  size_t i = 0;
  while (i < token.size()) {
    int n = utf8_sequence(token, i);
    if (n < 0) {  // not UTF-8 (JSON strings are): keep the byte
      out += token[i++];
      continue;
    }
    const uint32_t cp = decode_cp(token, i, n);
    auto it = m.byte_of.find(cp);
    if (it != m.byte_of.end()) out += static_cast<char>(it->second);
    else out.append(token.substr(i, static_cast<size_t>(n)));
    i += static_cast<size_t>(n);
  }
  return out;
}

}  // namespace

const std::string& byte_level_char(unsigned char b) { return byte_level().chars[b]; }

// ---- regular expressions (PCRE2, Unicode properties) ----------------------------------------------

namespace {

class Regex {
 public:
  Regex(const std::string& pattern, const std::string& where) {
    int err = 0;
    PCRE2_SIZE off = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP, &err,
                          &off, nullptr);
    if (!code_) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      fail(where, ": the pattern '", excerpt(pattern), "' does not compile at offset ", off, ": ",
           reinterpret_cast<const char*>(msg));
    }
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // falls back to the interpreter when JIT is unavailable
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Calls fn(begin, end) for each non-overlapping match in s, left to right (valid UTF-8 only).
  template <class F>
  void for_each_match(std::string_view s, F&& fn) const {
    thread_local struct MatchData {
      pcre2_match_data* md = pcre2_match_data_create(4, nullptr);
      ~MatchData() { pcre2_match_data_free(md); }
    } data;
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    size_t start = 0;
    while (start <= s.size()) {
      const int rc = pcre2_match(code_, subject, s.size(), start, PCRE2_NO_UTF_CHECK, data.md, nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) return;
      if (rc < 0) fail("tokenizer: regular expression match failed (PCRE2 error ", rc, ")");
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(data.md);
      const size_t b = ov[0], e = ov[1];
      if (e > b) {
        fn(b, e);
        start = e;
      } else {  // an empty match: no piece; go on after the next character
        if (b >= s.size()) return;
        const int n = utf8_sequence(s, b);
        start = b + static_cast<size_t>(n > 0 ? n : 1);
      }
    }
  }

 private:
  pcre2_code* code_ = nullptr;
};

// The pattern ByteLevel(use_regex = true) splits with (GPT-2's).
constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// Split patterns of the tokenizers lmforge knows (Llama-3; Qwen2; SmolLM2/GPT-2 is ByteLevel's own):
// encode_parallel() cuts texts only for these (see there).
const std::string kKnownPatterns[] = {
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)",
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)",
    kGpt2Pattern,
};

enum class SplitBehavior { removed, isolated, merged_with_previous, merged_with_next, contiguous };

SplitBehavior split_behavior(const json& v, const std::string& where) {
  const std::string b = v.is_string() ? v.get<std::string>() : std::string("?");
  if (b == "Removed") return SplitBehavior::removed;
  if (b == "Isolated") return SplitBehavior::isolated;
  if (b == "MergedWithPrevious") return SplitBehavior::merged_with_previous;
  if (b == "MergedWithNext") return SplitBehavior::merged_with_next;
  if (b == "Contiguous") return SplitBehavior::contiguous;
  fail(where, ": pre_tokenizer Split: unknown behavior ", json_excerpt(v));
}

// Cuts s into pieces by the matches [b, e) that find(s, fn) reports, the way `tokenizers`'
// SplitDelimiterBehavior does; calls out(piece) for each non-empty piece.
template <class Find, class Out>
void split_by(std::string_view s, SplitBehavior behavior, Find&& find, Out&& out) {
  size_t prev = 0;        // end of the last match
  size_t pending = 0;     // start of text not yet emitted (merged_with_next / contiguous)
  bool have_pending = false;
  size_t last_match_end = std::string_view::npos;  // contiguous: the previous match ended here
  auto emit = [&](size_t b, size_t e) {
    if (e > b) out(s.substr(b, e - b));
  };
  find(s, [&](size_t b, size_t e) {
    switch (behavior) {
      case SplitBehavior::removed:
        emit(prev, b);
        break;
      case SplitBehavior::isolated:
        emit(prev, b);
        emit(b, e);
        break;
      case SplitBehavior::merged_with_previous:
        emit(prev, e);
        break;
      case SplitBehavior::merged_with_next:
        emit(have_pending ? pending : prev, b);
        pending = b;
        have_pending = true;
        break;
      case SplitBehavior::contiguous:
        if (have_pending && last_match_end == b) {  // extends the running group of matches
        } else {
          if (have_pending) emit(pending, last_match_end);
          emit(prev, b);
          pending = b;
          have_pending = true;
        }
        last_match_end = e;
        break;
    }
    prev = e;
  });
  if (behavior == SplitBehavior::merged_with_next && have_pending) {
    emit(pending, s.size());
    return;
  }
  if (behavior == SplitBehavior::contiguous && have_pending) emit(pending, last_match_end);
  emit(prev, s.size());
}

}  // namespace

// ---- the tokenizer -----------------------------------------------------------------------------

struct BpeTokenizer::Impl {
  struct Step {
    enum Kind { regex, string, byte_level, digits } kind;
    std::unique_ptr<Regex> re;       // regex, byte_level with use_regex
    std::string literal;             // string
    SplitBehavior behavior = SplitBehavior::isolated;
    bool add_prefix_space = false;   // byte_level
  };
  struct Added {
    std::string content;
    int32_t id;
    bool lstrip, rstrip, single_word, special;
  };

  uint64_t serial = next_serial();  // identifies this tokenizer in the per-thread piece caches
  std::string where;
  bool nfc = false;
  std::vector<Step> steps;
  bool ignore_merges = false;
  // encode_parallel may cut the text: every regex is one of the known patterns, no prefix space is
  // added, and no added token holds a newline.
  bool parallel_safe = true;
  int32_t unk = -1;
  bool fuse_unk = false;
  int32_t byte_id[256];          // the byte's byte-level token, -1 when the vocabulary lacks it
  int32_t byte_fallback_id[256];  // its <0xNN> token (byte_fallback), -1 when none
  std::unordered_map<std::string, int32_t> vocab;          // bytes -> id (the model's vocabulary)
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (left, right) -> (rank, merged id)
  std::vector<Added> added;                                // longest first
  bool first_byte[256] = {};                               // some added token starts with this byte
  std::unordered_map<std::string, int32_t> added_ids;

  static uint64_t next_serial() {
    static std::atomic<uint64_t> n{0};
    return ++n;
  }
  static uint64_t pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  void encode_text(std::string_view text, std::vector<int32_t>& out) const;      // between added tokens
  void pieces_of(std::string_view text, const std::function<void(std::string_view)>& piece) const;  // steps 3-4
  void pre_tokenize(std::string_view text, const std::function<void(std::string_view)>& piece) const;
  void apply_steps(size_t k, std::string_view piece, const std::function<void(std::string_view)>& out,
                   std::deque<std::string>& owned) const;
  void bpe(std::string_view piece, std::vector<int32_t>& out) const;
  void merge_word(std::string_view piece, std::vector<int32_t>& out) const;
  void split_added(std::string_view text, const std::function<void(std::string_view)>& plain,
                   const std::function<void(int32_t)>& token) const;
};

namespace {

std::string json_str(const json& o, const char* key, const std::string& where, const char* ctx) {
  auto it = o.find(key);
  if (it == o.end() || !it->is_string()) fail(where, ": ", ctx, ": '", key, "' must be a string");
  return it->get<std::string>();
}

bool json_flag(const json& o, const char* key, bool dflt, const std::string& where, const char* ctx) {
  auto it = o.find(key);
  if (it == o.end() || it->is_null()) return dflt;
  if (!it->is_boolean()) fail(where, ": ", ctx, ": '", key, "' must be true or false, not ", json_excerpt(*it));
  return it->get<bool>();
}

void parse_normalizer(const json& n, BpeTokenizer::Impl& t) {
  if (n.is_null()) return;
  const std::string type = n.is_object() ? n.value("type", std::string()) : std::string();
  if (type == "NFC") {
    t.nfc = true;
  } else if (type == "Sequence") {
    for (const json& e : n.value("normalizers", json::array())) parse_normalizer(e, t);
  } else {
    fail(t.where, ": normalizer ", json_excerpt(n), " is not supported (none or NFC)");
  }
}

void parse_pre_tokenizer(const json& p, BpeTokenizer::Impl& t) {
  using Step = BpeTokenizer::Impl::Step;
  if (p.is_null()) return;
  const std::string type = p.is_object() ? p.value("type", std::string()) : std::string();
  const char* ctx = "pre_tokenizer";
  if (type == "Sequence") {
    auto it = p.find("pretokenizers");
    if (it == p.end() || !it->is_array()) fail(t.where, ": pre_tokenizer Sequence: 'pretokenizers' must be a list");
    for (const json& e : *it) parse_pre_tokenizer(e, t);
  } else if (type == "Split") {
    Step s{Step::regex, nullptr, "", split_behavior(p.value("behavior", json()), t.where), false};
    if (json_flag(p, "invert", false, t.where, ctx)) fail(t.where, ": pre_tokenizer Split with invert: true is not supported");
    const json pat = p.value("pattern", json());
    if (pat.is_object() && pat.contains("Regex") && pat["Regex"].is_string()) {
      const std::string re = pat["Regex"].get<std::string>();
      s.re = std::make_unique<Regex>(re, t.where + ": pre_tokenizer Split");
      if (std::find(std::begin(kKnownPatterns), std::end(kKnownPatterns), re) == std::end(kKnownPatterns))
        t.parallel_safe = false;
    } else if (pat.is_object() && pat.contains("String") && pat["String"].is_string()) {
      s.kind = Step::string;
      s.literal = pat["String"].get<std::string>();
      if (s.literal.empty()) fail(t.where, ": pre_tokenizer Split: the String pattern is empty");
    } else {
      fail(t.where, ": pre_tokenizer Split: 'pattern' must be {\"Regex\": ...} or {\"String\": ...}");
    }
    t.steps.push_back(std::move(s));
  } else if (type == "ByteLevel") {
    Step s{Step::byte_level, nullptr, "", SplitBehavior::isolated, json_flag(p, "add_prefix_space", true, t.where, ctx)};
    if (s.add_prefix_space) t.parallel_safe = false;
    if (json_flag(p, "use_regex", true, t.where, ctx)) s.re = std::make_unique<Regex>(kGpt2Pattern, t.where);
    t.steps.push_back(std::move(s));
  } else if (type == "Digits") {
    Step s{Step::digits, nullptr, "", SplitBehavior::contiguous, false};
    if (json_flag(p, "individual_digits", false, t.where, ctx)) s.behavior = SplitBehavior::isolated;
    t.steps.push_back(std::move(s));
  } else {
    fail(t.where, ": pre_tokenizer ", json_excerpt(p), " is not supported (Sequence, Split, ByteLevel, Digits)");
  }
}

// TemplateProcessing's "single" template: the special tokens before the sequence become the prefix.
void parse_post_processor(const json& p, const BpeTokenizer::Impl& t, std::vector<int32_t>& prefix) {
  if (p.is_null()) return;
  const std::string type = p.is_object() ? p.value("type", std::string()) : std::string();
  if (type == "ByteLevel") return;  // offsets only
  if (type == "Sequence") {
    for (const json& e : p.value("processors", json::array())) parse_post_processor(e, t, prefix);
    return;
  }
  if (type != "TemplateProcessing") fail(t.where, ": post_processor ", json_excerpt(p), " is not supported");
  const json single = p.value("single", json::array());
  const json specials = p.value("special_tokens", json::object());
  for (const json& piece : single) {
    if (piece.contains("Sequence")) break;
    if (!piece.contains("SpecialToken")) fail(t.where, ": post_processor: unexpected template piece ", json_excerpt(piece));
    const std::string id = json_str(piece["SpecialToken"], "id", t.where, "post_processor");
    auto sp = specials.find(id);
    if (sp == specials.end() || !sp->contains("ids") || !(*sp)["ids"].is_array())
      fail(t.where, ": post_processor: special token '", id, "' has no ids");
    for (const json& i : (*sp)["ids"]) {
      auto v = json_int64(i);
      if (!v || *v < 0 || *v > INT32_MAX) fail(t.where, ": post_processor: special token '", id, "' has a bad id");
      prefix.push_back(static_cast<int32_t>(*v));
    }
  }
}

// ByteLevel decodes; the no-ops transformers' GGUF reader adds beside it (ByteFallback and Fuse, which
// change nothing for byte-level tokens, and Replace of "\u2581" by " ", which no byte-level token holds)
// are accepted too.
void check_decoder(const json& d, const std::string& where) {
  if (d.is_null()) return;
  const std::string type = d.is_object() ? d.value("type", std::string()) : std::string();
  if (type == "ByteLevel" || type == "ByteFallback" || type == "Fuse") return;
  if (type == "Replace" && d.value("content", json()) == " " && d.value("pattern", json()) == json{{"String", "\u2581"}})
    return;
  if (type == "Sequence") {
    for (const json& e : d.value("decoders", json::array())) check_decoder(e, where);
    return;
  }
  fail(where, ": decoder ", json_excerpt(d), " is not supported (byte-level BPE decodes with ByteLevel)");
}

int32_t checked_id(const json& v, const std::string& where, const std::string& what) {
  auto id = json_int64(v);
  if (!id || *id < 0 || *id >= (int64_t{1} << 31)) fail(where, ": ", what, ": id ", json_excerpt(v), " is not in [0, 2^31)");
  return static_cast<int32_t>(*id);
}

}  // namespace

BpeTokenizer::BpeTokenizer() : impl_(std::make_unique<Impl>()) {}
BpeTokenizer::~BpeTokenizer() = default;

std::unique_ptr<BpeTokenizer> BpeTokenizer::from_file(const std::string& path) {
  return from_json(read_file(path, "tokenizer"), path);
}

std::unique_ptr<BpeTokenizer> BpeTokenizer::from_json(std::string_view text, const std::string& where) {
  std::unique_ptr<BpeTokenizer> tok(new BpeTokenizer());
  Impl& t = *tok->impl_;
  t.where = where;
  const json j = json_parse(text, where);
  if (!j.is_object()) fail(where, ": a tokenizer.json must be a JSON object");
  const json model = j.value("model", json());
  if (!model.is_object()) fail(where, ": 'model' is missing");
  const std::string type = model.value("type", std::string("BPE"));
  if (type != "BPE") fail(where, ": model.type is '", type, "': only byte-level BPE tokenizers are supported");
  if (!model.value("dropout", json()).is_null()) fail(where, ": model.dropout is set: BPE dropout is not supported");
  const bool byte_fallback = json_flag(model, "byte_fallback", false, where, "model");
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    const json v = model.value(k, json());
    if (!v.is_null() && !(v.is_string() && v.get<std::string>().empty()))
      fail(where, ": model.", k, " is set: not supported for byte-level BPE");
  }
  t.ignore_merges = json_flag(model, "ignore_merges", false, where, "model");

  parse_normalizer(j.value("normalizer", json()), t);
  parse_pre_tokenizer(j.value("pre_tokenizer", json()), t);
  if (std::none_of(t.steps.begin(), t.steps.end(), [](const Impl::Step& s) { return s.kind == Impl::Step::byte_level; }))
    fail(where, ": the pre_tokenizer has no ByteLevel step: only byte-level BPE tokenizers are supported");
  check_decoder(j.value("decoder", json()), where);

  // vocabulary
  const json vocab = model.value("vocab", json());
  if (!vocab.is_object() || vocab.empty()) fail(where, ": model.vocab must be a non-empty object");
  int64_t n = 0;
  std::vector<std::pair<int32_t, std::string>> entries;
  entries.reserve(vocab.size());
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    const int32_t id = checked_id(it.value(), where, "model.vocab['" + excerpt(it.key()) + "']");
    std::string bytes = byte_level_bytes(it.key());
    if (!t.vocab.emplace(bytes, id).second)
      fail(where, ": model.vocab: two entries stand for the same bytes ('", excerpt(it.key()), "')");
    entries.emplace_back(id, std::move(bytes));
    n = std::max<int64_t>(n, int64_t{id} + 1);
  }
  // added tokens
  const json added = j.value("added_tokens", json::array());
  if (!added.is_array()) fail(where, ": 'added_tokens' must be a list");
  for (const json& a : added) {
    if (!a.is_object()) fail(where, ": added_tokens: each entry must be an object");
    Impl::Added x{json_str(a, "content", where, "added_tokens"), checked_id(a.value("id", json()), where, "added_tokens"),
                  json_flag(a, "lstrip", false, where, "added_tokens"), json_flag(a, "rstrip", false, where, "added_tokens"),
                  json_flag(a, "single_word", false, where, "added_tokens"), json_flag(a, "special", false, where, "added_tokens")};
    if (x.content.empty()) fail(where, ": added_tokens: token ", x.id, " has empty content");
    if (utf8_replace_invalid(x.content) != x.content) fail(where, ": added_tokens: token ", x.id, " is not UTF-8");
    n = std::max<int64_t>(n, int64_t{x.id} + 1);
    t.first_byte[static_cast<unsigned char>(x.content[0])] = true;
    if (x.content.find('\n') != std::string::npos) t.parallel_safe = false;
    t.added_ids[x.content] = x.id;
    t.added.push_back(std::move(x));
  }
  std::stable_sort(t.added.begin(), t.added.end(),
                   [](const Impl::Added& a, const Impl::Added& b) { return a.content.size() > b.content.size(); });
  tok->token_bytes_.assign(static_cast<size_t>(n), std::string());
  for (auto& [id, bytes] : entries) tok->token_bytes_[static_cast<size_t>(id)] = std::move(bytes);
  for (const Impl::Added& a : t.added) tok->token_bytes_[static_cast<size_t>(a.id)] = a.content;

  for (int b = 0; b < 256; ++b) {
    auto it = t.vocab.find(std::string(1, static_cast<char>(b)));
    t.byte_id[b] = it == t.vocab.end() ? -1 : it->second;
  }
  const json unk = model.value("unk_token", json());
  if (unk.is_string()) {
    auto it = t.vocab.find(byte_level_bytes(unk.get<std::string>()));
    if (it != t.vocab.end()) t.unk = it->second;
  }
  t.fuse_unk = json_flag(model, "fuse_unk", false, where, "model");
  // A byte the vocabulary has no byte-level token for becomes, as in `tokenizers`: its <0xNN> token
  // (byte_fallback), else the unknown token, else nothing.
  for (int b = 0; b < 256; ++b) {
    t.byte_fallback_id[b] = -1;
    if (t.byte_id[b] >= 0 || !byte_fallback) continue;
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    auto it = t.vocab.find(byte_level_bytes(name));
    if (it != t.vocab.end()) t.byte_fallback_id[b] = it->second;
  }

  // merges: "a b" strings or ["a", "b"] pairs, rank = position
  const json merges = model.value("merges", json::array());
  if (!merges.is_array()) fail(where, ": model.merges must be a list");
  t.merges.reserve(merges.size());
  int32_t rank = 0;
  for (const json& m : merges) {
    std::string a, b;
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        fail(where, ": model.merges[", rank, "] '", excerpt(s), "' is not two tokens separated by one space");
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    } else {
      fail(where, ": model.merges[", rank, "] must be \"a b\" or [\"a\", \"b\"], not ", json_excerpt(m));
    }
    const std::string ab = byte_level_bytes(a), bb = byte_level_bytes(b);
    auto ia = t.vocab.find(ab), ib = t.vocab.find(bb), ic = t.vocab.find(ab + bb);
    if (ia == t.vocab.end() || ib == t.vocab.end() || ic == t.vocab.end())
      fail(where, ": model.merges[", rank, "] ('", excerpt(a), "', '", excerpt(b), "') uses a token that is not in the vocabulary");
    t.merges.emplace(Impl::pair_key(ia->second, ib->second), std::make_pair(rank, ic->second));
    ++rank;
  }
  parse_post_processor(j.value("post_processor", json()), t, tok->prefix_);
  for (int32_t id : tok->prefix_)
    if (id >= n) fail(where, ": post_processor: special token id ", id, " is outside the vocabulary");
  return tok;
}

// ---- encoding ----------------------------------------------------------------------------------

void BpeTokenizer::Impl::merge_word(std::string_view piece, std::vector<int32_t>& out) const {
  struct Sym {
    int32_t id;
    int32_t prev, next;  // indices; -1 at the ends
    bool alive;
  };
  std::vector<Sym> sym;
  sym.reserve(piece.size());
  bool last_unknown = false;
  for (unsigned char c : piece) {
    const bool unknown = byte_id[c] < 0 && byte_fallback_id[c] < 0;
    const int32_t id = byte_id[c] >= 0 ? byte_id[c] : byte_fallback_id[c] >= 0 ? byte_fallback_id[c] : unk;
    const bool fuse = unknown && fuse_unk && last_unknown;
    last_unknown = unknown;
    if (id < 0 || fuse) continue;  // no unk token: the byte is dropped, as `tokenizers` does
    const int32_t i = static_cast<int32_t>(sym.size());
    sym.push_back({id, i - 1, -1, true});
    if (i > 0) sym[static_cast<size_t>(i - 1)].next = i;
  }
  struct Cand {
    int32_t rank, pos, id;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto push = [&](int32_t i) {
    const int32_t j = sym[static_cast<size_t>(i)].next;
    if (j < 0) return;
    auto it = merges.find(pair_key(sym[static_cast<size_t>(i)].id, sym[static_cast<size_t>(j)].id));
    if (it != merges.end()) heap.push({it->second.first, i, it->second.second});
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(sym.size()); ++i) push(i);
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    Sym& a = sym[static_cast<size_t>(c.pos)];
    if (!a.alive || a.next < 0) continue;
    Sym& b = sym[static_cast<size_t>(a.next)];
    auto it = merges.find(pair_key(a.id, b.id));
    if (it == merges.end() || it->second.second != c.id || it->second.first != c.rank) continue;  // stale
    a.id = c.id;
    b.alive = false;
    a.next = b.next;
    if (b.next >= 0) sym[static_cast<size_t>(b.next)].prev = c.pos;
    if (a.prev >= 0) push(a.prev);
    push(c.pos);
  }
  for (const Sym& s : sym)
    if (s.alive) out.push_back(s.id);
}

void BpeTokenizer::Impl::bpe(std::string_view piece, std::vector<int32_t>& out) const {
  if (ignore_merges) {
    auto it = vocab.find(std::string(piece));
    if (it != vocab.end()) {
      out.push_back(it->second);
      return;
    }
  }
  // Pieces repeat (words): each thread keeps the ids of the pieces it has seen, per tokenizer.
  // Keyed by the tokenizer's serial number, not its address: a new tokenizer may reuse a freed one's.
  struct Cache {
    uint64_t owner = 0;
    std::unordered_map<std::string, std::vector<int32_t>> ids;
  };
  thread_local Cache cache;
  if (cache.owner != serial || cache.ids.size() > 500000) {
    cache.ids.clear();
    cache.owner = serial;
  }
  if (piece.size() <= 64) {
    auto it = cache.ids.find(std::string(piece));
    if (it != cache.ids.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t at = out.size();
  merge_word(piece, out);
  if (piece.size() <= 64) cache.ids.emplace(std::string(piece), std::vector<int32_t>(out.begin() + static_cast<long>(at), out.end()));
}

void BpeTokenizer::Impl::apply_steps(size_t k, std::string_view piece, const std::function<void(std::string_view)>& out,
                                     std::deque<std::string>& owned) const {
  if (k == steps.size()) {
    out(piece);
    return;
  }
  const Step& s = steps[k];
  auto next = [&](std::string_view p) { apply_steps(k + 1, p, out, owned); };
  switch (s.kind) {
    case Step::regex:
      split_by(piece, s.behavior, [&](std::string_view x, auto&& fn) { s.re->for_each_match(x, fn); }, next);
      break;
    case Step::string:
      split_by(piece, s.behavior, [&](std::string_view x, auto&& fn) {
        for (size_t p = x.find(s.literal); p != std::string_view::npos; p = x.find(s.literal, p + s.literal.size()))
          fn(p, p + s.literal.size());
      }, next);
      break;
    case Step::digits:
      split_by(piece, s.behavior, [](std::string_view x, auto&& fn) {
        for (size_t p = 0; p < x.size(); ++p)
          if (x[p] >= '0' && x[p] <= '9') fn(p, p + 1);
      }, next);
      break;
    case Step::byte_level: {
      std::string_view p = piece;
      if (s.add_prefix_space && !p.empty() && p[0] != ' ') {
        owned.push_back(" " + std::string(p));
        p = owned.back();
      }
      if (s.re) s.re->for_each_match(p, [&](size_t b, size_t e) { next(p.substr(b, e - b)); });
      else next(p);
      break;
    }
  }
}

void BpeTokenizer::Impl::pieces_of(std::string_view text, const std::function<void(std::string_view)>& piece) const {
  if (text.empty()) return;
  std::string normalized;
  if (nfc && !is_ascii(text)) {
    utf8proc_uint8_t* dst = nullptr;
    const utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(text.data()),
                                            static_cast<utf8proc_ssize_t>(text.size()), &dst,
                                            static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
    if (n < 0) fail(where, ": NFC normalization failed: ", utf8proc_errmsg(n));
    normalized.assign(reinterpret_cast<const char*>(dst), static_cast<size_t>(n));
    std::free(dst);
    text = normalized;
  }
  std::deque<std::string> owned;
  apply_steps(0, text, piece, owned);
}

void BpeTokenizer::Impl::encode_text(std::string_view text, std::vector<int32_t>& out) const {
  pieces_of(text, [&](std::string_view piece) { bpe(piece, out); });
}

void BpeTokenizer::Impl::split_added(std::string_view text, const std::function<void(std::string_view)>& plain,
                                     const std::function<void(int32_t)>& token) const {
  auto is_space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; };
  auto is_word = [](char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
           static_cast<unsigned char>(c) >= 0x80;
  };
  size_t start = 0;  // start of the plain text not yet emitted
  size_t i = 0;
  while (i < text.size()) {
    if (!first_byte[static_cast<unsigned char>(text[i])]) {
      ++i;
      continue;
    }
    const Added* hit = nullptr;
    for (const Added& a : added) {  // longest first
      if (text.compare(i, a.content.size(), a.content) != 0) continue;
      if (a.single_word && ((i > 0 && is_word(text[i - 1])) ||
                            (i + a.content.size() < text.size() && is_word(text[i + a.content.size()]))))
        continue;
      hit = &a;
      break;
    }
    if (!hit) {
      ++i;
      continue;
    }
    size_t b = i, e = i + hit->content.size();
    if (hit->lstrip)
      while (b > start && is_space(text[b - 1])) --b;
    if (hit->rstrip)
      while (e < text.size() && is_space(text[e])) ++e;
    plain(text.substr(start, b - start));
    token(hit->id);
    start = i = e;
  }
  plain(text.substr(start));
}

std::vector<int32_t> BpeTokenizer::encode(std::string_view raw) const {
  const std::string text = utf8_replace_invalid(raw);
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  const Impl& t = *impl_;
  if (t.added.empty()) {
    t.encode_text(text, out);
  } else {
    t.split_added(text, [&](std::string_view s) { t.encode_text(s, out); }, [&](int32_t id) { out.push_back(id); });
  }
  return out;
}

std::vector<int32_t> BpeTokenizer::encode_parallel(std::string_view text, int threads) const {
  threads = impl_->parallel_safe ? std::max(1, threads) : 1;
  const size_t target = std::max<size_t>(1 << 16, text.size() / (static_cast<size_t>(threads) * 8) + 1);
  // Cut points: after a lone '\n' between two non-space bytes ("x\ny"). Each of the known patterns
  // makes that '\n' end a piece, or be one, the same whether the text ends there or goes on (a longer
  // whitespace run would not: "\n\n" before a letter is two pieces, at the end of a text one).
  auto space = [](char c) { return c == ' ' || c == '\n' || c == '\r' || c == '\t' || c == '\f' || c == '\v'; };
  std::vector<size_t> cuts{0};
  for (size_t pos = target; pos < text.size();) {
    size_t nl = text.find('\n', pos);
    while (nl != std::string_view::npos && (nl == 0 || nl + 1 >= text.size() || space(text[nl - 1]) || space(text[nl + 1])))
      nl = text.find('\n', nl + 1);
    if (nl == std::string_view::npos) break;
    cuts.push_back(nl + 1);
    pos = nl + 1 + target;
  }
  cuts.push_back(text.size());
  const size_t n = cuts.size() - 1;
  std::vector<std::vector<int32_t>> parts(n);
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t k = next++; k < n; k = next++) parts[k] = encode(text.substr(cuts[k], cuts[k + 1] - cuts[k]));
  };
  std::vector<std::thread> pool;
  for (int i = 1; i < threads && static_cast<size_t>(i) < n; ++i) pool.emplace_back(work);
  work();
  for (std::thread& th : pool) th.join();
  std::vector<int32_t> out;
  size_t total = 0;
  for (const auto& p : parts) total += p.size();
  out.reserve(total);
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

// ---- decoding ----------------------------------------------------------------------------------

std::string BpeTokenizer::decode(int32_t token) const {
  if (token < 0 || token >= vocab_size())
    fail("tokenizer ", impl_->where, ": token ", token, " is outside the vocabulary (", vocab_size(), " tokens)");
  return token_bytes_[static_cast<size_t>(token)];
}

int32_t BpeTokenizer::token_id(std::string_view content) const {
  auto a = impl_->added_ids.find(std::string(content));
  if (a != impl_->added_ids.end()) return a->second;
  auto v = impl_->vocab.find(std::string(content));
  return v == impl_->vocab.end() ? -1 : v->second;
}

void BpeTokenizer::pre_tokenize(std::string_view raw, const std::function<void(std::string_view)>& piece) const {
  const Impl& t = *impl_;
  t.split_added(utf8_replace_invalid(raw), [&](std::string_view s) { t.pieces_of(s, piece); }, [](int32_t) {});
}

std::vector<int32_t> BpeTokenizer::end_tokens() const {
  std::vector<int32_t> out;
  for (const Impl::Added& a : impl_->added) {
    std::string lower = a.content;
    for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (a.special && (lower.find("end") != std::string::npos || lower.find("eot") != std::string::npos || lower == "</s>"))
      out.push_back(a.id);
  }
  std::sort(out.begin(), out.end());
  return out;
}

bool BpeTokenizer::is_special(int32_t token) const {
  for (const Impl::Added& a : impl_->added)
    if (a.id == token) return a.special;
  return false;
}

}  // namespace lmf
