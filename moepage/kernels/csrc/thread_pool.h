// A small thread pool with passive waiting (no OpenMP: Apple clang has no -fopenmp), torch-free, shared by the bf16
// and ggml kernels. Workers spin 50 us (pause instructions) for the next job and then sleep on a condition variable,
// so a decode loop never spins on cores that other processes need.
#pragma once
#if defined(__linux__)
#include <pthread.h>
#endif
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace moepage_pool {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class Pool {
 public:
  // fn(task) for task in [0, tasks), tasks claimed one at a time by `threads` threads (the caller is one).
  void run(int64_t tasks, int threads, const std::function<void(int64_t)>& fn) {
    if (threads <= 1 || tasks <= 1) {
      for (int64_t t = 0; t < tasks; ++t) fn(t);
      return;
    }
    resize(threads - 1);
    auto job = std::make_shared<Job>();
    job->fn = &fn;
    job->tasks = tasks;
    bool sleeping;
    {
      std::lock_guard<std::mutex> g(mu_);
      job_ = job;
      epoch_.fetch_add(1);
      sleeping = sleepers_ > 0;
    }
    if (sleeping) wake_.notify_all();
    work(*job);
    wait_until([&] { return job->done.load() == tasks; }, done_);
  }

  ~Pool() { resize(0); }

 private:
  struct Job {  // a late worker holding a finished job finds no task left in it
    const std::function<void(int64_t)>* fn = nullptr;
    int64_t tasks = 0;
    std::atomic<int64_t> next{0}, done{0};
  };
  // Spin this long for the next job or the last task (pause instructions, the clock read every 64 of them, no
  // system calls), then sleep on a condition variable: a decode step's parallel regions follow each other within
  // microseconds, while a busy neighbour gets the core back after 50 us.
  static constexpr auto SPIN = std::chrono::microseconds(50);

  void work(Job& j) {
    int64_t finished = 0;
    for (int64_t t = j.next.fetch_add(1); t < j.tasks; t = j.next.fetch_add(1), ++finished) (*j.fn)(t);
    if (finished && j.done.fetch_add(finished) + finished == j.tasks) {
      std::lock_guard<std::mutex> g(mu_);
      done_.notify_all();
    }
  }

  template <class Ready>
  void wait_until(Ready ready, std::condition_variable& cv) {
    const auto until = std::chrono::steady_clock::now() + SPIN;
    for (;;) {
      for (int i = 0; i < 64; ++i) {
        if (ready()) return;
        cpu_relax();
      }
      if (std::chrono::steady_clock::now() > until) break;
    }
    std::unique_lock<std::mutex> l(mu_);
    ++sleepers_;
    cv.wait(l, ready);
    --sleepers_;
  }

  void worker() {
#if defined(__linux__)
    pthread_setname_np(pthread_self(), "moepage-pool");
#endif
    uint64_t seen = epoch_.load();
    for (;;) {
      wait_until([&] { return epoch_.load() != seen; }, wake_);
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> g(mu_);
        seen = epoch_.load();
        if (stop_) return;
        job = job_;
      }
      if (job) work(*job);
    }
  }

  void resize(size_t n) {
    if (workers_.size() == n) return;
    {
      std::lock_guard<std::mutex> g(mu_);
      stop_ = true;
      epoch_.fetch_add(1);
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
    stop_ = false;
    for (size_t i = 0; i < n; ++i) workers_.emplace_back([this] { worker(); });
  }

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  std::atomic<uint64_t> epoch_{0};
  std::shared_ptr<Job> job_;
  int sleepers_ = 0;
  bool stop_ = false;
};


// The process's pool for parallel_for and parallel_tasks, and the lock that keeps one region in it at a time (the
// pool has one job slot).
inline Pool& shared_pool() {
  static Pool pool;
  return pool;
}
inline std::mutex& shared_pool_mutex() {
  static std::mutex mu;
  return mu;
}
inline thread_local bool inside_region = false;  // a region started inside a region runs serially (as at::parallel_for)

// fn(task) for task in [0, tasks), claimed one at a time by up to `threads` threads (the caller is one): dynamic
// balancing, so a thread the OS deschedules on a busy machine leaves its share to the others instead of holding up the
// region. For work cut into tasks of tens of KB.
inline void parallel_tasks(int64_t tasks, int threads, const std::function<void(int64_t)>& fn) {
  if (tasks <= 0) return;
  if (tasks == 1 || threads <= 1 || inside_region) {
    for (int64_t t = 0; t < tasks; ++t) fn(t);
    return;
  }
  std::lock_guard<std::mutex> g(shared_pool_mutex());
  shared_pool().run(tasks, threads, [&](int64_t t) {  // the pool keeps `threads`: no resize per region
    inside_region = true;
    fn(t);
    inside_region = false;
  });
}

// fn(lo, hi) over [begin, end) split into at most `threads` contiguous ranges of at least `grain` items (the split
// at::parallel_for makes); one parallel region at a time per process.
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, int threads,
                         const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, (n + std::max<int64_t>(grain, 1) - 1) /
                                                                             std::max<int64_t>(grain, 1)));
  const int64_t chunk = (n + parts - 1) / parts;
  if (parts == 1 || inside_region) return fn(begin, end);
  std::lock_guard<std::mutex> g(shared_pool_mutex());
  shared_pool().run(parts, threads, [&](int64_t t) {
    const int64_t lo = begin + t * chunk, hi = std::min(end, lo + chunk);
    inside_region = true;
    if (lo < hi) fn(lo, hi);
    inside_region = false;
  });
}

}  // namespace moepage_pool
