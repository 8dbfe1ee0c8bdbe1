// Byte-level BPE against Hugging Face `tokenizers` (tools/make_tokenizer_fixtures.py wrote the
// reference ids): 2,200 lines of English, code, CJK, emoji, digits, whitespace runs, combining marks
// and invalid UTF-8, for tokenizers trained with `tokenizers` in the GPT-2, Llama-3 and Qwen2 styles
// (committed) and for SmolLM2-135M's (imported from its GGUF file, which scripts/fetch_smollm2.sh
// fetches). Every line's ids must be identical.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/check.h"
#include "core/fsutil.h"
#include "convert/gguf.h"
#include "data/bpe.h"
#include "data/bpe_train.h"
#include "data/corpus.h"
#include "support/cli_util.h"
#include "support/test_util.h"

namespace lmf {
namespace {

std::vector<std::string> read_lines(const std::string& path) {
  std::vector<std::string> lines;
  std::string text = read_file(path), cur;
  std::istringstream in(text);
  while (std::getline(in, cur)) lines.push_back(cur);
  return lines;
}

std::vector<std::vector<int32_t>> read_ids(const std::string& path) {
  std::vector<std::vector<int32_t>> out;
  for (const std::string& line : read_lines(path)) {
    std::istringstream in(line);
    std::vector<int32_t> ids;
    for (int32_t v; in >> v;) ids.push_back(v);
    out.push_back(std::move(ids));
  }
  return out;
}

std::string show(const std::vector<int32_t>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size() && i < 40; ++i) s += (i ? " " : "") + std::to_string(ids[i]);
  return s + (ids.size() > 40 ? " ..." : "");
}

// Every line's ids equal the reference's; decode(encode(x)) is x (after invalid UTF-8 -> U+FFFD), or
// with a normalizer (NFC), decoding is a fixed point: encode(decode(encode(x))) == encode(x).
void expect_matches_reference(const Tokenizer& tok, const std::string& ids_file, bool normalizes = false) {
  const std::vector<std::string> lines = read_lines(test::fixture_path("tokenizer/lines.txt"));
  const auto ref = read_ids(test::fixture_path(ids_file));
  ASSERT_EQ(lines.size(), ref.size()) << ids_file;
  ASSERT_GE(lines.size(), 2000u);
  int mismatches = 0, round_trip_failures = 0;
  for (size_t i = 0; i < lines.size(); ++i) {
    const std::vector<int32_t> ids = tok.encode(lines[i]);
    if (ids != ref[i] && ++mismatches <= 3)
      ADD_FAILURE() << ids_file << " line " << i + 1 << " '" << lines[i] << "'\n  ours:      " << show(ids)
                    << "\n  tokenizers: " << show(ref[i]);
    const bool round_trips = normalizes ? tok.encode(tok.decode(ids)) == ids : tok.decode(ids) == utf8_replace_invalid(lines[i]);
    if (!round_trips && ++round_trip_failures <= 3)
      ADD_FAILURE() << ids_file << " line " << i + 1 << ": decode(encode(x)) != x";
  }
  EXPECT_EQ(mismatches, 0) << "lines whose ids differ from tokenizers', of " << lines.size();
  EXPECT_EQ(round_trip_failures, 0);
}

TEST(BpeTokenizer, Gpt2StyleMatchesTokenizers) {
  auto tok = BpeTokenizer::from_file(test::fixture_path("tokenizer/gpt2.json"));
  expect_matches_reference(*tok, "tokenizer/gpt2.ids");
  EXPECT_TRUE(tok->special_prefix().empty());
}

TEST(BpeTokenizer, Llama3StyleMatchesTokenizers) {
  auto tok = BpeTokenizer::from_file(test::fixture_path("tokenizer/llama3.json"));
  expect_matches_reference(*tok, "tokenizer/llama3.ids");
  // its post-processor starts every encoding with <|begin_of_text|>
  ASSERT_EQ(tok->special_prefix().size(), 1u);
  EXPECT_EQ(tok->special_prefix()[0], tok->token_id("<|begin_of_text|>"));
}

TEST(BpeTokenizer, Qwen2StyleWithNfcMatchesTokenizers) {
  auto tok = BpeTokenizer::from_file(test::fixture_path("tokenizer/qwen2.json"));
  expect_matches_reference(*tok, "tokenizer/qwen2.ids", /*normalizes=*/true);
  // NFC: "e" + combining acute is the one character U+00E9, the same ids
  EXPECT_EQ(tok->encode("caf\x65\xcc\x81"), tok->encode("caf\xc3\xa9"));
}

// SmolLM2's tokenizer as lmforge imports it from the GGUF file's metadata (convert/gguf.h).
TEST(BpeTokenizer, SmolLM2MatchesTokenizers) {
  const std::string gguf = test::smollm2_path();
  if (gguf.empty()) GTEST_SKIP() << "third_party/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf is absent: run scripts/fetch_smollm2.sh";
  auto tok = BpeTokenizer::from_json(import_gguf(gguf).tokenizer_json, gguf);
  EXPECT_EQ(tok->vocab_size(), 49152);
  expect_matches_reference(*tok, "tokenizer/smollm2.ids");
}

TEST(BpeTokenizer, AddedTokensAreSplitOutFirst) {
  auto tok = BpeTokenizer::from_file(test::fixture_path("tokenizer/llama3.json"));
  const int32_t eot = tok->token_id("<|eot_id|>");
  ASSERT_GE(eot, 0);
  const std::vector<int32_t> ids = tok->encode("In the beginning<|eot_id|>God");
  const std::vector<int32_t> a = tok->encode("In the beginning"), b = tok->encode("God");
  std::vector<int32_t> want = a;
  want.push_back(eot);
  want.insert(want.end(), b.begin(), b.end());
  EXPECT_EQ(ids, want);
  EXPECT_TRUE(tok->is_special(eot));
  EXPECT_EQ(tok->decode(eot), "<|eot_id|>");
}

TEST(BpeTokenizer, ParallelEncodingGivesTheSameIds) {
  // lines joined by whitespace runs of every kind: a cut inside a run ("\n\n" before a letter is two
  // pieces, at the end of a text one) would change the ids
  const std::vector<std::string> lines = read_lines(test::fixture_path("tokenizer/lines.txt"));
  const char* seps[] = {"\n", "\n\n", " \n", "\n ", "\n\n\n", "\r\n", "\t\n"};
  std::string text;
  for (size_t i = 0; text.size() < (3u << 20); ++i) text += lines[i % lines.size()] + seps[i % 7];
  for (const char* name : {"gpt2", "llama3", "qwen2"}) {
    auto tok = BpeTokenizer::from_file(test::fixture_path(std::string("tokenizer/") + name + ".json"));
    const std::vector<int32_t> serial = tok->encode(text);
    for (int threads : {2, 5}) EXPECT_EQ(tok->encode_parallel(text, threads), serial) << name << ", " << threads << " threads";
  }
}

TEST(BpeTokenizer, InvalidUtf8IsReplacedAsPythonDoes) {
  // Python: b"\xe2\x82 \xff\xc0\xaf\xed\xa0\x80\xf0\x9f\x98".decode("utf-8", "replace")
  EXPECT_EQ(utf8_replace_invalid("\xe2\x82 \xff\xc0\xaf\xed\xa0\x80\xf0\x9f\x98"),
            "\xEF\xBF\xBD \xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");
  EXPECT_EQ(utf8_replace_invalid("ok \xc3\xa9 \xf0\x9f\x91\x8d"), "ok \xc3\xa9 \xf0\x9f\x91\x8d");
}

TEST(BpeTokenizer, DecodingAnIdOutsideTheVocabularyIsAnError) {
  auto tok = BpeTokenizer::from_file(test::fixture_path("tokenizer/gpt2.json"));
  EXPECT_TRUE(test::one_line_error([&] { tok->decode(static_cast<int32_t>(tok->vocab_size())); }, {"outside the vocabulary"}));
  EXPECT_TRUE(test::one_line_error([&] { tok->decode(-1); }, {"outside the vocabulary"}));
}

// A tokenizer.json that is not a byte-level BPE, or is broken, is one line naming the file and the
// problem, never a silently different tokenization.
TEST(BpeTokenizer, WhatItCannotReadIsRefusedNamingTheFileAndField) {
  const nlohmann::json good = nlohmann::json::parse(read_file(test::fixture_path("tokenizer/gpt2.json")));
  auto refuse = [](const std::string& text, std::vector<std::string> words) {
    words.insert(words.begin(), "bad.json");
    return test::one_line_error([&] { BpeTokenizer::from_json(text, "bad.json"); }, words);
  };
  auto edited = [&](const std::function<void(nlohmann::json&)>& f) {
    nlohmann::json j = good;
    f(j);
    return j.dump();
  };
  EXPECT_TRUE(refuse("{", {"JSON"}));
  EXPECT_TRUE(refuse("[]", {"object"}));
  EXPECT_TRUE(refuse(edited([](auto& j) { j["model"]["type"] = "WordPiece"; }), {"model.type", "WordPiece"}));
  EXPECT_TRUE(refuse(edited([](auto& j) { j["pre_tokenizer"]["type"] = "Metaspace"; }), {"pre_tokenizer", "Metaspace"}));
  EXPECT_TRUE(refuse(edited([](auto& j) { j["pre_tokenizer"] = nullptr; }), {"no ByteLevel step"}));
  EXPECT_TRUE(refuse(edited([](auto& j) { j["model"]["dropout"] = 0.1; }), {"dropout"}));
  EXPECT_TRUE(refuse(edited([](auto& j) { j["model"]["merges"].insert(j["model"]["merges"].begin(), "nosuchtoken xyz"); }),
                     {"merges[0]", "not in the vocabulary"}));
  EXPECT_TRUE(refuse(edited([](auto& j) { j["model"]["merges"].insert(j["model"]["merges"].begin(), "a b c"); }),
                     {"merges[0]", "two tokens"}));
  EXPECT_TRUE(refuse(edited([](auto& j) { j["model"]["vocab"]["x"] = -3; }), {"model.vocab", "-3"}));
  EXPECT_TRUE(refuse(edited([](auto& j) { j["normalizer"] = {{"type", "Lowercase"}}; }), {"normalizer", "Lowercase"}));
  EXPECT_TRUE(refuse(edited([](auto& j) { j["decoder"] = {{"type", "WordPiece"}}; }), {"decoder", "WordPiece"}));
  EXPECT_TRUE(test::one_line_error([&] { BpeTokenizer::from_file("/nonexistent/tokenizer.json"); },
                                   {"/nonexistent/tokenizer.json"}));
}


// `lmforge tokenizer train`: what it writes reads back (here and, checked with `tokenizers` when this
// was written, there), encodes every mixed line losslessly, compresses the corpus it learned from, and
// is the same file every time.
TEST(BpeTrainer, LearnsATokenizerThatRoundTripsAndIsDeterministic) {
  const std::string corpus(bundled_corpus().substr(0, 200000));
  const std::vector<std::string> lines = read_lines(test::fixture_path("tokenizer/lines.txt"));
  for (const char* style : {"gpt2", "llama3"}) {
    BpeTrainOptions o;
    o.vocab_size = 1000;
    o.style = style;
    const std::string json = train_bpe(corpus, o);
    EXPECT_EQ(train_bpe(corpus, o), json) << style << ": training twice gave different files";
    auto tok = BpeTokenizer::from_json(json, style);
    EXPECT_EQ(tok->vocab_size(), 1000) << style;
    const size_t n = tok->encode(corpus).size();
    EXPECT_LT(n * 3, corpus.size()) << style << ": " << corpus.size() << " bytes -> " << n << " tokens";
    for (const std::string& l : lines) ASSERT_EQ(tok->decode(tok->encode(l)), utf8_replace_invalid(l)) << style << ": " << l;
    EXPECT_GE(tok->token_id(std::string(style) == "gpt2" ? "<|endoftext|>" : "<|begin_of_text|>"), 0);
  }
  BpeTrainOptions bad;
  bad.vocab_size = 200;
  EXPECT_TRUE(test::one_line_error([&] { train_bpe(corpus, bad); }, {"--vocab-size=200", "256 bytes"}));
  bad.vocab_size = 1000;
  bad.style = "bert";
  EXPECT_TRUE(test::one_line_error([&] { train_bpe(corpus, bad); }, {"--style=bert"}));
}

TEST(BpeTrainer, CliTrainsEncodesAndRefusesToOverwrite) {
  const std::string d = test::make_temp_dir("tok_cli");
  write_file_atomic(d + "/c.txt", std::string(bundled_corpus().substr(0, 100000)));
  auto r = test::run_cli("tokenizer train --input " + d + "/c.txt --out " + d + "/t.json --vocab-size 600", d);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("600 tokens"), std::string::npos) << r.out;
  const std::string first = read_file(d + "/t.json");
  r = test::run_cli("tokenizer train --input " + d + "/c.txt --out " + d + "/t.json --vocab-size 700", d);
  EXPECT_TRUE(test::one_line_error(r, {"t.json", "--overwrite"}));
  EXPECT_EQ(read_file(d + "/t.json"), first);
  r = test::run_cli("tokenizer encode --tokenizer " + d + "/t.json --text 'In the beginning'", d);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("| the|"), std::string::npos) << r.out;  // pieces shown between bars
  // prepare with it: shards of its ids
  r = test::run_cli("prepare --input " + d + "/c.txt --out-dir " + d + " --tokenizer " + d + "/t.json --threads 2", d);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("tokenizer bpe"), std::string::npos) << r.out;
  std::filesystem::remove_all(d);
}

}  // namespace
}  // namespace lmf
