// Data: shard format (llm.c), tokenizer, loader determinism and resumable position.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "data/corpus.h"
#include "data/loader.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "support/test_util.h"

namespace lmf {
namespace {

TEST(Shard, LlmcLayoutRoundTrip) {
  std::string d = test::make_temp_dir("shard");
  std::vector<uint16_t> toks = {1, 2, 65535, 7};
  write_shard(d + "/a.bin", toks);
  // byte layout: 256 int32 header then uint16 tokens
  std::ifstream f(d + "/a.bin", std::ios::binary);
  int32_t header[256];
  f.read(reinterpret_cast<char*>(header), sizeof(header));
  EXPECT_EQ(header[0], 20240520);
  EXPECT_EQ(header[1], 1);
  EXPECT_EQ(header[2], 4);
  EXPECT_EQ(std::filesystem::file_size(d + "/a.bin"), 1024u + 8u);
  Shard s(d + "/a.bin");
  ASSERT_EQ(s.size(), 4);
  for (int64_t i = 0; i < 4; ++i) EXPECT_EQ(s.tokens()[i], toks[static_cast<size_t>(i)]);
  std::filesystem::remove_all(d);
}

// Ids above 65,535 (Llama-3, Qwen2) need uint32 tokens: version 2, which llm.c's readers refuse
// instead of misreading; ids that fit stay version 1.
TEST(Shard, WideIdsWriteVersionTwoAndNarrowOnesStayVersionOne) {
  std::string d = test::make_temp_dir("shard");
  const std::vector<int32_t> wide = {0, 65535, 65536, 151935, 7};
  write_shard(d + "/w.bin", wide);
  EXPECT_EQ(std::filesystem::file_size(d + "/w.bin"), 1024u + 4u * wide.size());
  Shard w(d + "/w.bin");
  ASSERT_EQ(w.size(), 5);
  EXPECT_EQ(w.tokens().width, 4);
  for (int64_t i = 0; i < 5; ++i) EXPECT_EQ(w.tokens()[i], static_cast<uint32_t>(wide[static_cast<size_t>(i)]));
  write_shard(d + "/n.bin", std::vector<int32_t>{1, 65535, 3});
  Shard n(d + "/n.bin");
  EXPECT_EQ(n.tokens().width, 2);
  EXPECT_EQ(n.tokens()[1], 65535u);
  EXPECT_THROW(write_shard(d + "/neg.bin", std::vector<int32_t>{1, -2}), Error);
  // the loader reads both widths and checks every id against the vocabulary
  std::vector<int32_t> many(300);
  for (size_t i = 0; i < many.size(); ++i) many[i] = static_cast<int32_t>(100000 + i);
  write_shard(d + "/m.bin", many);
  DataLoader l({d + "/m.bin"}, 2, 8, 1, 100300);
  std::vector<int32_t> in(16), tg(16);
  l.next(in.data(), tg.data());
  for (int k = 0; k < 16; ++k) {
    EXPECT_GE(in[k], 100000);
    EXPECT_EQ(tg[k], in[k] + 1);
  }
  EXPECT_THROW(DataLoader({d + "/m.bin"}, 2, 8, 1, 100299), Error);
  std::filesystem::remove_all(d);
}

TEST(Tokenizer, ByteLevelRoundTrip) {
  auto t = make_tokenizer("byte");
  std::string text = "In the beginning \xc3\xa9\n";
  std::vector<int32_t> ids = t->encode(text);
  ASSERT_EQ(ids.size(), text.size());
  std::string back;
  for (int32_t id : ids) back += t->decode(id);
  EXPECT_EQ(back, text);
  EXPECT_THROW(make_tokenizer("bpe50k"), Error);
}

TEST(Corpus, BundledCorpusIsEmbedded) {
  std::string_view c = bundled_corpus();
  EXPECT_GT(c.size(), 500000u);
  EXPECT_EQ(c.substr(0, 20), "\nGenesis 1\n\nIn the b");
}

TEST(Loader, DeterministicTargetsShiftedAndResumable) {
  std::vector<int32_t> toks(5000);
  for (size_t i = 0; i < toks.size(); ++i) toks[i] = static_cast<int32_t>(i % 251);
  const int64_t B = 3, T = 17;
  DataLoader a(toks, "mem", B, T, 11, 256), b(toks, "mem", B, T, 11, 256), c(toks, "mem", B, T, 12, 256);
  std::vector<int32_t> ia(B * T), ta(B * T), ib(B * T), tb(B * T), ic(B * T), tc(B * T);
  for (int k = 0; k < 5; ++k) {
    a.next(ia.data(), ta.data());
    b.next(ib.data(), tb.data());
    c.next(ic.data(), tc.data());
    EXPECT_EQ(ia, ib);
    EXPECT_EQ(ta, tb);
    for (int64_t b_ = 0; b_ < B; ++b_)
      for (int64_t t = 0; t + 1 < T; ++t) EXPECT_EQ(ta[b_ * T + t], ia[b_ * T + t + 1]);
  }
  EXPECT_NE(ia, ic) << "a different seed should draw different windows";
  // resuming at a saved position reproduces the next batch
  DataLoader r(toks, "mem", B, T, 11, 256);
  r.set_position(a.position());
  a.next(ia.data(), ta.data());
  r.next(ib.data(), tb.data());
  EXPECT_EQ(ia, ib);
}

TEST(Loader, MultipleShardsByWildcardAndTooShortShard) {
  std::string d = test::make_temp_dir("shards");
  write_shard(d + "/x_000.bin", std::vector<uint16_t>(100, 1));
  write_shard(d + "/x_001.bin", std::vector<uint16_t>(100, 2));
  DataLoader l({d + "/x_*.bin"}, 4, 8, 1, 256);
  EXPECT_EQ(l.total_tokens(), 200);
  std::vector<int32_t> in(32), tg(32);
  bool saw1 = false, saw2 = false;
  for (int k = 0; k < 20; ++k) {
    l.next(in.data(), tg.data());
    for (int32_t v : in) { saw1 |= v == 1; saw2 |= v == 2; }
  }
  EXPECT_TRUE(saw1 && saw2) << "both shards should be sampled";
  EXPECT_THROW(DataLoader({d + "/x_*.bin"}, 1, 200, 1, 256), Error);
  EXPECT_THROW(DataLoader({d + "/none_*.bin"}, 1, 8, 1, 256), Error);
  std::filesystem::remove_all(d);
}

}  // namespace
}  // namespace lmf
