// test_ops_rope.cpp: rotary position embedding (ops/rope.h) against float64 references and finite
// differences, on awkward head sizes and sequence lengths, with GQA layouts and position offsets;
// v untouched; forward then backward is the identity; shape and position errors.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "ops/rope.h"
#include "support/test_util.h"

namespace lmf {
namespace {

using test::all_close;
using test::awkward_sizes;
using test::randn;
using test::tensor_of;
using test::to_double;

constexpr double kTheta = 10000.0;

// angle of position p, pair i, head size HS: p * theta^(-2i/HS), float64
double angle(int64_t p, int64_t i, int64_t HS) {
  return static_cast<double>(p) * std::exp(-2.0 * static_cast<double>(i) / static_cast<double>(HS) * std::log(kTheta));
}

// qkv: (B, T, (NH + 2*NKV) * HS); returns the rotated copy (q and k heads rotated, v unchanged), float64.
// Row t has position pos_offset + t.
std::vector<double> rope_ref(std::vector<double> qkv, int64_t B, int64_t T, int64_t NH, int64_t NKV, int64_t HS,
                             int64_t pos_offset) {
  const int64_t row = (NH + 2 * NKV) * HS, half = HS / 2;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < NH + NKV; ++h) {
        double* x = &qkv[(b * T + t) * row + h * HS];
        for (int64_t i = 0; i < half; ++i) {
          const double a = angle(pos_offset + t, i, HS), x1 = x[i], x2 = x[i + half];
          x[i] = x1 * std::cos(a) - x2 * std::sin(a);
          x[i + half] = x2 * std::cos(a) + x1 * std::sin(a);
        }
      }
  return qkv;
}

std::vector<float> make_table(int64_t maxT, int64_t half) {
  std::vector<float> freqs(static_cast<size_t>(maxT * half * 2));
  rope_table_init(tensor_of(freqs, {maxT, half, 2}, "freqs"), static_cast<float>(kTheta));
  return freqs;
}

std::string case_name(int64_t T, int64_t HS, int64_t NH, int64_t NKV) {
  return "T=" + std::to_string(T) + " HS=" + std::to_string(HS) + " NH=" + std::to_string(NH) +
         " NKV=" + std::to_string(NKV);
}

// Table: cos/sin in float64 rounded once to f32 (half an ulp, <= 3e-8 absolute for |v| <= 1); the
// reference computes the angle another way (exp/log), which can flip that rounding by one ulp.
constexpr double kTableAtol = 6e-8, kTableRtol = 0.0;
// Rotation: x1 c - x2 s in fp32 with (c, s) rounded to f32; inputs ~N(0, 1); observed worst ~4e-7.
constexpr double kRotAtol = 2e-6, kRotRtol = 2e-6;

TEST(OpsRope, TableMatchesFloat64) {
  for (int64_t half : awkward_sizes()) {
    const int64_t maxT = 300;
    const auto freqs = make_table(maxT, half);
    std::vector<double> ref(freqs.size());
    for (int64_t p = 0; p < maxT; ++p)
      for (int64_t i = 0; i < half; ++i) {
        ref[(p * half + i) * 2] = std::cos(angle(p, i, 2 * half));
        ref[(p * half + i) * 2 + 1] = std::sin(angle(p, i, 2 * half));
      }
    EXPECT_TRUE(all_close("rope table HS=" + std::to_string(2 * half), freqs, ref, kTableAtol, kTableRtol));
  }
}

TEST(OpsRope, ForwardAwkwardSizesGqaAndOffsets) {
  const int64_t B = 2;
  for (int64_t T : awkward_sizes())
    for (int64_t half : awkward_sizes())
      for (auto [NH, NKV] : {std::pair<int64_t, int64_t>{1, 1}, {4, 2}})
        for (int64_t pos_offset : {int64_t{0}, int64_t{5}}) {
          const int64_t HS = 2 * half, row = (NH + 2 * NKV) * HS, maxT = T + 5;
          auto freqs = make_table(maxT, half);
          auto qkv = randn(static_cast<size_t>(B * T * row), 1);
          const auto ref = rope_ref(to_double(qkv), B, T, NH, NKV, HS, pos_offset);
          const auto v_before = qkv;
          rope_forward(tensor_of(qkv, {B, T, row}, "qkv"), tensor_of(freqs, {maxT, half, 2}, "freqs"),
                       static_cast<int>(NH), static_cast<int>(NKV), pos_offset);
          const std::string what = case_name(T, HS, NH, NKV) + " offset " + std::to_string(pos_offset);
          EXPECT_TRUE(all_close("rope qkv " + what, qkv, ref, kRotAtol, kRotRtol));
          // v heads are bitwise untouched
          for (int64_t n = 0; n < B * T; ++n) {
            const size_t v0 = static_cast<size_t>(n * row + (NH + NKV) * HS);
            ASSERT_EQ(0, std::memcmp(&qkv[v0], &v_before[v0], static_cast<size_t>(NKV * HS) * sizeof(float)))
                << "v changed, " << what << " row " << n;
          }
        }
}

TEST(OpsRope, OffsetMatchesLaterRowsOfLongerSequence) {
  // Decoding: row t with pos_offset P must equal row P + t of a sequence rotated from 0, bitwise
  // (both read the same table row).
  const int64_t T = 19, P = 7, half = 7, HS = 2 * half, NH = 2, NKV = 1, row = (NH + 2 * NKV) * HS, maxT = 32;
  auto freqs = make_table(maxT, half);
  auto full = randn(static_cast<size_t>((P + T) * row), 2);
  std::vector<float> tail(full.begin() + P * row, full.end());
  rope_forward(tensor_of(full, {1, P + T, row}, "full"), tensor_of(freqs, {maxT, half, 2}, "freqs"), NH, NKV, 0);
  rope_forward(tensor_of(tail, {1, T, row}, "tail"), tensor_of(freqs, {maxT, half, 2}, "freqs"), NH, NKV, P);
  EXPECT_EQ(0, std::memcmp(tail.data(), full.data() + P * row, tail.size() * sizeof(float)));
}

TEST(OpsRope, BackwardFiniteDifferences) {
  // rope_backward transforms dqkv in place (no accumulation): starting from dqkv = r it must give
  // d/dqkv of loss = sum(rope(qkv) * r), v part included (= r).
  const int64_t B = 1;
  for (int64_t T : awkward_sizes())
    for (int64_t half : awkward_sizes())
      for (auto [NH, NKV] : {std::pair<int64_t, int64_t>{1, 1}, {4, 2}}) {
        const int64_t HS = 2 * half, row = (NH + 2 * NKV) * HS, pos_offset = 2;
        const int64_t Tfd = std::min<int64_t>(T, std::max<int64_t>(1, 1500 / row));  // FD cost ~ numel^2
        const int64_t maxT = Tfd + pos_offset;
        auto freqs = make_table(maxT, half);
        auto qkv = randn(static_cast<size_t>(B * Tfd * row), 3), r = randn(qkv.size(), 4);
        const auto rd = to_double(r);
        auto loss = [&](const std::vector<double>& p) {
          const auto out = rope_ref(p, B, Tfd, NH, NKV, HS, pos_offset);
          double s = 0;
          for (size_t i = 0; i < out.size(); ++i) s += out[i] * rd[i];
          return s;
        };
        const auto g = test::finite_diff(loss, to_double(qkv));
        auto dqkv = r;
        rope_backward(tensor_of(dqkv, {B, Tfd, row}, "dqkv"), tensor_of(freqs, {maxT, half, 2}, "freqs"),
                      static_cast<int>(NH), static_cast<int>(NKV), pos_offset);
        EXPECT_TRUE(all_close("rope dqkv " + case_name(Tfd, HS, NH, NKV), dqkv, g, kRotAtol, kRotRtol));
      }
}

TEST(OpsRope, ForwardThenBackwardIsIdentity) {
  // The rotation is orthogonal, so backward (its transpose) undoes forward up to fp32 rounding.
  const int64_t B = 2, T = 111, half = 19, HS = 2 * half, NH = 4, NKV = 2, row = (NH + 2 * NKV) * HS;
  auto freqs = make_table(T, half);
  auto x = randn(static_cast<size_t>(B * T * row), 5);
  auto y = x;
  rope_forward(tensor_of(y, {B, T, row}, "qkv"), tensor_of(freqs, {T, half, 2}, "freqs"), NH, NKV);
  rope_backward(tensor_of(y, {B, T, row}, "qkv"), tensor_of(freqs, {T, half, 2}, "freqs"), NH, NKV);
  // cos^2 + sin^2 of the f32 table differs from 1 by ~1e-7, plus two fp32 rotations.
  EXPECT_TRUE(all_close("rope backward(forward(x))", y, to_double(x), kRotAtol, kRotRtol));
}

TEST(OpsRope, RejectsBadShapesAndPositionsNamingTensor) {
  const int64_t B = 1, T = 7, half = 4, HS = 8, NH = 2, NKV = 1, row = (NH + 2 * NKV) * HS, maxT = 7;
  auto freqs = make_table(maxT, half);
  std::vector<float> qkv(static_cast<size_t>(B * T * (row + 1)));
  try {  // last dim is not (NH + 2 NKV) HS
    rope_forward(tensor_of(qkv, {B, T, row + 1}, "attn.qkv_out"), tensor_of(freqs, {maxT, half, 2}, "freqs"), NH,
                 NKV);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("'attn.qkv_out'"));
  }
  std::vector<float> ok(static_cast<size_t>(B * T * row));
  try {  // positions [1, 8) exceed maxT = 7
    rope_forward(tensor_of(ok, {B, T, row}, "qkv"), tensor_of(freqs, {maxT, half, 2}, "rope_freqs"), NH, NKV, 1);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("'rope_freqs'"));
    EXPECT_THAT(e.what(), ::testing::HasSubstr("maxT=7"));
  }
  EXPECT_THROW(rope_backward(tensor_of(ok, {B, T, row}, "dqkv"), tensor_of(freqs, {maxT, half, 2}, "freqs"), NH + 1,
                             NKV),
               Error);
  std::vector<float> bad_table(7 * 4 * 3);
  EXPECT_THROW(rope_table_init(tensor_of(bad_table, {7, 4, 3}, "freqs"), 10000.0f), Error);
}

