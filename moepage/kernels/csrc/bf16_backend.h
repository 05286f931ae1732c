// Which core bf16_decode.cpp runs on, chosen when the module is compiled for the machine (native.py picks -march):
// the AVX512-BF16 specialisation (bf16_avx512.h) where the build's target has it, the portable core (bf16_portable.h:
// AVX2 + FMA, NEON, anything else) everywhere else; and the threads they run on: moepage's passive-waiting pool
// (thread_pool.h), with or without OpenMP in the build (Apple clang has none).
//
// Shape legend: M activation rows, K input features, N output rows, R query heads sharing one kv head,
// P cached positions, D head dim.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "bf16_portable.h"
#include "thread_pool.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define MOEPAGE_BF16_AVX512 1
#include "bf16_avx512.h"
#endif

namespace {

using bf16 = c10::BFloat16;

inline const uint16_t* bits(const bf16* p) { return reinterpret_cast<const uint16_t*>(p); }
inline uint16_t* bits(bf16* p) { return reinterpret_cast<uint16_t*>(p); }

const char* core_name() {
#ifdef MOEPAGE_BF16_AVX512
  return "avx512bf16";
#else
  return "portable";
#endif
}

const char* threads_name() { return "pool"; }

// Weights per task of a parallel region: enough tasks for the threads to balance dynamically (a thread descheduled on
// a busy machine leaves its share to the others), few enough that claiming one (an atomic add) costs nothing.
constexpr int64_t TASK_BYTES = 64 * 1024;
// A region that reads less than this runs on the calling thread: waking a sleeping worker costs more than it saves.
constexpr int64_t INLINE_BYTES = 96 * 1024;

// Rows of K bf16 weights per task: about TASK_BYTES, a multiple of 4.
inline int64_t rows_per_task(int64_t K) { return std::max<int64_t>(4, (TASK_BYTES / std::max<int64_t>(1, 2 * K)) & ~3); }

// fn(task) for task in [0, tasks) on moepage's pool (thread_pool.h: tasks claimed one at a time, workers spin 50 us
// and then sleep), with at::get_num_threads() threads; on the calling thread alone when the region reads under
// INLINE_BYTES. OpenMP's static split would leave a region waiting for a descheduled thread's half.
template <class F>
void parallel_tasks(int64_t tasks, int64_t bytes, const F& fn) {
  if (bytes < INLINE_BYTES || tasks <= 1) {
    for (int64_t t = 0; t < tasks; ++t) fn(t);
    return;
  }
  moepage_pool::parallel_tasks(tasks, at::get_num_threads(), fn);
}

// Activation rows x [M, K] as the core reads them, a copy of their own (the caller may reuse x): bf16 as they are
// (AVX512-BF16), widened to fp32 once (portable).
class Rows {
 public:
  Rows(const bf16* x, int64_t M, int64_t K) : M_(M), K_(K) {
#ifdef MOEPAGE_BF16_AVX512
    xb_.assign(x, x + M * K);
#else
    const int64_t Kp = bf16p::padded(K);
    xf_.resize(M * Kp);
    for (int64_t m = 0; m < M; ++m) bf16p::widen_permuted(bits(x) + m * K, K, xf_.data() + m * Kp);
#endif
  }

  // out[m * ldo + n] = sum_k x[m, k] * w[n, k] for n in [n0, n1); w bf16 [N, K].
  void gemv(const bf16* w, int64_t n0, int64_t n1, float* out, int64_t ldo) const {
#ifdef MOEPAGE_BF16_AVX512
    avx512bf16::gemv_rows(xb_.data(), M_, w, K_, n0, n1, out, ldo);
#else
    bf16p::gemv_rows(xf_.data(), M_, bits(w), K_, n0, n1, out, ldo);
#endif
  }

 private:
  int64_t M_, K_;
  std::vector<bf16> xb_;
  std::vector<float> xf_;
};

// Scratch of one thread's attention: scores [R, P], output sums and the widened queries [R, padded(D)].
struct AttendScratch {
  std::vector<float> s, o, q;
  AttendScratch(int64_t R, int64_t P, int64_t D) : s(R * P), o(R * bf16p::padded(D)), q(R * bf16p::padded(D)) {}
};

// The R query heads q [R, D] sharing one kv head over its P cached positions k, v [>= P, D] -> out [R, D].
void attend_kv_head(const bf16* q, int64_t R, const bf16* k, const bf16* v, int64_t P, int64_t D, float scale,
                    AttendScratch& t, bf16* out) {
#ifdef MOEPAGE_BF16_AVX512
  // Softmax weights far below the maximum underflow to subnormals, which cost ~10x per operation; flushing them to
  // zero changes nothing a bf16 output can show (the sum is >= 1).
  const unsigned int csr = _mm_getcsr();
  _mm_setcsr(csr | 0x8040);  // FTZ | DAZ for this call, restored below
  avx512bf16::attend_kv_head(q, R, k, v, P, D, scale, t.s.data(), t.o.data(), out);
  _mm_setcsr(csr);
#else
  for (int64_t j = 0; j < R; ++j) bf16p::widen_permuted(bits(q) + j * D, D, t.q.data() + j * bf16p::padded(D));
  bf16p::attend_kv_head(t.q.data(), R, bits(k), bits(v), P, D, scale, t.s.data(), t.o.data(), bits(out));
#endif
}

inline float round_bf16(float v) { return bf16p::round_bf16(v); }

void rms_norm_row(const bf16* in, const bf16* w, int64_t D, double eps, bf16* out) {
  bf16p::rms_norm_row(bits(in), bits(w), D, eps, bits(out));
}

void rope_row(const bf16* x, const bf16* cos, const bf16* sin, int64_t D, bf16* out) {
  bf16p::rope_row(bits(x), bits(cos), bits(sin), D, bits(out));
}

}  // namespace
