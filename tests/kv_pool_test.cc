// The paged KV cache of the model (KvPagePool, KVCache on a pool): page accounting, exhaustion
// errors, and bitwise equality of logits between a contiguous cache and a paged one for
// ForwardCached (every position encoding, prompt and prefix tuning), ContextShift and
// BatchDecoder::Step, with page sizes that do not divide the lengths, pages in scrambled order
// and sequences whose pages interleave in one pool. Paged attention reads the same rows with the
// same arithmetic as contiguous attention, so any mis-addressed page changes the bits.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "ropekit/model.h"
#include "src/ops/ops.h"
#include "tests/test_util.h"

namespace ropekit {
namespace {

using testing::RandomTokens;

ModelConfig Small(PositionEncodingKind kind = PositionEncodingKind::kRope,
                  RopeType type = RopeType::kDefault) {
  ModelConfig c;
  c.hidden_size = 32;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.intermediate_size = 40;
  c.max_position_embeddings = 24;
  c.init_std = 0.1;
  c.position_encoding.kind = kind;
  c.position_encoding.rope.type = type;
  if (type == RopeType::kYarn || type == RopeType::kDynamic) c.position_encoding.rope.factor = 2.0;
  if (kind == PositionEncodingKind::kT5) {
    c.position_encoding.num_buckets = 8;
    c.position_encoding.max_distance = 16;
    c.position_encoding.init_std = 0.5;
  }
  return c;
}

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Draws every page of the pool through one-token caches, then frees them in a shuffled order,
// so that the next caches draw their pages in scrambled order.
void Scramble(Model& model, KvPagePool& pool, uint32_t seed) {
  std::vector<std::unique_ptr<KVCache>> decoys;
  const int32_t token = 7;
  while (pool.available_pages() > 0) {
    decoys.push_back(std::make_unique<KVCache>(pool, 1));
    model.ForwardCached(std::span<const int32_t>(&token, 1), *decoys.back(), nullptr, true,
                        nullptr);
  }
  std::shuffle(decoys.begin(), decoys.end(), std::mt19937(seed));
  decoys.clear();
  ASSERT_EQ(pool.used_pages(), 0);
  ASSERT_EQ(pool.reserved_pages(), 0);
}

bool Ascending(std::span<const int32_t> table) {
  return std::is_sorted(table.begin(), table.end());
}

TEST(KvPagePool, AccountsForReservedAndDrawnPagesAndFreesThemAtOnce) {
  Model model(Small(), 1);
  KvPagePool pool(model.config(), 5, 4);
  EXPECT_EQ(pool.PagesFor(0), 0);
  EXPECT_EQ(pool.PagesFor(1), 1);
  EXPECT_EQ(pool.PagesFor(8), 2);
  EXPECT_EQ(pool.PagesFor(9), 3);
  // k and v of 2 layers x 5 pages x 4 tokens x Hkv * D = 16 floats.
  EXPECT_EQ(pool.bytes(), int64_t{2} * 2 * 5 * 4 * 16 * 4);
  const std::vector<int32_t> tokens = RandomTokens(10, 1);
  {
    KVCache a(pool, 10);  // 3 pages reserved, none drawn yet
    EXPECT_TRUE(a.paged());
    EXPECT_EQ(pool.reserved_pages(), 3);
    EXPECT_EQ(pool.used_pages(), 0);
    EXPECT_EQ(pool.available_pages(), 2);
    model.ForwardCached(std::span<const int32_t>(tokens.data(), 6), a, nullptr, true, nullptr);
    EXPECT_EQ(a.block_table().size(), 2u);  // grows page by page
    EXPECT_EQ(pool.used_pages(), 2);
    // 9 tokens need 3 pages; 2 are free to reserve.
    try {
      KVCache b(pool, 9);
      ADD_FAILURE() << "reserved past the pool";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("KV page pool exhausted"), std::string::npos);
      EXPECT_NE(std::string(e.what()).find("2 of 5 pages are free"), std::string::npos) << e.what();
    }
    EXPECT_EQ(pool.reserved_pages(), 3);  // the failed reservation left nothing behind
    KVCache c(pool, 8);
    EXPECT_EQ(pool.available_pages(), 0);
    // Past the capacity: refused like a contiguous cache.
    EXPECT_THROW(
        model.ForwardCached(std::span<const int32_t>(tokens.data(), 10), c, nullptr, true, nullptr),
        Error);
    a.Clear();  // drawn pages back, the reservation kept
    EXPECT_EQ(pool.used_pages(), 0);
    EXPECT_EQ(pool.reserved_pages(), 5);
    EXPECT_TRUE(a.block_table().empty());
  }
  EXPECT_EQ(pool.reserved_pages(), 0);
  EXPECT_EQ(pool.used_pages(), 0);
  EXPECT_EQ(pool.available_pages(), 5);
  EXPECT_THROW(KvPagePool(model.config(), 0, 4), Error);
  EXPECT_THROW(KvPagePool(model.config(), 4, 0), Error);
  EXPECT_THROW(KVCache(pool, 0), Error);
  ModelConfig wide = Small();
  wide.num_kv_heads = 4;
  Model wide_model(wide, 1);
  KVCache d(pool, 4);
  EXPECT_THROW(wide_model.ForwardCached(std::span<const int32_t>(tokens.data(), 2), d, nullptr,
                                        true, nullptr),
               Error);
}

// DecodeAttention over a block table equals the same keys laid out contiguously, bit for bit.
TEST(KvPagePool, PagedDecodeAttentionEqualsContiguousBitwise) {
  const int64_t H = 4, Hkv = 2, D = 12, Tk = 23, P = 5, pages = 9, hk = Hkv * D;
  std::mt19937 gen(3);
  std::normal_distribution<float> dist;
  std::vector<float> q(H * D), k(Tk * hk), v(Tk * hk);
  for (auto* x : {&q, &k, &v}) {
    for (float& f : *x) f = dist(gen);
  }
  const std::vector<int32_t> table = {6, 2, 8, 0, 4};  // scrambled, 5 pages cover 23 keys
  std::vector<float> pk(pages * P * hk, 1e30f), pv(pages * P * hk, 1e30f);
  for (int64_t j = 0; j < Tk; ++j) {
    const int64_t slot = table[j / P] * P + j % P;
    std::copy_n(k.begin() + j * hk, hk, pk.begin() + slot * hk);
    std::copy_n(v.begin() + j * hk, hk, pv.begin() + slot * hk);
  }
  std::vector<int64_t> kpos(Tk);
  for (int64_t j = 0; j < Tk; ++j) kpos[j] = j;
  for (int64_t qp : {Tk - 1, int64_t{9}}) {  // all keys visible, and a causal prefix
    ops::AttentionArgs a;
    a.tq = 1;
    a.tk = Tk;
    a.heads = H;
    a.kv_heads = Hkv;
    a.head_dim = D;
    a.q = q.data();
    a.q_row_stride = a.q_batch_stride = H * D;
    a.k = k.data();
    a.v = v.data();
    a.kv_row_stride = hk;
    a.kv_batch_stride = Tk * hk;
    a.out_row_stride = a.out_batch_stride = H * D;
    a.q_positions = std::span<const int64_t>(&qp, 1);
    a.k_positions = kpos;
    a.scale = 0.3f;
    std::vector<float> want(H * D), got(H * D), scratch(Tk);
    a.out = want.data();
    ops::DecodeAttention(a, scratch);
    a.k = pk.data();
    a.v = pv.data();
    a.block_table = table;
    a.page_size = P;
    a.out = got.data();
    ops::DecodeAttention(a, scratch);
    EXPECT_TRUE(SameBits(want, got)) << "query at " << qp;
    a.block_table = std::span<const int32_t>(table.data(), 4);  // 20 < 23 keys
    EXPECT_THROW(ops::DecodeAttention(a, scratch), Error);
    EXPECT_THROW(ops::AttentionForward(a, nullptr), Error);
  }
}

struct CachedCase {
  const char* name;
  ModelConfig config;
};

class PagedForwardCached : public ::testing::TestWithParam<CachedCase> {};

// Two sequences decoded in turns on one scrambled pool (their pages interleave) against the same
// sequences on contiguous caches: every logit of the prompt and of each step, bit for bit.
TEST_P(PagedForwardCached, EqualsContiguousBitwise) {
  Model model(GetParam().config, 5);
  // 27 tokens: past max_position_embeddings 24, where dynamic NTK changes its frequencies.
  const int64_t V = model.config().vocab_size, prompt = 7, steps = 20, total = prompt + steps;
  for (int64_t P : {1, 3, 16}) {
    KvPagePool pool(model.config(), 2 * ((total + P - 1) / P) + 3, P);
    Scramble(model, pool, static_cast<uint32_t>(P));
    std::vector<std::vector<int32_t>> seqs = {RandomTokens(total, 11), RandomTokens(total, 12)};
    std::vector<std::unique_ptr<KVCache>> flat, paged;
    for (int s = 0; s < 2; ++s) {
      flat.push_back(std::make_unique<KVCache>(model.config(), total));
      paged.push_back(std::make_unique<KVCache>(pool, total));
      std::vector<float> a(prompt * V), b(prompt * V);
      const std::span<const int32_t> p(seqs[s].data(), prompt);
      model.ForwardCached(p, *flat[s], a.data(), false, nullptr);
      model.ForwardCached(p, *paged[s], b.data(), false, nullptr);
      ASSERT_TRUE(SameBits(a, b)) << "P " << P << " prefill of sequence " << s;
    }
    for (int64_t t = prompt; t < total; ++t) {
      for (int s = 0; s < 2; ++s) {
        std::vector<float> a(V), b(V);
        const std::span<const int32_t> tok(&seqs[s][t], 1);
        model.ForwardCached(tok, *flat[s], a.data(), true, nullptr);
        model.ForwardCached(tok, *paged[s], b.data(), true, nullptr);
        ASSERT_TRUE(SameBits(a, b)) << "P " << P << " sequence " << s << " position " << t;
      }
    }
    if (P == 3) {  // nine pages per sequence (with two, either order is likely)
      EXPECT_FALSE(Ascending(paged[0]->block_table()) && Ascending(paged[1]->block_table()))
          << "the pages were not scrambled: the test would not see mis-addressing";
    }
  }
}

ModelConfig WithAlibi() { return Small(PositionEncodingKind::kAlibi); }

INSTANTIATE_TEST_SUITE_P(
    Encodings, PagedForwardCached,
    ::testing::Values(CachedCase{"rope", Small()},
                      CachedCase{"yarn", Small(PositionEncodingKind::kRope, RopeType::kYarn)},
                      CachedCase{"dynamic", Small(PositionEncodingKind::kRope, RopeType::kDynamic)},
                      CachedCase{"alibi", WithAlibi()},
                      CachedCase{"t5", Small(PositionEncodingKind::kT5)},
                      CachedCase{"nope", Small(PositionEncodingKind::kNone)}),
    [](const ::testing::TestParamInfo<CachedCase>& info) { return info.param.name; });

// Prompt tuning (K virtual tokens run first) and prefix tuning (K fixed cache entries written
// before the prompt) fill a paged cache as they fill a contiguous one.
TEST(KvPagePool, PromptAndPrefixTuningPrefillEqualsContiguousBitwise) {
  for (PeftType type : {PeftType::kPromptTuning, PeftType::kPrefixTuning}) {
    Model model(Small(), 9);
    LoraConfig lc;
    lc.type = type;
    lc.num_virtual_tokens = 5;
    model.AddLora(lc, 4);
    const int64_t V = model.config().vocab_size, T = 8, cap = 5 + T + 2;
    KvPagePool pool(model.config(), 2 * ((cap + 2) / 3) + 2, 3);
    Model plain(Small(), 9);  // the adapters' caches need room for their K entries
    Scramble(plain, pool, 21);
    const std::vector<int32_t> tokens = RandomTokens(T + 2, 8);
    KVCache flat(model.config(), cap), paged(pool, cap);
    for (int64_t n : {T, int64_t{1}, int64_t{1}}) {
      const int64_t at = flat.size() == 0 ? 0 : flat.size() - 5;  // tokens already consumed
      std::vector<float> a(n * V), b(n * V);
      const std::span<const int32_t> in(tokens.data() + at, n);
      model.ForwardCached(in, flat, a.data(), false, nullptr);
      model.ForwardCached(in, paged, b.data(), false, nullptr);
      ASSERT_TRUE(SameBits(a, b)) << static_cast<int>(type) << " at " << at;
      ASSERT_EQ(flat.size(), paged.size());
    }
  }
}

// ContextShift moves rows through the block table: the logits after two shifts equal the
// contiguous cache's, bit for bit.
TEST(KvPagePool, ContextShiftEqualsContiguousBitwise) {
  for (RopeType type : {RopeType::kDefault, RopeType::kDynamic}) {
    Model model(Small(PositionEncodingKind::kRope, type), 13);
    const int64_t V = model.config().vocab_size, context = 14, n_keep = 3, steps = 30;
    KvPagePool pool(model.config(), 12, 4);
    Scramble(model, pool, 5);
    KVCache flat(model.config(), context), paged(pool, context);
    const std::vector<int32_t> tokens = RandomTokens(steps, 17);
    int shifts = 0;
    for (int64_t t = 0; t < steps; ++t) {
      if (flat.size() == context) {
        const int64_t n_discard = (context - n_keep) / 2;
        model.ContextShift(flat, n_keep, n_discard, nullptr);
        model.ContextShift(paged, n_keep, n_discard, nullptr);
        ++shifts;
      }
      std::vector<float> a(V), b(V);
      model.ForwardCached(std::span<const int32_t>(&tokens[t], 1), flat, a.data(), true, nullptr);
      model.ForwardCached(std::span<const int32_t>(&tokens[t], 1), paged, b.data(), true, nullptr);
      ASSERT_TRUE(SameBits(a, b)) << RopeTypeName(type) << " token " << t;
    }
    EXPECT_GE(shifts, 2);
  }
}

// BatchDecoder::Step over contiguous caches, over caches sharing one scrambled pool (one fused
// append per layer) and over caches in two pools (one fused append per sequence): the same bits.
TEST(KvPagePool, BatchDecoderStepEqualsContiguousBitwise) {
  for (PositionEncodingKind kind : {PositionEncodingKind::kRope, PositionEncodingKind::kAlibi}) {
    Model model(Small(kind), 15);
    const int64_t V = model.config().vocab_size, B = 5, steps = 9, cap = 24, P = 5;
    KvPagePool pool(model.config(), (B + B / 2 + 1) * 5, P), pool2(model.config(), 3 * 5, P);
    Scramble(model, pool, 31);
    Scramble(model, pool2, 32);
    std::vector<std::vector<int32_t>> seqs;
    std::vector<std::unique_ptr<KVCache>> flat, shared, split;
    for (int64_t b = 0; b < B; ++b) {
      seqs.push_back(RandomTokens(2 + 3 * b + steps, 40 + b));
      const std::span<const int32_t> p(seqs[b].data(), 2 + 3 * b);
      flat.push_back(std::make_unique<KVCache>(model.config(), cap));
      shared.push_back(std::make_unique<KVCache>(pool, cap));
      split.push_back(std::make_unique<KVCache>(b % 2 ? pool : pool2, cap));
      for (auto* c : {flat.back().get(), shared.back().get(), split.back().get()}) {
        model.ForwardCached(p, *c, nullptr, true, nullptr);
      }
    }
    BatchDecoder decoder(model);
    ThreadPool threads(2);
    for (int64_t t = 0; t < steps; ++t) {
      std::vector<int32_t> ids;
      for (int64_t b = 0; b < B; ++b) ids.push_back(seqs[b][2 + 3 * b + t]);
      std::vector<std::vector<float>> out;
      for (auto* set : {&flat, &shared, &split}) {
        std::vector<KVCache*> cs;
        for (auto& c : *set) cs.push_back(c.get());
        out.emplace_back(B * V);
        decoder.Step(cs, ids, out.back().data(), t % 2 ? &threads : nullptr);
      }
      ASSERT_TRUE(SameBits(out[0], out[1])) << "shared pool, step " << t;
      ASSERT_TRUE(SameBits(out[0], out[2])) << "two pools, step " << t;
    }
    EXPECT_FALSE(Ascending(shared[B - 1]->block_table()));
  }
  // Nothing leaks: every cache is gone, every page is back.
}

}  // namespace
}  // namespace ropekit
