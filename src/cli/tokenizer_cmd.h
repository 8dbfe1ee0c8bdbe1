// tokenizer_cmd.h: `lmforge tokenizer train|encode` (the subcommands' flags and what they run).
#pragma once
#include <CLI/CLI.hpp>
#include <string>

#include "data/bpe_train.h"

namespace lmf {

struct TokenizerCommand {
  CLI::App* app = nullptr;
  CLI::App* train = nullptr;
  CLI::App* encode = nullptr;
  // train
  std::string input, out, specials;
  bool overwrite = false;
  BpeTrainOptions options;
  // encode
  std::string tokenizer, text;
};

// Adds `tokenizer` with its subcommands to app; the flags land in cmd.
void add_tokenizer_command(CLI::App& app, TokenizerCommand& cmd);
// Runs the parsed subcommand; returns the exit code.
int run_tokenizer_command(const TokenizerCommand& cmd);

}  // namespace lmf
