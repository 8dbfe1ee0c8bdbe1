// loader.h: batches of B windows of T+1 tokens from one or more shards (or an in-memory token
// stream such as the bundled corpus).
//
// Window b of batch number k starts at a uniformly drawn offset:
//   w = rng_u64(seed, kDataStream, k * B + b) mod total_windows
// over the concatenation of all sources (a window never crosses a source boundary). The loader's
// only state is k, `position()`, which checkpoints save: resuming reproduces the same batches.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "data/shard.h"

namespace lmf {

// What the trainer reads batches from: a model family's data (token windows: DataLoader; time-series
// windows: data/series_loader.h SeriesLoader). next() fills host buffers laid out as the model's ends
// say (ModelEnds::input_spec / target_spec); position() counts what was read, for resuming bitwise.
class BatchSource {
 public:
  virtual ~BatchSource() = default;
  virtual void next(void* inputs, void* targets) = 0;
  virtual uint64_t position() const = 0;
  virtual void set_position(uint64_t p) = 0;
  virtual int64_t total_points() const = 0;  // tokens, or time-series values
  // Data parallelism: this source reads rows [rank B, (rank + 1) B) of a global batch of ranks x B rows,
  // the rows one source of ranks x B rows would read (B: its batch size). Call before the first next().
  virtual void set_slice(int64_t rank, int64_t ranks) = 0;
  virtual const std::string& description() const = 0;
};

class DataLoader final : public BatchSource {
 public:
  // `paths`: shard files (a path may contain * or ? wildcards); every token must be < vocab_size.
  DataLoader(const std::vector<std::string>& paths, int64_t B, int64_t T, uint64_t seed, int64_t vocab_size);
  // In-memory tokens (e.g. the bundled corpus); `name` is used in messages.
  DataLoader(std::vector<int32_t> tokens, const std::string& name, int64_t B, int64_t T, uint64_t seed,
             int64_t vocab_size);

  // inputs, targets: (B, T) i32; targets are inputs shifted by one.
  void next(int32_t* inputs, int32_t* targets);
  void next(void* inputs, void* targets) override { next(static_cast<int32_t*>(inputs), static_cast<int32_t*>(targets)); }
  uint64_t position() const override { return position_; }
  void set_position(uint64_t p) override { position_ = p; }
  void set_slice(int64_t rank, int64_t ranks) override;
  int64_t total_tokens() const;
  int64_t total_points() const override { return total_tokens(); }
  const std::string& description() const override { return description_; }

 private:
  struct Source {
    TokenSpan tokens;
    std::string name;
  };
  void finish_setup(int64_t vocab_size);

  int64_t B_, T_;
  uint64_t seed_;
  uint64_t position_ = 0;
  int64_t slice_rank_ = 0, slice_ranks_ = 1;
  std::vector<Shard> shards_;
  std::vector<int32_t> owned_;
  std::vector<Source> sources_;
  std::vector<int64_t> window_start_;  // cumulative window counts per source
  int64_t total_windows_ = 0;
  std::string description_;
};

// Expands shell wildcards in a path; a path without wildcards is returned as is (even if missing,
// so opening it gives the precise error).
std::vector<std::string> expand_data_paths(const std::string& pattern);

}  // namespace lmf
