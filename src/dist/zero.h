// ZeRO stage 1 over a Communicator (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward
// Training Trillion Parameter Models", arXiv:1910.02054, Sec. 5.1: optimizer-state partitioning):
// the flat parameter buffer is cut into one contiguous shard per rank; each rank reduces the
// gradient of its shard, keeps the AdamW moments of its shard only, updates its shard of the
// parameters, and the shards are all-gathered.
//
// Bit-identity with one process. One process with A micro-batches accumulates the step's gradient
// as the left fold ((g_0 + g_1) + g_2) + ... in float32 (Train: micro-batch 0 is computed into
// the accumulator, every later one into a zeroed scratch buffer that is then added). Here the A
// micro-batches are split contiguously over the N ranks (rank r computes [A r / N, A (r + 1) / N)),
// and the owner of each shard element folds the same terms in the same order: rank 0 folds its
// prefix locally, the other ranks send each micro-batch's gradient separately, and the owner adds
// them in micro-batch order. MPI_Reduce / MPI_Allreduce are not used: they do not fix the order.
//
// Overlap (PyTorch DDP's bucketed reduction): during the backward of a rank's last micro-batch,
// the model reports each flat range whose gradient is final (a layer, the head, the embedding);
// the pieces of that range are sent to their owners at once with non-blocking transfers, which
// proceed while the backward continues.
//
// Dimension legend: P = flat parameter floats, N = ranks, A = micro-batches per step,
// S = this rank's shard length, C = norm chunks.
#ifndef ROPEKIT_SRC_DIST_ZERO_H_
#define ROPEKIT_SRC_DIST_ZERO_H_

#include <cstdint>
#include <span>
#include <vector>

#include "ropekit/distributed.h"

namespace ropekit::dist {

// Shard boundaries and gradient-norm partial sums are aligned to chunks of this many floats, so
// that the squared norm is the same sum of the same per-chunk partial sums for any rank count.
inline constexpr int64_t kNormChunk = 1024;

class ShardLayout {
 public:
  ShardLayout(int64_t num_params, int ranks);
  int ranks() const { return static_cast<int>(offsets_.size()) - 1; }
  int64_t begin(int r) const { return offsets_[r]; }
  int64_t end(int r) const { return offsets_[r + 1]; }
  int64_t size(int r) const { return offsets_[r + 1] - offsets_[r]; }
  std::span<const int64_t> offsets() const { return offsets_; }  // N + 1 entries
  int64_t num_chunks() const { return num_chunks_; }
  int64_t chunk_begin(int r) const { return chunk_offsets_[r]; }
  std::span<const int64_t> chunk_offsets() const { return chunk_offsets_; }

 private:
  std::vector<int64_t> offsets_, chunk_offsets_;
  int64_t num_chunks_ = 0;
};

// First micro-batch of rank r when A micro-batches are split over N ranks (rank r computes
// [MicroBegin(A, N, r), MicroBegin(A, N, r + 1))).
inline int64_t MicroBegin(int64_t A, int N, int r) { return A * r / N; }
// The rank that computes micro-batch k.
int MicroOwner(int64_t A, int N, int64_t k);

// Squared L2 norm partial sums of each kNormChunk-float chunk of `g`, in double (each square of
// a float is exact in double; the sum runs in index order). out.size() = ceil(g.size() / chunk).
void ChunkSquares(std::span<const float> g, std::span<double> out);

// One step's ordered reduce-scatter of gradients, bucket by bucket.
class GradientReducer {
 public:
  GradientReducer(Communicator& comm, const ShardLayout& layout, int64_t micro_batches,
                  bool overlap);

  // `local`: this rank's gradient buffers [P] that the owners read, in micro-batch order. Rank 0
  // passes one buffer (the fold of its micro-batches); rank r > 0 one buffer per micro-batch.
  void BeginStep(std::vector<const float*> local);
  // The gradient of flat range [begin, end) is final in every local buffer (called during the
  // backward of this rank's last micro-batch, in the same order on every rank).
  void Ready(int64_t begin, int64_t end);
  // Waits for the transfers and writes this rank's shard of the summed gradient into out [S].
  void Finish(std::span<float> out);
  int64_t floats_sent() const { return floats_sent_; }

 private:
  void Post(int64_t begin, int64_t end);

  Communicator& comm_;
  const ShardLayout& layout_;
  int64_t A_;
  bool overlap_;
  int rank_, N_;
  std::vector<const float*> local_;
  // Terms of the fold, in order: term 0 is rank 0's prefix; term t >= 1 is micro-batch
  // first_remote_ + t - 1.
  int64_t first_remote_;
  std::vector<std::vector<float>> staging_;  // [terms][S] for terms received from other ranks
  std::vector<std::pair<int64_t, int64_t>> deferred_;
  int64_t covered_ = 0, floats_sent_ = 0;
};

}  // namespace ropekit::dist

#endif  // ROPEKIT_SRC_DIST_ZERO_H_
