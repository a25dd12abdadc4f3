// Data-parallel building blocks that need no second process: the ZeRO-1 shard layout, the split
// of micro-batches over ranks, the norm's chunk sums, the single-rank reduce-scatter, and the
// model's gradient-ready ranges (the buckets). The multi-rank equivalence is tested end to end
// under mpirun in tests/python/test_mpi_train.py.
#include <gtest/gtest.h>

#include <numeric>
#include <random>

#include "ropekit/model.h"
#include "src/dist/zero.h"

namespace ropekit {
namespace {

TEST(ShardLayout, ContiguousChunkAlignedAndCovering) {
  for (int64_t P : {0, 1, 1023, 1024, 1025, 5000, 26000}) {
    for (int N : {1, 2, 3, 4, 7}) {
      dist::ShardLayout L(P, N);
      EXPECT_EQ(L.begin(0), 0);
      EXPECT_EQ(L.end(N - 1), P);
      int64_t chunks = 0;
      for (int r = 0; r < N; ++r) {
        EXPECT_LE(L.begin(r), L.end(r));
        if (r + 1 < N) {
          EXPECT_EQ(L.end(r), L.begin(r + 1));
        }
        if (L.end(r) < P) {
          EXPECT_EQ(L.end(r) % dist::kNormChunk, 0);
        }
        chunks += L.chunk_offsets()[r + 1] - L.chunk_offsets()[r];
        // Balanced to within one chunk.
        EXPECT_LE(L.size(r), (L.num_chunks() / N + 1) * dist::kNormChunk);
      }
      EXPECT_EQ(chunks, (P + dist::kNormChunk - 1) / dist::kNormChunk);
    }
  }
  EXPECT_THROW(dist::ShardLayout(10, 0), Error);
}

TEST(MicroBatches, ContiguousSplitAndOwner) {
  for (int64_t A : {1, 2, 3, 5, 8, 13}) {
    for (int N = 1; N <= A; ++N) {
      int64_t count = 0;
      for (int r = 0; r < N; ++r) {
        const int64_t b = dist::MicroBegin(A, N, r), e = dist::MicroBegin(A, N, r + 1);
        EXPECT_GE(e - b, 1) << "every rank computes a micro-batch";
        for (int64_t k = b; k < e; ++k) EXPECT_EQ(dist::MicroOwner(A, N, k), r);
        count += e - b;
      }
      EXPECT_EQ(count, A);
    }
  }
}

TEST(ChunkSquares, ExactSquaresSummedInOrder) {
  std::mt19937 rng(1);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  std::vector<float> g(2 * dist::kNormChunk + 17);
  for (float& x : g) x = dist(rng);
  std::vector<double> out(3);
  dist::ChunkSquares(g, out);
  for (int c = 0; c < 3; ++c) {
    double sum = 0.0;  // independent loop: the same terms in index order
    const size_t end = std::min<size_t>(g.size(), (c + 1) * dist::kNormChunk);
    for (size_t i = c * dist::kNormChunk; i < end; ++i) {
      sum += static_cast<double>(g[i]) * static_cast<double>(g[i]);
    }
    EXPECT_EQ(out[c], sum);
  }
  std::vector<double> wrong(2);
  EXPECT_THROW(dist::ChunkSquares(g, wrong), Error);
}

TEST(GradientReducer, OneRankCopiesItsBufferAndChecksCoverage) {
  Communicator& one = SingleProcess();
  dist::ShardLayout L(3000, 1);
  std::vector<float> g(3000);
  std::iota(g.begin(), g.end(), 0.5f);
  for (bool overlap : {true, false}) {
    dist::GradientReducer reducer(one, L, 1, overlap);
    reducer.BeginStep({g.data()});
    reducer.Ready(1000, 3000);
    reducer.Ready(0, 1000);
    std::vector<float> out(3000);
    reducer.Finish(out);
    EXPECT_EQ(out, g);
    reducer.BeginStep({g.data()});
    reducer.Ready(0, 1000);
    EXPECT_THROW(reducer.Finish(out), Error);  // 2000 floats never reported ready
  }
  EXPECT_THROW(dist::GradientReducer(one, dist::ShardLayout(10, 2), 1, true), Error);
}

ModelConfig TinyDistConfig(PositionEncodingKind kind, bool tied) {
  ModelConfig c;
  c.hidden_size = 16;
  c.num_layers = 3;
  c.num_heads = 2;
  c.num_kv_heads = 1;
  c.intermediate_size = 24;
  c.max_position_embeddings = 8;
  c.tie_word_embeddings = tied;
  c.position_encoding.kind = kind;
  c.position_encoding.max_positions = 8;
  return c.Resolved();
}

// Each reported range covers parameters() exactly once, and its gradient is already final when
// reported (what the bucketed reduction relies on).
TEST(GradReady, RangesCoverParametersOnceAndAreFinal) {
  for (auto [kind, tied] : {std::pair{PositionEncodingKind::kRope, true},
                            std::pair{PositionEncodingKind::kLearned, false},
                            std::pair{PositionEncodingKind::kT5, true}}) {
    Model model(TinyDistConfig(kind, tied), 7);
    const size_t P = model.parameters().size();
    std::vector<int32_t> tokens(2 * 9);
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>(i * 37 % 256);
    std::vector<float> grads(P, 0.0f), snapshot(P, 0.0f);
    std::vector<int> seen(P, 0);
    std::vector<std::pair<int64_t, int64_t>> order;
    model.ForwardBackward(tokens, 2, 8, grads, 0.5f, nullptr, [&](int64_t b, int64_t e) {
      order.emplace_back(b, e);
      for (int64_t i = b; i < e; ++i) {
        seen[i] += 1;
        snapshot[i] = grads[i];
      }
    });
    for (size_t i = 0; i < P; ++i) ASSERT_EQ(seen[i], 1) << "parameter " << i;
    EXPECT_EQ(snapshot, grads);
    EXPECT_GE(order.size(), 5u);  // head, 3 layers, embedding (+ position table)
    // The same ranges in the same order on every call.
    std::vector<std::pair<int64_t, int64_t>> again;
    model.ForwardBackward(tokens, 2, 8, grads, 0.5f, nullptr,
                          [&](int64_t b, int64_t e) { again.emplace_back(b, e); });
    EXPECT_EQ(order, again);
  }
}

}  // namespace
}  // namespace ropekit
