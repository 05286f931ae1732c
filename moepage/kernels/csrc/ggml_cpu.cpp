// Quantized matvecs with ggml's own CPU kernels: the activation is converted once to the weight type's
// "vec_dot type" (Q8_0 blocks for Q4_0..Q8_0, Q8_K for K-quants, F16 for F16, ...) with ggml's `from_float`, then
// every weight row is one call of ggml's `vec_dot` on the stored bytes, as llama.cpp's CPU backend does. The
// library (libggml-cpu from the libggml-python wheel, or another build) is opened at run time, so its SIMD is
// whatever it was built for (AVX2, AVX-512, NEON) and nothing here needs CPU-specific flags.
//
// Threads: a pool of our own whose workers spin briefly (yielding) and then sleep on a condition variable,
// so a decode step with busy neighbours does not burn the cores it shares.
//
// Shape legend: M activation rows (tokens), K input features (weight columns), N output features (weight rows),
// E experts of one token, H hidden, I expert intermediate size.
#include <torch/extension.h>

#include <dlfcn.h>

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

namespace {

// ---- the part of ggml.h / ggml-cpu.h (ggml 0.20) used here -------------------------------------------
using to_float_t = void (*)(const void*, float*, int64_t);
using from_float_t = void (*)(const float*, void*, int64_t);
using vec_dot_t = void (*)(int, float*, size_t, const void*, size_t, const void*, size_t, int);

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

constexpr int TYPE_F32 = 0, TYPE_Q4_K = 12, TYPE_Q8_K = 15;
constexpr int TYPE_COUNT = 40;  // ids below MXFP4 + 1: every ggml since 0.20 has them

struct Library {
  const TypeTraits* (*traits)(int) = nullptr;
  const TypeTraitsCpu* (*cpu_traits)(int) = nullptr;
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

// ---- a small thread pool with passive waiting ---------------------------------------------------------
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
  static constexpr auto SPIN = std::chrono::microseconds(100);  // spin (yielding) this long, then sleep

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
    while (!ready()) {
      if (std::chrono::steady_clock::now() > until) {
        std::unique_lock<std::mutex> l(mu_);
        ++sleepers_;
        cv.wait(l, ready);
        --sleepers_;
        return;
      }
      std::this_thread::yield();
    }
  }

