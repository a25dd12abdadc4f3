// Communicator over MPI_COMM_WORLD.
//
// Waiting: MPI's own blocking calls wait forever for a peer that died or hangs (Open MPI's
// launcher stops the job when a rank exits, but not when one hangs, and not under every launcher).
// Every wait here is a poll of non-blocking point-to-point requests with a deadline (the gathers
// too, so that the wait knows which peer is missing); a peer that has not answered within the
// timeout stops the group through MPI_Abort with a message naming it. The poll sleeps between
// tests (ranks may share cores with each other's compute).
#include "src/dist/mpi_communicator.h"

// The C API only: no deprecated C++ bindings (Open MPI, MPICH).
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <exception>
#include <thread>
#include <vector>

#include "ropekit/error.h"

namespace ropekit {
namespace {

using Clock = std::chrono::steady_clock;

int ToInt(int64_t n, const char* what) {
  if (n < 0 || n > INT_MAX) {
    throw Error(std::string(what) + ": " + std::to_string(n) +
                " elements exceed one MPI message (at most 2^31 - 1)");
  }
  return static_cast<int>(n);
}

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(int* argc, char*** argv, const CommunicatorOptions& options)
      : timeout_s_(options.timeout_s) {
    int provided = 0;
    MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
    // Errors come back as codes (turned into Error) rather than aborting inside MPI.
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    // Gathers run as point-to-point transfers on a communicator of their own, so that a wait
    // can name the rank that does not answer (a collective cannot), and their messages never
    // match the gradient transfers'.
    MPI_Comm_dup(MPI_COMM_WORLD, &gather_comm_);
    MPI_Comm_set_errhandler(gather_comm_, MPI_ERRORS_RETURN);
  }
  ~MpiCommunicator() override {
    if (std::uncaught_exceptions() > 0) {
      // Another rank may be waiting for this one: finalising would hang it.
      MPI_Abort(MPI_COMM_WORLD, 1);
    }
    MPI_Comm_free(&gather_comm_);
    MPI_Finalize();
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void Isend(const float* data, int64_t count, int peer, int tag) override {
    CheckPeer(peer);
    MPI_Request r;
    Check(MPI_Isend(data, ToInt(count, "Isend"), MPI_FLOAT, peer, tag, MPI_COMM_WORLD, &r),
          "MPI_Isend");
    pending_.push_back(r);
    peers_.push_back(peer);
  }
  void Irecv(float* data, int64_t count, int peer, int tag) override {
    CheckPeer(peer);
    MPI_Request r;
    Check(MPI_Irecv(data, ToInt(count, "Irecv"), MPI_FLOAT, peer, tag, MPI_COMM_WORLD, &r),
          "MPI_Irecv");
    pending_.push_back(r);
    peers_.push_back(peer);
  }
  void Progress() override {
    if (pending_.empty()) return;
    int done = 0;
    Check(
        MPI_Testall(static_cast<int>(pending_.size()), pending_.data(), &done, MPI_STATUSES_IGNORE),
        "MPI_Testall");
    if (done) Clear(pending_, peers_);
  }
  void WaitAll() override { Wait(pending_, peers_, "gradients"); }

  void AllGather(std::span<float> buf, std::span<const int64_t> offsets) override {
    AllGatherT(buf.data(), buf.size(), offsets, MPI_FLOAT, "parameters");
  }
  void AllGather(std::span<double> buf, std::span<const int64_t> offsets) override {
    AllGatherT(buf.data(), buf.size(), offsets, MPI_DOUBLE, "loss and norm partial sums");
  }
  void Gather(std::span<const float> mine, std::span<float> all,
              std::span<const int64_t> offsets) override {
    std::vector<MPI_Request> reqs;
    std::vector<int> peers;
    if (rank_ == 0) {
      Layout(all.size(), offsets, nullptr);
      if (static_cast<int64_t>(mine.size()) != offsets[1]) throw Error("Gather: block size");
      std::copy(mine.begin(), mine.end(), all.begin());
      for (int r = 1; r < size_; ++r) {
        Post(MPI_Irecv, all.data() + offsets[r], offsets[r + 1] - offsets[r], MPI_FLOAT, r, reqs,
             peers);
      }
    } else {
      Post(MPI_Isend, const_cast<float*>(mine.data()), static_cast<int64_t>(mine.size()), MPI_FLOAT,
           0, reqs, peers);
    }
    Wait(reqs, peers, "optimizer state");
  }
  void AllGatherBytes(std::span<const uint8_t> mine, std::span<uint8_t> all) override {
    const size_t n = mine.size();
    if (all.size() != n * static_cast<size_t>(size_)) {
      throw Error("AllGatherBytes: output must hold size() blocks");
    }
    std::copy(mine.begin(), mine.end(), all.begin() + n * rank_);
    std::vector<MPI_Request> reqs;
    std::vector<int> peers;
    for (int r = 0; r < size_; ++r) {
      if (r == rank_) continue;
      Post(MPI_Irecv, all.data() + n * r, static_cast<int64_t>(n), MPI_BYTE, r, reqs, peers);
      Post(MPI_Isend, const_cast<uint8_t*>(mine.data()), static_cast<int64_t>(n), MPI_BYTE, r, reqs,
           peers);
    }
    Wait(reqs, peers, "the start-up consistency check");
  }

  [[noreturn]] void Abort(const std::string& message) override {
    std::fprintf(stderr, "ropekit: error: rank %d of %d: %s\n", rank_, size_, message.c_str());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
    std::_Exit(1);
  }

 private:
  void CheckPeer(int peer) const {
    if (peer < 0 || peer >= size_ || peer == rank_) {
      throw Error("communicator: rank " + std::to_string(peer) + " is not a peer of rank " +
                  std::to_string(rank_) + " (size " + std::to_string(size_) + ")");
    }
  }
  void Check(int code, const char* call) {
    if (code == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(code, text, &len);
    Abort(std::string(call) + " failed: " + std::string(text, len));
  }
  static void Clear(std::vector<MPI_Request>& reqs, std::vector<int>& peers) {
    reqs.clear();
    peers.clear();
  }
  void Layout(size_t n, std::span<const int64_t> offsets, void*) const {
    if (offsets.size() != static_cast<size_t>(size_) + 1 || offsets[0] != 0 ||
        offsets[size_] != static_cast<int64_t>(n)) {
      throw Error("gather offsets must have size() + 1 entries from 0 to the buffer size");
    }
    for (int r = 0; r < size_; ++r) {
      if (offsets[r + 1] < offsets[r]) throw Error("gather offsets must not decrease");
    }
  }
  template <typename Fn, typename T>
  void Post(Fn fn, T* data, int64_t count, MPI_Datatype type, int peer,
            std::vector<MPI_Request>& reqs, std::vector<int>& peers) {
    MPI_Request r;
    Check(fn(data, ToInt(count, "gather block"), type, peer, 0, gather_comm_, &r),
          "point-to-point gather");
    reqs.push_back(r);
    peers.push_back(peer);
  }
  // In place: send my block to every rank, receive every other block.
  void AllGatherT(void* buf, size_t n, std::span<const int64_t> offsets, MPI_Datatype type,
                  const char* what) {
    Layout(n, offsets, nullptr);
    int width = 0;
    MPI_Type_size(type, &width);
    auto* base = static_cast<uint8_t*>(buf);
    std::vector<MPI_Request> reqs;
    std::vector<int> peers;
    for (int k = 1; k < size_; ++k) {
      // Receive from rank - k and send to rank + k: every rank talks to one peer per round.
      const int from = (rank_ - k + size_) % size_, to = (rank_ + k) % size_;
      Post(MPI_Irecv, base + offsets[from] * width, offsets[from + 1] - offsets[from], type, from,
           reqs, peers);
      Post(MPI_Isend, base + offsets[rank_] * width, offsets[rank_ + 1] - offsets[rank_], type, to,
           reqs, peers);
    }
    Wait(reqs, peers, what);
  }
  // Polls the requests until all are complete; after timeout_s, aborts naming a silent peer.
  void Wait(std::vector<MPI_Request>& reqs, std::vector<int>& peers, const char* what) {
    const auto start = Clock::now();
    for (int spins = 0;; ++spins) {
      int done = 0;
      Check(MPI_Testall(static_cast<int>(reqs.size()), reqs.data(), &done, MPI_STATUSES_IGNORE),
            "MPI_Testall");
      if (done) break;
      if (spins < 64) {
        std::this_thread::yield();
        continue;
      }
      // Ranks may share cores with each other's compute: sleep rather than spin.
      std::this_thread::sleep_for(std::chrono::microseconds(50));
      if ((spins & 255) == 0 &&
          std::chrono::duration<double>(Clock::now() - start).count() > timeout_s_) {
        int silent = -1;
        for (size_t i = 0; i < reqs.size() && silent < 0; ++i) {
          int one = 0;  // MPI_Test frees a completed request (MPI_Testall leaves them all)
          if (reqs[i] != MPI_REQUEST_NULL) MPI_Test(&reqs[i], &one, MPI_STATUS_IGNORE);
          if (!one) silent = peers[i];
        }
        char seconds[32];
        std::snprintf(seconds, sizeof(seconds), "%g", timeout_s_);
        Abort("no progress for " + std::string(seconds) + " s waiting for " + what +
              " from/to rank " + std::to_string(silent) +
              ": that rank has died or hangs; stopping all ranks");
      }
    }
    Clear(reqs, peers);
  }

  double timeout_s_;
  int rank_ = 0, size_ = 1;
  MPI_Comm gather_comm_ = MPI_COMM_NULL;
  std::vector<MPI_Request> pending_;
  std::vector<int> peers_;
};

}  // namespace

std::unique_ptr<Communicator> MakeMpiCommunicator(int* argc, char*** argv,
                                                  const CommunicatorOptions& options) {
  return std::make_unique<MpiCommunicator>(argc, argv, options);
}

}  // namespace ropekit
