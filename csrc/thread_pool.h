// A small persistent worker pool shared by every native call.
#pragma once

#include <cstddef>
#include <functional>

#include "status.h"

namespace dckpt {

constexpr int kMaxThreads = 256;

// CPUs this process may run on (sched_getaffinity), at least 1.
int usable_cores();

// <= 0 means usable_cores(); never more threads than tasks or kMaxThreads.
int resolve_threads(int requested, size_t tasks);

// Calls body(task, worker) for every task in [0, tasks) on `threads` threads: the
// caller plus threads-1 pool workers. worker is in [0, threads), so callers can keep
// per-worker scratch. After a failure (or exception) no new task starts; the failure of
// the lowest-numbered failed task is returned. Safe to call from several threads at once:
// a caller never waits for a worker that has not joined its job, so a busy pool only
// slows it down.
Status parallel_for(size_t tasks, int threads,
                    const std::function<Status(size_t task, int worker)>& body);

}  // namespace dckpt
