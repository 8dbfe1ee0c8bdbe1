// json_util.h: the one way lmforge reads JSON it did not write itself: model configs, a checkpoint's
// config.json and state.json, safetensors headers, HTTP request bodies, metrics files.
//
// nlohmann::json parses without a depth limit, and copying or dumping a parsed value recurses once per
// nesting level: 100,000 nested brackets overflow the stack. json_parse() therefore checks the
// nesting depth (at most kJsonMaxDepth arrays/objects inside each other) on the raw text *before* the
// parser sees it, and turns every parser error (syntax, bad UTF-8, a number like 1e400 that overflows a
// double) into one lmf::Error line naming `what`. Every parse of untrusted JSON goes through it.
//
// json_int64 / json_uint64 are the strict readers of integer fields: only a JSON integer that fits
// (no 19.5 -> 19, no 1e30 -> undefined behaviour, no true -> 1, no -1 -> 2^64 - 1).
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>

namespace lmf {

constexpr int kJsonMaxDepth = 64;  // arrays/objects inside each other; lmforge's own files use <= 3

// "" when no array or object in `text` nests deeper than kJsonMaxDepth, else why (with the byte
// offset). Brackets inside strings do not count (the scan skips strings as the parser does).
std::string json_depth_problem(std::string_view text);

// Parses `text`; throws lmf::Error "<what>: invalid JSON (<why>)" on any problem, depth included.
nlohmann::json json_parse(std::string_view text, const std::string& what);

// The value of `v` when it is a JSON integer in range, else nullopt (floats, other types, out of range).
std::optional<int64_t> json_int64(const nlohmann::json& v);
std::optional<uint64_t> json_uint64(const nlohmann::json& v);  // non-negative integers only

// `v` as compact JSON for an error message, cut to about `max` characters ("..." marks the cut).
std::string json_excerpt(const nlohmann::json& v, size_t max = 64);
// A string from the input (a key, an enum value) cut the same way, for an error message.
std::string excerpt(std::string_view s, size_t max = 64);

}  // namespace lmf
