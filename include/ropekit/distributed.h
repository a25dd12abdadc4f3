// Data-parallel training across processes: the communicator the trainer talks to.
//
// A Communicator is a group of `size()` processes (ranks) that train one model together. The
// trainer needs only a few operations of it: non-blocking point-to-point transfers of float
// ranges (the ordered reduce-scatter of gradient buckets), in-place gathers (parameters after the
// sharded optimizer step, optimizer shards for checkpoints, loss and gradient-norm partial sums)
// and a fault-aware wait. Two implementations exist: the single process (size 1; every
// collective is the identity) and MPI (when ropekit is built with ROPEKIT_WITH_MPI and launched by
// `mpirun`). See Train() in ropekit/model.h for what is computed where.
#ifndef ROPEKIT_DISTRIBUTED_H_
#define ROPEKIT_DISTRIBUTED_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>

namespace ropekit {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // Posts a non-blocking send / receive of `count` floats to / from rank `peer` (never this
  // rank). Transfers between one pair of ranks with one tag complete in posting order. The
  // buffers must stay valid until WaitAll() returns.
  virtual void Isend(const float* data, int64_t count, int peer, int tag) = 0;
  virtual void Irecv(float* data, int64_t count, int peer, int tag) = 0;
  // Advances posted transfers without blocking.
  virtual void Progress() = 0;
  // Blocks until every posted transfer is complete. A peer that has not answered within the
  // communicator's timeout stops the whole group with an error that names it.
  virtual void WaitAll() = 0;

  // In-place gathers: rank r's block is buf[offsets[r], offsets[r + 1]) (offsets has size() + 1
  // entries, offsets[0] = 0); AllGather leaves every block on every rank.
  virtual void AllGather(std::span<float> buf, std::span<const int64_t> offsets) = 0;
  virtual void AllGather(std::span<double> buf, std::span<const int64_t> offsets) = 0;
  // Rank r's `mine` (offsets[r + 1] - offsets[r] floats) lands in all[offsets[r], ...) on rank 0;
  // `all` is read only on rank 0.
  virtual void Gather(std::span<const float> mine, std::span<float> all,
                      std::span<const int64_t> offsets) = 0;
  // Every rank contributes `mine` (the same length on all ranks); `all` receives size() blocks in
  // rank order.
  virtual void AllGatherBytes(std::span<const uint8_t> mine, std::span<uint8_t> all) = 0;

  // Stops every rank of the group (the process does not return). `message` is printed first.
  [[noreturn]] virtual void Abort(const std::string& message) = 0;
};

// The process alone: size 1, rank 0.
Communicator& SingleProcess();

struct CommunicatorOptions {
  // Seconds a rank waits for a peer before it stops the group (a peer that died or hangs).
  double timeout_s = 600.0;
};

// The group this process was launched in: all ranks of `mpirun -np N` (MPI_COMM_WORLD, which is
// initialised here and finalised when the returned object is destroyed), or nullptr when not
// launched by an MPI launcher (the process trains alone: SingleProcess()). Throws Error when
// launched by mpirun with N > 1 but built without MPI, so that N processes never silently train N
// copies into one directory.
std::unique_ptr<Communicator> ConnectRanks(int* argc, char*** argv,
                                           const CommunicatorOptions& options = {});

// True when this build can run over MPI (ROPEKIT_WITH_MPI).
bool BuiltWithMpi();

// Per-rank measurements of data-parallel training, filled by Train() when requested.
struct DataParallelStats {
  int ranks = 1;
  int64_t steps = 0;
  double step_s = 0.0;         // wall time of all steps (excluding validation and checkpoints)
  double compute_s = 0.0;      // forward + backward of this rank's micro-batches
  double reduce_wait_s = 0.0;  // blocked after the backward until the gradient shard was complete
  // The part of reduce_wait_s after the last rank's backward ended (the rest is waiting for a
  // slower rank); meaningful when the ranks share one machine's steady clock.
  double reduce_after_last_backward_s = 0.0;
  double reduce_post_s = 0.0;  // posting and progressing bucket transfers during the backward
  double optimizer_s = 0.0;    // gradient norm (with its partial sums' gather), AdamW on the shard
  double allgather_s = 0.0;    // parameters (and the loss / norm partial sums) all-gathered
  int64_t grad_floats_sent = 0;            // gradient floats this rank sent, over all steps
  int64_t optimizer_floats = 0;            // AdamW moments held by this rank (2 per shard element)
  int64_t optimizer_floats_unsharded = 0;  // the same for one process (2 per parameter)
};

struct DataParallelOptions {
  Communicator* comm = nullptr;  // nullptr: SingleProcess()
  // Reduce each gradient bucket as soon as its layer's backward is done (DDP-style overlap).
  // false: post every bucket after the backward (for measuring how much the overlap hides).
  bool overlap = true;
  DataParallelStats* stats = nullptr;
};

}  // namespace ropekit

#endif  // ROPEKIT_DISTRIBUTED_H_
