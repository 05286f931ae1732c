// The shared core of moepage's ggml CPU kernels (included by ggml_cpu.cpp and, through ggml_cpu_gemm.h,
// ggml_gemm.cpp; each module keeps its own state): the library's type tables,
// a thread pool with passive waiting, activation conversion and matvecs on GGML bytes.
#pragma once
#include <torch/extension.h>

#include <dlfcn.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "thread_pool.h"
#include "ggml_q4k_avx512.h"
#include "ggml_q6k_avx512.h"

namespace {

// ---- the part of ggml.h / ggml-cpu.h (ggml 0.20) used here -------------------------------------------
using to_float_t = void (*)(const void*, float*, int64_t);
using from_float_t = void (*)(const float*, void*, int64_t);
using vec_dot_t = void (*)(int, float*, size_t, const void*, size_t, const void*, size_t, int);
// ggml's gemv over 8-row interleaved weights: (K, out, out stride, weights, activation, 1 row, output columns)
using gemv_t = void (*)(int, float*, size_t, const void*, const void*, int, int);

struct TypeTraits {  // struct ggml_type_traits
  const char* type_name;
  int64_t blck_size;
  int64_t blck_size_interleave;
  size_t type_size;
  bool is_quantized;
  to_float_t to_float;
  from_float_t from_float_ref;
};

struct TypeTraitsCpu {  // struct ggml_type_traits_cpu
  from_float_t from_float;
  vec_dot_t vec_dot;
  int vec_dot_type;
  int64_t nrows;
};

constexpr int TYPE_F32 = 0, TYPE_Q4_K = 12, TYPE_Q6_K = 14, TYPE_Q8_K = 15;
constexpr int TYPE_COUNT = 40;  // ids below MXFP4 + 1: every ggml since 0.20 has them
// A weight's type id with this bit set: the type's 8-row interleaved layout (ggml_cpu_interleave.h)
constexpr int64_t INTERLEAVED = 256;

struct Library {
  const TypeTraits* (*traits)(int) = nullptr;
  const TypeTraitsCpu* (*cpu_traits)(int) = nullptr;
  gemv_t gemv_q4_k_x8 = nullptr;  // set where ggml's own repack would use it (AVX2; NEON with int8 matmul)
  std::string features;
};
Library lib;

void* symbol(void* handle, const char* name, const std::string& path) {
  void* p = dlsym(handle, name);
  TORCH_CHECK(p != nullptr, path, ": no symbol ", name, " (not a ggml 0.20 CPU backend library)");
  return p;
}

void* open_isolated(const std::string& path) {
#if defined(__linux__) && defined(__GLIBC__)
  // A namespace of its own: another ggml in the process (llama-cpp-python's) keeps its own symbols.
  void* h = dlmopen(LM_ID_NEWLM, path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (h != nullptr) return h;
#endif
  return dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
}

// Opens the ggml CPU backend library at `path` (its libggml-base beside it) into `lib`: its type tables, checked
// against ggml 0.20's layout, the CPU features it uses and, where ggml's own repack would use it, the interleaved
// Q4_K gemv. Returns the library's handle, or nullptr when `lib` was open already.
void* open_library(const std::string& path) {
  if (lib.traits != nullptr) return nullptr;
  void* h = open_isolated(path);
  TORCH_CHECK(h != nullptr, path, ": cannot load (", dlerror(), ")");
  auto init = reinterpret_cast<void (*)()>(symbol(h, "ggml_cpu_init", path));
  auto traits = reinterpret_cast<const TypeTraits* (*)(int)>(symbol(h, "ggml_get_type_traits", path));
  auto cpu = reinterpret_cast<const TypeTraitsCpu* (*)(int)>(symbol(h, "ggml_get_type_traits_cpu", path));
  init();
  const TypeTraits* q4k = traits(TYPE_Q4_K);
  TORCH_CHECK(q4k && q4k->blck_size == 256 && q4k->type_size == 144 && cpu(TYPE_Q4_K)->vec_dot_type == TYPE_Q8_K,
              path, ": its type tables do not match ggml 0.20's layout");
  std::string features;
  for (const char* f : {"avx2", "fma", "f16c", "avx512", "avx512_vnni", "avx512_bf16", "neon", "dotprod",
                        "matmul_int8", "sve"}) {
    auto has = reinterpret_cast<int (*)()>(dlsym(h, (std::string("ggml_cpu_has_") + f).c_str()));
    if (has != nullptr && has()) features += (features.empty() ? "" : " ") + std::string(f);
  }
  lib.cpu_traits = cpu;
  lib.features = features;
  const bool has_x8 = features.find("avx2") != std::string::npos ||
                      (features.find("neon") != std::string::npos && features.find("matmul_int8") != std::string::npos);
  if (has_x8) lib.gemv_q4_k_x8 = reinterpret_cast<gemv_t>(dlsym(h, "ggml_gemv_q4_K_8x8_q8_K"));
  lib.traits = traits;
  return h;
}

// ---- the thread pool (thread_pool.h) -------------------------------------------------------------
using moepage_pool::Pool;

Pool pool;
std::mutex pool_mu;  // one parallel region at a time (the pool has one job slot)

// Work below this many bytes runs on the calling thread: waking the pool costs more than it saves.
constexpr int64_t INLINE_BYTES = 96 * 1024;

void parallel(int64_t tasks, const std::function<void(int64_t)>& fn, int64_t bytes = INT64_MAX) {
  if (bytes < INLINE_BYTES) {
    for (int64_t t = 0; t < tasks; ++t) fn(t);
    return;
  }
  std::lock_guard<std::mutex> g(pool_mu);
  pool.run(tasks, std::max(1, at::get_num_threads()), fn);
}

// ---- types ---------------------------------------------------------------------------------------------
struct Kind {
  int id;
  const TypeTraits* t;
  const TypeTraitsCpu* cpu;
  const TypeTraits* dot;  // the activation's type
  const TypeTraitsCpu* dot_cpu;
  gemv_t gemv = nullptr;  // the 8-row interleaved layout's kernel, or row-by-row vec_dot when null
  vec_dot_t vec_dot = nullptr;  // one row's dot product: ggml's, or ours where it gives ggml's bits faster

  int64_t row_bytes(int64_t K) const { return K / t->blck_size * t->type_size; }
  int64_t dot_row_bytes(int64_t K) const { return K / dot->blck_size * dot->type_size; }
};

// Our dot product for type `id` where it is the library's own bit for bit (its Q6_K kernel is the AVX2 one: ours
// does its arithmetic 64 bytes at a time, ggml_q6k_avx512.h) and own_kernels is on; else the library's `fallback`.
bool own_kernels = true;
bool own_replaces_avx2() { return own_kernels && lib.features.find("avx2") != std::string::npos; }

// Whether this module uses our kernels where they give the library's bits from now on (kinds made before keep
// theirs); returns the previous setting. For A/B checks.
bool use_own_kernels(bool on) {
  const bool was = own_kernels;
  own_kernels = on;
  return was;
}

vec_dot_t own_vec_dot(int id, vec_dot_t fallback) {
#if defined(MOEPAGE_HAS_Q6K_AVX512)
  if (id == TYPE_Q6_K && own_replaces_avx2()) return vec_dot_q6_k_avx512;
#endif
  return fallback;
}

#if defined(MOEPAGE_HAS_Q4K_X8_AVX512)
// ggml's gemv signature over nc rows (a multiple of 8) of interleaved Q4_K in AVX-512 (ggml_q4k_avx512.h) for one
// activation row; the library's kernel for more
void gemv_q4_k_x8_own(int n, float* s, size_t bs, const void* vx, const void* vy, int nr, int nc) {
  if (nr != 1) return lib.gemv_q4_k_x8(n, s, bs, vx, vy, nr, nc);
  gemv_q4_k_x8_avx512(n, s, vx, vy, nc);
}
#endif

// The interleaved Q4_K gemv: ours where it gives the library's (AVX2) bits faster, else the library's.
gemv_t own_gemv_q4_k_x8() {
#if defined(MOEPAGE_HAS_Q4K_X8_AVX512)
  if (own_replaces_avx2()) return gemv_q4_k_x8_own;
#endif
  return lib.gemv_q4_k_x8;
}

Kind kind(int64_t type) {
  TORCH_CHECK(lib.traits != nullptr, "the ggml CPU library is not open");
  const int64_t id = type & ~INTERLEAVED;
  TORCH_CHECK(id >= 0 && id < TYPE_COUNT, "GGML type id ", type, " is out of range");
  Kind k{static_cast<int>(id), lib.traits(id), lib.cpu_traits(id), nullptr, nullptr};
  if (type & INTERLEAVED) {
    TORCH_CHECK(id == TYPE_Q4_K && lib.gemv_q4_k_x8 != nullptr, "no interleaved kernel for GGML type id ", id);
    k.gemv = own_gemv_q4_k_x8();
  }
  TORCH_CHECK(k.t != nullptr && k.t->blck_size > 0 && k.cpu != nullptr && k.cpu->vec_dot != nullptr,
              "ggml has no CPU dot product for type ", k.t && k.t->type_name ? k.t->type_name : "?");
  k.vec_dot = own_vec_dot(k.id, k.cpu->vec_dot);
  k.dot = lib.traits(k.cpu->vec_dot_type);
  k.dot_cpu = lib.cpu_traits(k.cpu->vec_dot_type);
  TORCH_CHECK(k.cpu->vec_dot_type == TYPE_F32 || (k.dot_cpu != nullptr && k.dot_cpu->from_float != nullptr),
              "ggml cannot convert activations for type ", k.t->type_name);
  return k;
}

void check_weight(const torch::Tensor& raw, const Kind& k, int64_t N, int64_t K, const char* what) {
  TORCH_CHECK(raw.device().is_cpu() && raw.scalar_type() == at::kByte && raw.is_contiguous(), what,
              ": GGML bytes must be a contiguous uint8 CPU tensor");
  TORCH_CHECK(K % k.t->blck_size == 0, what, ": ", K, " columns are not a multiple of the ", k.t->type_name,
              " block size ", k.t->blck_size);
  TORCH_CHECK(raw.numel() == N * k.row_bytes(K), what, ": ", raw.numel(), " bytes do not hold ", k.t->type_name,
              " [", N, ", ", K, "]");
  TORCH_CHECK(k.gemv == nullptr || N % 8 == 0, what, ": an interleaved matrix has a multiple of 8 rows, not ", N);
}

// x [M, K] float32 (contiguous) -> M rows of the weight's vec_dot type (K must suit its block size)
std::vector<uint8_t> quantize_activations(const float* x, int64_t M, int64_t K, const Kind& k) {
  TORCH_CHECK(K % k.dot->blck_size == 0, K, " activations are not a multiple of the ", k.dot->type_name,
              " block size ", k.dot->blck_size);
  const int64_t rb = k.dot_row_bytes(K);
  std::vector<uint8_t> out(M * rb);
  if (k.cpu->vec_dot_type == TYPE_F32) {
    std::memcpy(out.data(), x, M * K * sizeof(float));
  } else {
    for (int64_t m = 0; m < M; ++m) k.dot_cpu->from_float(x + m * K, out.data() + m * rb, K);
  }
  return out;
}

// Rows per task: about TASK_BYTES of weights (a multiple of 8 rows, so 8-row interleaved layouts split whole), enough
// tasks for dynamic balancing between threads, few enough that claiming one (an atomic add) stays negligible.
constexpr int64_t TASK_BYTES = 64 * 1024;

int64_t rows_per_task(int64_t row_bytes) {
  return std::max<int64_t>(8, (TASK_BYTES / std::max<int64_t>(1, row_bytes)) & ~int64_t(7));
}

// One matrix of a fused matvec: out[n] = row n of w . xq (the activation already in w's vec_dot type), n < N.
struct Segment {
  const uint8_t* w;
  const Kind* k;
  int64_t N, K;
  const uint8_t* xq;
  float* out;
};

// Every segment's rows in one parallel region (one wake-up of the pool for several matrices).
void matvec_segments(const std::vector<Segment>& segs) {
  std::vector<int64_t> first(segs.size() + 1, 0), rows(segs.size());  // first task and rows per task of each segment
  int64_t bytes = 0;
  for (size_t i = 0; i < segs.size(); ++i) {
    const int64_t wb = segs[i].k->row_bytes(segs[i].K);
    rows[i] = rows_per_task(wb);
    first[i + 1] = first[i] + (segs[i].N + rows[i] - 1) / rows[i];
    bytes += segs[i].N * wb;
  }
  parallel(first.back(), [&](int64_t task) {
    const size_t i = std::upper_bound(first.begin(), first.end(), task) - first.begin() - 1;
    const Segment& s = segs[i];
    const int64_t wb = s.k->row_bytes(s.K), n0 = (task - first[i]) * rows[i];
    const int64_t n1 = std::min(s.N, n0 + rows[i]);
    if (s.k->gemv != nullptr) {  // n0, n1: multiples of 8 (rows_per_task and N are)
      s.k->gemv(s.K, s.out + n0, s.N, s.w + n0 * wb, s.xq, 1, n1 - n0);
      return;
    }
    for (int64_t n = n0; n < n1; ++n) s.k->vec_dot(s.K, s.out + n, 0, s.w + n * wb, 0, s.xq, 0, 1);
  }, bytes);
}

// out[m * ldo + n] = row n of w . activation row m, for n in [0, N)
void matvec(const uint8_t* w, const Kind& k, int64_t N, int64_t K, const uint8_t* xq, int64_t M, float* out,
            int64_t ldo) {
  const int64_t wb = k.row_bytes(K), xb = k.dot_row_bytes(K), per = rows_per_task(wb);
  parallel((N + per - 1) / per, [&](int64_t task) {
    const int64_t n0 = task * per, n1 = std::min(N, n0 + per);
    if (k.gemv != nullptr) {
      for (int64_t m = 0; m < M; ++m) k.gemv(K, out + m * ldo + n0, N, w + n0 * wb, xq + m * xb, 1, n1 - n0);
      return;
    }
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < M; ++m) k.vec_dot(K, out + m * ldo + n, 0, w + n * wb, 0, xq + m * xb, 0, 1);
  }, N * wb);
}


}  // namespace
