// The MPI implementation of Communicator (built only with ROPEKIT_WITH_MPI).
#ifndef ROPEKIT_SRC_DIST_MPI_COMMUNICATOR_H_
#define ROPEKIT_SRC_DIST_MPI_COMMUNICATOR_H_

#include <memory>

#include "ropekit/distributed.h"

namespace ropekit {

#ifdef ROPEKIT_HAVE_MPI
// Initialises MPI (MPI_THREAD_FUNNELED: only the calling thread talks to MPI) on MPI_COMM_WORLD;
// the destructor finalises it, or aborts the group when an exception is propagating.
std::unique_ptr<Communicator> MakeMpiCommunicator(int* argc, char*** argv,
                                                  const CommunicatorOptions& options);
#endif

}  // namespace ropekit

#endif  // ROPEKIT_SRC_DIST_MPI_COMMUNICATOR_H_
