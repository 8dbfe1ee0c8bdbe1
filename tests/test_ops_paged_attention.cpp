// test_ops_paged_attention.cpp: serving's ops on the CPU (ops/paged_attention.h, ops/sampling.h):
// paged attention over shuffled KV blocks against a float64 causal-attention reference, in mixed
// batches (prompt chunks over a cached prefix, decode rows, padding rows), batch invariance, the row
// gather and the errors that name the offending tensor.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "core/rng.h"
#include "ops/paged_attention.h"
#include "support/test_util.h"

namespace lmf {
namespace {

using test::all_close;
using test::randn;
using test::tensor_of;

struct Heads {
  int64_t NH, NKV, HS;
  int64_t C3() const { return (NH + 2 * NKV) * HS; }
  int64_t CO() const { return NH * HS; }
};

// fp64 causal attention of one sequence: qkv (T, C3) -> out (T, CO).
std::vector<double> ref_attention(const std::vector<float>& qkv, int64_t T, const Heads& h) {
  std::vector<double> out(static_cast<size_t>(T * h.CO()), 0.0), s(static_cast<size_t>(T));
  const double scale = 1.0 / std::sqrt(static_cast<double>(h.HS));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t hd = 0; hd < h.NH; ++hd) {
      const int64_t kvh = hd / (h.NH / h.NKV);
      const float* q = &qkv[static_cast<size_t>(t * h.C3() + hd * h.HS)];
      double mx = -std::numeric_limits<double>::infinity(), sum = 0;
      for (int64_t u = 0; u <= t; ++u) {
        const float* k = &qkv[static_cast<size_t>(u * h.C3() + (h.NH + kvh) * h.HS)];
        double dot = 0;
        for (int64_t i = 0; i < h.HS; ++i) dot += static_cast<double>(q[i]) * k[i];
        s[static_cast<size_t>(u)] = dot * scale;
        mx = std::max(mx, s[static_cast<size_t>(u)]);
      }
      for (int64_t u = 0; u <= t; ++u) sum += (s[static_cast<size_t>(u)] = std::exp(s[static_cast<size_t>(u)] - mx));
      for (int64_t u = 0; u <= t; ++u) {
        const float* v = &qkv[static_cast<size_t>(u * h.C3() + (h.NH + h.NKV + kvh) * h.HS)];
        for (int64_t i = 0; i < h.HS; ++i)
          out[static_cast<size_t>(t * h.CO() + hd * h.HS + i)] += s[static_cast<size_t>(u)] / sum * v[i];
      }
    }
  return out;
}

// A paged cache holding several sequences in shuffled blocks, and batches over it.
struct Paged {
  Heads h;
  int64_t bs, blocks, max_blocks;
  std::vector<float> k, v;          // (blocks, bs, NKV HS), NaN where nothing was written
  std::vector<int32_t> tables;      // (S, max_blocks)
  std::vector<std::vector<float>> qkv;  // per sequence (T_s, C3)

  Paged(const Heads& hh, int64_t block_size, const std::vector<int64_t>& lens, uint64_t seed)
      : h(hh), bs(block_size) {
    max_blocks = 0;
    for (int64_t T : lens) max_blocks = std::max(max_blocks, (T + bs - 1) / bs);
    blocks = max_blocks * static_cast<int64_t>(lens.size()) + 3;
    k.assign(static_cast<size_t>(blocks * bs * h.NKV * h.HS), std::nanf(""));
    v = k;
    std::vector<int32_t> ids(static_cast<size_t>(blocks));
    std::iota(ids.begin(), ids.end(), 0);
    for (size_t i = ids.size() - 1; i > 0; --i) std::swap(ids[i], ids[rng_u64(seed, 7, i) % (i + 1)]);
    tables.assign(lens.size() * static_cast<size_t>(max_blocks), -1);
    for (size_t s = 0; s < lens.size(); ++s) {
      for (int64_t j = 0; j < (lens[s] + bs - 1) / bs; ++j)
        tables[s * static_cast<size_t>(max_blocks) + static_cast<size_t>(j)] = ids[s * static_cast<size_t>(max_blocks) + static_cast<size_t>(j)];
      qkv.push_back(randn(static_cast<size_t>(lens[s] * h.C3()), seed + 100 + s));
    }
  }
  int32_t slot(size_t s, int64_t p) const {
    return static_cast<int32_t>(tables[s * static_cast<size_t>(max_blocks) + static_cast<size_t>(p / bs)] * bs + p % bs);
  }

