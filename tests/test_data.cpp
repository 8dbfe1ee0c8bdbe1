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
  EXPECT_EQ(std::vector<uint16_t>(s.tokens(), s.tokens() + 4), toks);
  std::filesystem::remove_all(d);
}

TEST(Tokenizer, ByteLevelRoundTrip) {
  auto t = make_tokenizer("byte");
  std::string text = "In the beginning \xc3\xa9\n";
  std::vector<uint16_t> ids = t->encode(text);
  ASSERT_EQ(ids.size(), text.size());
  std::string back;
  for (uint16_t id : ids) back += t->decode(id);
  EXPECT_EQ(back, text);
  EXPECT_THROW(make_tokenizer("bpe50k"), Error);
}

TEST(Corpus, BundledCorpusIsEmbedded) {
  std::string_view c = bundled_corpus();
  EXPECT_GT(c.size(), 500000u);
  EXPECT_EQ(c.substr(0, 20), "\nGenesis 1\n\nIn the b");
}

TEST(Loader, DeterministicTargetsShiftedAndResumable) {
  std::vector<uint16_t> toks(5000);
  for (size_t i = 0; i < toks.size(); ++i) toks[i] = static_cast<uint16_t>(i % 251);
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