  void worker() {
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

Pool pool;
std::mutex pool_mu;  // one parallel region at a time (the pool has one job slot)

void parallel(int64_t tasks, const std::function<void(int64_t)>& fn) {
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

  int64_t row_bytes(int64_t K) const { return K / t->blck_size * t->type_size; }
  int64_t dot_row_bytes(int64_t K) const { return K / dot->blck_size * dot->type_size; }
};

Kind kind(int64_t id) {
  TORCH_CHECK(lib.traits != nullptr, "the ggml CPU library is not open");
  TORCH_CHECK(id >= 0 && id < TYPE_COUNT, "GGML type id ", id, " is out of range");
  Kind k{static_cast<int>(id), lib.traits(id), lib.cpu_traits(id), nullptr, nullptr};
  TORCH_CHECK(k.t != nullptr && k.t->blck_size > 0 && k.cpu != nullptr && k.cpu->vec_dot != nullptr,
              "ggml has no CPU dot product for type ", k.t && k.t->type_name ? k.t->type_name : "?");
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

constexpr int64_t ROWS_PER_TASK = 16;

// out[m * ldo + n] = row n of w . activation row m, for n in [0, N)
void matvec(const uint8_t* w, const Kind& k, int64_t N, int64_t K, const uint8_t* xq, int64_t M, float* out,
            int64_t ldo) {
  const int64_t wb = k.row_bytes(K), xb = k.dot_row_bytes(K);
  parallel((N + ROWS_PER_TASK - 1) / ROWS_PER_TASK, [&](int64_t task) {
    const int64_t n1 = std::min(N, (task + 1) * ROWS_PER_TASK);
    for (int64_t n = task * ROWS_PER_TASK; n < n1; ++n)
      for (int64_t m = 0; m < M; ++m) k.cpu->vec_dot(K, out + m * ldo + n, 0, w + n * wb, 0, xq + m * xb, 0, 1);
  });
}

float silu(float v) { return v / (1.0f + std::exp(-v)); }

}  // namespace

// Opens the ggml CPU backend library at `path` (its libggml-base beside it); returns the CPU features it uses.
std::string open(const std::string& path) {
  if (lib.traits != nullptr) return lib.features;
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
  lib.traits = traits;
  return features;
}

// (block size, bytes per block, activation type id, whether ggml has a CPU dot product for it)
std::tuple<int64_t, int64_t, int64_t, bool> type_info(int64_t id) {
  TORCH_CHECK(lib.traits != nullptr && id >= 0 && id < TYPE_COUNT, "bad GGML type id ", id);
  const TypeTraits* t = lib.traits(id);
  const TypeTraitsCpu* c = lib.cpu_traits(id);
  if (t == nullptr || t->blck_size <= 0) return {0, 0, -1, false};
  const bool dot = c != nullptr && c->vec_dot != nullptr;
  return {t->blck_size, static_cast<int64_t>(t->type_size), dot ? c->vec_dot_type : -1, dot};
}

// Q8_K, an activation-only type ggml has no to_float for: float d, int8 q[256], int16 bsums[16] -> d * q
void q8_k_to_float(const void* src, float* y, int64_t k) {
  const uint8_t* b = static_cast<const uint8_t*>(src);
  for (int64_t i = 0; i < k; i += 256, b += 292) {
    float d;
    std::memcpy(&d, b, 4);
    const int8_t* q = reinterpret_cast<const int8_t*>(b + 4);
    for (int j = 0; j < 256; ++j) y[i + j] = d * q[j];
  }
}

// [N, K] GGML bytes -> float32 [N, K] (ggml's to_float)
torch::Tensor dequantize(torch::Tensor raw, int64_t type, int64_t N, int64_t K) {
  TORCH_CHECK(lib.traits != nullptr && type >= 0 && type < TYPE_COUNT, "bad GGML type id ", type);
  const TypeTraits* t = lib.traits(type);
  TORCH_CHECK(t != nullptr && t->blck_size > 0 && (t->to_float != nullptr || type == TYPE_Q8_K),
              "ggml cannot dequantize type ", type);
  const to_float_t to_float = type == TYPE_Q8_K ? q8_k_to_float : t->to_float;
  Kind k{static_cast<int>(type), t, nullptr, nullptr, nullptr};
  check_weight(raw, k, N, K, "dequantize");
  auto out = torch::empty({N, K}, raw.options().dtype(at::kFloat));
  const uint8_t* src = raw.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  const int64_t rb = k.row_bytes(K), per_task = std::max<int64_t>(1, 65536 / K);
  parallel((N + per_task - 1) / per_task, [&](int64_t task) {
    const int64_t n1 = std::min(N, (task + 1) * per_task);
    for (int64_t n = task * per_task; n < n1; ++n) to_float(src + n * rb, dst + n * K, K);
  });
  return out;
}

// x [M, K] float32 -> M rows of `type`'s activation blocks (uint8 [M, bytes per row]), ggml's from_float
torch::Tensor quantize_rows(torch::Tensor x, int64_t type) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x must be a 2-D CPU tensor");
  const Kind k = kind(type);
  auto xf = x.to(at::kFloat).contiguous();
  auto q = quantize_activations(xf.data_ptr<float>(), xf.size(0), xf.size(1), k);
  auto out = torch::empty({xf.size(0), k.dot_row_bytes(xf.size(1))}, x.options().dtype(at::kByte));
  std::memcpy(out.data_ptr<uint8_t>(), q.data(), q.size());
  return out;
}

// x [M, K] (any float dtype) @ w [N, K]^T (GGML bytes of `type`) -> [M, N] in x's dtype
torch::Tensor linear(torch::Tensor x, torch::Tensor raw, int64_t type, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x must be a 2-D CPU tensor");
  const Kind k = kind(type);
  const int64_t M = x.size(0), K = x.size(1);
  check_weight(raw, k, N, K, "linear");
  auto xf = x.to(at::kFloat).contiguous();
  auto xq = quantize_activations(xf.data_ptr<float>(), M, K, k);
  auto out = torch::empty({M, N}, x.options().dtype(at::kFloat));
  matvec(raw.data_ptr<uint8_t>(), k, N, K, xq.data(), M, out.data_ptr<float>(), N);
  return out.to(x.scalar_type());
}

// One decode token through E routed SwiGLU experts: x [1, H]; gates[e], ups[e] [I, H] and downs[e] [H, I] as GGML
// bytes of one type each; -> (residual +) sum_e weights[e] * down_e(silu(gate_e x) * up_e x), summed in list order.
// x is converted once for all gate/up rows and each expert's activation once for its down rows.
torch::Tensor experts_one_token(torch::Tensor x, std::vector<torch::Tensor> gates, std::vector<torch::Tensor> ups,
                                std::vector<torch::Tensor> downs, int64_t gate_type, int64_t up_type,
                                int64_t down_type, int64_t I, std::vector<double> weights,
                                c10::optional<torch::Tensor> residual) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.device().is_cpu(), "x must be [1, H] on the CPU");
  const int64_t E = static_cast<int64_t>(gates.size()), H = x.size(1);
  TORCH_CHECK(E > 0 && ups.size() == gates.size() && downs.size() == gates.size() &&
                  weights.size() == gates.size(), "one gate, up, down and weight per expert");
  const Kind kg = kind(gate_type), ku = kind(up_type), kd = kind(down_type);
  for (int64_t e = 0; e < E; ++e) {
    check_weight(gates[e], kg, I, H, "expert gate");
    check_weight(ups[e], ku, I, H, "expert up");
    check_weight(downs[e], kd, H, I, "expert down");
  }
  auto xf = x.to(at::kFloat).contiguous();
  const auto xg = quantize_activations(xf.data_ptr<float>(), 1, H, kg);
  const auto xu = ku.cpu->vec_dot_type == kg.cpu->vec_dot_type ? xg
                                                                 : quantize_activations(xf.data_ptr<float>(), 1, H, ku);
  std::vector<float> gu(E * 2 * I);  // expert e: gate outputs at [2eI, 2eI + I), up outputs after them
  const int64_t tasks_per_part = (I + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
  const int64_t gb = kg.row_bytes(H), ub = ku.row_bytes(H);
  parallel(E * 2 * tasks_per_part, [&](int64_t task) {
    const int64_t e = task / (2 * tasks_per_part), part = task / tasks_per_part % 2, r = task % tasks_per_part;
    const Kind& k = part ? ku : kg;
    const uint8_t* w = (part ? ups : gates)[e].data_ptr<uint8_t>();
    const uint8_t* xq = part ? xu.data() : xg.data();
    float* out = gu.data() + (2 * e + part) * I;
    const int64_t rb = part ? ub : gb, n1 = std::min(I, (r + 1) * ROWS_PER_TASK);
    for (int64_t n = r * ROWS_PER_TASK; n < n1; ++n) k.cpu->vec_dot(H, out + n, 0, w + n * rb, 0, xq, 0, 1);
  });
  std::vector<float> act(E * I);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t i = 0; i < I; ++i) act[e * I + i] = silu(gu[2 * e * I + i]) * gu[(2 * e + 1) * I + i];
  TORCH_CHECK(I % kd.dot->blck_size == 0, "expert width ", I, " is not a multiple of the ", kd.dot->type_name,
              " block size");
  const auto aq = quantize_activations(act.data(), E, I, kd);
  std::vector<float> down(E * H);
  const int64_t ab = kd.dot_row_bytes(I), db = kd.row_bytes(I), tasks_h = (H + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
  parallel(E * tasks_h, [&](int64_t task) {
    const int64_t e = task / tasks_h, r = task % tasks_h, n1 = std::min(H, (r + 1) * ROWS_PER_TASK);
    const uint8_t* w = downs[e].data_ptr<uint8_t>();
    for (int64_t n = r * ROWS_PER_TASK; n < n1; ++n)
      kd.cpu->vec_dot(I, down.data() + e * H + n, 0, w + n * db, 0, aq.data() + e * ab, 0, 1);
  });
  auto out = residual.has_value() ? residual->to(at::kFloat).contiguous().clone()
                                  : torch::zeros({1, H}, x.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (int64_t e = 0; e < E; ++e) {
    const float we = static_cast<float>(weights[e]);
    for (int64_t h = 0; h < H; ++h) o[h] += we * down[e * H + h];
  }
  return out.to(x.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto free_gil = py::call_guard<py::gil_scoped_release>();  // page-in threads run while a kernel computes
  m.def("open", &open, "open a ggml 0.20 CPU backend library; returns the CPU features it was built for");
  m.def("type_info", &type_info, "(block size, bytes per block, activation type id, has a CPU dot product)");
  m.def("dequantize", &dequantize, "GGML bytes [N, K] -> float32 with ggml's to_float", free_gil);
  m.def("quantize_rows", &quantize_rows, "x [M, K] -> activation blocks of a weight type (ggml's from_float)",
        free_gil);
  m.def("linear", &linear, "x [M, K] @ GGML weight [N, K]^T with ggml's vec_dot", free_gil);
  m.def("experts_one_token", &experts_one_token, "one token through E quantized SwiGLU experts, summed", free_gil);
}
