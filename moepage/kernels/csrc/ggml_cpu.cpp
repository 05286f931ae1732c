// Quantized matvecs with ggml's own CPU kernels: the activation is converted once to the weight type's
// "vec_dot type" (Q8_0 blocks for Q4_0..Q8_0, Q8_K for K-quants, F16 for F16, ...) with ggml's `from_float`, then
// every weight row is one call of ggml's `vec_dot` on the stored bytes, as llama.cpp's CPU backend does. The
// library (libggml-cpu from the libggml-python wheel, or another build) is opened at run time, so its SIMD is
// whatever it was built for (AVX2, AVX-512, NEON). Where this module is built with AVX512BW, the Q6_K dot product and
// the interleaved Q4_K gemv are ours (ggml_q6k_avx512.h, ggml_q4k_avx512.h): the library's AVX2 bits, faster.
//
// Threads: a pool of our own whose workers spin briefly (yielding) and then sleep on a condition variable,
// so a decode step with busy neighbours does not burn the cores it shares.
//
// Shape legend: M activation rows (tokens), K input features (weight columns), N output features (weight rows),
// E experts of one token, H hidden, I expert intermediate size.
#include "ggml_cpu_core.h"
#include "ggml_cpu_decode.h"
#include "ggml_cpu_experts.h"
#include "ggml_cpu_token.h"
#include "ggml_cpu_interleave.h"

namespace {

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

}  // namespace

