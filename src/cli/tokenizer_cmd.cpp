#include "cli/tokenizer_cmd.h"

#include <filesystem>
#include <iostream>
#include <sstream>

#include "core/check.h"
#include "core/fsutil.h"
#include "data/bpe.h"

namespace lmf {

void add_tokenizer_command(CLI::App& app, TokenizerCommand& c) {
  c.app = app.add_subcommand("tokenizer", "train a byte-level BPE tokenizer, or show how one encodes a text");
  c.app->require_subcommand(1);
  c.train = c.app->add_subcommand("train", "learn a byte-level BPE on a text file; writes a Hugging Face tokenizer.json");
  c.train->add_option("--input", c.input, "UTF-8 text file")->required();
  c.train->add_option("--out", c.out, "tokenizer.json to write")->required();
  c.train->add_option("--vocab-size", c.options.vocab_size, "tokens in all: special tokens + 256 bytes + merges")
      ->capture_default_str();
  c.train->add_option("--style", c.options.style, "pre-tokenizer: gpt2 (GPT-2's regex) or llama3 (Llama-3's)")
      ->capture_default_str();
  c.train->add_option("--special-tokens", c.specials,
                      "comma-separated special tokens, ids 0.. (default gpt2: <|endoftext|>; llama3: "
                      "<|begin_of_text|>,<|end_of_text|>)");
  c.train->add_option("--min-frequency", c.options.min_frequency, "fewest occurrences of a pair to merge it")
      ->capture_default_str();
  c.train->add_flag("--overwrite", c.overwrite, "replace --out if it exists");
  c.encode = c.app->add_subcommand("encode", "print the ids and pieces a tokenizer gives a text");
  c.encode->add_option("--tokenizer", c.tokenizer, "tokenizer.json")->required();
  c.encode->add_option("--text", c.text, "the text")->required();
}

namespace {

int run_train(const TokenizerCommand& c) {
  BpeTrainOptions o = c.options;
  if (!c.specials.empty()) {
    std::stringstream ss(c.specials);
    for (std::string s; std::getline(ss, s, ',');) o.special_tokens.push_back(s);
  }
  if (std::filesystem::exists(c.out) && !c.overwrite) fail(c.out, ": exists (pass --overwrite to replace it)");
  const std::string corpus = read_file(c.input, "input text");
  if (corpus.empty()) fail(c.input, ": input text is empty");
  const std::string json = train_bpe(corpus, o, [](int64_t done, int64_t want) {
    std::cerr << "\r[tokenizer] " << done << "/" << want << " merges" << std::flush;
  });
  std::cerr << "\n";
  auto check = BpeTokenizer::from_json(json, c.out);  // what we write must read back
  write_file_atomic(c.out, json);
  const size_t n = check->encode(corpus).size();
  std::cout << "wrote " << c.out << " (" << check->vocab_size() << " tokens, style " << o.style << "; " << corpus.size()
            << " bytes of " << c.input << " -> " << n << " tokens, " << static_cast<double>(corpus.size()) / static_cast<double>(n)
            << " bytes/token)\n";
  return 0;
}

int run_encode(const TokenizerCommand& c) {
  auto tok = make_tokenizer(c.tokenizer);
  const std::vector<int32_t> ids = tok->encode(c.text);
  for (size_t i = 0; i < ids.size(); ++i) std::cout << (i ? " " : "") << ids[i];
  std::cout << "\n";
  for (size_t i = 0; i < ids.size(); ++i) {
    std::string piece = tok->decode(ids[i]);
    std::cout << (i ? "|" : "") << piece;
  }
  std::cout << "\n" << ids.size() << " tokens\n";
  return 0;
}

}  // namespace

int run_tokenizer_command(const TokenizerCommand& c) {
  if (*c.train) return run_train(c);
  return run_encode(c);
}

}  // namespace lmf
