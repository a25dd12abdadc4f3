// ZeRO stage 1 shard layout and the ordered, bucketed reduce-scatter (see zero.h).
#include "src/dist/zero.h"

#include <algorithm>
#include <string>

#include "ropekit/error.h"

namespace ropekit::dist {

ShardLayout::ShardLayout(int64_t num_params, int ranks) {
  if (ranks < 1) throw Error("ShardLayout: ranks must be >= 1");
  if (num_params < 0) throw Error("ShardLayout: num_params must be >= 0");
  num_chunks_ = (num_params + kNormChunk - 1) / kNormChunk;
  offsets_.resize(ranks + 1);
  chunk_offsets_.resize(ranks + 1);
  for (int r = 0; r <= ranks; ++r) {
    chunk_offsets_[r] = num_chunks_ * r / ranks;
    offsets_[r] = std::min(num_params, chunk_offsets_[r] * kNormChunk);
  }
}

int MicroOwner(int64_t A, int N, int64_t k) {
  int r = N - 1;
  while (r > 0 && MicroBegin(A, N, r) > k) --r;
  return r;
}

void ChunkSquares(std::span<const float> g, std::span<double> out) {
  const int64_t n = static_cast<int64_t>(g.size());
  if (static_cast<int64_t>(out.size()) != (n + kNormChunk - 1) / kNormChunk) {
    throw Error("ChunkSquares: one output per chunk expected");
  }
  for (size_t c = 0; c < out.size(); ++c) {
    const int64_t i0 = static_cast<int64_t>(c) * kNormChunk, i1 = std::min(n, i0 + kNormChunk);
    double sum = 0.0;
    for (int64_t i = i0; i < i1; ++i) sum += double{g[i]} * g[i];
    out[c] = sum;
  }
}

GradientReducer::GradientReducer(Communicator& comm, const ShardLayout& layout,
                                 int64_t micro_batches, bool overlap)
    : comm_(comm),
      layout_(layout),
      A_(micro_batches),
      overlap_(overlap),
      rank_(comm.rank()),
      N_(comm.size()) {
  if (layout.ranks() != N_) throw Error("GradientReducer: layout and communicator sizes differ");
  if (A_ < N_) throw Error("GradientReducer: fewer micro-batches than ranks");
  first_remote_ = MicroBegin(A_, N_, 1);
  const int64_t terms = 1 + (A_ - first_remote_);
  staging_.resize(terms);
  for (int64_t t = 0; t < terms; ++t) {
    const int source = t == 0 ? 0 : MicroOwner(A_, N_, first_remote_ + t - 1);
    if (source != rank_) staging_[t].resize(layout.size(rank_));
  }
}

void GradientReducer::BeginStep(std::vector<const float*> local) {
  const int64_t expected =
      rank_ == 0 ? 1 : MicroBegin(A_, N_, rank_ + 1) - MicroBegin(A_, N_, rank_);
  if (static_cast<int64_t>(local.size()) != expected) {
    throw Error("GradientReducer: rank " + std::to_string(rank_) + " expects " +
                std::to_string(expected) + " gradient buffers");
  }
  local_ = std::move(local);
  deferred_.clear();
  covered_ = 0;
}

void GradientReducer::Ready(int64_t begin, int64_t end) {
  covered_ += end - begin;
  if (!overlap_) {
    deferred_.emplace_back(begin, end);
    return;
  }
  Post(begin, end);
  comm_.Progress();
}

void GradientReducer::Post(int64_t begin, int64_t end) {
  const int64_t terms = static_cast<int64_t>(staging_.size());
  for (int j = 0; j < N_; ++j) {
    const int64_t c0 = std::max(begin, layout_.begin(j)), c1 = std::min(end, layout_.end(j));
    if (c0 >= c1) continue;
    for (int64_t t = 0; t < terms; ++t) {
      const int64_t k = first_remote_ + t - 1;  // micro-batch of term t >= 1
      const int source = t == 0 ? 0 : MicroOwner(A_, N_, k);
      const int tag = static_cast<int>(t);
      if (j == rank_ && source != rank_) {
        comm_.Irecv(staging_[t].data() + (c0 - layout_.begin(j)), c1 - c0, source, tag);
      } else if (j != rank_ && source == rank_) {
        const float* buf = t == 0 ? local_[0] : local_[k - MicroBegin(A_, N_, rank_)];
        comm_.Isend(buf + c0, c1 - c0, j, tag);
        floats_sent_ += c1 - c0;
      }
    }
  }
}

void GradientReducer::Finish(std::span<float> out) {
  for (auto [b, e] : deferred_) Post(b, e);
  deferred_.clear();
  if (covered_ != layout_.end(N_ - 1)) {
    throw Error("GradientReducer: the backward reported " + std::to_string(covered_) + " of " +
                std::to_string(layout_.end(N_ - 1)) + " gradient floats as ready");
  }
  comm_.WaitAll();
  const int64_t S = layout_.size(rank_), s0 = layout_.begin(rank_);
  if (static_cast<int64_t>(out.size()) != S) throw Error("GradientReducer: output is not a shard");
  if (S == 0) return;
  const int64_t terms = static_cast<int64_t>(staging_.size());
  for (int64_t t = 0; t < terms; ++t) {
    const int64_t k = first_remote_ + t - 1;
    const int source = t == 0 ? 0 : MicroOwner(A_, N_, k);
    const float* src = source != rank_ ? staging_[t].data()
                       : t == 0        ? local_[0] + s0
                                       : local_[k - MicroBegin(A_, N_, rank_)] + s0;
    if (t == 0) {
      std::copy(src, src + S, out.begin());
    } else {
      for (int64_t i = 0; i < S; ++i) out[i] += src[i];  // the left fold, term by term
    }
  }
}

}  // namespace ropekit::dist