// Opens the ggml CPU backend library at `path` (its libggml-base beside it); returns the CPU features it uses.
std::string open(const std::string& path) {
  open_library(path);
  return lib.features;
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

// [N, K] GGML bytes -> float32 [N, K] (ggml's to_float)
torch::Tensor dequantize(torch::Tensor raw, int64_t type, int64_t N, int64_t K) {
  const bool interleaved = type & INTERLEAVED;
  type &= ~INTERLEAVED;
  TORCH_CHECK(lib.traits != nullptr && type >= 0 && type < TYPE_COUNT, "bad GGML type id ", type);
  TORCH_CHECK(!interleaved || type == TYPE_Q4_K, "no interleaved layout of GGML type id ", type);
  const TypeTraits* t = lib.traits(type);
  TORCH_CHECK(t != nullptr && t->blck_size > 0 && (t->to_float != nullptr || type == TYPE_Q8_K),
              "ggml cannot dequantize type ", type);
  const to_float_t to_float = type == TYPE_Q8_K ? q8_k_to_float : t->to_float;
  Kind k{static_cast<int>(type), t, nullptr, nullptr, nullptr};
  check_weight(raw, k, N, K, "dequantize");
  TORCH_CHECK(!interleaved || N % 8 == 0, "dequantize: an interleaved matrix has a multiple of 8 rows, not ", N);
  auto out = torch::empty({N, K}, raw.options().dtype(at::kFloat));
  const uint8_t* src = raw.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  const int64_t rb = k.row_bytes(K), per_task = std::max<int64_t>(8, 65536 / K) & ~int64_t(7);
  parallel((N + per_task - 1) / per_task, [&](int64_t task) {
    const int64_t n0 = task * per_task, n1 = std::min(N, n0 + per_task);
    std::vector<uint8_t> rows(interleaved ? 8 * rb : 0);
    for (int64_t n = n0; n < n1; ++n) {
      if (interleaved && n % 8 == 0) deinterleave_group(src + n * rb, rows.data(), K / t->blck_size);
      to_float(interleaved ? rows.data() + (n % 8) * rb : src + n * rb, dst + n * K, K);
    }
  }, N * rb);
  return out;
}

// Whether weights of `type` have an 8-row interleaved layout with a faster kernel in this library (and this CPU)
bool interleaves(int64_t type) { return type == TYPE_Q4_K && lib.gemv_q4_k_x8 != nullptr; }

// [N, K] GGML bytes of `type` (N a multiple of 8) rearranged in place into / out of the interleaved layout
void relayout_(torch::Tensor raw, int64_t type, int64_t N, int64_t K, bool interleave) {
  TORCH_CHECK(lib.traits != nullptr && type == TYPE_Q4_K, "only Q4_K has an interleaved layout here");
  Kind k{static_cast<int>(type), lib.traits(type), nullptr, nullptr, nullptr};
  check_weight(raw, k, N, K, interleave ? "interleave" : "deinterleave");
  TORCH_CHECK(N % 8 == 0, "an interleaved matrix has a multiple of 8 rows, not ", N);
  uint8_t* p = raw.data_ptr<uint8_t>();
  const int64_t rb = k.row_bytes(K), B = K / k.t->blck_size;
  // On the calling thread: a page-in thread calls this while decode runs, and the pool is the decode's (a region
  // here would hold the pool's lock and both cores while a token waits)
  thread_local std::vector<uint8_t> copy;
  copy.resize(8 * rb);
  for (int64_t g = 0; g < N / 8; ++g) {
    std::memcpy(copy.data(), p + g * 8 * rb, 8 * rb);
    (interleave ? interleave_group : deinterleave_group)(copy.data(), p + g * 8 * rb, B);
  }
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
  std::vector<const uint8_t*> g(E), u(E), d(E);
  std::vector<float> w(E);
  for (int64_t e = 0; e < E; ++e) {
    g[e] = gates[e].data_ptr<uint8_t>();
    u[e] = ups[e].data_ptr<uint8_t>();
    d[e] = downs[e].data_ptr<uint8_t>();
    w[e] = static_cast<float>(weights[e]);
  }
  auto out = torch::empty({1, H}, x.options().dtype(at::kFloat));
  experts_sum(xf.data_ptr<float>(), H, I, E, g.data(), u.data(), d.data(), kg, ku, kd, w.data(), out.data_ptr<float>());
  if (!residual.has_value()) return out.to(x.scalar_type());
  return residual->add(out.to(x.scalar_type()));  // the experts' sum rounded to x's dtype, then the residual added
}

// One decode token through a layer's attention half (ggml_cpu_decode.h); weights are GGML bytes [rows, bytes per
// row] with their type ids, everything else in the model dtype (float32 or bfloat16).
DecodeOut attention_decode(torch::Tensor h, torch::Tensor attn_norm, torch::Tensor ffn_norm, double eps,
                           torch::Tensor wq, int64_t tq, torch::Tensor wk, int64_t tk, torch::Tensor wv, int64_t tv,
                           torch::Tensor wo, int64_t to, c10::optional<torch::Tensor> bq,
                           c10::optional<torch::Tensor> bk, c10::optional<torch::Tensor> bv,
                           c10::optional<torch::Tensor> bo, int64_t qk_norm_mode, c10::optional<torch::Tensor> q_norm,
                           c10::optional<torch::Tensor> k_norm, torch::Tensor cos, torch::Tensor sin,
                           torch::Tensor k_cache, torch::Tensor v_cache, int64_t pos, double scale,
                           c10::optional<torch::Tensor> router, int64_t tr, int64_t top_k, bool norm_topk_prob,
                           bool weights_in_logits_dtype) {
  TORCH_CHECK(h.dim() == 2 && h.size(0) == 1 && h.device().is_cpu(), "attention_decode takes one token h [1, H]");
  const Weight q = weight(wq, tq, "q"), k = weight(wk, tk, "k"), v = weight(wv, tv, "v"), o = weight(wo, to, "o");
  c10::optional<Weight> r;
  if (router.has_value() && router->defined()) r = weight(*router, tr, "router");
  const Weight* rp = r.has_value() ? &*r : nullptr;
  if (h.scalar_type() == at::kFloat)
    return attention_decode_t<float>(h, attn_norm, ffn_norm, eps, q, k, v, o, bq, bk, bv, bo, qk_norm_mode, q_norm,
                                     k_norm, cos, sin, k_cache, v_cache, pos, scale, rp, top_k, norm_topk_prob,
                                     weights_in_logits_dtype);
  TORCH_CHECK(h.scalar_type() == at::kBFloat16, "attention_decode runs in float32 or bfloat16");
  return attention_decode_t<c10::BFloat16>(h, attn_norm, ffn_norm, eps, q, k, v, o, bq, bk, bv, bo, qk_norm_mode,
                                           q_norm, k_norm, cos, sin, k_cache, v_cache, pos, scale, rp, top_k,
                                           norm_topk_prob, weights_in_logits_dtype);
}

namespace {

// The first index of the largest of v[0..n) (T float or bf16), or -1 when any value is NaN or inf. Three passes the
// compiler vectorises (x - x is 0 exactly for finite x; the largest value; its first index), on this thread: a
// greedy sampler's whole cost, ~300 KB of a 152k vocabulary's logits, instead of torch's isfinite, all and argmax.
inline void widen(const float* v, int64_t m, float* out) { std::memcpy(out, v, m * sizeof(float)); }

// bf16 -> float as bits shifted up (exact): a loop the compiler vectorises, which c10::BFloat16's conversion is not
inline void widen(const c10::BFloat16* v, int64_t m, float* out) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(v);
  uint32_t* o = reinterpret_cast<uint32_t*>(out);
  for (int64_t i = 0; i < m; ++i) o[i] = static_cast<uint32_t>(bits[i]) << 16;
}

template <class T>
int64_t finite_argmax_t(const T* v, int64_t n) {
  constexpr int64_t B = 1024;
  float top = -INFINITY;
  float buf[B];
  bool finite = true;
  std::vector<float> block_max;  // each block's largest: the first block holding the top is the one searched
  block_max.reserve((n + B - 1) / B);
  for (int64_t b0 = 0; b0 < n; b0 += B) {
    const int64_t m = std::min(B, n - b0);
    widen(v + b0, m, buf);
    constexpr int W = 16;  // lanes kept apart, so the compiler vectorises without reassociating a reduction
    float mxs[W];
    int bads[W] = {0};
    std::fill(mxs, mxs + W, -INFINITY);
    int64_t i = 0;
    for (; i + W <= m; i += W)
      for (int j = 0; j < W; ++j) {
        bads[j] |= (buf[i + j] - buf[i + j]) != 0.0f;
        mxs[j] = buf[i + j] > mxs[j] ? buf[i + j] : mxs[j];
      }
    int bad = 0;
    float mx = -INFINITY;
    for (; i < m; ++i) {
      bad |= (buf[i] - buf[i]) != 0.0f;
      mx = buf[i] > mx ? buf[i] : mx;
    }
    for (int j = 0; j < W; ++j) {
      bad |= bads[j];
      mx = mxs[j] > mx ? mxs[j] : mx;
    }
    finite = finite && !bad;
    top = mx > top ? mx : top;
    block_max.push_back(mx);
  }
  if (!finite) return -1;
  for (size_t b = 0; b < block_max.size(); ++b) {
    if (block_max[b] != top) continue;
    const int64_t b0 = static_cast<int64_t>(b) * B;
    for (int64_t i = b0; i < std::min(n, b0 + B); ++i)
      if (static_cast<float>(v[i]) == top) return i;
  }
  return -1;  // n == 0
}

}  // namespace

