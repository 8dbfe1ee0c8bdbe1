#include "data/loader.h"

#include <glob.h>

#include "core/check.h"
#include "core/rng.h"

namespace lmf {

namespace {
constexpr uint64_t kDataStream = 0xda7a;
}

std::vector<std::string> expand_data_paths(const std::string& pattern) {
  if (pattern.find_first_of("*?[") == std::string::npos) return {pattern};
  glob_t g{};
  int rc = ::glob(pattern.c_str(), 0, nullptr, &g);
  std::vector<std::string> out;
  if (rc == 0)
    for (size_t i = 0; i < g.gl_pathc; ++i) out.emplace_back(g.gl_pathv[i]);
  ::globfree(&g);
  if (out.empty()) fail_not_found(pattern, ": no data shard matches this pattern");
  return out;
}

DataLoader::DataLoader(const std::vector<std::string>& paths, int64_t B, int64_t T, uint64_t seed, int64_t vocab_size)
    : B_(B), T_(T), seed_(seed) {
  for (const std::string& p : paths)
    for (const std::string& f : expand_data_paths(p)) shards_.emplace_back(f);
  if (shards_.empty()) fail("no data shards given");
  for (const Shard& s : shards_) sources_.push_back({s.tokens(), s.path()});
  description_ = shards_.size() == 1 ? shards_[0].path() : std::to_string(shards_.size()) + " shards";
  finish_setup(vocab_size);
}

DataLoader::DataLoader(std::vector<int32_t> tokens, const std::string& name, int64_t B, int64_t T, uint64_t seed,
                       int64_t vocab_size)
    : B_(B), T_(T), seed_(seed), owned_(std::move(tokens)) {
  for (int32_t t : owned_)
    if (t < 0) fail(name, ": token id ", t, " is negative");
  sources_.push_back({{owned_.data(), 4, static_cast<int64_t>(owned_.size())}, name});
  description_ = name;
  finish_setup(vocab_size);
}

void DataLoader::finish_setup(int64_t vocab_size) {
  LMF_CHECK(B_ >= 1 && T_ >= 1, "B=", B_, " T=", T_);
  for (const Source& s : sources_) {
    const int64_t n = s.tokens.n;
    if (n < T_ + 1) fail(s.name, ": ", n, " tokens, fewer than one window of seq_len+1=", T_ + 1);
    for (int64_t i = 0; i < n; ++i)
      if (s.tokens[i] >= vocab_size)
        fail(s.name, ": token ", s.tokens[i], " at index ", i, " is outside the model's vocab_size=", vocab_size);
    window_start_.push_back(total_windows_);
    total_windows_ += n - T_;
  }
}

int64_t DataLoader::total_tokens() const {
  int64_t n = 0;
  for (const Source& s : sources_) n += s.tokens.n;
  return n;
}

void DataLoader::set_slice(int64_t rank, int64_t ranks) {
  LMF_CHECK(ranks >= 1 && rank >= 0 && rank < ranks, "data slice: rank ", rank, " of ", ranks);
  slice_rank_ = rank;
  slice_ranks_ = ranks;
}

void DataLoader::next(int32_t* inputs, int32_t* targets) {
  // batch k of the global batch of slice_ranks_ x B rows; this source's rows start at slice_rank_ x B
  const uint64_t row0 = position_ * static_cast<uint64_t>(B_ * slice_ranks_) + static_cast<uint64_t>(slice_rank_ * B_);
  for (int64_t b = 0; b < B_; ++b) {
    uint64_t w = rng_u64(seed_, kDataStream, row0 + static_cast<uint64_t>(b)) % static_cast<uint64_t>(total_windows_);
    // find the source holding window w (few sources: linear scan)
    size_t s = sources_.size() - 1;
    while (static_cast<int64_t>(w) < window_start_[s]) --s;
    const TokenSpan& t = sources_[s].tokens;
    const int64_t at = static_cast<int64_t>(w) - window_start_[s];
    for (int64_t i = 0; i < T_; ++i) {
      inputs[b * T_ + i] = static_cast<int32_t>(t[at + i]);
      targets[b * T_ + i] = static_cast<int32_t>(t[at + i + 1]);
    }
  }
  position_++;
}

}  // namespace lmf