  // Rows (sequence, position; sequence -1 = padding): writes their k and v, then attends. Returns out.
  std::vector<float> run(const std::vector<std::pair<int, int64_t>>& rows) {
    const int64_t N = static_cast<int64_t>(rows.size());
    std::vector<float> q(static_cast<size_t>(N * h.C3()), 0.0f), out(static_cast<size_t>(N * h.CO()), 7.0f);
    std::vector<int32_t> slots(static_cast<size_t>(N)), seqs(static_cast<size_t>(N)), pos(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n) {
      const auto [s, p] = rows[static_cast<size_t>(n)];
      seqs[static_cast<size_t>(n)] = s;
      pos[static_cast<size_t>(n)] = static_cast<int32_t>(s < 0 ? 0 : p);
      slots[static_cast<size_t>(n)] = s < 0 ? -1 : slot(static_cast<size_t>(s), p);
      if (s >= 0)
        std::copy_n(&qkv[static_cast<size_t>(s)][static_cast<size_t>(p * h.C3())], h.C3(), &q[static_cast<size_t>(n * h.C3())]);
    }
    const int64_t S = static_cast<int64_t>(tables.size()) / max_blocks;
    Tensor kc = tensor_of(k, {blocks, bs, h.NKV * h.HS}, "k_cache"), vc = tensor_of(v, {blocks, bs, h.NKV * h.HS}, "v_cache");
    Tensor qt = tensor_of(q, {N, h.C3()}, "qkv");
    kv_cache_write(kc, vc, qt, tensor_of(slots, {N}, "slots"), static_cast<int>(h.NH), static_cast<int>(h.NKV));
    paged_attention_forward(tensor_of(out, {N, h.CO()}, "out"), qt, kc, vc, tensor_of(tables, {S, max_blocks}, "block_tables"),
                            tensor_of(seqs, {N}, "seqs"), tensor_of(pos, {N}, "positions"), static_cast<int>(h.NH),
                            static_cast<int>(h.NKV));
    return out;
  }
};

// fp32 online softmax against the fp64 reference: rounding only (observed ~3e-7).
constexpr double kAtol = 2e-6, kRtol = 1e-5;

TEST(OpsPagedAttention, MixedBatchesMatchCausalAttention) {
  for (const Heads h : {Heads{4, 2, 8}, Heads{3, 3, 16}, Heads{8, 1, 4}})
    for (int64_t bs : {int64_t{1}, int64_t{5}, int64_t{16}}) {
      const std::vector<int64_t> lens{1, 7, 19, 40};
      Paged pg(h, bs, lens, 11 + static_cast<uint64_t>(bs));
      std::vector<std::vector<float>> got(lens.size());
      for (size_t s = 0; s < lens.size(); ++s) got[s].assign(static_cast<size_t>(lens[s] * h.CO()), 0.0f);
      // step 1: the first part of every prompt (a prefill chunk each); step 2: the rest, chunks and
      // single rows of all sequences interleaved with padding rows, in one batch
      std::vector<std::pair<int, int64_t>> step1, step2;
      for (size_t s = 0; s < lens.size(); ++s) {
        const int64_t split = lens[s] / 2;
        for (int64_t p = 0; p < split; ++p) step1.push_back({static_cast<int>(s), p});
        step2.push_back({-1, 0});
        for (int64_t p = split; p < lens[s]; ++p) step2.push_back({static_cast<int>(s), p});
      }
      step2.push_back({-1, 0});
      for (const auto& step : {step1, step2}) {
        const std::vector<float> out = pg.run(step);
        for (size_t n = 0; n < step.size(); ++n) {
          const auto [s, p] = step[n];
          const float* o = &out[n * static_cast<size_t>(h.CO())];
          if (s < 0) {
            for (int64_t i = 0; i < h.CO(); ++i) ASSERT_EQ(o[i], 0.0f) << "padding row " << n;
            continue;
          }
          std::copy_n(o, h.CO(), &got[static_cast<size_t>(s)][static_cast<size_t>(p * h.CO())]);
        }
      }
      for (size_t s = 0; s < lens.size(); ++s) {
        const std::vector<double> ref = ref_attention(pg.qkv[s], lens[s], h);
        EXPECT_TRUE(all_close("NH=" + std::to_string(h.NH) + " NKV=" + std::to_string(h.NKV) + " HS=" +
                                  std::to_string(h.HS) + " bs=" + std::to_string(bs) + " seq " + std::to_string(s),
                              got[s], ref, kAtol, kRtol));
      }
    }
}

// A row's output has the same bits alone and among other rows (batch invariance).
TEST(OpsPagedAttention, RowsDoNotDependOnTheBatch) {
  const Heads h{4, 2, 8};
  Paged pg(h, 4, {30, 9, 17}, 5);
  std::vector<std::pair<int, int64_t>> prefill;
  for (int s = 0; s < 3; ++s)
    for (int64_t p = 0; p < (s == 0 ? 29 : s == 1 ? 8 : 16); ++p) prefill.push_back({s, p});
  pg.run(prefill);
  const std::vector<float> alone = pg.run({{0, 29}});
  const std::vector<float> batch = pg.run({{1, 8}, {-1, 0}, {0, 29}, {2, 16}});
  for (int64_t i = 0; i < h.CO(); ++i) ASSERT_EQ(alone[static_cast<size_t>(i)], batch[static_cast<size_t>(2 * h.CO() + i)]);
}

TEST(OpsPagedAttention, ErrorsNameTheTensor) {
  const Heads h{2, 1, 4};
  Paged pg(h, 4, {6}, 3);
  auto expect_error = [](auto f, const std::string& needle) {
    try {
      f();
      ADD_FAILURE() << "no error (expected one naming " << needle << ")";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  std::vector<float> q(static_cast<size_t>(h.C3())), q_short(static_cast<size_t>(h.C3() - 1)), out(static_cast<size_t>(h.CO()));
  std::vector<int32_t> bad_slot{static_cast<int32_t>(pg.blocks * pg.bs)}, seq0{0}, pos9{9}, pos2{2};
  Tensor kc = tensor_of(pg.k, {pg.blocks, pg.bs, h.NKV * h.HS}, "k_cache");
  Tensor vc = tensor_of(pg.v, {pg.blocks, pg.bs, h.NKV * h.HS}, "v_cache");
  expect_error([&] { kv_cache_write(kc, vc, tensor_of(q, {1, h.C3()}, "qkv"), tensor_of(bad_slot, {1}, "slots"), 2, 1); },
               "slots");
  // position 9 reaches block 2 of a table holding 2 blocks for this sequence (the rest are -1)
  expect_error([&] {
    paged_attention_forward(tensor_of(out, {1, h.CO()}, "out"), tensor_of(q, {1, h.C3()}, "qkv"), kc, vc,
                            tensor_of(pg.tables, {1, pg.max_blocks}, "block_tables"), tensor_of(seq0, {1}, "seqs"),
                            tensor_of(pos9, {1}, "positions"), 2, 1);
  }, "positions");
  std::vector<int32_t> tables = pg.tables;
  tables[0] = static_cast<int32_t>(pg.blocks);
  expect_error([&] {
    paged_attention_forward(tensor_of(out, {1, h.CO()}, "out"), tensor_of(q, {1, h.C3()}, "qkv"), kc, vc,
                            tensor_of(tables, {1, pg.max_blocks}, "block_tables"), tensor_of(seq0, {1}, "seqs"),
                            tensor_of(pos2, {1}, "positions"), 2, 1);
  }, "block_tables");
  expect_error([&] {
    paged_attention_forward(tensor_of(out, {1, h.CO()}, "out"), tensor_of(q_short, {1, h.C3() - 1}, "qkv"), kc, vc,
                            tensor_of(pg.tables, {1, pg.max_blocks}, "block_tables"), tensor_of(seq0, {1}, "seqs"),
                            tensor_of(pos2, {1}, "positions"), 2, 1);
  }, "qkv");
}

TEST(OpsPagedAttention, GatherRows) {
  std::vector<float> x = randn(5 * 3, 1), out(4 * 3);
  std::vector<int32_t> rows{4, 0, 4, 2}, bad{5};
  gather_rows(tensor_of(out, {4, 3}, "out"), tensor_of(x, {5, 3}, "x"), tensor_of(rows, {4}, "rows"));
  for (int m = 0; m < 4; ++m)
    for (int c = 0; c < 3; ++c) EXPECT_EQ(out[static_cast<size_t>(m * 3 + c)], x[static_cast<size_t>(rows[static_cast<size_t>(m)] * 3 + c)]);
  EXPECT_THROW(gather_rows(tensor_of(out, {1, 3}, "out"), tensor_of(x, {5, 3}, "x"), tensor_of(bad, {1}, "rows")), Error);
}

}  // namespace
}  // namespace lmf