// raw [V] (float32 or bf16, contiguous): its argmax (the first of ties, as torch.argmax), or -1 when a value is NaN
// or inf (or V is 0)
int64_t finite_argmax(torch::Tensor raw) {
  TORCH_CHECK(raw.dim() == 1 && raw.is_contiguous() && raw.device().is_cpu(), "raw: contiguous [V] on the CPU");
  if (raw.scalar_type() == at::kFloat) return finite_argmax_t(raw.data_ptr<float>(), raw.numel());
  TORCH_CHECK(raw.scalar_type() == at::kBFloat16, "raw: float32 or bfloat16");
  return finite_argmax_t(raw.data_ptr<c10::BFloat16>(), raw.numel());
}

// The GGML type ids that get our dot product instead of the library's (while use_own_kernels is on); the
// interleaved Q4_K as TYPE_Q4_K | INTERLEAVED where its gemv is ours.
std::vector<int64_t> own_kernel_types() {
  std::vector<int64_t> out;
  if (lib.traits == nullptr) return out;
  for (int id = 0; id < TYPE_COUNT; ++id) {
    const TypeTraitsCpu* c = lib.cpu_traits(id);
    if (c != nullptr && c->vec_dot != nullptr && own_vec_dot(id, c->vec_dot) != c->vec_dot) out.push_back(id);
  }
  if (lib.gemv_q4_k_x8 != nullptr && own_gemv_q4_k_x8() != lib.gemv_q4_k_x8) out.push_back(TYPE_Q4_K | INTERLEAVED);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto free_gil = py::call_guard<py::gil_scoped_release>();  // page-in threads run while a kernel computes
  m.def("open", &open, "open a ggml 0.20 CPU backend library; returns the CPU features it was built for");
  m.def("type_info", &type_info, "(block size, bytes per block, activation type id, has a CPU dot product)");
  m.def("dequantize", &dequantize, "GGML bytes [N, K] -> float32 with ggml's to_float", free_gil);
  m.def("interleaves", &interleaves, "whether a type has ggml's 8-row interleaved layout and kernel here");
  m.def("relayout_", &relayout_, "GGML bytes [N, K] into (interleave=True) or out of the 8-row interleaved layout, "
        "in place", free_gil);
  m.def("quantize_rows", &quantize_rows, "x [M, K] -> activation blocks of a weight type (ggml's from_float)",
        free_gil);
  m.def("linear", &linear, "x [M, K] @ GGML weight [N, K]^T with ggml's vec_dot", free_gil);
  m.def("experts_one_token", &experts_one_token, "one token through E quantized SwiGLU experts, summed", free_gil);
  m.def("use_own_kernels", &use_own_kernels, "our dot products where they give ggml's bits (on by default)");
  m.def("own_kernel_types", &own_kernel_types,
        "GGML type ids whose dot product (or, with the interleaved bit, gemv) is ours, not the library's");
  m.def("finite_argmax", &finite_argmax, "raw [V] -> its first argmax, or -1 when a value is NaN or inf");
  m.def("attention_decode", &attention_decode, "one decode token through a layer's attention half", free_gil);
  py::class_<TokenPlan>(m, "TokenPlan", "one decode token through every layer, the final norm and the lm_head")
      .def(py::init<const std::string&, double, double>())
      .def("add_layer", &TokenPlan::add_layer, "a layer's attention weights, router and every expert's bytes")
      .def("add_shared", &TokenPlan::add_shared, "the last added layer's shared expert and its gate")
      .def("set_head", &TokenPlan::set_head, "the final norm and the lm_head")
      .def("decode", &TokenPlan::decode, "h [1, H] -> (logits [1, V] or h [1, H], every layer's experts)", free_gil);
}
