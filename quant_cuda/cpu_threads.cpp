// The kernels' thread pool (cpu_threads.h).
//
// One job at a time is published in a single 64-bit word, `claim` = epoch | helpers | n |
// next, and every thread (the caller included) takes task `next` with a compare-exchange
// on that word. A helper only touches the job's function and context after such an
// exchange succeeded, and the caller only publishes the next job after all n tasks have
// finished; so a helper that read a stale word can at worst fail its exchange, never run a
// task of a job that is gone. The epoch makes each job's word distinct (24 bits: a helper
// would have to sleep through 16 million jobs between a load and its exchange to confuse
// two of them).
//
// Idle helpers spin for kSpinMicros (decode calls the kernels every few tens of
// microseconds, and a futex wake-up costs about as much as a small layer) and then sleep
// on a futex (std::atomic::wait). Helpers are detached and the pool is never freed: the
// process may exit or fork at any moment, and a forked child starts a fresh pool (the
// parent's helper threads do not exist there).
#include "cpu_threads.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QC_PAUSE() _mm_pause()
#else
#define QC_PAUSE() ((void)0)
#endif

namespace quant_cuda {
namespace cpu {

namespace {

constexpr int kSpinMicros = 100;
constexpr int kMaxHelpers = 255;

// claim word: epoch (24 bits) | helpers (8) | n (16) | next (16).
constexpr uint64_t pack(uint64_t epoch, uint64_t helpers, uint64_t n, uint64_t next) {
  return epoch << 40 | helpers << 32 | n << 16 | next;
}
constexpr int helpers_of(uint64_t w) { return int((w >> 32) & 0xFF); }
constexpr int64_t n_of(uint64_t w) { return int64_t((w >> 16) & 0xFFFF); }
constexpr int64_t next_of(uint64_t w) { return int64_t(w & 0xFFFF); }

struct Pool {
  std::mutex owner;  // held by the caller whose job is published
  std::atomic<uint64_t> claim{0};
  std::atomic<int64_t> done{0};
  std::atomic<TaskFn> fn{nullptr};
  std::atomic<void*> ctx{nullptr};
  std::atomic<uint32_t> wake{0};  // bumped per job; sleeping helpers wait on it
  std::atomic<int> sleepers{0};
  uint64_t epoch = 0;  // guarded by owner
  int started = 0;     // helper threads started, guarded by owner
};

std::atomic<Pool*> g_pool{nullptr};

void forget_pool_in_child() { g_pool.store(nullptr); }

Pool& pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p) return *p;
  static const int atfork = pthread_atfork(nullptr, nullptr, forget_pool_in_child);
  (void)atfork;
  Pool* fresh = new Pool();
  if (!g_pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) {
    delete fresh;
    return *p;
  }
  return *fresh;
}

// Runs tasks of the published job until none is left; helper < 0 is the caller.
// Returns whether it ran any.
bool work(Pool& p, int helper) {
  bool ran = false;
  uint64_t w = p.claim.load(std::memory_order_acquire);
  for (;;) {
    if (helper >= helpers_of(w) || next_of(w) >= n_of(w)) return ran;
    if (p.claim.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
      p.fn.load(std::memory_order_relaxed)(p.ctx.load(std::memory_order_relaxed), next_of(w));
      p.done.fetch_add(1, std::memory_order_release);
      ran = true;
      w = p.claim.load(std::memory_order_acquire);
    }
  }
}

void helper_loop(Pool* p, int helper) {
  using clock = std::chrono::steady_clock;
  for (;;) {
    const uint32_t seen = p->wake.load();
    if (work(*p, helper)) continue;
    const auto t0 = clock::now();
    bool woken = false;
    while (!woken && clock::now() - t0 < std::chrono::microseconds(kSpinMicros)) {
      for (int i = 0; i < 32; ++i) QC_PAUSE();
      woken = p->wake.load(std::memory_order_relaxed) != seen;
    }
    if (woken) continue;
    p->sleepers.fetch_add(1);
    p->wake.wait(seen);  // returns once a job has bumped `wake` (or spuriously)
    p->sleepers.fetch_sub(1);
  }
}

void run_inline(int64_t n, TaskFn fn, void* ctx) {
  for (int64_t t = 0; t < n; ++t) fn(ctx, t);
}

}  // namespace

int usable_cpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return int(std::max(1u, std::thread::hardware_concurrency()));
}

void parallel_tasks(int64_t n, int threads, TaskFn fn, void* ctx) {
  if (n <= 0) return;
  const int helpers = int(std::min<int64_t>({int64_t(threads) - 1, n - 1, kMaxHelpers}));
  if (helpers <= 0 || n > kMaxTasks) return run_inline(n, fn, ctx);
  Pool& p = pool();
  std::unique_lock<std::mutex> lock(p.owner, std::try_to_lock);
  if (!lock.owns_lock()) return run_inline(n, fn, ctx);  // another caller's job is running
  while (p.started < helpers) {
    try {
      std::thread(helper_loop, &p, p.started).detach();
    } catch (...) {  // no more threads: run with the helpers there are
      break;
    }
    ++p.started;
  }

  p.fn.store(fn, std::memory_order_relaxed);
  p.ctx.store(ctx, std::memory_order_relaxed);
  p.done.store(0, std::memory_order_relaxed);
  p.epoch = (p.epoch + 1) & 0xFFFFFF;
  p.claim.store(pack(p.epoch, uint64_t(std::min(helpers, p.started)), uint64_t(n), 0), std::memory_order_release);
  p.wake.fetch_add(1);
  if (p.sleepers.load() > 0) p.wake.notify_all();

  work(p, -1);
  // Only tasks a helper has claimed (and so is running) are left.
  for (int spins = 0; p.done.load(std::memory_order_acquire) < n; ++spins) {
    QC_PAUSE();
    if (spins > 4096) sched_yield();  // the helper may be waiting for this core
  }
}

}  // namespace cpu
}  // namespace quant_cuda
