// A small thread pool with static partitioning (see include/ropekit/thread_pool.h).
//
// Worker w owns tasks [w*n/W, (w+1)*n/W) of every ParallelFor; worker 0 is the caller. A
// generation counter under one mutex wakes the workers; a countdown tells the caller when all are
// done. Each output is owned by one task, so results do not depend on the thread count.
#include "ropekit/thread_pool.h"

#include <algorithm>
#include <condition_variable>
#include <exception>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "ropekit/error.h"

namespace ropekit {

struct ThreadPool::Impl {
  std::mutex mutex;
  std::condition_variable start_cv;
  std::condition_variable done_cv;
  uint64_t generation = 0;
  size_t pending = 0;
  bool stop = false;
  size_t num_tasks = 0;
  const std::function<void(size_t, size_t, size_t)>* range = nullptr;
  std::vector<std::exception_ptr> errors;
  std::vector<std::thread> threads;
};

namespace {

void RunSlice(size_t num_tasks, size_t num_workers, size_t worker,
              const std::function<void(size_t, size_t, size_t)>& range) {
  const size_t begin = num_tasks * worker / num_workers;
  const size_t end = num_tasks * (worker + 1) / num_workers;
  if (begin < end) range(begin, end, worker);
}

}  // namespace

ThreadPool::ThreadPool(size_t num_threads)
    : num_threads_(
          num_threads == 0
              ? std::min<size_t>(std::max(1u, std::thread::hardware_concurrency()), kMaxThreads)
              : num_threads),
      impl_(std::make_unique<Impl>()) {
  if (num_threads_ > kMaxThreads) {
    throw Error("num_threads " + std::to_string(num_threads_) + " must be in [0, " +
                std::to_string(kMaxThreads) + "]");
  }
  impl_->errors.resize(num_threads_);
  for (size_t w = 1; w < num_threads_; ++w) {
    impl_->threads.emplace_back([this, w] {
      Impl& s = *impl_;
      uint64_t seen = 0;
      for (;;) {
        std::unique_lock<std::mutex> lock(s.mutex);
        s.start_cv.wait(lock, [&] { return s.stop || s.generation != seen; });
        if (s.stop) return;
        seen = s.generation;
        const size_t num_tasks = s.num_tasks;
        const auto* range = s.range;
        lock.unlock();
        try {
          RunSlice(num_tasks, num_threads_, w, *range);
        } catch (...) {
          s.errors[w] = std::current_exception();
        }
        lock.lock();
        if (--s.pending == 0) s.done_cv.notify_one();
      }
    });
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->stop = true;
  }
  impl_->start_cv.notify_all();
  for (auto& t : impl_->threads) t.join();
}

void ThreadPool::ParallelFor(size_t num_tasks,
                             const std::function<void(size_t, size_t, size_t)>& range) {
  if (num_threads_ == 1 || num_tasks <= 1) {
    if (num_tasks > 0) range(0, num_tasks, 0);
    return;
  }
  Impl& s = *impl_;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    s.num_tasks = num_tasks;
    s.range = &range;
    s.pending = num_threads_ - 1;
    for (auto& e : s.errors) e = nullptr;
    ++s.generation;
  }
  s.start_cv.notify_all();
  try {
    RunSlice(num_tasks, num_threads_, 0, range);
  } catch (...) {
    s.errors[0] = std::current_exception();
  }
  {
    std::unique_lock<std::mutex> lock(s.mutex);
    s.done_cv.wait(lock, [&] { return s.pending == 0; });
  }
  for (auto& e : s.errors) {
    if (e) std::rethrow_exception(e);
  }
}

void ParallelFor(ThreadPool* pool, size_t num_tasks,
                 const std::function<void(size_t, size_t, size_t)>& range) {
  if (pool) {
    pool->ParallelFor(num_tasks, range);
  } else if (num_tasks > 0) {
    range(0, num_tasks, 0);
  }
}

namespace {

// Idle pools by thread count. Intentionally leaked (see ThreadPoolLease).
class PoolRegistry {
 public:
  static PoolRegistry& Get() {
    static PoolRegistry* registry = new PoolRegistry();
    return *registry;
  }
  std::unique_ptr<ThreadPool> Acquire(size_t num_threads) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto& idle = idle_[num_threads];
      if (!idle.empty()) {
        auto pool = std::move(idle.back());
        idle.pop_back();
        return pool;
      }
    }
    return std::make_unique<ThreadPool>(num_threads);
  }
  void Release(std::unique_ptr<ThreadPool> pool) {
    std::lock_guard<std::mutex> lock(mu_);
    idle_[pool->num_threads()].push_back(std::move(pool));
  }

 private:
  std::mutex mu_;
  std::map<size_t, std::vector<std::unique_ptr<ThreadPool>>> idle_;
};

}  // namespace

ThreadPoolLease::ThreadPoolLease(size_t num_threads) {
  if (num_threads > 1) pool_ = PoolRegistry::Get().Acquire(num_threads);
}

ThreadPoolLease::~ThreadPoolLease() {
  if (pool_) PoolRegistry::Get().Release(std::move(pool_));
}

}  // namespace ropekit