// bf16 runs on the GPU only (docs/MIXED_PRECISION.md): a bf16 qkv on the CPU fails with one line
// naming it; the table must be f32.
TEST(OpsRope, Bf16OnTheCpuIsAnError) {
  const int64_t T = 2, half = 4, row = (2 + 2 * 1) * 2 * half;
  std::vector<float> freqs(static_cast<size_t>(T * half * 2)), q(static_cast<size_t>(T * row));
  std::vector<bf16> qb(static_cast<size_t>(T * row));
  rope_table_init(tensor_of(freqs, {T, half, 2}, "freqs"), 10000.0f);
  try {
    rope_forward(Tensor(qb.data(), DType::bf16, {1, T, row}, "attn.qkv"), tensor_of(freqs, {T, half, 2}, "freqs"), 2, 1);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("rope_forward: bf16 tensors run on the GPU only ('attn.qkv')"));
  }
  try {
    rope_backward(Tensor(qb.data(), DType::bf16, {1, T, row}, "attn.dqkv"), tensor_of(freqs, {T, half, 2}, "freqs"), 2,
                  1);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("rope_backward: bf16 tensors run on the GPU only ('attn.dqkv')"));
  }
  std::vector<bf16> fb(freqs.size());
  EXPECT_THROW(rope_forward(tensor_of(q, {1, T, row}, "qkv"), Tensor(fb.data(), DType::bf16, {T, half, 2}, "freqs_bf16"),
                            2, 1),
               Error);
}

}  // namespace
}  // namespace lmf
