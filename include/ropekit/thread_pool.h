// ropekit: a small deterministic thread pool.
//
// ParallelFor splits [0, num_tasks) into contiguous, statically assigned ranges, one per worker
// (worker 0 is the calling thread). Each output is owned by exactly one task, so results never
// depend on the thread count or on scheduling.
#ifndef ROPEKIT_THREAD_POOL_H_
#define ROPEKIT_THREAD_POOL_H_

#include <cstddef>
#include <functional>
#include <memory>

namespace ropekit {

// The most threads any ropekit pool, command or binding accepts (0 = all hardware threads).
inline constexpr size_t kMaxThreads = 1024;

class ThreadPool {
 public:
  // num_threads in [1, kMaxThreads] (counting the caller); 0 means
  // std::thread::hardware_concurrency(), capped at kMaxThreads.
  explicit ThreadPool(size_t num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  size_t num_threads() const { return num_threads_; }

  // Calls range(begin, end, worker) for each worker's contiguous slice of [0, num_tasks) and
  // waits for all. Worker w gets tasks [w*num_tasks/W, (w+1)*num_tasks/W). An exception thrown by
  // a task is rethrown in the caller (the first one, by worker index). Not reentrant.
  void ParallelFor(size_t num_tasks,
                   const std::function<void(size_t begin, size_t end, size_t worker)>& range);

 private:
  size_t num_threads_;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// A pool leased from a process-wide registry of idle pools, for callers that run calls from
// several threads (a pool serves one ParallelFor at a time): each lease holds a pool of its own
// and returns it to the registry when destroyed. num_threads <= 1 leases no pool (get() is
// nullptr: run on the calling thread). The registry is never destroyed, so that worker threads
// are not joined during process (or interpreter) shutdown.
class ThreadPoolLease {
 public:
  explicit ThreadPoolLease(size_t num_threads);
  ~ThreadPoolLease();
  ThreadPoolLease(const ThreadPoolLease&) = delete;
  ThreadPoolLease& operator=(const ThreadPoolLease&) = delete;

  ThreadPool* get() const { return pool_.get(); }

 private:
  std::unique_ptr<ThreadPool> pool_;
};

// Runs on `pool` when non-null, else on the calling thread (one range, worker 0).
void ParallelFor(ThreadPool* pool, size_t num_tasks,
                 const std::function<void(size_t begin, size_t end, size_t worker)>& range);

}  // namespace ropekit

#endif  // ROPEKIT_THREAD_POOL_H_
