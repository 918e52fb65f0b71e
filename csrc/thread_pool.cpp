#include "thread_pool.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>
#include <vector>

namespace dckpt {
namespace {

struct Job {
  Job(size_t tasks, const std::function<Status(size_t, int)>& body) : tasks(tasks), body(body) {}

  const size_t tasks;
  const std::function<Status(size_t, int)>& body;  // lives on the caller's stack
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::atomic<int> joined{0};  // worker ids handed out; the caller is 0

  std::mutex mu;
  std::condition_variable left;
  int active = 0;       // pool workers inside run(); guarded by mu
  bool closed = false;  // once set no worker enters, so `body` may go away
  // The failure of the lowest-numbered task that failed: tasks start in order, so every
  // task before it ran to the end, and the error reported does not depend on timing.
  Status first_error;   // guarded by mu
  size_t first_error_task = SIZE_MAX;  // guarded by mu

  void run(int worker) {
    while (!failed.load(std::memory_order_relaxed)) {
      size_t task = next.fetch_add(1, std::memory_order_relaxed);
      if (task >= tasks) return;
      Status st;
      try {
        st = body(task, worker);
      } catch (const std::bad_alloc&) {
        st = Status::error(Kind::Io, "out of memory");
      } catch (const std::exception& e) {
        st = Status::error(Kind::Io, e.what());
      }
      if (!st.ok()) {
        std::lock_guard<std::mutex> lock(mu);
        failed.store(true);
        if (task < first_error_task) {
          first_error = std::move(st);
          first_error_task = task;
        }
        return;
      }
    }
  }
};

// Never destroyed (see pool()), so its threads simply sleep until the process exits.
class Pool {
 public:
  void submit(const std::shared_ptr<Job>& job, size_t helpers) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      try {
        while (threads_.size() < helpers) threads_.emplace_back([this] { loop(); });
      } catch (const std::system_error&) {
        // Out of threads (ulimit, memory): go on with those there are; the caller works too.
        helpers = threads_.size();
      }
      for (size_t i = 0; i < helpers; ++i) queue_.push_back(job);
    }
    if (helpers == 1) wake_.notify_one(); else wake_.notify_all();
  }

 private:
  void loop() {
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [this] { return !queue_.empty(); });
        job = std::move(queue_.front());
        queue_.pop_front();
      }
      {
        std::lock_guard<std::mutex> lock(job->mu);
        if (job->closed) continue;
        ++job->active;
      }
      job->run(job->joined.fetch_add(1) + 1);
      {
        std::lock_guard<std::mutex> lock(job->mu);
        --job->active;
      }
      job->left.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable wake_;
  std::deque<std::shared_ptr<Job>> queue_;
  std::vector<std::thread> threads_;
};

std::mutex g_pool_mu;
Pool* g_pool = nullptr;

// A forked child (DataLoader workers, multiprocessing) inherits the pool object but
// none of its threads, and maybe a mutex locked by one of them: start it afresh.
void forget_pool_in_child() {
  new (&g_pool_mu) std::mutex();
  g_pool = nullptr;  // leaked on purpose: its threads do not exist here
}

Pool& pool() {
  static const bool registered = [] {
    pthread_atfork(nullptr, nullptr, forget_pool_in_child);
    return true;
  }();
  (void)registered;
  std::lock_guard<std::mutex> lock(g_pool_mu);
  // Never destroyed: joining threads during interpreter shutdown can deadlock.
  if (g_pool == nullptr) g_pool = new Pool();
  return *g_pool;
}

}  // namespace

int usable_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  unsigned n = std::thread::hardware_concurrency();
  return n > 0 ? static_cast<int>(n) : 1;
}

int resolve_threads(int requested, size_t tasks) {
  size_t n = requested > 0 ? static_cast<size_t>(requested) : static_cast<size_t>(usable_cores());
  n = std::min({n, tasks, static_cast<size_t>(kMaxThreads)});
  return n > 0 ? static_cast<int>(n) : 1;
}

Status parallel_for(size_t tasks, int threads,
                    const std::function<Status(size_t, int)>& body) {
  auto job = std::make_shared<Job>(tasks, body);
  size_t used = std::min(static_cast<size_t>(std::max(threads, 1)), tasks);
  if (used > 1) pool().submit(job, used - 1);
  job->run(0);
  std::unique_lock<std::mutex> lock(job->mu);
  job->closed = true;
  job->left.wait(lock, [&] { return job->active == 0; });
  return std::move(job->first_error);
}

}  // namespace dckpt
