#include "core/json_util.h"

#include <limits>

#include "core/check.h"

namespace lmf {

using json = nlohmann::json;

std::string json_depth_problem(std::string_view text) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') ++i;  // the escaped character cannot end the string
      else if (c == '"') in_string = false;
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kJsonMaxDepth)
        return detail::concat("nested deeper than ", kJsonMaxDepth, " levels at byte ", i);
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return "";
}

json json_parse(std::string_view text, const std::string& what) {
  if (const std::string p = json_depth_problem(text); !p.empty()) fail(what, ": invalid JSON (", p, ")");
  try {
    return json::parse(text.begin(), text.end());
  } catch (const json::exception& e) {  // parse_error, and out_of_range for numbers beyond a double
    fail(what, ": invalid JSON (", e.what(), ")");
  }
}

std::optional<int64_t> json_int64(const json& v) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
    return static_cast<int64_t>(u);
  }
  if (v.is_number_integer()) return v.get<int64_t>();
  return std::nullopt;
}

std::optional<uint64_t> json_uint64(const json& v) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer() && v.get<int64_t>() >= 0) return static_cast<uint64_t>(v.get<int64_t>());
  return std::nullopt;
}

std::string excerpt(std::string_view s, size_t max) {
  return s.size() > max ? std::string(s.substr(0, max)) + "..." : std::string(s);
}

std::string json_excerpt(const json& v, size_t max) {
  return excerpt(v.dump(-1, ' ', false, json::error_handler_t::replace), max);
}

}  // namespace lmf
