// A small persistent thread pool for the CPU kernels (torch-free).
//
// Why not OpenMP: an OpenMP region ends in a barrier that waits for every thread of the
// team, including one that the OS has not scheduled yet. On a loaded 2-core machine a
// 2-thread region then costs a scheduler time slice (a 576-wide layer measured 2.5 ms
// instead of 0.25 ms), and each region costs a few microseconds even when idle. Here the
// calling thread claims tasks itself and only waits for tasks that a helper has
// *started*; a helper that wakes up late finds no work left and goes back to sleep.
#pragma once
#include <cstdint>

namespace quant_cuda {
namespace cpu {

using TaskFn = void (*)(void* ctx, int64_t task);

// Runs fn(ctx, t) for t in [0, n) on the calling thread and up to threads - 1 pool
// threads, and returns when all n have finished. Which thread runs a task is not fixed,
// so a task must compute the same result on any thread. n <= kMaxTasks. threads <= 1, or
// a pool already busy with another caller's job (two Python threads calling at once),
// runs every task on the calling thread.
void parallel_tasks(int64_t n, int threads, TaskFn fn, void* ctx);

// CPUs this process may run on (sched_getaffinity), at least 1.
int usable_cpus();

constexpr int64_t kMaxTasks = 65535;

}  // namespace cpu
}  // namespace quant_cuda
