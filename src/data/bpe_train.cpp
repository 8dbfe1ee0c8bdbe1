// bpe_train.cpp: BPE training (bpe_train.h).
#include "data/bpe_train.h"

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>
#include <queue>
#include <unordered_map>

#include "core/check.h"
#include "data/bpe.h"

namespace lmf {

using nlohmann::ordered_json;

namespace {

constexpr const char* kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

ordered_json pre_tokenizer_for(const std::string& style) {
  if (style == "gpt2")
    return {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  if (style == "llama3")
    return {{"type", "Sequence"},
            {"pretokenizers",
             {{{"type", "Split"}, {"pattern", {{"Regex", kLlama3Pattern}}}, {"behavior", "Isolated"}, {"invert", false}},
              {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}}}}};
  fail("--style=", style, " is not one of gpt2, llama3");
}

std::vector<std::string> default_specials(const std::string& style) {
  if (style == "llama3") return {"<|begin_of_text|>", "<|end_of_text|>"};
  return {"<|endoftext|>"};
}

// The tokenizer.json around a vocabulary (byte-level text -> id) and merges.
ordered_json tokenizer_json(const BpeTrainOptions& o, const std::vector<std::string>& specials,
                            const std::vector<std::string>& token_text,
                            const std::vector<std::pair<std::string, std::string>>& merges) {
  ordered_json added = ordered_json::array();
  for (size_t i = 0; i < specials.size(); ++i)
    added.push_back({{"id", i}, {"content", specials[i]}, {"single_word", false}, {"lstrip", false},
                     {"rstrip", false}, {"normalized", false}, {"special", true}});
  ordered_json vocab = ordered_json::object();
  for (size_t i = 0; i < token_text.size(); ++i) vocab[token_text[i]] = i;
  ordered_json m = ordered_json::array();
  for (const auto& [a, b] : merges) m.push_back({a, b});
  ordered_json post = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false}, {"use_regex", true}};
  if (o.style == "llama3")
    post = {{"type", "TemplateProcessing"},
            {"single", {{{"SpecialToken", {{"id", specials[0]}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
            {"pair", {{{"SpecialToken", {{"id", specials[0]}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                      {{"SpecialToken", {{"id", specials[0]}, {"type_id", 1}}}}, {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}}},
            {"special_tokens", {{specials[0], {{"id", specials[0]}, {"ids", {0}}, {"tokens", {specials[0]}}}}}}};
  return {{"version", "1.0"}, {"truncation", nullptr}, {"padding", nullptr}, {"added_tokens", added},
          {"normalizer", nullptr}, {"pre_tokenizer", pre_tokenizer_for(o.style)}, {"post_processor", post},
          {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
          {"model", {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
                     {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false},
                     {"ignore_merges", o.style == "llama3"}, {"vocab", vocab}, {"merges", m}}}};
}

std::string byte_level_text(const std::string& bytes) {
  std::string s;
  for (unsigned char c : bytes) s += byte_level_char(c);
  return s;
}

}  // namespace

std::string train_bpe(const std::string& corpus, const BpeTrainOptions& o,
                      const std::function<void(int64_t, int64_t)>& progress) {
  const std::vector<std::string> specials = o.special_tokens.empty() ? default_specials(o.style) : o.special_tokens;
  const int64_t base = static_cast<int64_t>(specials.size()) + 256;
  if (o.vocab_size < base || o.vocab_size > (int64_t{1} << 21))
    fail("--vocab-size=", o.vocab_size, " must be in [", base, ", ", int64_t{1} << 21, "] (", specials.size(),
         " special tokens + 256 bytes + merges)");
  if (o.min_frequency < 1) fail("--min-frequency=", o.min_frequency, " must be >= 1");
  for (const std::string& s : specials)
    if (s.empty() || utf8_replace_invalid(s) != s) fail("--special-tokens: '", s, "' must be non-empty UTF-8");

  // ids: specials, then the 256 bytes, then one per merge
  std::vector<std::string> bytes_of;  // id -> bytes (specials: their text)
  for (const std::string& s : specials) bytes_of.push_back(s);
  for (int b = 0; b < 256; ++b) bytes_of.push_back(std::string(1, static_cast<char>(b)));

  // count the pieces the style's pre-tokenizer cuts the corpus into
  const std::string skeleton = tokenizer_json(o, specials, {}, {}).dump();
  ordered_json sk = ordered_json::parse(skeleton);
  for (int b = 0; b < 256; ++b) sk["model"]["vocab"][byte_level_char(static_cast<unsigned char>(b))] = b;
  auto pre = BpeTokenizer::from_json(sk.dump(), "tokenizer train");
  std::unordered_map<std::string, int64_t> piece_count;
  pre->pre_tokenize(corpus, [&](std::string_view p) { ++piece_count[std::string(p)]; });
  std::vector<std::pair<std::string, int64_t>> pieces(piece_count.begin(), piece_count.end());
  std::sort(pieces.begin(), pieces.end());  // a fixed order: results do not depend on hashing

  // words as symbol id sequences, pair statistics
  struct Word {
    std::vector<int32_t> sym;
    int64_t count;
  };
  std::vector<Word> words;
  words.reserve(pieces.size());
  for (const auto& [p, c] : pieces) {
    Word w{{}, c};
    for (unsigned char ch : p) w.sym.push_back(static_cast<int32_t>(specials.size()) + ch);
    words.push_back(std::move(w));
  }
  auto key = [](int32_t a, int32_t b) { return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b); };
  std::unordered_map<uint64_t, int64_t> pair_count;
  std::unordered_map<uint64_t, std::vector<int32_t>> pair_words;  // words that held the pair (may be stale)
  for (int32_t wi = 0; wi < static_cast<int32_t>(words.size()); ++wi) {
    const Word& w = words[static_cast<size_t>(wi)];
    for (size_t i = 0; i + 1 < w.sym.size(); ++i) {
      const uint64_t k = key(w.sym[i], w.sym[i + 1]);
      pair_count[k] += w.count;
      auto& ws = pair_words[k];
      if (ws.empty() || ws.back() != wi) ws.push_back(wi);
    }
  }
  // max-heap of (count, pair) with lazy deletion: an entry is used only if its count is current
  struct Entry {
    int64_t count;
    uint64_t pair;
    bool operator<(const Entry& o) const { return count != o.count ? count < o.count : pair > o.pair; }
  };
  std::priority_queue<Entry> heap;
  for (const auto& [k, c] : pair_count) heap.push({c, k});

  std::vector<std::pair<std::string, std::string>> merges;
  const int64_t want = o.vocab_size - base;
  while (static_cast<int64_t>(merges.size()) < want && !heap.empty()) {
    const Entry top = heap.top();
    heap.pop();
    auto it = pair_count.find(top.pair);
    if (it == pair_count.end() || it->second != top.count) continue;  // stale
    if (top.count < o.min_frequency) break;
    const int32_t a = static_cast<int32_t>(top.pair >> 32), b = static_cast<int32_t>(top.pair & 0xffffffffu);
    const int32_t id = static_cast<int32_t>(bytes_of.size());
    bytes_of.push_back(bytes_of[static_cast<size_t>(a)] + bytes_of[static_cast<size_t>(b)]);
    merges.emplace_back(byte_level_text(bytes_of[static_cast<size_t>(a)]), byte_level_text(bytes_of[static_cast<size_t>(b)]));
    pair_count.erase(it);
    std::map<uint64_t, int64_t> delta;  // ordered: heap pushes in a fixed order
    std::vector<int32_t> holders = std::move(pair_words[top.pair]);
    pair_words.erase(top.pair);
    for (int32_t wi : holders) {
      Word& w = words[static_cast<size_t>(wi)];
      std::vector<int32_t> out;
      out.reserve(w.sym.size());
      bool changed = false;
      for (size_t i = 0; i < w.sym.size();) {
        if (i + 1 < w.sym.size() && w.sym[i] == a && w.sym[i + 1] == b) {
          out.push_back(id);
          i += 2;
          changed = true;
        } else {
          out.push_back(w.sym[i++]);
        }
      }
      if (!changed) continue;
      for (size_t i = 0; i + 1 < w.sym.size(); ++i) delta[key(w.sym[i], w.sym[i + 1])] -= w.count;
      for (size_t i = 0; i + 1 < out.size(); ++i) {
        const uint64_t k = key(out[i], out[i + 1]);
        delta[k] += w.count;
        if (out[i] == id || out[i + 1] == id) {
          auto& ws = pair_words[k];
          if (ws.empty() || ws.back() != wi) ws.push_back(wi);
        }
      }
      w.sym = std::move(out);
    }
    for (const auto& [k, d] : delta) {
      if (k == top.pair || d == 0) continue;
      int64_t& c = pair_count[k];
      c += d;
      if (c <= 0) pair_count.erase(k);
      else heap.push({c, k});
    }
    if (progress && (merges.size() % 1000 == 0 || static_cast<int64_t>(merges.size()) == want))
      progress(static_cast<int64_t>(merges.size()), want);
  }
  std::vector<std::string> text(bytes_of.size());
  for (size_t i = 0; i < bytes_of.size(); ++i) text[i] = i < specials.size() ? bytes_of[i] : byte_level_text(bytes_of[i]);
  return tokenizer_json(o, specials, text, merges).dump(1);
}

}  // namespace lmf
