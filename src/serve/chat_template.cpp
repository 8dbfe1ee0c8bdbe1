// chat_template.cpp: a Jinja2 subset for Hugging Face chat templates (chat_template.h, docs/CHAT.md).
//
// Three stages, each bounded by ChatTemplateLimits:
//   lex     source -> tokens, Jinja's lexer rules with HF's settings (trim_blocks, lstrip_blocks, no
//           trailing newline, \r\n and \r read as \n), whitespace control (-, +), comments, raw blocks
//   parse   tokens -> a tree of statements and expressions, recursive descent in the same precedence
//           as jinja2/parser.py; unknown tags, filters and tests are refused here, with their line
//   render  a tree walk over Python-like values (Value): Jinja's scoping (each loop iteration and each
//           macro call has its own frame; `set` writes the innermost one; namespace objects are shared)
//
// Values mirror the Python objects a template sees: none, bool, int (64-bit: beyond it is an error, not
// a big integer), float (printed as Python's repr), str (UTF-8; length, index and slice count code
// points), list/tuple, dict (insertion-ordered), namespace, loop, functions, bound methods and macros.
// Lists and dicts cannot be modified (HF renders in jinja2's ImmutableSandboxedEnvironment), so they
// are shared, never copied; a namespace may not hold a namespace, so no value can reach itself and
// every value's nesting depth is bounded.
#include "serve/chat_template.h"

#include "core/utf8.h"

#include <utf8proc.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <ctime>
#include <optional>
#include <string_view>
#include <utility>
#include <variant>

namespace lmf {

namespace {

template <class... A>
[[noreturn]] void fail_line(int line, const A&... a) {
  fail("chat template: line ", line, ": ", a...);
}

// ---------------------------------------------------------------------------------------------------
// UTF-8 (strings are bytes; Python's str operations count code points)

// The code point at s[i] and its length; a byte that starts no valid sequence is its own unit (length
// 1) with code point 0xDC00 + byte (Python's surrogateescape), so no input is ever rejected or lost.
char32_t utf8_next(std::string_view s, size_t i, size_t* len) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  *len = 1;
  if (c < 0x80) return c;
  int n;
  char32_t cp;
  if ((c & 0xE0) == 0xC0) {
    n = 2, cp = c & 0x1F;
  } else if ((c & 0xF0) == 0xE0) {
    n = 3, cp = c & 0x0F;
  } else if ((c & 0xF8) == 0xF0) {
    n = 4, cp = c & 0x07;
  } else {
    return 0xDC00 + c;
  }
  if (i + n > s.size()) return 0xDC00 + c;
  for (int k = 1; k < n; ++k) {
    const unsigned char d = static_cast<unsigned char>(s[i + k]);
    if ((d & 0xC0) != 0x80) return 0xDC00 + c;
    cp = (cp << 6) | (d & 0x3F);
  }
  static constexpr char32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0xDC00 + c;
  *len = n;
  return cp;
}

void utf8_append(std::string& out, char32_t cp) {
  if (cp >= 0xDC80 && cp <= 0xDCFF) {  // an escaped raw byte (utf8_next)
    out += static_cast<char>(cp - 0xDC00);
  } else {
    append_utf8(out, cp);
  }
}

std::vector<char32_t> utf8_decode(std::string_view s) {
  std::vector<char32_t> cps;
  cps.reserve(s.size());
  for (size_t i = 0, n; i < s.size(); i += n) cps.push_back(utf8_next(s, i, &n));
  return cps;
}

std::string utf8_encode(const std::vector<char32_t>& cps, size_t begin = 0, size_t end = SIZE_MAX) {
  std::string out;
  end = std::min(end, cps.size());
  for (size_t k = begin; k < end; ++k) utf8_append(out, cps[k]);
  return out;
}

bool is_ascii(std::string_view s) {
  for (char c : s)
    if (static_cast<unsigned char>(c) >= 0x80) return false;
  return true;
}

// Python's str.isspace() (and the regex \s of jinja's lexer)
bool is_py_space(char32_t c) {
  if ((c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20)) return true;
  if (c < 0x85) return false;
  return c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
         c == 0x202F || c == 0x205F || c == 0x3000;
}

bool is_real_cp(char32_t c) { return c < 0xD800 || (c > 0xDFFF && c <= 0x10FFFF); }
char32_t cp_upper(char32_t c) { return is_real_cp(c) ? static_cast<char32_t>(utf8proc_toupper(static_cast<int32_t>(c))) : c; }
char32_t cp_lower(char32_t c) { return is_real_cp(c) ? static_cast<char32_t>(utf8proc_tolower(static_cast<int32_t>(c))) : c; }
char32_t cp_title(char32_t c) { return is_real_cp(c) ? static_cast<char32_t>(utf8proc_totitle(static_cast<int32_t>(c))) : c; }
bool cp_cased(char32_t c) {
  if (!is_real_cp(c)) return false;
  const auto cat = utf8proc_category(static_cast<int32_t>(c));
  return cat == UTF8PROC_CATEGORY_LU || cat == UTF8PROC_CATEGORY_LL || cat == UTF8PROC_CATEGORY_LT;
}
// Python's str.isprintable() for one code point (what repr() leaves unescaped)
bool cp_printable(char32_t c) {
  if (c < 0x80) return c >= 0x20 && c < 0x7F;
  if (!is_real_cp(c)) return false;
  switch (utf8proc_category(static_cast<int32_t>(c))) {
    case UTF8PROC_CATEGORY_CN: case UTF8PROC_CATEGORY_CC: case UTF8PROC_CATEGORY_CF: case UTF8PROC_CATEGORY_CS:
    case UTF8PROC_CATEGORY_CO: case UTF8PROC_CATEGORY_ZL: case UTF8PROC_CATEGORY_ZP: case UTF8PROC_CATEGORY_ZS:
      return false;
    default:
      return true;
  }
}

// Python's str.strip/lstrip/rstrip: `chars` empty means whitespace.
std::string_view py_strip(std::string_view s, bool left, bool right, const std::vector<char32_t>* chars) {
  auto strip_cp = [&](char32_t c) {
    return chars ? std::find(chars->begin(), chars->end(), c) != chars->end() : is_py_space(c);
  };
  size_t begin = 0, end = s.size();
  if (left) {
    for (size_t n; begin < s.size() && strip_cp(utf8_next(s, begin, &n));) begin += n;
  }
  if (right) {  // forward scan: the end of the last code point that is kept
    size_t last_kept = begin;
    for (size_t i = begin, n; i < s.size(); i += n)
      if (!strip_cp(utf8_next(s, i, &n))) last_kept = i + n;
    end = last_kept;
  }
  return s.substr(begin, end - begin);
}

std::string py_rstrip_ws(std::string_view s) { return std::string(py_strip(s, false, true, nullptr)); }

template <class F>
std::string map_cps(std::string_view s, F&& f) {
  std::string out;
  out.reserve(s.size());
  size_t k = 0;
  for (size_t i = 0, n; i < s.size(); i += n, ++k) utf8_append(out, f(utf8_next(s, i, &n), k));
  return out;
}

// Python's float repr: the shortest digits that round-trip, fixed notation for 1e-4 <= |x| < 1e16.
std::string py_float_repr(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d < 0 ? "-inf" : "inf";
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
  const std::string_view sci(buf, r.ptr - buf);  // [-]d[.ddd]e(+|-)dd
  const size_t e_pos = sci.find('e');
  std::string_view mant = sci.substr(0, e_pos);
  const int exp10 = std::atoi(std::string(sci.substr(e_pos + 1)).c_str());
  std::string out;
  if (!mant.empty() && mant[0] == '-') out += '-', mant.remove_prefix(1);
  std::string digits;
  for (char c : mant)
    if (c != '.') digits += c;
  const int decpt = exp10 + 1;  // the decimal point sits after `decpt` digits
  const int nd = static_cast<int>(digits.size());
  if (decpt > -4 && decpt <= 16) {
    if (decpt <= 0) {
      out += "0." + std::string(-decpt, '0') + digits;
    } else if (decpt >= nd) {
      out += digits + std::string(decpt - nd, '0') + ".0";
    } else {
      out += digits.substr(0, decpt) + "." + digits.substr(decpt);
    }
    return out;
  }
  out += digits[0];
  if (nd > 1) out += "." + digits.substr(1);
  const int e = decpt - 1;
  char eb[16];
  std::snprintf(eb, sizeof eb, "e%c%02d", e < 0 ? '-' : '+', e < 0 ? -e : e);
  return out + eb;
}

// ---------------------------------------------------------------------------------------------------
// Values

struct Stmt;
struct ListData;
struct DictData;
struct NsData;
struct LoopData;
struct MethodData;
using StrPtr = std::shared_ptr<const std::string>;

enum class VK : uint8_t { undefined, none, boolean, integer, floating, string, list, dict, ns, loop, function, method, macro };
// jinja's globals and HF's; lipsum, cycler and joiner are defined (so `is defined` agrees) but refused
enum class Builtin : uint8_t { range, namespace_, dict, raise_exception, strftime_now, lipsum, cycler, joiner };

struct Value {
  VK kind = VK::undefined;
  Builtin fn{};
  union {
    int64_t i = 0;  // boolean (0/1), integer
    double f;       // floating
  };
  // string; undefined: its name (for the error when it is used), may be null
  std::variant<std::monostate, StrPtr, std::shared_ptr<const ListData>, std::shared_ptr<const DictData>,
               std::shared_ptr<NsData>, std::shared_ptr<const LoopData>, std::shared_ptr<const MethodData>>
      p;
  const Stmt* macro = nullptr;

  const std::string& str() const { return *std::get<StrPtr>(p); }
  const ListData& list() const { return *std::get<std::shared_ptr<const ListData>>(p); }
  const DictData& dict() const { return *std::get<std::shared_ptr<const DictData>>(p); }
  NsData& ns() const { return *std::get<std::shared_ptr<NsData>>(p); }
  const LoopData& loop() const { return *std::get<std::shared_ptr<const LoopData>>(p); }
  const MethodData& method() const { return *std::get<std::shared_ptr<const MethodData>>(p); }
  bool is_num() const { return kind == VK::boolean || kind == VK::integer || kind == VK::floating; }
  bool is_int() const { return kind == VK::boolean || kind == VK::integer; }
  double as_double() const { return kind == VK::floating ? f : static_cast<double>(i); }
};

// The Python object a ListData stands for; they differ in how they print, index, compare and count.
// `iterator` is what jinja's lazy filters return (map, select, reject, selectattr, rejectattr, items,
// reverse): always true, no length, not printable, and an error in making it surfaces only when it is
// iterated. Unlike Python's, it can be iterated more than once.
enum class LK : uint8_t { list, tuple, iterator, range, dict_items, dict_keys, dict_values };

struct ListData {
  std::vector<Value> items;
  LK kind = LK::list;
  int depth = 1;        // 1 + the deepest item's depth
  bool has_ns = false;  // some item is or holds a namespace
  int64_t range_start = 0, range_stop = 0, range_step = 1;  // range
  std::string deferred_error;                               // iterator: thrown when iterated
  bool indexable() const { return kind == LK::list || kind == LK::tuple || kind == LK::range; }
};
struct DictData {
  std::vector<std::pair<Value, Value>> items;  // insertion order, keys unique (Python equality)
  int depth = 1;
  bool has_ns = false;
};
struct NsData {
  std::vector<std::pair<std::string, Value>> attrs;
  int depth = 1;
};
struct LoopData {
  int64_t index0 = 0, length = 0;
  std::shared_ptr<const ListData> items;
};
struct MethodData {
  Value self;
  std::string name;
};

Value v_undefined(const std::string& name) {
  Value v;
  v.p = std::make_shared<const std::string>(name);
  return v;
}
Value v_none() {
  Value v;
  v.kind = VK::none;
  return v;
}
Value v_bool(bool b) {
  Value v;
  v.kind = VK::boolean;
  v.i = b;
  return v;
}
Value v_int(int64_t i) {
  Value v;
  v.kind = VK::integer;
  v.i = i;
  return v;
}
Value v_float(double f) {
  Value v;
  v.kind = VK::floating;
  v.f = f;
  return v;
}
Value v_str(StrPtr s) {
  Value v;
  v.kind = VK::string;
  v.p = std::move(s);
  return v;
}
Value v_str(std::string s) { return v_str(std::make_shared<const std::string>(std::move(s))); }
Value v_function(Builtin fn) {
  Value v;
  v.kind = VK::function;
  v.fn = fn;
  return v;
}

int value_depth(const Value& v) {
  switch (v.kind) {
    case VK::list: return v.list().depth;
    case VK::dict: return v.dict().depth;
    case VK::ns: return v.ns().depth;
    case VK::loop: return v.loop().items->depth + 1;
    case VK::method: return value_depth(v.method().self) + 1;
    default: return 0;
  }
}
bool holds_ns(const Value& v) {
  switch (v.kind) {
    case VK::ns: return true;
    case VK::list: return v.list().has_ns;
    case VK::dict: return v.dict().has_ns;
    case VK::loop: return v.loop().items->has_ns;
    case VK::method: return holds_ns(v.method().self);
    default: return false;
  }
}

const char* type_name(const Value& v) {
  switch (v.kind) {
    case VK::undefined: return "undefined";
    case VK::none: return "NoneType";
    case VK::boolean: return "bool";
    case VK::integer: return "int";
    case VK::floating: return "float";
    case VK::string: return "str";
    case VK::list:
      switch (v.list().kind) {
        case LK::list: return "list";
        case LK::tuple: return "tuple";
        case LK::iterator: return "generator";
        case LK::range: return "range";
        case LK::dict_items: return "dict_items";
        case LK::dict_keys: return "dict_keys";
        case LK::dict_values: return "dict_values";
      }
      return "list";
    case VK::dict: return "dict";
    case VK::ns: return "namespace";
    case VK::loop: return "loop";
    case VK::function: return "function";
    case VK::method: return "method";
    case VK::macro: return "macro";
  }
  return "?";
}

bool truthy(const Value& v) {
  switch (v.kind) {
    case VK::undefined: case VK::none: return false;
    case VK::boolean: case VK::integer: return v.i != 0;
    case VK::floating: return v.f != 0.0;
    case VK::string: return !v.str().empty();
    case VK::list: return v.list().kind == LK::iterator || !v.list().items.empty();
    case VK::dict: return !v.dict().items.empty();
    default: return true;
  }
}

// Code points of a string, indexable; ASCII strings are indexed in place.
struct CpView {
  std::string_view s;
  bool ascii;
  std::vector<size_t> off;  // non-ASCII: start of each code point, then s.size()
  explicit CpView(std::string_view str) : s(str), ascii(is_ascii(str)) {
    if (ascii) return;
    for (size_t i = 0, n; i < s.size(); i += n) {
      off.push_back(i);
      utf8_next(s, i, &n);
    }
    off.push_back(s.size());
  }
  int64_t size() const { return ascii ? static_cast<int64_t>(s.size()) : static_cast<int64_t>(off.size()) - 1; }
  std::string_view at(int64_t k) const { return ascii ? s.substr(k, 1) : s.substr(off[k], off[k + 1] - off[k]); }
};

// ---------------------------------------------------------------------------------------------------
// Lexer: jinja2/lexer.py's rules with trim_blocks and lstrip_blocks on

enum class Tok : uint8_t { data, var_begin, var_end, block_begin, block_end, name, string, integer, floating, op, eof };

struct Token {
  Tok type;
  int line;
  std::string text;  // data, name, string (unescaped), op
  int64_t ival = 0;
  double fval = 0;
};

class Lexer {
 public:
  explicit Lexer(const std::string& source) {
    // \r\n and \r read as \n; one trailing newline dropped (keep_trailing_newline=False)
    s_.reserve(source.size());
    for (size_t i = 0; i < source.size(); ++i) {
      if (source[i] == '\r') {
        s_ += '\n';
        if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
      } else {
        s_ += source[i];
      }
    }
    if (!s_.empty() && s_.back() == '\n') s_.pop_back();
    for (size_t i = 0; i < s_.size(); ++i)
      if (s_[i] == '\n') newlines_.push_back(i);
  }

  std::vector<Token> run() {
    const size_t n = s_.size();
    while (pos_ < n) {
      size_t i = pos_;
      for (;; ++i) {
        i = s_.find('{', i);
        if (i == std::string::npos || i + 1 >= n) {
          i = std::string::npos;
          break;
        }
        if (s_[i + 1] == '{' || s_[i + 1] == '%' || s_[i + 1] == '#') break;
      }
      if (i == std::string::npos) {
        add_data(s_.substr(pos_), pos_);
        break;
      }
      const char kind = s_[i + 1];
      size_t p = i + 2;
      char sign = 0;
      if (p < n && (s_[p] == '-' || s_[p] == '+')) sign = s_[p++];
      size_t raw_after = 0;
      const bool raw = kind == '%' && match_raw_begin(p, &raw_after);
      add_data(strip_before(s_.substr(pos_, i - pos_), sign, kind != '{'), pos_);
      if (raw) {
        lex_raw(i, raw_after);
      } else if (kind == '#') {
        lex_comment(i, p);
      } else {
        lex_tag(i, p, kind == '%');
      }
    }
    out_.push_back({Tok::eof, line_at(n), {}});
    return std::move(out_);
  }

 private:
  std::string s_;
  std::vector<size_t> newlines_;
  size_t pos_ = 0;
  bool line_starting_ = true;  // the last match ended with a newline (lstrip_blocks looks at it)
  std::vector<Token> out_;

