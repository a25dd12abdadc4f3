// The single-process communicator and the choice between it and MPI (ropekit/distributed.h).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "ropekit/distributed.h"
#include "ropekit/error.h"
#include "src/dist/mpi_communicator.h"

namespace ropekit {
namespace {

class SingleProcessCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void Isend(const float*, int64_t, int peer, int) override { NoPeer(peer); }
  void Irecv(float*, int64_t, int peer, int) override { NoPeer(peer); }
  void Progress() override {}
  void WaitAll() override {}
  void AllGather(std::span<float>, std::span<const int64_t> offsets) override { Check(offsets); }
  void AllGather(std::span<double>, std::span<const int64_t> offsets) override { Check(offsets); }
  void Gather(std::span<const float> mine, std::span<float> all,
              std::span<const int64_t> offsets) override {
    Check(offsets);
    if (mine.size() != all.size()) throw Error("Gather: one block of all.size() floats expected");
    std::copy(mine.begin(), mine.end(), all.begin());
  }
  void AllGatherBytes(std::span<const uint8_t> mine, std::span<uint8_t> all) override {
    if (all.size() != mine.size()) throw Error("AllGatherBytes: output must hold size() blocks");
    std::memcpy(all.data(), mine.data(), mine.size());
  }
  [[noreturn]] void Abort(const std::string& message) override {
    std::fprintf(stderr, "ropekit: error: %s\n", message.c_str());
    std::exit(1);
  }

 private:
  [[noreturn]] static void NoPeer(int peer) {
    throw Error("single-process communicator: there is no rank " + std::to_string(peer));
  }
  static void Check(std::span<const int64_t> offsets) {
    if (offsets.size() != 2) throw Error("gather offsets must have size() + 1 = 2 entries");
  }
};

// The number of ranks announced by an MPI launcher (Open MPI, or PMI for MPICH / Slurm), or 0.
int LauncherSize() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"}) {
    if (const char* v = std::getenv(name)) return std::atoi(v);
  }
  return 0;
}

}  // namespace

Communicator& SingleProcess() {
  static SingleProcessCommunicator single;
  return single;
}

bool BuiltWithMpi() {
#ifdef ROPEKIT_HAVE_MPI
  return true;
#else
  return false;
#endif
}

std::unique_ptr<Communicator> ConnectRanks(int* argc, char*** argv,
                                           const CommunicatorOptions& options) {
  if (!(options.timeout_s > 0)) throw Error("communicator timeout: must be > 0 seconds");
  const int launched = LauncherSize();
#ifdef ROPEKIT_HAVE_MPI
  if (launched > 0) return MakeMpiCommunicator(argc, argv, options);
#else
  if (launched > 1) {
    throw Error("launched as one of " + std::to_string(launched) +
                " ranks by an MPI launcher, but this ropekit was built without MPI "
                "(configure with -DROPEKIT_WITH_MPI=ON and install libopenmpi-dev)");
  }
#endif
  return nullptr;
}

}  // namespace ropekit