  int line_at(size_t off) const {
    return 1 + static_cast<int>(std::lower_bound(newlines_.begin(), newlines_.end(), off) - newlines_.begin());
  }
  bool at(size_t p, const char* lit) const { return s_.compare(p, std::strlen(lit), lit) == 0; }
  size_t skip_space(size_t p) const {
    for (size_t len; p < s_.size();) {
      if (!is_py_space(utf8_next(s_, p, &len))) break;
      p += len;
    }
    return p;
  }
  void add_data(std::string text, size_t off) {
    if (!text.empty()) out_.push_back({Tok::data, line_at(off), std::move(text)});
  }
  // The text before a tag: `-` strips all trailing whitespace; otherwise lstrip_blocks removes the
  // spaces between the line's start and a block or comment tag (not a {{ }}, not after `+`).
  std::string strip_before(std::string text, char sign, bool lstrip) const {
    if (sign == '-') return py_rstrip_ws(text);
    if (sign == '+' || !lstrip) return text;
    const size_t nl = text.rfind('\n');
    const size_t l_pos = nl == std::string::npos ? 0 : nl + 1;
    if ((l_pos > 0 || line_starting_) && l_pos < text.size() && skip_space_in(text, l_pos) == text.size())
      text.resize(l_pos);
    return text;
  }
  static size_t skip_space_in(const std::string& t, size_t p) {
    for (size_t len; p < t.size(); p += len)
      if (!is_py_space(utf8_next(t, p, &len))) break;
    return p;
  }
  // `{% raw %}` (p is after `{%` and its sign): \s* raw \s* (-%}\s* | %})
  bool match_raw_begin(size_t p, size_t* after) const {
    p = skip_space(p);
    if (!at(p, "raw")) return false;
    p = skip_space(p + 3);
    if (at(p, "-%}")) {
      *after = skip_space(p + 3);
      return true;
    }
    if (at(p, "%}")) {
      *after = p + 2;
      return true;
    }
    return false;
  }
  // A block end at p: +%} | -%}\s* | %}\n?  (0 when there is none)
  size_t block_end_at(size_t p) const {
    if (at(p, "+%}")) return p + 3;
    if (at(p, "-%}")) return skip_space(p + 3);
    if (at(p, "%}")) return p + 2 + (p + 2 < s_.size() && s_[p + 2] == '\n');
    return 0;
  }
  void end_match(size_t after) {
    line_starting_ = after > 0 && s_[after - 1] == '\n';
    pos_ = after;
  }
  void lex_raw(size_t start, size_t after) {
    for (size_t q = s_.find("{%", after); q != std::string::npos; q = s_.find("{%", q + 1)) {
      size_t p = q + 2;
      char sign = 0;
      if (p < s_.size() && (s_[p] == '-' || s_[p] == '+')) sign = s_[p++];
      p = skip_space(p);
      if (!at(p, "endraw")) continue;
      const size_t end = block_end_at(skip_space(p + 6));
      if (end == 0) continue;
      line_starting_ = s_[after - 1] == '\n';  // the raw tag's own match
      add_data(strip_before(s_.substr(after, q - after), sign, true), after);
      end_match(end);
      return;
    }
    fail_line(line_at(start), "{% raw %} is not closed by {% endraw %}");
  }
  void lex_comment(size_t start, size_t p) {
    for (size_t j = p; j + 1 < s_.size(); ++j) {
      if ((s_[j] == '+' || s_[j] == '-') && at(j + 1, "#}")) {
        end_match(s_[j] == '+' ? j + 3 : skip_space(j + 3));
        return;
      }
      if (at(j, "#}")) {
        end_match(j + 2 + (j + 2 < s_.size() && s_[j + 2] == '\n'));
        return;
      }
    }
    fail_line(line_at(start), "comment '{#' is not closed by '#}'");
  }
  size_t scan_digits(size_t p) const {  // (\d+_)*\d+
    auto digit = [&](size_t q) { return q < s_.size() && s_[q] >= '0' && s_[q] <= '9'; };
    if (!digit(p)) return p;
    while (true) {
      while (digit(p)) ++p;
      if (p < s_.size() && s_[p] == '_' && digit(p + 1)) {
        ++p;
        continue;
      }
      return p;
    }
  }
  size_t scan_exponent(size_t p) const {  // e[+-]?(\d+_)*\d+
    if (p >= s_.size() || (s_[p] != 'e' && s_[p] != 'E')) return 0;
    size_t q = p + 1;
    if (q < s_.size() && (s_[q] == '+' || s_[q] == '-')) ++q;
    const size_t e = scan_digits(q);
    return e > q ? e : 0;
  }
  static std::string no_underscores(std::string_view t) {
    std::string r;
    for (char c : t)
      if (c != '_') r += c;
    return r;
  }
  size_t lex_number(size_t p, int line) {
    const size_t a = scan_digits(p);
    size_t float_end = 0;
    if (p == 0 || s_[p - 1] != '.') {  // float_re's (?<!\.)
      size_t frac = 0;
      if (a < s_.size() && s_[a] == '.') {
        const size_t f = scan_digits(a + 1);
        if (f > a + 1) frac = f;
      }
      if (frac && scan_exponent(frac)) {
        float_end = scan_exponent(frac);
      } else if (scan_exponent(a)) {
        float_end = scan_exponent(a);
      } else if (frac) {
        float_end = frac;
      }
    }
    if (float_end) {
      const std::string t = no_underscores(std::string_view(s_).substr(p, float_end - p));
      double v = 0;
      std::from_chars(t.data(), t.data() + t.size(), v);
      if (!std::isfinite(v)) fail_line(line, "number literal ", t, " is out of range");
      Token tok{Tok::floating, line, t};
      tok.fval = v;
      out_.push_back(std::move(tok));
      return float_end;
    }
    size_t end = p + 1;
    int base = 10;
    auto digit_of = [](char c) { return c >= '0' && c <= '9' ? c - '0' : (c | 0x20) >= 'a' && (c | 0x20) <= 'f' ? (c | 0x20) - 'a' + 10 : 99; };
    if (s_[p] == '0' && p + 1 < s_.size() && s_[p + 1] != 0 && std::strchr("bBoOxX", s_[p + 1])) {
      base = (s_[p + 1] | 0x20) == 'b' ? 2 : (s_[p + 1] | 0x20) == 'o' ? 8 : 16;
      size_t q = p + 2;
      while (true) {  // (_?[digit])+
        const size_t d = q < s_.size() && s_[q] == '_' ? q + 1 : q;
        if (d < s_.size() && digit_of(s_[d]) < base) {
          q = d + 1;
        } else {
          break;
        }
      }
      if (q == p + 2) {  // no digits: "0" then a name
        base = 10;
      } else {
        end = q;
      }
    }
    if (base == 10) {
      const char lead = s_[p];
      end = p + 1;
      while (true) {  // [1-9](_?\d)* or 0(_?0)*
        const size_t d = end < s_.size() && s_[end] == '_' ? end + 1 : end;
        if (d < s_.size() && (lead == '0' ? s_[d] == '0' : (s_[d] >= '0' && s_[d] <= '9'))) {
          end = d + 1;
        } else {
          break;
        }
      }
    }
    const std::string t = no_underscores(std::string_view(s_).substr(p, end - p));
    int64_t v = 0;
    const char* first = t.data() + (base == 10 ? 0 : 2);
    const auto r = std::from_chars(first, t.data() + t.size(), v, base);
    if (r.ec != std::errc()) fail_line(line, "integer literal ", t, " does not fit 64 bits");
    Token tok{Tok::integer, line, t};
    tok.ival = v;
    out_.push_back(std::move(tok));
    return end;
  }
  // A string literal's value: Python's unicode-escape decoding of what is between the quotes.
  std::string unescape(std::string_view raw, int line) const {
    std::string out;
    for (size_t i = 0; i < raw.size(); ++i) {
      if (raw[i] != '\\' || i + 1 >= raw.size()) {
        out += raw[i];
        continue;
      }
      const char c = raw[++i];
      auto hex = [&](int digits) {
        char32_t v = 0;
        for (int k = 0; k < digits; ++k) {
          const char h = i + 1 + k < raw.size() ? raw[i + 1 + k] : 0;
          const int d = h >= '0' && h <= '9' ? h - '0' : (h | 0x20) >= 'a' && (h | 0x20) <= 'f' ? (h | 0x20) - 'a' + 10 : -1;
          if (d < 0) fail_line(line, "string literal: truncated \\", c, " escape");
          v = v * 16 + d;
        }
        i += digits;
        if (v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) fail_line(line, "string literal: \\", c, " escape is not a character");
        return v;
      };
      switch (c) {
        case '\n': break;
        case '\\': out += '\\'; break;
        case '\'': out += '\''; break;
        case '"': out += '"'; break;
        case 'a': out += '\a'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'v': out += '\v'; break;
        case 'x': utf8_append(out, hex(2)); break;
        case 'u': utf8_append(out, hex(4)); break;
        case 'U': utf8_append(out, hex(8)); break;
        case 'N': fail_line(line, "string literal: \\N{...} escapes are not supported");
        default:
          if (c >= '0' && c <= '7') {
            char32_t v = c - '0';
            for (int k = 0; k < 2 && i + 1 < raw.size() && raw[i + 1] >= '0' && raw[i + 1] <= '7'; ++k) v = v * 8 + (raw[++i] - '0');
            utf8_append(out, v);
          } else {
            out += '\\';
            out += c;
          }
      }
    }
    return out;
  }
  void lex_tag(size_t start, size_t p, bool block) {
    const int start_line = line_at(start);
    out_.push_back({block ? Tok::block_begin : Tok::var_begin, start_line, {}});
    std::vector<char> balance;
    const size_t n = s_.size();
    while (true) {
      if (p >= n) fail_line(start_line, "'", block ? "{%" : "{{", "' is not closed by '", block ? "%}" : "}}", "'");
      if (balance.empty()) {
        size_t after = 0;
        if (block) {
          after = block_end_at(p);
        } else if (at(p, "-}}")) {
          after = skip_space(p + 3);
        } else if (at(p, "}}")) {
          after = p + 2;
        }
        if (after) {
          out_.push_back({block ? Tok::block_end : Tok::var_end, line_at(p), {}});
          end_match(after);
          return;
        }
      }
      const int line = line_at(p);
      const char c = s_[p];
      size_t len;
      if (is_py_space(utf8_next(s_, p, &len))) {
        p = skip_space(p);
      } else if (c >= '0' && c <= '9') {
        p = lex_number(p, line);
      } else if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_') {
        size_t e = p + 1;
        while (e < n && (std::isalnum(static_cast<unsigned char>(s_[e])) || s_[e] == '_')) ++e;
        out_.push_back({Tok::name, line, s_.substr(p, e - p)});
        p = e;
      } else if (c == '\'' || c == '"') {
        size_t e = p + 1;
        while (e < n && s_[e] != c) e += s_[e] == '\\' ? 2 : 1;
        if (e >= n) fail_line(line, "string literal is not closed");
        out_.push_back({Tok::string, line, unescape(std::string_view(s_).substr(p + 1, e - p - 1), line)});
        p = e + 1;
      } else {
        static const char* const kOps[] = {"//", "**", "==", "!=", ">=", "<=", "+", "-", "/", "*", "%", "~", "[", "]",
                                           "(", ")", "{", "}", "=", ".", ":", "|", ",", ";", "<", ">"};
        const char* op = nullptr;
        for (const char* o : kOps)
          if (at(p, o)) {
            op = o;
            break;
          }
        if (!op) {
          std::string ch = s_.substr(p, len);
          fail_line(line, "unexpected character '", ch, "'");
        }
        if (*op == '(' || *op == '[' || *op == '{') {
          balance.push_back(*op == '(' ? ')' : *op == '[' ? ']' : '}');
        } else if (*op == ')' || *op == ']' || *op == '}') {
          if (balance.empty()) fail_line(line, "unexpected '", op, "'");
          if (balance.back() != *op) fail_line(line, "unexpected '", op, "', expected '", balance.back(), "'");
          balance.pop_back();
        }
        out_.push_back({Tok::op, line, op});
        p += std::strlen(op);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------------
// The tree

enum class EK : uint8_t {
  constant, name, getattr, getitem, slice, call, filter, test, neg, pos, not_, and_, or_, binop, concat, compare, cond,
  list, tuple, dict
};
enum class BinOp : uint8_t { add, sub, mul, div, floordiv, mod, pow };
enum class CmpOp : uint8_t { eq, ne, lt, le, gt, ge, in, notin };

enum class Filter : uint8_t {
  abs, capitalize, default_, first, float_, indent, int_, items, join, last, length, list, lower, map, reject,
  rejectattr, replace, reverse, select, selectattr, string, title, tojson, trim, upper
};
enum class Test : uint8_t {
  defined, undefined, none, boolean, true_, false_, integer, float_, number, string, mapping, iterable, sequence,
  callable, odd, even, divisibleby, eq, ne, lt, le, gt, ge, in, sameas, lower, upper
};

struct NamedFilter {
  const char* name;
  Filter f;
};
constexpr NamedFilter kFilters[] = {
    {"abs", Filter::abs},         {"capitalize", Filter::capitalize}, {"count", Filter::length},
    {"d", Filter::default_},      {"default", Filter::default_},      {"first", Filter::first},
    {"float", Filter::float_},    {"indent", Filter::indent},         {"int", Filter::int_},
    {"items", Filter::items},     {"join", Filter::join},             {"last", Filter::last},
    {"length", Filter::length},   {"list", Filter::list},             {"lower", Filter::lower},
    {"map", Filter::map},         {"reject", Filter::reject},         {"rejectattr", Filter::rejectattr},
    {"replace", Filter::replace}, {"reverse", Filter::reverse},
    {"select", Filter::select},   {"selectattr", Filter::selectattr}, {"string", Filter::string},
    {"title", Filter::title},     {"tojson", Filter::tojson},         {"trim", Filter::trim},
    {"upper", Filter::upper},
};
struct NamedTest {
  const char* name;
  Test t;
};
constexpr NamedTest kTests[] = {
    {"defined", Test::defined},   {"undefined", Test::undefined}, {"none", Test::none},
    {"boolean", Test::boolean},   {"true", Test::true_},          {"false", Test::false_},
    {"integer", Test::integer},   {"float", Test::float_},        {"number", Test::number},
    {"string", Test::string},     {"mapping", Test::mapping},     {"iterable", Test::iterable},
    {"sequence", Test::sequence}, {"callable", Test::callable},   {"odd", Test::odd},
    {"even", Test::even},         {"divisibleby", Test::divisibleby}, {"eq", Test::eq},
    {"equalto", Test::eq},        {"ne", Test::ne},               {"lt", Test::lt},
    {"lessthan", Test::lt},       {"le", Test::le},               {"gt", Test::gt},
    {"greaterthan", Test::gt},    {"ge", Test::ge},               {"in", Test::in},
    {"sameas", Test::sameas},     {"lower", Test::lower},         {"upper", Test::upper},
};
const Filter* find_filter(const std::string& name) {
  for (const auto& f : kFilters)
    if (name == f.name) return &f.f;
  return nullptr;
}
const Test* find_test(const std::string& name) {
  for (const auto& t : kTests)
    if (name == t.name) return &t.t;
  return nullptr;
}

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;
struct Expr {
  EK kind;
  int line;
  int depth = 1;     // of this subtree: evaluation recurses this deep
  Value value;       // constant
  std::string name;  // name; getattr: attribute; filter, test: its name
  BinOp op{};
  Filter filter{};
  Test test{};
  std::vector<CmpOp> cmp;  // compare: one per operand after kids[0]
  // getattr: [obj]; getitem: [obj, key]; slice: [obj, start, stop, step] (null = omitted); call: [callee,
  // args...]; filter: [obj (null in a set block), args...]; test: [obj, args...]; neg/pos/not: [x];
  // and/or/binop: [a, b]; concat, list, tuple: items; compare: operands; cond: [test, then, else (null)];
  // dict: [k0, v0, k1, v1, ...]
  std::vector<ExprPtr> kids;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
};

enum class SK : uint8_t { text, output, if_, for_, set, set_attr, set_block, macro, with, break_, continue_, block };

struct Stmt;
using Body = std::vector<std::unique_ptr<Stmt>>;
struct Stmt {
  SK kind;
  int line;
  std::string text;                // text: the data; set_attr: the attribute; macro: its name
  std::vector<std::string> names;  // set, set_block, for, with: targets; macro: parameters; set_attr: [namespace]
  bool unpack = false;             // set/for: the target was a tuple
  // output: the expressions to print; if: one condition per branch; for: [iterable, filter (null)]; set, set_attr: [value];
  // set_block: [filter chain (null)]; with: values; macro: defaults, one per parameter (null: none)
  std::vector<ExprPtr> exprs;
  // if: one body per condition, then else; for: [body, else]; set_block, macro, with, block: [body]
  std::vector<Body> bodies;
};

// ---------------------------------------------------------------------------------------------------
// Parser: jinja2/parser.py's grammar, precedence from loosest to tightest:
//   a if b else c | or | and | not | comparisons, in, not in | + - | ~ | * / // % | ** | unary - + |
//   postfix (.attr [key] [a:b:c] (call)) then filters (| f) and tests (is t)

class Parser {
 public:
  Parser(std::vector<Token> toks, const ChatTemplateLimits& lim) : t_(std::move(toks)), lim_(lim) {}

  Body parse_template() {
    Body body = subparse({});
    if (cur().type != Tok::eof) fail_line(cur().line, "unexpected '", cur().text, "'");
    return body;
  }

 private:
  std::vector<Token> t_;
  const ChatTemplateLimits& lim_;
  size_t i_ = 0;
  int depth_ = 0;       // parser recursion (blocks and expressions)
  int loop_depth_ = 0;  // for break/continue

  struct Nest {
    Parser& p;
    Nest(Parser& parser, int line) : p(parser) {
      if (++p.depth_ > p.lim_.max_depth) fail_line(line, "nesting deeper than ", p.lim_.max_depth, " levels (max_depth)");
    }
    ~Nest() { --p.depth_; }
  };

  const Token& cur() const { return t_[i_]; }
  const Token& peek() const { return t_[std::min(i_ + 1, t_.size() - 1)]; }
  void next() {
    if (i_ + 1 < t_.size()) ++i_;
  }
  bool is_name(const char* s) const { return cur().type == Tok::name && cur().text == s; }
  bool is_op(const char* s) const { return cur().type == Tok::op && cur().text == s; }
  bool skip_name(const char* s) {
    if (!is_name(s)) return false;
    next();
    return true;
  }
  bool skip_op(const char* s) {
    if (!is_op(s)) return false;
    next();
    return true;
  }
  static std::string describe(const Token& t) {
    switch (t.type) {
      case Tok::eof: return "end of template";
      case Tok::data: return "text";
      case Tok::var_begin: return "'{{'";
      case Tok::var_end: return "'}}'";
      case Tok::block_begin: return "'{%'";
      case Tok::block_end: return "'%}'";
      case Tok::string: return "a string";
      default: return "'" + t.text + "'";
    }
  }
  [[noreturn]] void unexpected(const char* wanted) const {
    fail_line(cur().line, "expected ", wanted, ", got ", describe(cur()));
  }
  void expect_op(const char* s) {
    if (!skip_op(s)) unexpected((std::string("'") + s + "'").c_str());
  }
  void expect(Tok type, const char* what) {
    if (cur().type != type) unexpected(what);
    next();
  }
  std::string expect_name() {
    if (cur().type != Tok::name) unexpected("a name");
    std::string s = cur().text;
    next();
    return s;
  }

  ExprPtr node(EK kind, int line) {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->line = line;
    return e;
  }
  // Sets e's depth from its children; a tree deeper than max_depth (a chain like a.b.c.d... or
  // x|f|f|f...) is refused here, so evaluating it cannot recurse deeper.
  ExprPtr done(ExprPtr e) {
    int d = 0;
    for (const auto& k : e->kids)
      if (k) d = std::max(d, k->depth);
    for (const auto& kw : e->kwargs) d = std::max(d, kw.second->depth);
    e->depth = d + 1;
    if (e->depth > lim_.max_depth) fail_line(e->line, "expression nested deeper than ", lim_.max_depth, " levels (max_depth)");
    return e;
  }
  ExprPtr unary_node(EK kind, int line, ExprPtr x) {
    auto e = node(kind, line);
    e->kids.push_back(std::move(x));
    return done(std::move(e));
  }
  ExprPtr binary_node(EK kind, int line, ExprPtr a, ExprPtr b) {
    auto e = node(kind, line);
    e->kids.push_back(std::move(a));
    e->kids.push_back(std::move(b));
    return done(std::move(e));
  }

  // --- statements

  bool at_end_tag(std::initializer_list<const char*> ends) const {
    if (cur().type != Tok::block_begin || peek().type != Tok::name) return false;
    for (const char* e : ends)
      if (peek().text == e) return true;
    return false;
  }

  // Statements up to (not including) a block tag whose name is in `ends`; that tag's {% and name are
  // consumed, the current token is what follows the name.
  Body subparse(std::initializer_list<const char*> ends, int open_line = 0, const char* open_tag = nullptr) {
    Nest nest(*this, cur().line);
    Body body;
    while (true) {
      const Token& t = cur();
      if (t.type == Tok::eof) {
        if (ends.size() == 0) return body;
        fail_line(open_line, "'{% ", open_tag, " %}' is not closed (expected '{% ", *(ends.end() - 1), " %}')");
      }
      if (t.type == Tok::data) {
        auto s = std::make_unique<Stmt>();
        s->kind = SK::text;
        s->line = t.line;
        s->text = t.text;
        body.push_back(std::move(s));
        next();
      } else if (t.type == Tok::var_begin) {
        auto s = std::make_unique<Stmt>();
        s->kind = SK::output;
        s->line = t.line;
        next();
        s->exprs.push_back(parse_tuple(true, {}, false));
        expect(Tok::var_end, "'}}'");
        body.push_back(std::move(s));
      } else if (t.type == Tok::block_begin) {
        if (at_end_tag(ends)) {
          next();
          next();
          return body;
        }
        next();
        body.push_back(parse_statement());
        expect(Tok::block_end, "'%}'");
      } else {
        unexpected("text or a tag");
      }
    }
  }

  // The body of a block statement: expects the %} of its opening tag first.
  Body block_body(std::initializer_list<const char*> ends, int open_line, const char* open_tag) {
    expect(Tok::block_end, "'%}'");
    return subparse(ends, open_line, open_tag);
  }

  std::unique_ptr<Stmt> parse_statement() {
    if (cur().type != Tok::name) unexpected("a tag name");
    const std::string tag = cur().text;
    const int line = cur().line;
    auto s = std::make_unique<Stmt>();
    s->line = line;
    next();
    if (tag == "if") return parse_if(std::move(s));
    if (tag == "for") return parse_for(std::move(s));
    if (tag == "set") return parse_set(std::move(s));
    if (tag == "macro") return parse_macro(std::move(s));
    if (tag == "with") return parse_with(std::move(s));
    if (tag == "print") {  // {% print a, b %} outputs a then b
      s->kind = SK::output;
      while (cur().type != Tok::block_end) {
        if (!s->exprs.empty()) expect_op(",");
        s->exprs.push_back(parse_expression(true));
      }
      return s;
    }
    if (tag == "break" || tag == "continue") {
      if (loop_depth_ == 0) fail_line(line, "'", tag, "' outside a for loop");
      s->kind = tag == "break" ? SK::break_ : SK::continue_;
      return s;
    }
    if (tag == "generation") {  // HF's marker of assistant text: renders its body
      s->kind = SK::block;
      s->bodies.push_back(block_body({"endgeneration"}, line, "generation"));
      return s;
    }
    static const char* const kKnown[] = {"block", "extends", "include", "import", "from", "call", "filter",
                                         "autoescape", "do", "trans", "raw"};
    for (const char* k : kKnown)
      if (tag == k) fail_line(line, "tag '", tag, "' is not supported");
    fail_line(line, "unknown tag '", tag, "'");
  }

  std::unique_ptr<Stmt> parse_if(std::unique_ptr<Stmt> s) {
    s->kind = SK::if_;
    const int line = s->line;
    while (true) {
      s->exprs.push_back(parse_tuple(false, {}, false));
      s->bodies.push_back(block_body({"elif", "else", "endif"}, line, "if"));
      const std::string& ended = t_[i_ - 1].text;
      if (ended == "elif") continue;
      if (ended == "else") s->bodies.push_back(block_body({"endif"}, line, "if"));
      return s;
    }
  }

  // for/set targets: a name, or names separated by commas (optionally in parentheses); like jinja, a
  // trailing comma is allowed only inside the parentheses
  void parse_targets(Stmt& s) {
    const bool paren = skip_op("(");
    while (true) {
      s.names.push_back(expect_name());
      if (!skip_op(",")) break;
      s.unpack = true;
      if (paren && is_op(")")) break;
    }
    if (paren) expect_op(")");
    if (paren && s.names.size() > 1) s.unpack = true;
  }

  std::unique_ptr<Stmt> parse_for(std::unique_ptr<Stmt> s) {
    s->kind = SK::for_;
    parse_targets(*s);
    if (!skip_name("in")) unexpected("'in'");
    s->exprs.push_back(parse_tuple(false, {"recursive"}, false));
    s->exprs.push_back(skip_name("if") ? parse_expression(true) : nullptr);
    if (is_name("recursive")) fail_line(cur().line, "recursive for loops are not supported");
    ++loop_depth_;
    s->bodies.push_back(block_body({"else", "endfor"}, s->line, "for"));
    --loop_depth_;
    s->bodies.emplace_back();
    if (t_[i_ - 1].text == "else") s->bodies.back() = block_body({"endfor"}, s->line, "for");
    return s;
  }

  std::unique_ptr<Stmt> parse_set(std::unique_ptr<Stmt> s) {
    if (cur().type == Tok::name && peek().type == Tok::op && peek().text == ".") {  // {% set ns.attr = v %}
      s->kind = SK::set_attr;
      s->names.push_back(expect_name());
      next();
      s->text = expect_name();
      expect_op("=");
      s->exprs.push_back(parse_tuple(true, {}, false));
      return s;
    }
    parse_targets(*s);
    if (skip_op("=")) {
      s->kind = SK::set;
      s->exprs.push_back(parse_tuple(true, {}, false));
      return s;
    }
    if (s->unpack) unexpected("'='");
    s->kind = SK::set_block;  // {% set x %}...{% endset %}, optionally {% set x | filter %}
    s->exprs.push_back(is_op("|") ? parse_filters(nullptr) : nullptr);
    const int saved = loop_depth_;
    loop_depth_ = 0;
    s->bodies.push_back(block_body({"endset"}, s->line, "set"));
    loop_depth_ = saved;
    return s;
  }

  std::unique_ptr<Stmt> parse_macro(std::unique_ptr<Stmt> s) {
    s->kind = SK::macro;
    s->text = expect_name();
    expect_op("(");
    while (!is_op(")")) {
      if (!s->names.empty()) expect_op(",");
      if (is_op(")")) break;
      s->names.push_back(expect_name());
      if (skip_op("=")) {
        s->exprs.push_back(parse_expression(true));
      } else {
        if (!s->exprs.empty() && s->exprs.back()) fail_line(s->line, "macro '", s->text, "': a parameter without a default follows one with a default");
        s->exprs.push_back(nullptr);
      }
    }
    expect_op(")");
    const int saved = loop_depth_;
    loop_depth_ = 0;
    s->bodies.push_back(block_body({"endmacro"}, s->line, "macro"));
    loop_depth_ = saved;
    return s;
  }

  std::unique_ptr<Stmt> parse_with(std::unique_ptr<Stmt> s) {
    s->kind = SK::with;
    while (cur().type != Tok::block_end) {
      if (!s->names.empty()) expect_op(",");
      s->names.push_back(expect_name());
      expect_op("=");
      s->exprs.push_back(parse_expression(true));
    }
    s->bodies.push_back(block_body({"endwith"}, s->line, "with"));
    return s;
  }

  // --- expressions

  bool tuple_end(std::initializer_list<const char*> extra_end) const {
    if (cur().type == Tok::var_end || cur().type == Tok::block_end || is_op(")")) return true;
    for (const char* e : extra_end)
      if (is_name(e)) return true;
    return false;
  }

  ExprPtr parse_tuple(bool with_condexpr, std::initializer_list<const char*> extra_end, bool explicit_parens) {
    const int line = cur().line;
    std::vector<ExprPtr> items;
    bool is_tuple = false;
    while (true) {
      if (!items.empty()) expect_op(",");
      if (tuple_end(extra_end)) break;
      items.push_back(parse_expression(with_condexpr));
      if (is_op(",")) {
        is_tuple = true;
      } else {
        break;
      }
    }
    if (!is_tuple) {
      if (!items.empty()) return std::move(items[0]);
      if (!explicit_parens) unexpected("an expression");
    }
    auto e = node(EK::tuple, line);
    e->kids = std::move(items);
    return done(std::move(e));
  }

  ExprPtr parse_expression(bool with_condexpr) { return with_condexpr ? parse_condexpr() : parse_or(); }

  ExprPtr parse_condexpr() {
    Nest nest(*this, cur().line);
    int line = cur().line;
    ExprPtr e1 = parse_or();
    while (skip_name("if")) {
      ExprPtr test = parse_or();
      ExprPtr e3 = skip_name("else") ? parse_condexpr() : nullptr;
      auto c = node(EK::cond, line);
      c->kids.push_back(std::move(test));
      c->kids.push_back(std::move(e1));
      c->kids.push_back(std::move(e3));
      e1 = done(std::move(c));
      line = cur().line;
    }
    return e1;
  }
  ExprPtr parse_or() {
    ExprPtr left = parse_and();
    while (is_name("or")) {
      const int line = cur().line;
      next();
      left = binary_node(EK::or_, line, std::move(left), parse_and());
    }
    return left;
  }
  ExprPtr parse_and() {
    ExprPtr left = parse_not();
    while (is_name("and")) {
      const int line = cur().line;
      next();
      left = binary_node(EK::and_, line, std::move(left), parse_not());
    }
    return left;
  }
  ExprPtr parse_not() {
    if (is_name("not")) {
      const int line = cur().line;
      Nest nest(*this, line);
      next();
      return unary_node(EK::not_, line, parse_not());
    }
    return parse_compare();
  }
  ExprPtr parse_compare() {
    const int line = cur().line;
    ExprPtr first = parse_math1();
    auto e = node(EK::compare, line);
    while (true) {
      CmpOp op;
      if (is_op("==")) op = CmpOp::eq;
      else if (is_op("!=")) op = CmpOp::ne;
      else if (is_op("<")) op = CmpOp::lt;
      else if (is_op("<=")) op = CmpOp::le;
      else if (is_op(">")) op = CmpOp::gt;
      else if (is_op(">=")) op = CmpOp::ge;
      else if (is_name("in")) op = CmpOp::in;
      else if (is_name("not") && peek().type == Tok::name && peek().text == "in") {
        op = CmpOp::notin;
        next();
      } else {
        break;
      }
      next();
      e->cmp.push_back(op);
      e->kids.push_back(parse_math1());
    }
    if (e->cmp.empty()) return first;
    e->kids.insert(e->kids.begin(), std::move(first));
    return done(std::move(e));
  }
  ExprPtr parse_math1() {
    ExprPtr left = parse_concat();
    while (is_op("+") || is_op("-")) {
      const int line = cur().line;
      const BinOp op = cur().text == "+" ? BinOp::add : BinOp::sub;
      next();
      left = binary_node(EK::binop, line, std::move(left), parse_concat());
      left->op = op;
    }
    return left;
  }
  ExprPtr parse_concat() {
    const int line = cur().line;
    ExprPtr first = parse_math2();
    if (!is_op("~")) return first;
    auto e = node(EK::concat, line);
    e->kids.push_back(std::move(first));
    while (skip_op("~")) e->kids.push_back(parse_math2());
    return done(std::move(e));
  }
  ExprPtr parse_math2() {
    ExprPtr left = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const int line = cur().line;
      const std::string& o = cur().text;
      const BinOp op = o == "*" ? BinOp::mul : o == "/" ? BinOp::div : o == "//" ? BinOp::floordiv : BinOp::mod;
      next();
      left = binary_node(EK::binop, line, std::move(left), parse_pow());
      left->op = op;
    }
    return left;
  }
  ExprPtr parse_pow() {
    ExprPtr left = parse_unary(true);
    while (is_op("**")) {
      const int line = cur().line;
      next();
      left = binary_node(EK::binop, line, std::move(left), parse_unary(true));
      left->op = BinOp::pow;
    }
    return left;
  }
  ExprPtr parse_unary(bool with_filter) {
    const int line = cur().line;
    Nest nest(*this, line);
    ExprPtr e;
    if (skip_op("-")) {
      e = unary_node(EK::neg, line, parse_unary(false));
    } else if (skip_op("+")) {
      e = unary_node(EK::pos, line, parse_unary(false));
    } else {
      e = parse_primary();
    }
    e = parse_postfix(std::move(e));
    if (with_filter) e = parse_filter_expr(std::move(e));
    return e;
  }
  ExprPtr parse_primary() {
    const Token& t = cur();
    const int line = t.line;
    if (t.type == Tok::name) {
      const std::string name = t.text;
      next();
      auto e = node(EK::constant, line);
      if (name == "true" || name == "True" || name == "false" || name == "False") {
        e->value = v_bool(name[0] == 't' || name[0] == 'T');
      } else if (name == "none" || name == "None") {
        e->value = v_none();
      } else {
        e->kind = EK::name;
        e->name = name;
      }
      return done(std::move(e));
    }
    if (t.type == Tok::string) {
      std::string s;
      while (cur().type == Tok::string) {  // adjacent literals concatenate
        s += cur().text;
        next();
      }
      auto e = node(EK::constant, line);
      e->value = v_str(std::move(s));
      return done(std::move(e));
    }
    if (t.type == Tok::integer || t.type == Tok::floating) {
      auto e = node(EK::constant, line);
      e->value = t.type == Tok::integer ? v_int(t.ival) : v_float(t.fval);
      next();
      return done(std::move(e));
    }
    if (skip_op("(")) {
      ExprPtr e = parse_tuple(true, {}, true);
      expect_op(")");
      return e;
    }
    if (is_op("[") || is_op("{")) {
      const bool dict = is_op("{");
      const char* close = dict ? "}" : "]";
      next();
      auto e = node(dict ? EK::dict : EK::list, line);
      while (!is_op(close)) {
        if (!e->kids.empty()) expect_op(",");
        if (is_op(close)) break;
        e->kids.push_back(parse_expression(true));
        if (dict) {
          expect_op(":");
          e->kids.push_back(parse_expression(true));
        }
      }
      expect_op(close);
      return done(std::move(e));
    }
    unexpected("an expression");
  }
  ExprPtr parse_postfix(ExprPtr e) {
    while (true) {
      if (is_op(".") || is_op("[")) {
        e = parse_subscript(std::move(e));
      } else if (is_op("(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }
  ExprPtr parse_filter_expr(ExprPtr e) {
    while (true) {
      if (is_op("|")) {
        e = parse_filters(std::move(e));
      } else if (is_name("is")) {
        e = parse_test(std::move(e));
      } else if (is_op("(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }
  ExprPtr parse_subscript(ExprPtr obj) {
    const int line = cur().line;
    if (skip_op(".")) {
      if (cur().type == Tok::name) {
        auto e = node(EK::getattr, line);
        e->name = cur().text;
        next();
        e->kids.push_back(std::move(obj));
        return done(std::move(e));
      }
      if (cur().type != Tok::integer) unexpected("a name or number");
      auto key = node(EK::constant, line);
      key->value = v_int(cur().ival);
      next();
      return binary_node(EK::getitem, line, std::move(obj), done(std::move(key)));
    }
    expect_op("[");
    std::vector<ExprPtr> args;
    while (!is_op("]")) {
      if (!args.empty()) expect_op(",");
      args.push_back(parse_subscribed(obj, args.empty()));
      if (args.back()->kind == EK::slice) {  // the object moved into the slice node
        if (!is_op("]")) unexpected("']'");
        expect_op("]");
        return std::move(args.back());
      }
    }
    expect_op("]");
    if (args.empty()) unexpected("a subscript");
    ExprPtr key;
    if (args.size() == 1) {
      key = std::move(args[0]);
    } else {
      key = node(EK::tuple, line);
      key->kids = std::move(args);
      key = done(std::move(key));
    }
    return binary_node(EK::getitem, line, std::move(obj), std::move(key));
  }
  // One subscript: an expression, or a slice a:b:c (any part omitted) which takes over `obj`.
  ExprPtr parse_subscribed(ExprPtr& obj, bool first) {
    const int line = cur().line;
    ExprPtr start;
    if (!is_op(":")) {
      start = parse_expression(true);
      if (!is_op(":")) return start;
    }
    if (!first) fail_line(line, "slices inside a tuple subscript are not supported");
    next();  // the first ':'
    ExprPtr stop, step;
    if (!is_op(":") && !is_op("]") && !is_op(",")) stop = parse_expression(true);
    if (skip_op(":")) {
      if (!is_op("]") && !is_op(",")) step = parse_expression(true);
    }
    auto e = node(EK::slice, line);
    e->kids.push_back(std::move(obj));
    e->kids.push_back(std::move(start));
    e->kids.push_back(std::move(stop));
    e->kids.push_back(std::move(step));
    return done(std::move(e));
  }
  void parse_call_args(Expr& e) {
    expect_op("(");
    bool need_comma = false;
    while (!is_op(")")) {
      if (need_comma) {
        expect_op(",");
        if (is_op(")")) break;
      }
      if (is_op("*") || is_op("**")) fail_line(cur().line, "*args and **kwargs in calls are not supported");
      if (cur().type == Tok::name && peek().type == Tok::op && peek().text == "=") {
        std::string key = cur().text;
        next();
        next();
        e.kwargs.emplace_back(std::move(key), parse_expression(true));
      } else {
        if (!e.kwargs.empty()) fail_line(cur().line, "a positional argument follows a keyword argument");
        e.kids.push_back(parse_expression(true));
      }
      need_comma = true;
    }
    expect_op(")");
  }
  ExprPtr parse_call(ExprPtr callee) {
    auto e = node(EK::call, cur().line);
    e->kids.push_back(std::move(callee));
    parse_call_args(*e);
    return done(std::move(e));
  }
  // obj | f | g(args) ...; obj is null for {% set x | f %}
  ExprPtr parse_filters(ExprPtr obj) {
    while (skip_op("|")) {
      const int line = cur().line;
      auto e = node(EK::filter, line);
      e->name = expect_name();
      if (is_op(".")) fail_line(line, "dotted filter names are not supported");
      const Filter* f = find_filter(e->name);
      if (!f) fail_line(line, "filter '", e->name, "' is not supported");
      e->filter = *f;
      e->kids.push_back(std::move(obj));
      if (is_op("(")) parse_call_args(*e);
      obj = done(std::move(e));
    }
    return obj;
  }
  ExprPtr parse_test(ExprPtr obj) {
    const int line = cur().line;
    next();  // is
    const bool negated = skip_name("not");
    auto e = node(EK::test, line);
    e->name = expect_name();
    if (is_op(".")) fail_line(line, "dotted test names are not supported");
    const Test* t = find_test(e->name);
    if (!t) fail_line(line, "test '", e->name, "' is not supported");
    e->test = *t;
    e->kids.push_back(std::move(obj));
    if (is_op("(")) {
      parse_call_args(*e);
    } else if ((cur().type == Tok::name || cur().type == Tok::string || cur().type == Tok::integer ||
                cur().type == Tok::floating || is_op("(") || is_op("[") || is_op("{")) &&
               !is_name("else") && !is_name("or") && !is_name("and")) {
      if (is_name("is")) fail_line(line, "tests cannot be chained with 'is'");
      e->kids.push_back(parse_postfix(parse_primary()));  // `x is divisibleby 3`
    }
    ExprPtr r = done(std::move(e));
    return negated ? unary_node(EK::not_, line, std::move(r)) : std::move(r);
  }
};

// ---------------------------------------------------------------------------------------------------
// Renderer

struct Frame {
  Frame* parent = nullptr;
  std::vector<std::pair<std::string, Value>> vars;

  const Value* find(const std::string& name) const {
    for (const Frame* f = this; f; f = f->parent)
      for (const auto& kv : f->vars)
        if (kv.first == name) return &kv.second;
    return nullptr;
  }
  void set(const std::string& name, Value v) {
    for (auto& kv : vars)
      if (kv.first == name) {
        kv.second = std::move(v);
        return;
      }
    vars.emplace_back(name, std::move(v));
  }
};

struct Args {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
};

enum class Flow : uint8_t { normal, break_, continue_ };

constexpr int64_t kMaxRange = 100000;  // jinja2's sandbox refuses longer range()s (MAX_RANGE)

const char* const kStrMethods[] = {"strip", "lstrip", "rstrip", "startswith", "endswith", "split", "rsplit",
                                   "upper", "lower", "title", "capitalize", "replace", "find", "count", "join",
                                   "splitlines", "isdigit", "isspace", "isalpha", "isalnum", "islower", "isupper"};
const char* const kDictMethods[] = {"items", "keys", "values", "get"};
const char* const kListMethods[] = {"count", "index"};
// Python methods that change a list or dict: jinja's sandbox refuses them, and so does this renderer
const char* const kMutators[] = {"append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse",
                                 "update", "setdefault", "popitem"};
template <size_t N>
bool in_list(const char* const (&list)[N], const std::string& name) {
  for (const char* s : list)
    if (name == s) return true;
  return false;
}
bool is_method(const Value& v, const std::string& name) {
  switch (v.kind) {
    case VK::string: return in_list(kStrMethods, name);
    case VK::dict: return in_list(kDictMethods, name);
    case VK::list: return (v.list().kind == LK::list || v.list().kind == LK::tuple) && in_list(kListMethods, name);
    case VK::loop: return name == "cycle";
    default: return false;
  }
}

struct JsonOpts {
  bool indent = false;
  std::string indent_str;
  std::string item_sep = ", ", key_sep = ": ";
  bool sort_keys = false, ensure_ascii = false;
};

class Renderer {
 public:
  Renderer(const ChatTemplateLimits& lim, Frame& globals) : lim_(lim), globals_(globals) {}

  std::string render(const Body& body) {
    Frame root{&globals_, {}};
    root_ = &root;
    exec_body(body, root);
    return std::move(out_);
  }

 private:
  const ChatTemplateLimits& lim_;
  Frame& globals_;
  Frame* root_ = nullptr;
  std::string out_;
  int64_t steps_ = 0, iterations_ = 0;
  size_t work_ = 0;
  int line_ = 0;
  int depth_ = 0;
  const Value* block_input_ = nullptr;  // the captured text a {% set x | filter %} block filters

  // --- bounds

  struct Enter {
    Renderer& r;
    Enter(Renderer& renderer, int line) : r(renderer) {
      r.line_ = line;
      if (++r.depth_ > r.lim_.max_render_depth)
        fail_line(line, "rendering recurses deeper than ", r.lim_.max_render_depth, " levels (max_render_depth)");
      if (++r.steps_ > r.lim_.max_steps) fail_line(line, "rendering takes more than ", r.lim_.max_steps, " steps (max_steps)");
    }
    ~Enter() { --r.depth_; }
  };
  void step() {
    if (++steps_ > lim_.max_steps) fail_line(line_, "rendering takes more than ", lim_.max_steps, " steps (max_steps)");
  }
  void iteration() {
    if (++iterations_ > lim_.max_loop_iterations)
      fail_line(line_, "loops run more than ", lim_.max_loop_iterations, " iterations (max_loop_iterations)");
  }
  // A string or list of `bytes` is about to be built.
  void need(size_t bytes) {
    if (bytes > lim_.max_output_bytes)
      fail_line(line_, "a value of ", bytes, " bytes exceeds max_output_bytes (", lim_.max_output_bytes, ")");
    work_ += bytes;
    if (work_ > lim_.max_work_bytes) fail_line(line_, "rendering builds more than ", lim_.max_work_bytes, " bytes (max_work_bytes)");
  }
  void append(std::string& out, std::string_view s) {
    if (out.size() + s.size() > lim_.max_output_bytes)
      fail_line(line_, "the text exceeds max_output_bytes (", lim_.max_output_bytes, ")");
    out += s;
  }
  size_t mul_size(size_t a, int64_t n) {
    if (n <= 0) return 0;
    size_t r;
    if (__builtin_mul_overflow(a, static_cast<size_t>(n), &r) || r > lim_.max_output_bytes)
      fail_line(line_, "a value of more than max_output_bytes (", lim_.max_output_bytes, ") bytes");
    return r;
  }
  [[noreturn]] void fail_undefined(const Value& v) {
    const StrPtr* name = std::get_if<StrPtr>(&v.p);
    fail_line(line_, "'", name && *name && !(*name)->empty() ? **name : std::string("value"), "' is undefined");
  }
  [[noreturn]] void fail_type(const char* what, const Value& v) {
    if (v.kind == VK::undefined) fail_undefined(v);
    fail_line(line_, what, " (got ", type_name(v), ")");
  }

  // --- value construction

  Value str_value(std::string s) {
    need(s.size());
    return v_str(std::move(s));
  }
  Value list_value(std::vector<Value> items, LK kind = LK::list) {
    auto l = std::make_shared<ListData>();
    l->items = std::move(items);
    l->kind = kind;
    return finish_list(std::move(l));
  }
  Value finish_list(std::shared_ptr<ListData> l) {
    need(l->items.size() * sizeof(Value));
    for (const Value& v : l->items) {
      l->depth = std::max(l->depth, value_depth(v) + 1);
      l->has_ns = l->has_ns || holds_ns(v);
    }
    if (l->depth > lim_.max_depth) fail_line(line_, "values nested deeper than ", lim_.max_depth, " levels (max_depth)");
    Value v;
    v.kind = VK::list;
    v.p = std::shared_ptr<const ListData>(std::move(l));
    return v;
  }
  Value range_value(int64_t start, int64_t stop, int64_t step, int64_t n) {
    auto l = std::make_shared<ListData>();
    l->kind = LK::range;
    l->range_start = start;
    l->range_stop = stop;
    l->range_step = step;
    for (int64_t k = 0; k < n; ++k) l->items.push_back(v_int(start + k * step));
    return finish_list(std::move(l));
  }
  // What a lazy jinja filter returns: `make` builds the items now; an error doing so is kept and
  // thrown when (if ever) the iterator is iterated.
  template <class F>
  Value lazy_value(F&& make) {
    auto l = std::make_shared<ListData>();
    l->kind = LK::iterator;
    try {
      l->items = make();
    } catch (const ChatTemplateRaised&) {
      throw;
    } catch (const Error& e) {
      l->items.clear();
      l->deferred_error = e.what();
    }
    return finish_list(std::move(l));
  }
  void check_hashable(const Value& k) {
    if ((k.kind == VK::list && k.list().kind != LK::tuple && k.list().kind != LK::range && k.list().kind != LK::iterator) ||
        k.kind == VK::dict || k.kind == VK::ns || k.kind == VK::undefined)
      fail_line(line_, "unhashable dict key (", type_name(k), ")");
  }
  // Python's dict(pairs): a later duplicate key replaces the value, keeps the position.
  Value dict_value(std::vector<std::pair<Value, Value>> pairs) {
    need(pairs.size() * 2 * sizeof(Value));
    auto d = std::make_shared<DictData>();
    for (auto& kv : pairs) {
      check_hashable(kv.first);
      d->depth = std::max({d->depth, value_depth(kv.first) + 1, value_depth(kv.second) + 1});
      d->has_ns = d->has_ns || holds_ns(kv.first) || holds_ns(kv.second);
      bool replaced = false;
      for (auto& existing : d->items)
        if (equal(existing.first, kv.first)) {
          existing.second = std::move(kv.second);
          replaced = true;
          break;
        }
      if (!replaced) d->items.push_back(std::move(kv));
    }
    if (d->depth > lim_.max_depth) fail_line(line_, "values nested deeper than ", lim_.max_depth, " levels (max_depth)");
    Value v;
    v.kind = VK::dict;
    v.p = std::shared_ptr<const DictData>(std::move(d));
    return v;
  }
  Value ns_value(std::vector<std::pair<std::string, Value>> attrs) {
    auto ns = std::make_shared<NsData>();
    for (auto& kv : attrs) {
      set_ns_attr(*ns, kv.first, std::move(kv.second));
    }
    Value v;
    v.kind = VK::ns;
    v.p = std::move(ns);
    return v;
  }
  void set_ns_attr(NsData& ns, const std::string& name, Value v) {
    if (holds_ns(v)) fail_line(line_, "a namespace cannot hold a namespace (or a list or dict holding one)");
    if (value_depth(v) + 1 > lim_.max_depth) fail_line(line_, "values nested deeper than ", lim_.max_depth, " levels (max_depth)");
    ns.depth = std::max(ns.depth, value_depth(v) + 1);
    for (auto& kv : ns.attrs)
      if (kv.first == name) {
        kv.second = std::move(v);
        return;
      }
    need(sizeof(Value) + name.size());
    ns.attrs.emplace_back(name, std::move(v));
  }
  Value method_value(const Value& self, const std::string& name) {
    auto m = std::make_shared<MethodData>();
    m->self = self;
    m->name = name;
    Value v;
    v.kind = VK::method;
    v.p = std::shared_ptr<const MethodData>(std::move(m));
    return v;
  }

  // --- Python semantics of values

  bool equal(const Value& a, const Value& b) {
    step();
    if (a.is_num() && b.is_num()) {
      if (a.is_int() && b.is_int()) return a.i == b.i;
      return a.as_double() == b.as_double();
    }
    if (a.kind != b.kind) return false;
    switch (a.kind) {
      case VK::undefined: case VK::none: return true;
      case VK::string: return a.str() == b.str();
      case VK::list: {
        const ListData& x = a.list();
        const ListData& y = b.list();
        if (&x == &y) return true;
        if (x.kind != y.kind || x.kind == LK::iterator || x.items.size() != y.items.size()) return false;
        for (size_t k = 0; k < x.items.size(); ++k)
          if (!equal(x.items[k], y.items[k])) return false;
        return true;
      }
      case VK::dict: {
        const DictData& x = a.dict();
        const DictData& y = b.dict();
        if (&x == &y) return true;
        if (x.items.size() != y.items.size()) return false;
        for (const auto& kv : x.items) {
          const Value* other = dict_find(y, kv.first);
          if (!other || !equal(kv.second, *other)) return false;
        }
        return true;
      }
      case VK::ns: return &a.ns() == &b.ns();
      case VK::loop: return &a.loop() == &b.loop();
      case VK::method: return &a.method() == &b.method();
      case VK::function: return a.fn == b.fn;
      case VK::macro: return a.macro == b.macro;
      default: return false;
    }
  }
  const Value* dict_find(const DictData& d, const Value& key) {
    for (const auto& kv : d.items)
      if (equal(kv.first, key)) return &kv.second;
    return nullptr;
  }
  const Value* dict_find(const DictData& d, const std::string& key) {
    for (const auto& kv : d.items)
      if (kv.first.kind == VK::string && kv.first.str() == key) return &kv.second;
    return nullptr;
  }
  // Three-way order of two values Python can order (numbers, strings, lists of such).
  int order(const Value& a, const Value& b, const char* op) {
    step();
    if (a.is_num() && b.is_num()) {
      if (a.is_int() && b.is_int()) return a.i < b.i ? -1 : a.i > b.i;
      const double x = a.as_double(), y = b.as_double();
      return x < y ? -1 : x > y;
    }
    if (a.kind == VK::string && b.kind == VK::string) {
      const int c = a.str().compare(b.str());  // UTF-8 byte order is code point order
      return c < 0 ? -1 : c > 0;
    }
    if (a.kind == VK::list && b.kind == VK::list && a.list().kind == b.list().kind &&
        (a.list().kind == LK::list || a.list().kind == LK::tuple)) {
      const auto& x = a.list().items;
      const auto& y = b.list().items;
      for (size_t k = 0; k < x.size() && k < y.size(); ++k)
        if (!equal(x[k], y[k])) return order(x[k], y[k], op);
      return x.size() < y.size() ? -1 : x.size() > y.size();
    }
    if (a.kind == VK::undefined) fail_undefined(a);
    if (b.kind == VK::undefined) fail_undefined(b);
    fail_line(line_, "'", op, "' is not supported between ", type_name(a), " and ", type_name(b));
  }
  bool compare(CmpOp op, const Value& a, const Value& b) {
    switch (op) {
      case CmpOp::eq: return equal(a, b);
      case CmpOp::ne: return !equal(a, b);
      case CmpOp::in: return contains(b, a);
      case CmpOp::notin: return !contains(b, a);
      default: break;
    }
    if (a.is_num() && b.is_num() && (a.kind == VK::floating || b.kind == VK::floating)) {  // NaN compares false
      const double x = a.as_double(), y = b.as_double();
      return op == CmpOp::lt ? x < y : op == CmpOp::le ? x <= y : op == CmpOp::gt ? x > y : x >= y;
    }
    const char* sym = op == CmpOp::lt ? "<" : op == CmpOp::le ? "<=" : op == CmpOp::gt ? ">" : ">=";
    const int c = order(a, b, sym);
    return op == CmpOp::lt ? c < 0 : op == CmpOp::le ? c <= 0 : op == CmpOp::gt ? c > 0 : c >= 0;
  }
  bool contains(const Value& container, const Value& item) {
    switch (container.kind) {
      case VK::undefined: return false;
      case VK::string:
        if (item.kind != VK::string) fail_type("'in <string>' needs a string on the left", item);
        return container.str().find(item.str()) != std::string::npos;
      case VK::list:
        for (const Value& v : container.list().items)
          if (equal(v, item)) return true;
        return false;
      case VK::dict:
        check_hashable(item);
        return dict_find(container.dict(), item) != nullptr;
      default: fail_line(line_, "'in' needs a string, list or dict on the right (got ", type_name(container), ")");
    }
  }

  // str(v) appended to out (undefined is '')
  void str_into(const Value& v, std::string& out) {
    switch (v.kind) {
      case VK::undefined: return;
      case VK::string: append(out, v.str()); return;
      case VK::none: append(out, "None"); return;
      case VK::boolean: append(out, v.i ? "True" : "False"); return;
      case VK::integer: append(out, std::to_string(v.i)); return;
      case VK::floating: append(out, py_float_repr(v.f)); return;
      default: repr_into(v, out);
    }
  }
  StrPtr to_str(const Value& v) {
    if (v.kind == VK::string) return std::get<StrPtr>(v.p);
    std::string s;
    str_into(v, s);
    need(s.size());
    return std::make_shared<const std::string>(std::move(s));
  }
  void repr_str(std::string_view s, std::string& out) {
    const bool dq = s.find('\'') != std::string_view::npos && s.find('"') == std::string_view::npos;
    const char q = dq ? '"' : '\'';
    std::string r(1, q);
    for (size_t i = 0, n; i < s.size(); i += n) {
      const char32_t c = utf8_next(s, i, &n);
      char buf[16];
      if (c == static_cast<char32_t>(q) || c == '\\') {
        r += '\\';
        r += static_cast<char>(c);
      } else if (c == '\t') {
        r += "\\t";
      } else if (c == '\n') {
        r += "\\n";
      } else if (c == '\r') {
        r += "\\r";
      } else if (cp_printable(c)) {
        r.append(s.substr(i, n));
      } else {
        if (c >= 0xDC80 && c <= 0xDCFF) {
          std::snprintf(buf, sizeof buf, "\\udc%02x", static_cast<unsigned>(c - 0xDC00));
        } else if (c < 0x100) {
          std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned>(c));
        } else if (c < 0x10000) {
          std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(c));
        } else {
          std::snprintf(buf, sizeof buf, "\\U%08x", static_cast<unsigned>(c));
        }
        r += buf;
      }
    }
    r += q;
    append(out, r);
  }
  void repr_into(const Value& v, std::string& out) {
    step();
    switch (v.kind) {
      case VK::undefined: append(out, "Undefined"); return;
      case VK::string: repr_str(v.str(), out); return;
      case VK::list: {
        const ListData& l = v.list();
        const bool tuple = l.kind == LK::tuple;
        switch (l.kind) {
          case LK::iterator: fail_line(line_, "cannot render a generator as text (add '| list')");
          case LK::range:
            append(out, "range(" + std::to_string(l.range_start) + ", " + std::to_string(l.range_stop) +
                            (l.range_step != 1 ? ", " + std::to_string(l.range_step) : "") + ")");
            return;
          case LK::dict_items: append(out, "dict_items("); break;
          case LK::dict_keys: append(out, "dict_keys("); break;
          case LK::dict_values: append(out, "dict_values("); break;
          default: break;
        }
        append(out, tuple ? "(" : "[");
        for (size_t k = 0; k < l.items.size(); ++k) {
          if (k) append(out, ", ");
          repr_into(l.items[k], out);
        }
        if (tuple && l.items.size() == 1) append(out, ",");
        append(out, tuple ? ")" : "]");
        if (l.kind != LK::list && l.kind != LK::tuple) append(out, ")");
        return;
      }
      case VK::dict: {
        append(out, "{");
        bool first = true;
        for (const auto& kv : v.dict().items) {
          if (!first) append(out, ", ");
          first = false;
          repr_into(kv.first, out);
          append(out, ": ");
          repr_into(kv.second, out);
        }
        append(out, "}");
        return;
      }
      case VK::ns: {
        append(out, "<Namespace {");
        bool first = true;
        for (const auto& kv : v.ns().attrs) {
          if (!first) append(out, ", ");
          first = false;
          repr_str(kv.first, out);
          append(out, ": ");
          repr_into(kv.second, out);
        }
        append(out, "}>");
        return;
      }
      case VK::loop: case VK::function: case VK::method: case VK::macro:
        fail_line(line_, "cannot render a ", type_name(v), " as text");
      default: str_into(v, out);
    }
  }

  // json.dumps as HF's tojson filter calls it
  void json_str(std::string_view s, std::string& out, bool ensure_ascii) {
    std::string r = "\"";
    for (size_t i = 0, n; i < s.size(); i += n) {
      const char32_t c = utf8_next(s, i, &n);
      char buf[16];
      switch (c) {
        case '"': r += "\\\""; continue;
        case '\\': r += "\\\\"; continue;
        case '\n': r += "\\n"; continue;
        case '\r': r += "\\r"; continue;
        case '\t': r += "\\t"; continue;
        case '\b': r += "\\b"; continue;
        case '\f': r += "\\f"; continue;
        default: break;
      }
      if (c < 0x20 || (ensure_ascii && c >= 0x7F)) {
        if (c >= 0x10000 && !(c >= 0xDC80 && c <= 0xDCFF)) {
          const char32_t u = c - 0x10000;
          std::snprintf(buf, sizeof buf, "\\u%04x\\u%04x", static_cast<unsigned>(0xD800 + (u >> 10)),
                        static_cast<unsigned>(0xDC00 + (u & 0x3FF)));
        } else {
          std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(c));
        }
        r += buf;
      } else {
        r.append(s.substr(i, n));
      }
    }
    r += '"';
    append(out, r);
  }
  std::string json_key(const Value& k) {
    switch (k.kind) {
      case VK::string: return k.str();
      case VK::integer: return std::to_string(k.i);
      case VK::boolean: return k.i ? "true" : "false";
      case VK::none: return "null";
      case VK::floating:
        return std::isnan(k.f) ? "NaN" : std::isinf(k.f) ? (k.f < 0 ? "-Infinity" : "Infinity") : py_float_repr(k.f);
      default: fail_line(line_, "tojson: dict keys must be str, int, float, bool or None (got ", type_name(k), ")");
    }
  }
  void json_newline(std::string& out, const JsonOpts& o, int level) {
    append(out, "\n");
    for (int k = 0; k < level; ++k) append(out, o.indent_str);
  }
  void json_into(const Value& v, std::string& out, const JsonOpts& o, int level) {
    step();
    switch (v.kind) {
      case VK::none: append(out, "null"); return;
      case VK::boolean: append(out, v.i ? "true" : "false"); return;
      case VK::integer: append(out, std::to_string(v.i)); return;
      case VK::floating:
        append(out, std::isnan(v.f) ? "NaN" : std::isinf(v.f) ? (v.f < 0 ? "-Infinity" : "Infinity") : py_float_repr(v.f));
        return;
      case VK::string: json_str(v.str(), out, o.ensure_ascii); return;
      case VK::list: {
        if (v.list().kind != LK::list && v.list().kind != LK::tuple) break;
        const auto& items = v.list().items;
        if (items.empty()) return append(out, "[]");
        append(out, "[");
        for (size_t k = 0; k < items.size(); ++k) {
          if (k) append(out, o.item_sep);
          if (o.indent) json_newline(out, o, level + 1);
          json_into(items[k], out, o, level + 1);
        }
        if (o.indent) json_newline(out, o, level);
        append(out, "]");
        return;
      }
      case VK::dict: {
        std::vector<const std::pair<Value, Value>*> items;
        for (const auto& kv : v.dict().items) items.push_back(&kv);
        if (items.empty()) return append(out, "{}");
        if (o.sort_keys) {
          std::stable_sort(items.begin(), items.end(), [&](auto* a, auto* b) { return order(a->first, b->first, "<") < 0; });
        }
        append(out, "{");
        for (size_t k = 0; k < items.size(); ++k) {
          if (k) append(out, o.item_sep);
          if (o.indent) json_newline(out, o, level + 1);
          json_str(json_key(items[k]->first), out, o.ensure_ascii);
          append(out, o.key_sep);
          json_into(items[k]->second, out, o, level + 1);
        }
        if (o.indent) json_newline(out, o, level);
        append(out, "}");
        return;
      }
      default: break;
    }
    fail_line(line_, "tojson: a ", type_name(v), " is not JSON serializable");
  }

  // The items a for loop (or list(), join, map...) walks: a list's items, a dict's keys, a string's
  // characters; undefined is empty.
  std::shared_ptr<const ListData> iterate(const Value& v) {
    switch (v.kind) {
      case VK::list:
        if (!v.list().deferred_error.empty()) throw Error(v.list().deferred_error);
        return std::get<std::shared_ptr<const ListData>>(v.p);
      case VK::undefined: return std::make_shared<const ListData>();
      case VK::dict: {
        std::vector<Value> keys;
        for (const auto& kv : v.dict().items) keys.push_back(kv.first);
        return std::get<std::shared_ptr<const ListData>>(list_value(std::move(keys)).p);
      }
      case VK::string: {
        const CpView cps(v.str());
        need(static_cast<size_t>(cps.size()) * (sizeof(Value) + 32));
        std::vector<Value> chars;
        chars.reserve(cps.size());
        for (int64_t k = 0; k < cps.size(); ++k) chars.push_back(v_str(std::string(cps.at(k))));
        return std::get<std::shared_ptr<const ListData>>(list_value(std::move(chars)).p);
      }
      default: fail_type("the value is not iterable", v);
    }
  }

  // --- attributes, items, slices

  Value loop_attr(const Value& loop, const std::string& name) {
    const LoopData& l = loop.loop();
    if (name == "index") return v_int(l.index0 + 1);
    if (name == "index0") return v_int(l.index0);
    if (name == "revindex") return v_int(l.length - l.index0);
    if (name == "revindex0") return v_int(l.length - l.index0 - 1);
    if (name == "first") return v_bool(l.index0 == 0);
    if (name == "last") return v_bool(l.index0 == l.length - 1);
    if (name == "length") return v_int(l.length);
    if (name == "depth") return v_int(1);
    if (name == "depth0") return v_int(0);
    if (name == "previtem") return l.index0 > 0 ? l.items->items[l.index0 - 1] : v_undefined("loop.previtem");
    if (name == "nextitem") return l.index0 + 1 < l.length ? l.items->items[l.index0 + 1] : v_undefined("loop.nextitem");
    if (name == "cycle") return method_value(loop, name);
    return v_undefined("loop." + name);
  }
  Value get_attr(const Value& obj, const std::string& name) {
    switch (obj.kind) {
      case VK::undefined: fail_undefined(obj);
      case VK::dict: {
        if (is_method(obj, name)) return method_value(obj, name);
        const Value* v = dict_find(obj.dict(), name);
        return v ? *v : v_undefined(name);
      }
      case VK::string: case VK::list: return is_method(obj, name) ? method_value(obj, name) : v_undefined(name);
      case VK::ns:
        for (const auto& kv : obj.ns().attrs)
          if (kv.first == name) return kv.second;
        return v_undefined(name);
      case VK::loop: return loop_attr(obj, name);
      default: return v_undefined(name);
    }
  }
  Value get_item(const Value& obj, const Value& key) {
    switch (obj.kind) {
      case VK::undefined: fail_undefined(obj);
      case VK::dict: {
        if (key.kind == VK::list && key.list().kind != LK::tuple) return v_undefined("item");  // unhashable: TypeError
        const Value* v = dict_find(obj.dict(), key);
        if (v) return *v;
        if (key.kind == VK::string && is_method(obj, key.str())) return method_value(obj, key.str());
        return v_undefined(key.kind == VK::string ? key.str() : "item");
      }
      case VK::list: {
        if (!key.is_int() || !obj.list().indexable()) {
          if (key.kind != VK::string) return v_undefined("item");
          return is_method(obj, key.str()) ? method_value(obj, key.str()) : v_undefined(key.str());
        }
        const auto& items = obj.list().items;
        const int64_t n = static_cast<int64_t>(items.size());
        const int64_t k = key.i < 0 ? key.i + n : key.i;
        return k >= 0 && k < n ? items[k] : v_undefined("item");
      }
      case VK::string: {
        if (!key.is_int()) return key.kind == VK::string ? get_attr(obj, key.str()) : v_undefined("item");
        const CpView cps(obj.str());
        const int64_t k = key.i < 0 ? key.i + cps.size() : key.i;
        return k >= 0 && k < cps.size() ? str_value(std::string(cps.at(k))) : v_undefined("item");
      }
      case VK::ns: case VK::loop:
        return key.kind == VK::string ? get_attr(obj, key.str()) : v_undefined("item");
      default: return v_undefined("item");
    }
  }
  // Python's slice.indices(): the positions a[start:stop:step] takes.
  void slice_positions(int64_t len, const Value& start_v, const Value& stop_v, const Value& step_v, int64_t* start,
                       int64_t* step, int64_t* count, int64_t* stop_out = nullptr) {
    auto as_index = [&](const Value& v, const char* what) -> std::optional<int64_t> {
      if (v.kind == VK::none || v.kind == VK::undefined) return std::nullopt;
      if (!v.is_int()) fail_line(line_, "slice ", what, " must be an integer (got ", type_name(v), ")");
      return v.i;
    };
    const auto st = as_index(step_v, "step");
    *step = st.value_or(1);
    if (*step == 0) fail_line(line_, "slice step cannot be zero");
    if (*step == INT64_MIN) *step = -INT64_MAX;
    const int64_t lower = *step > 0 ? 0 : -1, upper = *step > 0 ? len : len - 1;
    auto clamp = [&](std::optional<int64_t> v, int64_t dflt) {
      if (!v) return dflt;
      int64_t x = *v;
      if (x < 0) {
        x = x < -len ? lower : x + len;
        return std::max(x, lower);
      }
      return std::min(x, upper);
    };
    *start = clamp(as_index(start_v, "start"), *step > 0 ? lower : upper);
    const int64_t stop = clamp(as_index(stop_v, "stop"), *step > 0 ? upper : lower);
    if (stop_out) *stop_out = stop;
    if (*step > 0) {
      *count = stop > *start ? (stop - *start - 1) / *step + 1 : 0;
    } else {
      *count = *start > stop ? (*start - stop - 1) / (-*step) + 1 : 0;
    }
  }
  Value slice(const Value& obj, const Value& a, const Value& b, const Value& c) {
    if (obj.kind == VK::undefined) fail_undefined(obj);
    int64_t start, step, count, stop;
    if (obj.kind == VK::list && obj.list().indexable()) {
      const ListData& l = obj.list();
      slice_positions(static_cast<int64_t>(l.items.size()), a, b, c, &start, &step, &count, &stop);
      std::vector<Value> out;
      out.reserve(count);
      for (int64_t k = 0; k < count; ++k) out.push_back(l.items[start + k * step]);
      if (l.kind != LK::range) return list_value(std::move(out), l.kind);
      // a range's slice is a range
      return range_value(l.range_start + start * l.range_step, l.range_start + stop * l.range_step, l.range_step * step, count);
    }
    if (obj.kind == VK::string) {
      const CpView cps(obj.str());
      slice_positions(cps.size(), a, b, c, &start, &step, &count);
      std::string out;
      if (step == 1 && count > 0) {
        out = std::string(cps.ascii ? obj.str().substr(start, count)
                                    : obj.str().substr(cps.off[start], cps.off[start + count] - cps.off[start]));
      } else {
        for (int64_t k = 0; k < count; ++k) out += cps.at(start + k * step);
      }
      return str_value(std::move(out));
    }
    fail_line(line_, "a ", type_name(obj), " cannot be sliced");  // jinja slices bypass getitem: TypeError
  }

  // --- arithmetic

  [[noreturn]] void fail_overflow() { fail_line(line_, "integer overflow (Python's big integers are not supported)"); }
  Value arith(BinOp op, const Value& a, const Value& b) {
    if (op == BinOp::mod && a.kind == VK::string) fail_line(line_, "string formatting with '%' is not supported");
    if (a.kind == VK::undefined) fail_undefined(a);
    if (b.kind == VK::undefined) fail_undefined(b);
    static const char* const kSym[] = {"+", "-", "*", "/", "//", "%", "**"};
    if (a.is_num() && b.is_num()) return arith_num(op, a, b);
    if (op == BinOp::add && a.kind == VK::string && b.kind == VK::string) {
      need(a.str().size() + b.str().size());
      std::string s;
      s.reserve(a.str().size() + b.str().size());
      s += a.str();
      s += b.str();
      return v_str(std::move(s));
    }
    if (op == BinOp::add && a.kind == VK::list && b.kind == VK::list && a.list().kind == b.list().kind &&
        (a.list().kind == LK::list || a.list().kind == LK::tuple)) {
      std::vector<Value> items = a.list().items;
      items.insert(items.end(), b.list().items.begin(), b.list().items.end());
      return list_value(std::move(items), a.list().kind);
    }
    if (op == BinOp::mul && (a.is_int() || b.is_int())) {
      const Value& seq = a.is_int() ? b : a;
      const int64_t n = a.is_int() ? a.i : b.i;
      if (seq.kind == VK::string) {
        const size_t size = mul_size(seq.str().size(), n);
        need(size);
        std::string s;
        s.reserve(size);
        for (int64_t k = 0; k < n && size; ++k) s += seq.str();
        return v_str(std::move(s));
      }
      if (seq.kind == VK::list && (seq.list().kind == LK::list || seq.list().kind == LK::tuple)) {
        mul_size(seq.list().items.size() * sizeof(Value), n);
        std::vector<Value> items;
        for (int64_t k = 0; k < n; ++k) items.insert(items.end(), seq.list().items.begin(), seq.list().items.end());
        return list_value(std::move(items), seq.list().kind);
      }
    }
    fail_line(line_, "unsupported operand types for ", kSym[static_cast<int>(op)], ": ", type_name(a), " and ", type_name(b));
  }
  Value arith_num(BinOp op, const Value& a, const Value& b) {
    if (a.is_int() && b.is_int() && op != BinOp::div) {
      const int64_t x = a.i, y = b.i;
      int64_t r;
      switch (op) {
        case BinOp::add: if (__builtin_add_overflow(x, y, &r)) fail_overflow(); return v_int(r);
        case BinOp::sub: if (__builtin_sub_overflow(x, y, &r)) fail_overflow(); return v_int(r);
        case BinOp::mul: if (__builtin_mul_overflow(x, y, &r)) fail_overflow(); return v_int(r);
        case BinOp::floordiv: case BinOp::mod: {
          if (y == 0) fail_line(line_, "integer division or modulo by zero");
          if (x == INT64_MIN && y == -1) {
            if (op == BinOp::mod) return v_int(0);
            fail_overflow();
          }
          int64_t q = x / y, m = x % y;
          if (m != 0 && ((m < 0) != (y < 0))) {
            m += y;
            --q;
          }
          return v_int(op == BinOp::floordiv ? q : m);
        }
        case BinOp::pow: {
          if (y < 0) return arith_float(op, static_cast<double>(x), static_cast<double>(y));
          int64_t result = 1, base = x, e = y;
          while (e > 0) {
            if (e & 1)
              if (__builtin_mul_overflow(result, base, &result)) fail_overflow();
            e >>= 1;
            if (e > 0 && __builtin_mul_overflow(base, base, &base)) fail_overflow();
          }
          return v_int(result);
        }
        default: break;
      }
    }
    return arith_float(op, a.as_double(), b.as_double());
  }
  Value arith_float(BinOp op, double x, double y) {
    switch (op) {
      case BinOp::add: return v_float(x + y);
      case BinOp::sub: return v_float(x - y);
      case BinOp::mul: return v_float(x * y);
      case BinOp::div:
        if (y == 0) fail_line(line_, "division by zero");
        return v_float(x / y);
      case BinOp::floordiv: case BinOp::mod: {  // Python's float_divmod
        if (y == 0) fail_line(line_, "float division or modulo by zero");
        double mod = std::fmod(x, y);
        double div = (x - mod) / y;
        if (mod != 0) {
          if ((y < 0) != (mod < 0)) {
            mod += y;
            div -= 1.0;
          }
        } else {
          mod = std::copysign(0.0, y);
        }
        double floordiv;
        if (div != 0) {
          floordiv = std::floor(div);
          if (div - floordiv > 0.5) floordiv += 1.0;
        } else {
          floordiv = std::copysign(0.0, x / y);
        }
        return v_float(op == BinOp::mod ? mod : floordiv);
      }
      case BinOp::pow: {
        if (x == 0 && y < 0) fail_line(line_, "0.0 cannot be raised to a negative power");
        if (x < 0 && std::floor(y) != y) fail_line(line_, "a negative number to a fractional power is complex");
        const double r = std::pow(x, y);
        if (std::isinf(r) && std::isfinite(x) && std::isfinite(y)) fail_line(line_, "float overflow in '**'");
        return v_float(r);
      }
    }
    return v_none();
  }

  // --- calls

  // Binds call arguments to `params` (positional, then by keyword); null where not given.
  std::vector<const Value*> bind(const Args& a, std::initializer_list<const char*> params, const std::string& what,
                                 size_t required) {
    if (a.pos.size() > params.size())
      fail_line(line_, what, " takes at most ", params.size(), " argument(s) (", a.pos.size(), " given)");
    std::vector<const Value*> out(params.size(), nullptr);
    for (size_t k = 0; k < a.pos.size(); ++k) out[k] = &a.pos[k];
    for (const auto& kw : a.kw) {
      size_t k = 0;
      for (const char* p : params) {
        if (kw.first == p) break;
        ++k;
      }
      if (k == params.size()) fail_line(line_, what, " has no argument '", kw.first, "'");
      if (out[k]) fail_line(line_, what, " got argument '", kw.first, "' twice");
      out[k] = &kw.second;
    }
    for (size_t k = 0; k < required; ++k)
      if (!out[k]) fail_line(line_, what, " needs argument '", *(params.begin() + k), "'");
    return out;
  }
  int64_t int_arg(const Value* v, int64_t dflt, const char* what) {
    if (!v || v->kind == VK::none) return dflt;
    if (!v->is_int()) fail_type((std::string(what) + " must be an integer").c_str(), *v);
    return v->i;
  }
  StrPtr str_arg(const Value* v, const char* what) {
    if (!v) return std::make_shared<const std::string>();
    if (v->kind != VK::string) fail_type((std::string(what) + " must be a string").c_str(), *v);
    return std::get<StrPtr>(v->p);
  }

  Value call_builtin(Builtin fn, const Args& a) {
    switch (fn) {
      case Builtin::range: {
        if (!a.kw.empty()) fail_line(line_, "range() takes no keyword arguments");
        if (a.pos.empty() || a.pos.size() > 3) fail_line(line_, "range() takes 1 to 3 arguments");
        for (const Value& v : a.pos)
          if (!v.is_int()) fail_type("range() arguments must be integers", v);
        const int64_t start = a.pos.size() == 1 ? 0 : a.pos[0].i;
        const int64_t stop = a.pos.size() == 1 ? a.pos[0].i : a.pos[1].i;
        const int64_t step = a.pos.size() == 3 ? a.pos[2].i : 1;
        if (step == 0) fail_line(line_, "range() step cannot be zero");
        const double n = step > 0 ? std::ceil((static_cast<double>(stop) - static_cast<double>(start)) / static_cast<double>(step))
                                  : std::ceil((static_cast<double>(start) - static_cast<double>(stop)) / -static_cast<double>(step));
        if (n > kMaxRange) fail_line(line_, "range() of more than ", kMaxRange, " items (jinja2's sandbox limit)");
        return range_value(start, stop, step, static_cast<int64_t>(std::max(0.0, n)));
      }
      case Builtin::namespace_: case Builtin::dict: {
        const char* what = fn == Builtin::dict ? "dict()" : "namespace()";
        std::vector<std::pair<std::string, Value>> attrs;
        if (a.pos.size() > 1) fail_line(line_, what, " takes at most one positional argument");
        if (a.pos.size() == 1) {
          if (a.pos[0].kind != VK::dict) fail_type((std::string(what) + ": the positional argument must be a dict").c_str(), a.pos[0]);
          for (const auto& kv : a.pos[0].dict().items) {
            if (kv.first.kind != VK::string) fail_line(line_, what, ": keys must be strings");
            attrs.emplace_back(kv.first.str(), kv.second);
          }
        }
        for (const auto& kw : a.kw) attrs.push_back(kw);
        if (fn == Builtin::namespace_) return ns_value(std::move(attrs));
        std::vector<std::pair<Value, Value>> pairs;
        for (auto& kv : attrs) pairs.emplace_back(v_str(kv.first), std::move(kv.second));
        return dict_value(std::move(pairs));
      }
      case Builtin::raise_exception: {
        const auto args = bind(a, {"message"}, "raise_exception()", 1);
        throw ChatTemplateRaised(*to_str(*args[0]));
      }
      case Builtin::strftime_now: {
        const auto args = bind(a, {"format"}, "strftime_now()", 1);
        const StrPtr fmt = str_arg(args[0], "strftime_now's format");
        if (fmt->size() > 256) fail_line(line_, "strftime_now: the format is longer than 256 bytes");
        if (fmt->empty()) return v_str(std::string());
        const std::time_t now = std::time(nullptr);
        std::tm tm{};
        localtime_r(&now, &tm);
        char buf[1024];
        const size_t n = std::strftime(buf, sizeof buf, fmt->c_str(), &tm);
        return str_value(std::string(buf, n));
      }
      case Builtin::lipsum: fail_line(line_, "lipsum() is not supported");
      case Builtin::cycler: fail_line(line_, "cycler() is not supported");
      case Builtin::joiner: fail_line(line_, "joiner() is not supported");
    }
    return v_none();
  }

  Value call_macro(const Value& m, const Args& a) {
    const Stmt& def = *m.macro;
    const std::string what = "macro '" + def.text + "'";
    if (a.pos.size() > def.names.size())
      fail_line(line_, what, " takes not more than ", def.names.size(), " argument(s)");
    Frame frame{root_, {}};
    for (const auto& kw : a.kw)
      if (std::find(def.names.begin(), def.names.end(), kw.first) == def.names.end())
        fail_line(line_, what, " takes no keyword argument '", kw.first, "'");
    for (size_t k = 0; k < def.names.size(); ++k) {
      const std::string& param = def.names[k];
      const Value* given = k < a.pos.size() ? &a.pos[k] : nullptr;
      for (const auto& kw : a.kw)
        if (kw.first == param) {
          if (given) fail_line(line_, what, " got argument '", param, "' twice");
          given = &kw.second;
        }
      if (given) {
        frame.set(param, *given);
      } else if (def.exprs[k]) {
        frame.set(param, eval(*def.exprs[k], frame));
      } else {
        frame.set(param, v_undefined(param));
      }
    }
    std::string saved;
    std::swap(saved, out_);
    exec_body(def.bodies[0], frame);
    std::swap(saved, out_);
    need(saved.size());
    return v_str(std::move(saved));
  }

  Value call_value(const Value& fn, const Args& a) {
    switch (fn.kind) {
      case VK::function: return call_builtin(fn.fn, a);
      case VK::macro: return call_macro(fn, a);
      case VK::method: return call_method(fn.method().self, fn.method().name, a);
      case VK::undefined: fail_undefined(fn);
      default: fail_line(line_, "a ", type_name(fn), " is not callable");
    }
  }

  Value eval_call(const Expr& e, Frame& f) {
    const Expr& callee = *e.kids[0];
    Value target;
    if (callee.kind == EK::getattr) {
      target = eval(*callee.kids[0], f);
      line_ = e.line;
      if (is_method(target, callee.name)) return call_method(target, callee.name, eval_args(e, f));
      const bool container = target.kind == VK::string || target.kind == VK::list || target.kind == VK::dict;
      Value attr = get_attr(target, callee.name);
      if (container && attr.kind == VK::undefined) {
        const bool mutating = in_list(kMutators, callee.name);
        fail_line(line_, "method ", type_name(target), ".", callee.name, "() is not supported",
                  mutating ? " (lists and dicts cannot be changed in a chat template)" : "");
      }
      target = std::move(attr);
    } else {
      target = eval(callee, f);
    }
    Args args = eval_args(e, f);
    line_ = e.line;
    return call_value(target, args);
  }
  Args eval_args(const Expr& e, Frame& f, size_t first = 1) {
    Args a;
    for (size_t k = first; k < e.kids.size(); ++k) a.pos.push_back(eval(*e.kids[k], f));
    for (const auto& kw : e.kwargs) a.kw.emplace_back(kw.first, eval(*kw.second, f));
    return a;
  }

  // --- methods of str, dict and loop

  std::vector<Value> py_split(std::string_view s, const Value* sep_v, int64_t maxsplit, bool from_right) {
    std::vector<std::string> parts;
    if (!sep_v || sep_v->kind == VK::none) {  // runs of whitespace, none at either end
      const std::vector<char32_t> cps = utf8_decode(s);
      const int64_t n = static_cast<int64_t>(cps.size());
      std::vector<std::pair<int64_t, int64_t>> words;  // [begin, end) code points
      if (!from_right) {
        int64_t k = 0;
        while (true) {
          while (k < n && is_py_space(cps[k])) ++k;
          if (k >= n) break;
          if (maxsplit >= 0 && static_cast<int64_t>(words.size()) == maxsplit) {
            words.emplace_back(k, n);
            break;
          }
          const int64_t b = k;
          while (k < n && !is_py_space(cps[k])) ++k;
          words.emplace_back(b, k);
        }
      } else {
        int64_t k = n;
        while (true) {
          while (k > 0 && is_py_space(cps[k - 1])) --k;
          if (k <= 0) break;
          if (maxsplit >= 0 && static_cast<int64_t>(words.size()) == maxsplit) {
            words.emplace_back(0, k);
            break;
          }
          const int64_t e = k;
          while (k > 0 && !is_py_space(cps[k - 1])) --k;
          words.emplace_back(k, e);
        }
        std::reverse(words.begin(), words.end());
      }
      for (const auto& w : words) parts.push_back(utf8_encode(cps, w.first, w.second));
    } else {
      const StrPtr sep = str_arg(sep_v, "split's separator");
      if (sep->empty()) fail_line(line_, "split: empty separator");
      if (!from_right) {
        size_t b = 0;
        for (int64_t k = 0; maxsplit < 0 || k < maxsplit; ++k) {
          const size_t at = s.find(*sep, b);
          if (at == std::string_view::npos) break;
          parts.emplace_back(s.substr(b, at - b));
          b = at + sep->size();
        }
        parts.emplace_back(s.substr(b));
      } else {
        size_t e = s.size();
        std::vector<std::string> rev;
        for (int64_t k = 0; maxsplit < 0 || k < maxsplit; ++k) {
          if (e < sep->size()) break;
          const size_t at = s.substr(0, e).rfind(*sep);
          if (at == std::string_view::npos) break;
          rev.emplace_back(s.substr(at + sep->size(), e - at - sep->size()));
          e = at;
        }
        rev.emplace_back(s.substr(0, e));
        parts.assign(rev.rbegin(), rev.rend());
      }
    }
    need(s.size() + parts.size() * sizeof(Value));
    std::vector<Value> out;
    for (auto& p : parts) out.push_back(v_str(std::move(p)));
    return out;
  }
  std::string py_replace(std::string_view s, std::string_view old, std::string_view rep, int64_t count) {
    if (count < 0) count = INT64_MAX;
    std::string out;
    if (old.empty()) {  // before every code point and at the end
      const CpView cps(s);
      const int64_t inserts = std::min<int64_t>(count, cps.size() + 1);
      need(s.size() + mul_size(rep.size(), inserts));
      int64_t k = 0;
      for (; k < cps.size(); ++k) {
        if (k < inserts) out += rep;
        out += cps.at(k);
      }
      if (k < inserts) out += rep;
      return out;
    }
    int64_t hits = 0;
    for (size_t at = s.find(old); at != std::string_view::npos && hits < count; at = s.find(old, at + old.size())) ++hits;
    const size_t size = s.size() - hits * old.size() + mul_size(rep.size(), hits);
    need(size);
    if (size > lim_.max_output_bytes) fail_line(line_, "replace: the result exceeds max_output_bytes");
    out.reserve(size);
    size_t b = 0;
    for (int64_t k = 0; k < hits; ++k) {
      const size_t at = s.find(old, b);
      out.append(s.substr(b, at - b));
      out.append(rep);
      b = at + old.size();
    }
    out.append(s.substr(b));
    return out;
  }
  std::vector<std::string> py_splitlines(std::string_view s, bool keepends) {
    std::vector<std::string> lines;
    size_t b = 0;
    for (size_t i = 0, n; i < s.size(); i += n) {
      const char32_t c = utf8_next(s, i, &n);
      const bool brk = c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || c == 0x1C || c == 0x1D || c == 0x1E ||
                       c == 0x85 || c == 0x2028 || c == 0x2029;
      if (!brk) continue;
      size_t e = i + n;
      if (c == '\r' && e < s.size() && s[e] == '\n') ++e;
      lines.emplace_back(s.substr(b, (keepends ? e : i) - b));
      b = e;
      n = e - i;
    }
    if (b < s.size()) lines.emplace_back(s.substr(b));
    return lines;
  }
  static std::string py_title(std::string_view s) {
    bool prev_cased = false;
    return map_cps(s, [&](char32_t c, size_t) {
      char32_t r = c;
      if (cp_cased(c) && utf8proc_category(static_cast<int32_t>(c)) != UTF8PROC_CATEGORY_LL) {
        if (prev_cased) r = cp_lower(c);
      } else if (cp_cased(c)) {
        if (!prev_cased) r = cp_title(c);
      }
      prev_cased = cp_cased(c);
      return r;
    });
  }
  static std::string py_capitalize(std::string_view s) {
    return map_cps(s, [](char32_t c, size_t k) { return k == 0 ? cp_title(c) : cp_lower(c); });
  }
  // str.islower()/isupper(): some cased character, and none of the other case
  static bool py_is_case(std::string_view s, bool lower) {
    bool cased = false;
    for (size_t i = 0, n; i < s.size(); i += n) {
      const char32_t c = utf8_next(s, i, &n);
      if (!cp_cased(c)) continue;
      const bool is_lower = utf8proc_category(static_cast<int32_t>(c)) == UTF8PROC_CATEGORY_LL;
      if (is_lower != lower) return false;
      cased = true;
    }
    return cased;
  }
  template <class Pred>
  static bool py_all(std::string_view s, Pred&& pred) {
    if (s.empty()) return false;
    for (size_t i = 0, n; i < s.size(); i += n)
      if (!pred(utf8_next(s, i, &n))) return false;
    return true;
  }
  static int cat_of(char32_t c) { return is_real_cp(c) ? utf8proc_category(static_cast<int32_t>(c)) : UTF8PROC_CATEGORY_CN; }
  static bool cp_alpha(char32_t c) {
    const int k = cat_of(c);
    return k >= UTF8PROC_CATEGORY_LU && k <= UTF8PROC_CATEGORY_LO;
  }
  static bool cp_digit(char32_t c) { return cat_of(c) == UTF8PROC_CATEGORY_ND; }

  Value str_method(const Value& self, const std::string& name, const Args& a) {
    const std::string& s = self.str();
    const std::string what = "str." + name + "()";
    if (name == "strip" || name == "lstrip" || name == "rstrip") {
      const auto args = bind(a, {"chars"}, what, 0);
      std::vector<char32_t> chars;
      const bool custom = args[0] && args[0]->kind != VK::none;
      if (custom) chars = utf8_decode(*str_arg(args[0], "strip's chars"));
      return str_value(std::string(py_strip(s, name != "rstrip", name != "lstrip", custom ? &chars : nullptr)));
    }
    if (name == "startswith" || name == "endswith") {
      const auto args = bind(a, {"prefix"}, what, 1);
      auto match = [&](const Value& p) {
        const StrPtr x = str_arg(&p, "startswith/endswith's argument");
        return x->size() <= s.size() &&
               (name == "startswith" ? s.compare(0, x->size(), *x) == 0 : s.compare(s.size() - x->size(), x->size(), *x) == 0);
      };
      if (args[0]->kind == VK::list && args[0]->list().kind == LK::tuple) {
        for (const Value& p : args[0]->list().items)
          if (match(p)) return v_bool(true);
        return v_bool(false);
      }
      return v_bool(match(*args[0]));
    }
    if (name == "split" || name == "rsplit") {
      const auto args = bind(a, {"sep", "maxsplit"}, what, 0);
      return list_value(py_split(s, args[0], int_arg(args[1], -1, "maxsplit"), name == "rsplit"));
    }
    if (name == "upper" || name == "lower" || name == "title" || name == "capitalize") {
      bind(a, {}, what, 0);
      need(s.size() * 2);
      if (name == "upper") return v_str(map_cps(s, [](char32_t c, size_t) { return cp_upper(c); }));
      if (name == "lower") return v_str(map_cps(s, [](char32_t c, size_t) { return cp_lower(c); }));
      return v_str(name == "title" ? py_title(s) : py_capitalize(s));
    }
    if (name == "replace") {
      const auto args = bind(a, {"old", "new", "count"}, what, 2);
      return v_str(py_replace(s, *str_arg(args[0], "replace's old"), *str_arg(args[1], "replace's new"),
                              int_arg(args[2], -1, "replace's count")));
    }
    if (name == "find" || name == "count") {
      const auto args = bind(a, {"sub"}, what, 1);
      const StrPtr sub = str_arg(args[0], "the substring");
      if (name == "find") {
        const size_t at = s.find(*sub);
        return v_int(at == std::string::npos ? -1 : CpView(std::string_view(s).substr(0, at)).size());
      }
      if (sub->empty()) return v_int(CpView(s).size() + 1);
      int64_t n = 0;
      for (size_t at = s.find(*sub); at != std::string::npos; at = s.find(*sub, at + sub->size())) ++n;
      return v_int(n);
    }
    if (name == "join") {
      const auto args = bind(a, {"iterable"}, what, 1);
      const auto items = iterate(*args[0]);
      std::string out;
      for (size_t k = 0; k < items->items.size(); ++k) {
        step();
        if (k) append(out, s);
        const Value& item = items->items[k];
        if (item.kind != VK::string) fail_type("str.join() needs strings", item);
        append(out, item.str());
      }
      return str_value(std::move(out));
    }
    if (name == "splitlines") {
      const auto args = bind(a, {"keepends"}, what, 0);
      need(s.size());
      std::vector<Value> out;
      for (auto& l : py_splitlines(s, args[0] && truthy(*args[0]))) out.push_back(v_str(std::move(l)));
      return list_value(std::move(out));
    }
    bind(a, {}, what, 0);
    if (name == "isspace") return v_bool(py_all(s, is_py_space));
    if (name == "isdigit") return v_bool(py_all(s, cp_digit));
    if (name == "isalpha") return v_bool(py_all(s, cp_alpha));
    if (name == "isalnum") return v_bool(py_all(s, [](char32_t c) { return cp_alpha(c) || cp_digit(c); }));
    if (name == "islower") return v_bool(py_is_case(s, true));
    return v_bool(py_is_case(s, false));  // isupper
  }

  Value call_method(const Value& self, const std::string& name, const Args& a) {
    if (self.kind == VK::string) return str_method(self, name, a);
    if (self.kind == VK::loop) {  // loop.cycle(a, b, ...)
      if (!a.kw.empty() || a.pos.empty()) fail_line(line_, "loop.cycle() needs at least one positional argument");
      return a.pos[self.loop().index0 % static_cast<int64_t>(a.pos.size())];
    }
    if (self.kind == VK::list) {  // list.count(x), list.index(x)
      const auto args = bind(a, {"value"}, "list." + name + "()", 1);
      int64_t n = 0;
      const auto& items = self.list().items;
      for (size_t k = 0; k < items.size(); ++k) {
        if (!equal(items[k], *args[0])) continue;
        if (name == "index") return v_int(static_cast<int64_t>(k));
        ++n;
      }
      if (name == "index") fail_line(line_, "list.index(x): x is not in the list");
      return v_int(n);
    }
    const DictData& d = self.dict();
    const std::string what = "dict." + name + "()";
    if (name == "get") {
      const auto args = bind(a, {"key", "default"}, what, 1);
      check_hashable(*args[0]);
      const Value* v = dict_find(d, *args[0]);
      return v ? *v : args[1] ? *args[1] : v_none();
    }
    bind(a, {}, what, 0);
    std::vector<Value> out;
    for (const auto& kv : d.items) {
      if (name == "keys") {
        out.push_back(kv.first);
      } else if (name == "values") {
        out.push_back(kv.second);
      } else {
        out.push_back(list_value({kv.first, kv.second}, LK::tuple));
      }
    }
    return list_value(std::move(out), name == "keys" ? LK::dict_keys : name == "values" ? LK::dict_values : LK::dict_items);
  }

  // --- filters and tests

  // item.a.b (or item.0): jinja's attribute getter for map/selectattr/join(attribute=...)
  Value get_path(const Value& item, const std::string& path) {
    Value v = item;
    size_t b = 0;
    while (true) {
      const size_t e = std::min(path.find('.', b), path.size());
      const std::string part = path.substr(b, e - b);
      const bool digits = !part.empty() && std::all_of(part.begin(), part.end(), [](char c) { return c >= '0' && c <= '9'; });
      if (digits && part.size() < 18) {
        v = get_item(v, v_int(std::stoll(part)));
      } else {
        v = get_item(v, v_str(part));
      }
      if (e == path.size()) return v;
      b = e + 1;
    }
  }
  Value path_arg(const Value& item, const Value& attr) {
    if (attr.is_int()) return get_item(item, attr);
    return get_path(item, *str_arg(&attr, "attribute"));
  }
  Args rest_args(const Args& a, size_t skip) {
    Args r;
    r.pos.assign(a.pos.begin() + std::min(skip, a.pos.size()), a.pos.end());
    r.kw = a.kw;
    return r;
  }
  // select/reject(test, args...) and selectattr/rejectattr(attribute, test, args...)
  std::vector<Value> filter_select(const Value& v, const Args& a, bool attr, bool keep_if, const std::string& what) {
    if (attr && a.pos.empty()) fail_line(line_, what, " needs an attribute");
    const size_t test_pos = attr ? 1 : 0;
    const Test* t = nullptr;
    std::string tname;
    if (a.pos.size() > test_pos) {
      tname = *str_arg(&a.pos[test_pos], "the test's name");
      t = find_test(tname);
      if (!t) fail_line(line_, what, ": test '", tname, "' is not supported");
    }
    const Args targs = rest_args(a, test_pos + 1);
    const auto items = iterate(v);
    std::vector<Value> out;
    for (const Value& item : items->items) {
      iteration();
      const Value x = attr ? path_arg(item, a.pos[0]) : item;
      const bool pass = t ? apply_test(*t, tname, x, targs) : truthy(x);
      if (pass == keep_if) out.push_back(item);
    }
    return out;
  }
  std::vector<Value> filter_map(const Value& v, const Args& a) {
    const auto items = iterate(v);
    std::vector<Value> out;
    const Value* attribute = nullptr;
    const Value* dflt = nullptr;
    for (const auto& kw : a.kw) {
      if (kw.first == "attribute") attribute = &kw.second;
      if (kw.first == "default") dflt = &kw.second;
    }
    if (attribute) {
      if (!a.pos.empty() || a.kw.size() > (dflt ? 2u : 1u)) fail_line(line_, "map(attribute=...) takes only attribute and default");
      for (const Value& item : items->items) {
        iteration();
        Value x = path_arg(item, *attribute);
        out.push_back(x.kind == VK::undefined && dflt ? *dflt : std::move(x));
      }
      return out;
    }
    if (a.pos.empty()) fail_line(line_, "map needs a filter name or attribute=");
    const std::string fname = *str_arg(&a.pos[0], "map's filter name");
    const Filter* f = find_filter(fname);
    if (!f) fail_line(line_, "map: filter '", fname, "' is not supported");
    const Args fargs = rest_args(a, 1);
    for (const Value& item : items->items) {
      iteration();
      out.push_back(apply_filter(*f, fname, item, fargs));
    }
    return out;
  }
  Value filter_tojson(const Value& v, const Args& a) {
    const auto args = bind(a, {"ensure_ascii", "indent", "separators", "sort_keys"}, "filter 'tojson'", 0);
    JsonOpts o;
    o.ensure_ascii = args[0] && truthy(*args[0]);
    if (args[1] && args[1]->kind != VK::none) {
      o.indent = true;
      o.item_sep = ",";
      if (args[1]->kind == VK::string) {
        o.indent_str = args[1]->str();
      } else {
        const int64_t n = int_arg(args[1], 0, "tojson's indent");
        if (n > 64) fail_line(line_, "tojson: indent of more than 64 spaces");
        o.indent_str = std::string(std::max<int64_t>(n, 0), ' ');
      }
    }
    if (args[2] && args[2]->kind != VK::none) {
      if (args[2]->kind != VK::list || args[2]->list().items.size() != 2) fail_type("tojson's separators must be a pair of strings", *args[2]);
      o.item_sep = *str_arg(&args[2]->list().items[0], "tojson's separators");
      o.key_sep = *str_arg(&args[2]->list().items[1], "tojson's separators");
    }
    o.sort_keys = args[3] && truthy(*args[3]);
    std::string out;
    json_into(v, out, o, 0);
    return str_value(std::move(out));
  }
  Value filter_indent(const Value& v, const Args& a) {
    const auto args = bind(a, {"width", "first", "blank"}, "filter 'indent'", 0);
    std::string ind = "    ";
    if (args[0] && args[0]->kind == VK::string) {
      ind = args[0]->str();
    } else if (args[0]) {
      const int64_t n = int_arg(args[0], 4, "indent's width");
      if (n > 1024) fail_line(line_, "indent: width of more than 1024");
      ind = std::string(std::max<int64_t>(n, 0), ' ');
    }
    if (v.kind != VK::string) fail_type("filter 'indent' needs a string", v);
    std::string s = v.str() + "\n";
    const auto lines = py_splitlines(s, false);
    need(s.size() + mul_size(ind.size() + 1, static_cast<int64_t>(lines.size())));
    std::string rv;
    if (args[2] && truthy(*args[2])) {
      for (size_t k = 0; k < lines.size(); ++k) rv += (k ? "\n" + ind : "") + lines[k];
    } else {
      rv = lines.empty() ? "" : lines[0];
      for (size_t k = 1; k < lines.size(); ++k) rv += "\n" + (lines[k].empty() ? "" : ind) + lines[k];
    }
    if (args[1] && truthy(*args[1])) rv = ind + rv;
    return v_str(std::move(rv));
  }
  static std::optional<double> parse_py_float(std::string_view t) {
    t = py_strip(t, true, true, nullptr);
    std::string s(t);
    if (s.find('_') != std::string::npos) return std::nullopt;
    std::string low;
    for (char c : s) low += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    const bool neg = !low.empty() && low[0] == '-';
    const std::string body = !low.empty() && (low[0] == '-' || low[0] == '+') ? low.substr(1) : low;
    if (body == "inf" || body == "infinity") return neg ? -INFINITY : INFINITY;
    if (body == "nan") return NAN;
    if (body.empty() || body[0] == '+' || body[0] == '-' || body.find_first_not_of("0123456789.e+-") != std::string::npos) return std::nullopt;
    double v = 0;
    const auto r = std::from_chars(body.data(), body.data() + body.size(), v);
    if (r.ec != std::errc() || r.ptr != body.data() + body.size()) return std::nullopt;
    return neg ? -v : v;
  }
  static std::optional<int64_t> parse_py_int(std::string_view t) {
    t = py_strip(t, true, true, nullptr);
    std::string s;
    bool neg = false;
    size_t k = 0;
    if (k < t.size() && (t[k] == '+' || t[k] == '-')) neg = t[k++] == '-';
    for (; k < t.size(); ++k) {
      const char c = t[k];
      if (c >= '0' && c <= '9') {
        s += c;
      } else if (c == '_' && !s.empty() && k + 1 < t.size() && t[k + 1] >= '0' && t[k + 1] <= '9') {
        continue;
      } else {
        return std::nullopt;
      }
    }
    if (s.empty()) return std::nullopt;
    if (neg) s = "-" + s;
    int64_t v = 0;
    const auto r = std::from_chars(s.data(), s.data() + s.size(), v);
    if (r.ec != std::errc()) return std::nullopt;
    return v;
  }
  int64_t float_to_int(double d) {
    if (std::isnan(d)) return INT64_MIN;  // caller turns this into the default
    if (!(d > -9.2e18 && d < 9.2e18)) fail_overflow();
    return static_cast<int64_t>(d);
  }

  Value apply_filter(Filter f, const std::string& name, const Value& v, const Args& a) {
    step();
    const std::string what = "filter '" + name + "'";
    switch (f) {
      case Filter::abs:
        bind(a, {}, what, 0);
        if (v.kind == VK::floating) return v_float(std::fabs(v.f));
        if (!v.is_int()) fail_type("abs needs a number", v);
        if (v.i == INT64_MIN) fail_overflow();
        return v_int(v.i < 0 ? -v.i : v.i);
      case Filter::capitalize: bind(a, {}, what, 0); return str_value(py_capitalize(*to_str(v)));
      case Filter::lower: case Filter::upper: {
        bind(a, {}, what, 0);
        const bool up = f == Filter::upper;
        return str_value(map_cps(*to_str(v), [up](char32_t c, size_t) { return up ? cp_upper(c) : cp_lower(c); }));
      }
      case Filter::title: {
        bind(a, {}, what, 0);
        bool word_start = true;
        return str_value(map_cps(*to_str(v), [&](char32_t c, size_t) {
          if (c == '-' || c == '(' || c == '{' || c == '[' || c == '<' || is_py_space(c)) {
            word_start = true;
            return c;
          }
          const char32_t r = word_start ? cp_upper(c) : cp_lower(c);
          word_start = false;
          return r;
        }));
      }
      case Filter::default_: {
        const auto args = bind(a, {"default_value", "boolean"}, what, 0);
        const bool boolean = args[1] && truthy(*args[1]);
        if (v.kind == VK::undefined || (boolean && !truthy(v))) return args[0] ? *args[0] : v_str(std::string());
        return v;
      }
      case Filter::first: case Filter::last: {
        bind(a, {}, what, 0);
        if (v.kind == VK::undefined) return v_undefined(name);
        if (v.kind == VK::string) {
          const CpView cps(v.str());
          if (cps.size() == 0) return v_undefined(name);
          return v_str(std::string(cps.at(f == Filter::first ? 0 : cps.size() - 1)));
        }
        if (f == Filter::last && v.kind == VK::list && v.list().kind == LK::iterator)
          fail_line(line_, "filter 'last' cannot take a generator (add '| list')");
        const auto items = iterate(v);
        if (items->items.empty()) return v_undefined(name);
        return f == Filter::first ? items->items.front() : items->items.back();
      }
      case Filter::float_: {
        const auto args = bind(a, {"default"}, what, 0);
        const Value dflt = args[0] ? *args[0] : v_float(0.0);
        if (v.kind == VK::undefined) fail_undefined(v);
        if (v.is_num()) return v_float(v.as_double());
        if (v.kind == VK::string) {
          const auto d = parse_py_float(v.str());
          return d ? v_float(*d) : dflt;
        }
        return dflt;
      }
      case Filter::int_: {
        const auto args = bind(a, {"default", "base"}, what, 0);
        const Value dflt = args[0] ? *args[0] : v_int(0);
        if (int_arg(args[1], 10, "int's base") != 10) fail_line(line_, "filter 'int': only base 10 is supported");
        if (v.kind == VK::undefined) fail_undefined(v);
        if (v.is_int()) return v_int(v.i);
        if (v.kind == VK::floating) return std::isnan(v.f) ? dflt : v_int(float_to_int(v.f));
        if (v.kind == VK::string) {
          if (const auto i = parse_py_int(v.str())) return v_int(*i);
          const auto d = parse_py_float(v.str());
          return d && !std::isnan(*d) ? v_int(float_to_int(*d)) : dflt;
        }
        return dflt;
      }
      case Filter::indent: return filter_indent(v, a);
      case Filter::items:
        bind(a, {}, what, 0);
        return lazy_value([&] {
          if (v.kind == VK::undefined) return std::vector<Value>{};
          if (v.kind != VK::dict) fail_type("filter 'items' needs a dict", v);
          return call_method(v, "items", Args{}).list().items;
        });
      case Filter::join: {
        const auto args = bind(a, {"d", "attribute"}, what, 0);
        const StrPtr sep = args[0] ? to_str(*args[0]) : std::make_shared<const std::string>();
        const auto items = iterate(v);
        std::string out;
        for (size_t k = 0; k < items->items.size(); ++k) {
          step();
          if (k) append(out, *sep);
          str_into(args[1] && args[1]->kind != VK::none ? path_arg(items->items[k], *args[1]) : items->items[k], out);
        }
        return str_value(std::move(out));
      }
      case Filter::length: {
        bind(a, {}, what, 0);
        switch (v.kind) {
          case VK::undefined: return v_int(0);
          case VK::string: return v_int(CpView(v.str()).size());
          case VK::list:
            if (v.list().kind == LK::iterator) fail_line(line_, "filter 'length': a generator has no length (add '| list')");
            return v_int(static_cast<int64_t>(v.list().items.size()));
          case VK::dict: return v_int(static_cast<int64_t>(v.dict().items.size()));
          default: fail_type("filter 'length' needs a string, list or dict", v);
        }
      }
      case Filter::list: {
        bind(a, {}, what, 0);
        return list_value(iterate(v)->items);
      }
      case Filter::map: return lazy_value([&] { return filter_map(v, a); });
      case Filter::select: return lazy_value([&] { return filter_select(v, a, false, true, what); });
      case Filter::reject: return lazy_value([&] { return filter_select(v, a, false, false, what); });
      case Filter::selectattr: return lazy_value([&] { return filter_select(v, a, true, true, what); });
      case Filter::rejectattr: return lazy_value([&] { return filter_select(v, a, true, false, what); });
      case Filter::replace: {
        const auto args = bind(a, {"old", "new", "count"}, what, 2);
        return v_str(py_replace(*to_str(v), *to_str(*args[0]), *to_str(*args[1]), int_arg(args[2], -1, "replace's count")));
      }
      case Filter::reverse: {
        bind(a, {}, what, 0);
        if (v.kind == VK::string) {
          const CpView cps(v.str());
          std::string out;
          for (int64_t k = cps.size() - 1; k >= 0; --k) out += cps.at(k);
          return str_value(std::move(out));
        }
        std::vector<Value> items = iterate(v)->items;
        std::reverse(items.begin(), items.end());
        // reversed() of a list or dict is an iterator; of an iterator, jinja falls back to a list
        const bool was_iterator = v.kind == VK::list && v.list().kind == LK::iterator;
        return list_value(std::move(items), was_iterator ? LK::list : LK::iterator);
      }
      case Filter::string: bind(a, {}, what, 0); return v_str(to_str(v));
      case Filter::tojson: return filter_tojson(v, a);
      case Filter::trim: {
        const auto args = bind(a, {"chars"}, what, 0);
        std::vector<char32_t> chars;
        const bool custom = args[0] && args[0]->kind != VK::none;
        if (custom) chars = utf8_decode(*str_arg(args[0], "trim's chars"));
        const StrPtr s = to_str(v);
        return str_value(std::string(py_strip(*s, true, true, custom ? &chars : nullptr)));
      }
    }
    return v_none();
  }

  bool apply_test(Test t, const std::string& name, const Value& v, const Args& a) {
    step();
    const std::string what = "test '" + name + "'";
    auto other = [&](const char* param) { return *bind(a, {param}, what, 1)[0]; };
    switch (t) {
      case Test::eq: return compare(CmpOp::eq, v, other("other"));
      case Test::ne: return compare(CmpOp::ne, v, other("other"));
      case Test::lt: return compare(CmpOp::lt, v, other("other"));
      case Test::le: return compare(CmpOp::le, v, other("other"));
      case Test::gt: return compare(CmpOp::gt, v, other("other"));
      case Test::ge: return compare(CmpOp::ge, v, other("other"));
      case Test::in: return contains(other("seq"), v);
      case Test::sameas: {
        const Value o = other("other");
        if (v.kind != o.kind) return false;
        switch (v.kind) {
          case VK::none: return true;
          case VK::boolean: return v.i == o.i;
          case VK::integer: return v.i == o.i && v.i >= -5 && v.i <= 256;  // CPython's cached small ints
          case VK::string: return &v.str() == &o.str();
          default: return v.p == o.p && v.fn == o.fn && v.macro == o.macro && v.kind != VK::undefined;
        }
      }
      case Test::divisibleby: {
        const Value n = other("num");
        return equal(arith(BinOp::mod, v, n), v_int(0));
      }
      default: break;
    }
    bind(a, {}, what, 0);
    switch (t) {
      case Test::defined: return v.kind != VK::undefined;
      case Test::undefined: return v.kind == VK::undefined;
      case Test::none: return v.kind == VK::none;
      case Test::boolean: return v.kind == VK::boolean;
      case Test::true_: return v.kind == VK::boolean && v.i;
      case Test::false_: return v.kind == VK::boolean && !v.i;
      case Test::integer: return v.kind == VK::integer;
      case Test::float_: return v.kind == VK::floating;
      case Test::number: return v.is_num();
      case Test::string: return v.kind == VK::string;
      case Test::mapping: return v.kind == VK::dict;
      case Test::iterable: return v.kind == VK::string || v.kind == VK::list || v.kind == VK::dict || v.kind == VK::undefined;
      case Test::sequence:  // len() and [] both work
        return v.kind == VK::string || (v.kind == VK::list && v.list().indexable()) || v.kind == VK::dict ||
               v.kind == VK::undefined;
      case Test::callable:  // jinja's Undefined is callable (calling it raises)
        return v.kind == VK::function || v.kind == VK::method || v.kind == VK::macro || v.kind == VK::undefined;
      case Test::odd: case Test::even: {
        const Value r = arith(BinOp::mod, v, v_int(2));
        return equal(r, v_int(t == Test::odd ? 1 : 0));
      }
      case Test::lower: return py_is_case(*to_str(v), true);
      case Test::upper: return py_is_case(*to_str(v), false);
      default: return false;
    }
  }

  // --- expressions

  Value eval(const Expr& e, Frame& f) {
    Enter enter(*this, e.line);
    switch (e.kind) {
      case EK::constant: return e.value;
      case EK::name: {
        if (const Value* v = f.find(e.name)) return *v;
        if (e.name == "range") return v_function(Builtin::range);
        if (e.name == "namespace") return v_function(Builtin::namespace_);
        if (e.name == "dict") return v_function(Builtin::dict);
        if (e.name == "raise_exception") return v_function(Builtin::raise_exception);
        if (e.name == "strftime_now") return v_function(Builtin::strftime_now);
        if (e.name == "lipsum") return v_function(Builtin::lipsum);
        if (e.name == "cycler") return v_function(Builtin::cycler);
        if (e.name == "joiner") return v_function(Builtin::joiner);
        return v_undefined(e.name);
      }
      case EK::getattr: {
        const Value obj = eval(*e.kids[0], f);
        line_ = e.line;
        return get_attr(obj, e.name);
      }
      case EK::getitem: {
        const Value obj = eval(*e.kids[0], f);
        const Value key = eval(*e.kids[1], f);
        line_ = e.line;
        return get_item(obj, key);
      }
      case EK::slice: {
        const Value obj = eval(*e.kids[0], f);
        Value part[3];
        for (int k = 0; k < 3; ++k) part[k] = e.kids[k + 1] ? eval(*e.kids[k + 1], f) : v_none();
        line_ = e.line;
        return slice(obj, part[0], part[1], part[2]);
      }
      case EK::call: return eval_call(e, f);
      case EK::filter: {
        const Value v = e.kids[0] ? eval(*e.kids[0], f) : *block_input_;
        const Args a = eval_args(e, f);
        line_ = e.line;
        return apply_filter(e.filter, e.name, v, a);
      }
      case EK::test: {
        const Value v = eval(*e.kids[0], f);
        const Args a = eval_args(e, f);
        line_ = e.line;
        return v_bool(apply_test(e.test, e.name, v, a));
      }
      case EK::neg: case EK::pos: {
        const Value v = eval(*e.kids[0], f);
        line_ = e.line;
        if (v.kind == VK::floating) return v_float(e.kind == EK::neg ? -v.f : v.f);
        if (!v.is_int()) fail_type(e.kind == EK::neg ? "unary '-' needs a number" : "unary '+' needs a number", v);
        if (e.kind == EK::pos) return v_int(v.i);
        if (v.i == INT64_MIN) fail_overflow();
        return v_int(-v.i);
      }
      case EK::not_: return v_bool(!truthy(eval(*e.kids[0], f)));
      case EK::and_: {
        Value a = eval(*e.kids[0], f);
        return truthy(a) ? eval(*e.kids[1], f) : a;
      }
      case EK::or_: {
        Value a = eval(*e.kids[0], f);
        return truthy(a) ? a : eval(*e.kids[1], f);
      }
      case EK::binop: {
        const Value a = eval(*e.kids[0], f);
        const Value b = eval(*e.kids[1], f);
        line_ = e.line;
        return arith(e.op, a, b);
      }
      case EK::concat: {
        std::string s;
        for (const auto& k : e.kids) {
          const Value v = eval(*k, f);
          line_ = e.line;
          str_into(v, s);
        }
        return str_value(std::move(s));
      }
      case EK::compare: {
        Value left = eval(*e.kids[0], f);
        for (size_t k = 1; k < e.kids.size(); ++k) {
          Value right = eval(*e.kids[k], f);
          line_ = e.line;
          if (!compare(e.cmp[k - 1], left, right)) return v_bool(false);
          left = std::move(right);
        }
        return v_bool(true);
      }
      case EK::cond:
        if (truthy(eval(*e.kids[0], f))) return eval(*e.kids[1], f);
        return e.kids[2] ? eval(*e.kids[2], f) : v_undefined("");
      case EK::list: case EK::tuple: {
        std::vector<Value> items;
        for (const auto& k : e.kids) items.push_back(eval(*k, f));
        line_ = e.line;
        return list_value(std::move(items), e.kind == EK::tuple ? LK::tuple : LK::list);
      }
      case EK::dict: {
        std::vector<std::pair<Value, Value>> pairs;
        for (size_t k = 0; k + 1 < e.kids.size(); k += 2) {
          Value key = eval(*e.kids[k], f);
          pairs.emplace_back(std::move(key), eval(*e.kids[k + 1], f));
        }
        line_ = e.line;
        return dict_value(std::move(pairs));
      }
    }
    return v_none();
  }

  // --- statements

  void assign(const Stmt& s, const Value& v, Frame& f) {
    if (!s.unpack) return f.set(s.names[0], v);
    const auto items = v.kind == VK::list || v.kind == VK::string ? iterate(v) : nullptr;
    if (!items || items->items.size() != s.names.size())
      fail_line(s.line, "cannot unpack ", type_name(v), items ? " of " + std::to_string(items->items.size()) + " items" : "",
                " into ", s.names.size(), " names");
    for (size_t k = 0; k < s.names.size(); ++k) f.set(s.names[k], items->items[k]);
  }

  Flow exec_body(const Body& body, Frame& f) {
    for (const auto& s : body) {
      const Flow fl = exec(*s, f);
      if (fl != Flow::normal) return fl;
    }
    return Flow::normal;
  }

  Flow exec_for(const Stmt& s, Frame& f) {
    const Value seq = eval(*s.exprs[0], f);
    line_ = s.line;
    auto items = iterate(seq);
    if (s.exprs[1]) {  // {% for x in xs if cond %}: loop.* counts the kept items only
      std::vector<Value> kept;
      for (const Value& item : items->items) {
        iteration();
        Frame tf{&f, {}};
        assign(s, item, tf);
        if (truthy(eval(*s.exprs[1], tf))) kept.push_back(item);
      }
      items = std::get<std::shared_ptr<const ListData>>(list_value(std::move(kept)).p);
    }
    const int64_t n = static_cast<int64_t>(items->items.size());
    if (n == 0) {
      Frame ef{&f, {}};
      return exec_body(s.bodies[1], ef);
    }
    for (int64_t k = 0; k < n; ++k) {
      line_ = s.line;
      iteration();
      Frame bf{&f, {}};  // each iteration starts from the enclosing scope (Jinja: sets stay inside)
      assign(s, items->items[k], bf);
      auto ld = std::make_shared<LoopData>();
      ld->index0 = k;
      ld->length = n;
      ld->items = items;
      Value lv;
      lv.kind = VK::loop;
      lv.p = std::shared_ptr<const LoopData>(std::move(ld));
      bf.set("loop", std::move(lv));
      if (exec_body(s.bodies[0], bf) == Flow::break_) break;
    }
    return Flow::normal;
  }

  Flow exec(const Stmt& s, Frame& f) {
    Enter enter(*this, s.line);
    switch (s.kind) {
      case SK::text: append(out_, s.text); return Flow::normal;
      case SK::output:
        for (const auto& e : s.exprs) {
          const Value v = eval(*e, f);
          line_ = s.line;
          str_into(v, out_);
        }
        return Flow::normal;
      case SK::if_:
        for (size_t k = 0; k < s.exprs.size(); ++k)
          if (truthy(eval(*s.exprs[k], f))) return exec_body(s.bodies[k], f);
        if (s.bodies.size() > s.exprs.size()) return exec_body(s.bodies.back(), f);
        return Flow::normal;
      case SK::for_: return exec_for(s, f);
      case SK::set: assign(s, eval(*s.exprs[0], f), f); return Flow::normal;
      case SK::set_attr: {
        Value v = eval(*s.exprs[0], f);
        line_ = s.line;
        const Value* target = f.find(s.names[0]);
        if (!target || target->kind != VK::ns)
          fail_line(s.line, "cannot set '", s.names[0], ".", s.text, "': '", s.names[0], "' is not a namespace()");
        const Value ns = *target;
        set_ns_attr(ns.ns(), s.text, std::move(v));
        return Flow::normal;
      }
      case SK::set_block: {
        std::string captured;
        std::swap(captured, out_);
        exec_body(s.bodies[0], f);
        std::swap(captured, out_);
        Value text = str_value(std::move(captured));
        if (s.exprs[0]) {
          const Value* saved = block_input_;
          block_input_ = &text;
          Value filtered = eval(*s.exprs[0], f);
          block_input_ = saved;
          text = std::move(filtered);
        }
        f.set(s.names[0], std::move(text));
        return Flow::normal;
      }
      case SK::macro: {
        Value m;
        m.kind = VK::macro;
        m.macro = &s;
        f.set(s.text, std::move(m));
        return Flow::normal;
      }
      case SK::with: {
        Frame w{&f, {}};
        std::vector<Value> values;
        for (const auto& e : s.exprs) values.push_back(eval(*e, f));
        for (size_t k = 0; k < s.names.size(); ++k) w.set(s.names[k], std::move(values[k]));
        return exec_body(s.bodies[0], w);
      }
      case SK::break_: return Flow::break_;
      case SK::continue_: return Flow::continue_;
      case SK::block: return exec_body(s.bodies[0], f);
    }
    return Flow::normal;
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------------

struct ChatTemplate::Impl {
  ChatTemplateLimits limits;
  Body body;
};

ChatTemplate::ChatTemplate(const std::string& source, const ChatTemplateLimits& limits)
    : impl_(std::make_unique<Impl>()) {
  impl_->limits = limits;
  if (source.size() > limits.max_template_bytes)
    fail("chat template: ", source.size(), " bytes is more than ", limits.max_template_bytes, " (max_template_bytes)");
  Lexer lexer(source);
  Parser parser(lexer.run(), impl_->limits);
  impl_->body = parser.parse_template();
}

ChatTemplate::~ChatTemplate() = default;
ChatTemplate::ChatTemplate(ChatTemplate&&) noexcept = default;
ChatTemplate& ChatTemplate::operator=(ChatTemplate&&) noexcept = default;

std::string ChatTemplate::render(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                                 const std::string& bos_token, const std::string& eos_token,
                                 const std::map<std::string, std::string>& extra) const {
  auto list = std::make_shared<ListData>();
  list->depth = 3;
  const StrPtr role_key = std::make_shared<const std::string>("role");
  const StrPtr content_key = std::make_shared<const std::string>("content");
  for (const ChatMessage& m : messages) {
    auto d = std::make_shared<DictData>();
    d->depth = 2;
    d->items.emplace_back(v_str(role_key), v_str(m.role));
    d->items.emplace_back(v_str(content_key), v_str(m.content));
    Value dv;
    dv.kind = VK::dict;
    dv.p = std::shared_ptr<const DictData>(std::move(d));
    list->items.push_back(std::move(dv));
  }
  Value mv;
  mv.kind = VK::list;
  mv.p = std::shared_ptr<const ListData>(std::move(list));

  Frame globals;
  globals.set("messages", std::move(mv));
  globals.set("add_generation_prompt", v_bool(add_generation_prompt));
  globals.set("bos_token", v_str(bos_token));
  globals.set("eos_token", v_str(eos_token));
  globals.set("tools", v_none());
  globals.set("documents", v_none());
  for (const auto& kv : extra) {
    if (globals.find(kv.first)) fail("chat template: extra variable '", kv.first, "' would replace a standard one");
    globals.set(kv.first, v_str(kv.second));
  }
  Renderer renderer(impl_->limits, globals);
  return renderer.render(impl_->body);
}

std::string render_chat_template(const std::string& tmpl, const std::vector<ChatMessage>& messages,
                                 bool add_generation_prompt, const std::string& bos_token,
                                 const std::string& eos_token, const std::map<std::string, std::string>& extra) {
  return ChatTemplate(tmpl).render(messages, add_generation_prompt, bos_token, eos_token, extra);
}

}  // namespace lmf
