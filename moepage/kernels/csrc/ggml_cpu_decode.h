// The attention half of one decoder layer for one decode token over GGML weights (included by ggml_cpu.cpp), the
// quantized twin of bf16_decode.cpp's attention_decode with the same arguments and results:
//   r = attn_norm(h); q, k, v = r Wq, r Wk, r Wv (+ biases); q/k norm (1: per head [D], 2: over all heads);
//   RoPE at this position; k, v written to the layer's cache at `pos`; softmax(q k^T * scale) v over positions
//   0..pos (GQA: query head n reads kv head n / (N/G)); h2 = h + o Wo (+ bias); r2 = ffn_norm(h2);
//   logits = r2 Wr when a router is given, and its softmax top-k when top_k > 0.
// Activations, norms, caches and biases are in the model dtype T (float or bf16): values are rounded to T where
// the torch ops of model.py round them; everything in between is fp32. Weights are GGML bytes multiplied with
// ggml's vec_dot after one conversion of the activation per vec_dot type.
//
// Shape legend: H hidden, N query heads, G kv heads, D head dim, S cache positions, E experts.
#pragma once

#include "ggml_cpu_core.h"
#include "route_topk.h"

namespace {

template <class T>
float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

template <class T>
const T* opt_data(const c10::optional<torch::Tensor>& t, int64_t n, const char* what) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->numel() == n && t->is_contiguous() && t->scalar_type() == c10::CppTypeToScalarType<T>::value,
              what, ": expected ", n, " contiguous values of the model dtype");
  return t->data_ptr<T>();
}

// kernels/norm.py: x * rsqrt(mean(x^2) + eps) rounded to T, times the weight, rounded to T
template <class T>
void rms_norm_row(const float* x, const T* w, int64_t n, double eps, float* out) {
  float ss = 0.0f;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + static_cast<float>(eps));
  for (int64_t i = 0; i < n; ++i) out[i] = round_to<T>(static_cast<float>(w[i]) * round_to<T>(x[i] * inv));
}

// kernels/rope.py: x * cos + rotate_half(x) * sin, each product and the sum rounded to T
template <class T>
void rope_row(float* x, const T* cos, const T* sin, int64_t D) {
  std::vector<float> y(D);
  const int64_t half = D / 2;
  for (int64_t d = 0; d < D; ++d) {
    const float rot = d < half ? -x[d + half] : x[d - half];
    y[d] = round_to<T>(round_to<T>(x[d] * static_cast<float>(cos[d])) + round_to<T>(rot * static_cast<float>(sin[d])));
  }
  std::copy(y.begin(), y.end(), x);
}

// Eight floats in a generic vector (AVX2, NEON as two halves, SSE2 likewise): the attention loops below, with
// every lane's arithmetic the scalar loop's (a product rounded, then a sum: no contraction), so the bits do not
// depend on the target. GCC did not vectorise the scalar loops over c10::BFloat16 (a 16-bit load, shift, scalar
// multiply-add per value).
typedef float f32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline f32x8 load8(const c10::BFloat16* p) {  // bf16 -> float: the 16 bits moved to the top of each lane
  u16x8 h;
  std::memcpy(&h, p, sizeof h);
  const u32x8 u = __builtin_convertvector(h, u32x8) << 16;
  f32x8 v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
inline void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof v); }

// q . k over D values, eight partial sums (lane j: the values d = j mod 8), added pairwise at the end
template <class T>
float dot_row(const float* q, const T* k, int64_t D) {
  f32x8 acc = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) acc += load8(q + d) * load8(k + d);
  float total = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; d < D; ++d) total += q[d] * static_cast<float>(k[d]);
  return total;
}

// o[d] += w * v[d] for d < D
template <class T>
void add_scaled(float* o, float w, const T* v, int64_t D) {
  int64_t d = 0;
  const f32x8 w8 = {w, w, w, w, w, w, w, w};
  for (; d + 8 <= D; d += 8) store8(o + d, load8(o + d) + w8 * load8(v + d));
  for (; d < D; ++d) o[d] += w * static_cast<float>(v[d]);
}

struct Weight {
  const uint8_t* data;
  Kind kind;
  int64_t rows, cols;
};

Weight weight(const torch::Tensor& raw, int64_t type, const char* what) {
  TORCH_CHECK(raw.dim() == 2, what, ": GGML bytes [rows, bytes per row]");
  Weight w{raw.data_ptr<uint8_t>(), kind(type), raw.size(0), 0};
  w.cols = raw.size(1) / static_cast<int64_t>(w.kind.t->type_size) * w.kind.t->blck_size;
  check_weight(raw, w.kind, w.rows, w.cols, what);
  return w;
}

// out_i = x . rows of weights[i], for every weight in one parallel region; x converted once per vec_dot type
void fused_matvec(const float* x, int64_t K, const std::vector<const Weight*>& ws, const std::vector<float*>& outs) {
  std::vector<std::pair<int, std::vector<uint8_t>>> converted;
  std::vector<Segment> segs;
  for (size_t i = 0; i < ws.size(); ++i) {
    TORCH_CHECK(ws[i]->cols == K, "weight has ", ws[i]->cols, " columns, the activation ", K);
    const int dot = ws[i]->kind.cpu->vec_dot_type;
    auto it = std::find_if(converted.begin(), converted.end(), [&](const auto& c) { return c.first == dot; });
    if (it == converted.end()) {
      converted.emplace_back(dot, quantize_activations(x, 1, K, ws[i]->kind));
      it = converted.end() - 1;
    }
    segs.push_back({ws[i]->data, &ws[i]->kind, ws[i]->rows, K, it->second.data(), outs[i]});
  }
  matvec_segments(segs);
}

// linear output rounded to T, then the bias added in T (ggml_linear returns x's dtype, then + bias)
template <class T>
void finish_linear(float* acc, const T* bias, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    acc[i] = bias ? round_to<T>(round_to<T>(acc[i]) + static_cast<float>(bias[i])) : round_to<T>(acc[i]);
}

using DecodeOut = std::tuple<torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, std::vector<int64_t>,
                             c10::optional<torch::Tensor>>;

// One layer's attention half, checked once: weights, and norms / biases / q-k norms as pointers of the model dtype
// (biases and q/k norms may be null). The tensors behind the pointers are kept alive by whoever holds this.
struct AttnLayer {
  Weight q, k, v, o;
  const void *attn_norm, *ffn_norm, *bq, *bk, *bv, *bo, *q_norm, *k_norm;
  int64_t qk_norm_mode;
  int64_t H, NQ, NK;
};

template <class T>
AttnLayer attn_layer(const torch::Tensor& attn_norm, const torch::Tensor& ffn_norm, const Weight& wq,
                     const Weight& wk, const Weight& wv, const Weight& wo, const c10::optional<torch::Tensor>& bq,
                     const c10::optional<torch::Tensor>& bk, const c10::optional<torch::Tensor>& bv,
                     const c10::optional<torch::Tensor>& bo, int64_t qk_norm_mode,
                     const c10::optional<torch::Tensor>& q_norm, const c10::optional<torch::Tensor>& k_norm,
                     int64_t D) {
  const int64_t H = wq.cols, NQ = wq.rows, NK = wk.rows;
  TORCH_CHECK(D > 0 && wk.cols == H && wv.cols == H && wv.rows == NK && NQ % D == 0 && NK % D == 0 &&
                  (NQ / D) % (NK / D) == 0 && wo.rows == H && wo.cols == NQ, "attention weight shapes");
  AttnLayer a{wq, wk, wv, wo, opt_data<T>(attn_norm, H, "attn_norm"), opt_data<T>(ffn_norm, H, "ffn_norm"),
              opt_data<T>(bq, NQ, "q bias"), opt_data<T>(bk, NK, "k bias"), opt_data<T>(bv, NK, "v bias"),
              opt_data<T>(bo, H, "o bias"), nullptr, nullptr, qk_norm_mode, H, NQ, NK};
  TORCH_CHECK(a.attn_norm && a.ffn_norm, "norm weights are required");
  TORCH_CHECK(qk_norm_mode >= 0 && qk_norm_mode <= 2, "qk_norm_mode is 0, 1 or 2");
  if (qk_norm_mode) {
    a.q_norm = opt_data<T>(q_norm, qk_norm_mode == 1 ? D : NQ, "q_norm");
    a.k_norm = opt_data<T>(k_norm, qk_norm_mode == 1 ? D : NK, "k_norm");
    TORCH_CHECK(a.q_norm && a.k_norm, "qk norm weights missing");
  }
  return a;
}

// The caches of one layer: contiguous [G, S, D] of the model dtype.
template <class T>
void check_cache(const torch::Tensor& k_cache, const torch::Tensor& v_cache, const AttnLayer& a, int64_t pos) {
  const auto dtype = c10::CppTypeToScalarType<T>::value;
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype,
              "k_cache, v_cache: contiguous [G, S, D] of the model dtype");
  TORCH_CHECK(k_cache.size(0) * k_cache.size(2) == a.NK, "the KV cache's [G, D] do not match the k projection");
  TORCH_CHECK(pos >= 0 && pos < k_cache.size(1), "position ", pos, " outside the KV cache of ", k_cache.size(1));
}

// h [H] (values of T, as float) -> h2 = h + attention (values of T) and r2 = ffn_norm(h2) (values of T).
template <class T>
void attention_half(const AttnLayer& a, const float* hp, T* kc, T* vc, int64_t G, int64_t S, int64_t D, int64_t pos,
                    const T* cp, const T* sp, double eps, double scale, float* h2f, float* r2f) {
  const int64_t H = a.H, NQ = a.NQ, NK = a.NK, N = NQ / D;
  const T *qn = static_cast<const T*>(a.q_norm), *kn = static_cast<const T*>(a.k_norm);
  std::vector<float> r(H), q(NQ), k(NK), v(NK);
  rms_norm_row<T>(hp, static_cast<const T*>(a.attn_norm), H, eps, r.data());
  fused_matvec(r.data(), H, {&a.q, &a.k, &a.v}, {q.data(), k.data(), v.data()});
  finish_linear<T>(q.data(), static_cast<const T*>(a.bq), NQ);
  finish_linear<T>(k.data(), static_cast<const T*>(a.bk), NK);
  finish_linear<T>(v.data(), static_cast<const T*>(a.bv), NK);
  if (a.qk_norm_mode == 2) {
    rms_norm_row<T>(q.data(), qn, NQ, eps, q.data());
    rms_norm_row<T>(k.data(), kn, NK, eps, k.data());
  }
  for (int64_t n = 0; n < N; ++n) {
    if (a.qk_norm_mode == 1) rms_norm_row<T>(q.data() + n * D, qn, D, eps, q.data() + n * D);
    rope_row<T>(q.data() + n * D, cp, sp, D);
  }
  for (int64_t g = 0; g < G; ++g) {
    if (a.qk_norm_mode == 1) rms_norm_row<T>(k.data() + g * D, kn, D, eps, k.data() + g * D);
    rope_row<T>(k.data() + g * D, cp, sp, D);
    for (int64_t d = 0; d < D; ++d) {
      kc[(g * S + pos) * D + d] = static_cast<T>(k[g * D + d]);
      vc[(g * S + pos) * D + d] = static_cast<T>(v[g * D + d]);
    }
  }

  const int64_t P = pos + 1, per_kv = N / G;
  std::vector<float> attn(NQ);
  parallel(G, [&](int64_t g) {  // the query heads of one kv head per task: each key and value row read once
    const float* qg = q.data() + g * per_kv * D;
    const T* keys = kc + g * S * D;
    const T* values = vc + g * S * D;
    std::vector<float> s(per_kv * P), o(per_kv * D, 0.0f), sum(per_kv, 0.0f), mx(per_kv, -INFINITY);
    for (int64_t p = 0; p < P; ++p)
      for (int64_t j = 0; j < per_kv; ++j) {
        s[j * P + p] = dot_row(qg + j * D, keys + p * D, D) * static_cast<float>(scale);
        mx[j] = std::max(mx[j], s[j * P + p]);
      }
    for (int64_t j = 0; j < per_kv; ++j)
      for (int64_t p = 0; p < P; ++p) {
        s[j * P + p] = std::exp(s[j * P + p] - mx[j]);
        sum[j] += s[j * P + p];
      }
    for (int64_t p = 0; p < P; ++p)
      for (int64_t j = 0; j < per_kv; ++j) add_scaled(o.data() + j * D, s[j * P + p], values + p * D, D);
    for (int64_t j = 0; j < per_kv; ++j)
      for (int64_t d = 0; d < D; ++d) attn[(g * per_kv + j) * D + d] = round_to<T>(o[j * D + d] / sum[j]);
  }, 2 * G * P * D * static_cast<int64_t>(sizeof(T)));  // the keys and values read

  std::vector<float> oacc(H);
  fused_matvec(attn.data(), NQ, {&a.o}, {oacc.data()});
  finish_linear<T>(oacc.data(), static_cast<const T*>(a.bo), H);
  for (int64_t j = 0; j < H; ++j) h2f[j] = round_to<T>(round_to<T>(hp[j]) + oacc[j]);
  rms_norm_row<T>(h2f, static_cast<const T*>(a.ffn_norm), H, eps, r2f);
}

// v [n] -> [1, n] of T, each value rounded as Tensor.to rounds it (on this thread: no parallel region for a copy)
template <class T>
torch::Tensor as_model_dtype(const float* v, int64_t n) {
  auto out = torch::empty({1, n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  T* o = static_cast<T*>(out.data_ptr());
  for (int64_t i = 0; i < n; ++i) o[i] = static_cast<T>(v[i]);
  return out;
}

template <class T>
DecodeOut attention_decode_t(const torch::Tensor& h, const torch::Tensor& attn_norm, const torch::Tensor& ffn_norm,
                             double eps, const Weight& wq, const Weight& wk, const Weight& wv, const Weight& wo,
                             const c10::optional<torch::Tensor>& bq, const c10::optional<torch::Tensor>& bk,
                             const c10::optional<torch::Tensor>& bv, const c10::optional<torch::Tensor>& bo,
                             int64_t qk_norm_mode, const c10::optional<torch::Tensor>& q_norm,
                             const c10::optional<torch::Tensor>& k_norm, const torch::Tensor& cos,
                             const torch::Tensor& sin, torch::Tensor& k_cache, torch::Tensor& v_cache, int64_t pos,
                             double scale, const Weight* router, int64_t top_k, bool norm_topk_prob,
                             bool weights_in_logits_dtype) {
  TORCH_CHECK(k_cache.dim() == 3, "k_cache, v_cache: contiguous [G, S, D] of the model dtype");
  const int64_t H = h.size(1), G = k_cache.size(0), S = k_cache.size(1), D = k_cache.size(2);
  TORCH_CHECK(wq.cols == H, "attention weight shapes");
  const AttnLayer a = attn_layer<T>(attn_norm, ffn_norm, wq, wk, wv, wo, bq, bk, bv, bo, qk_norm_mode, q_norm, k_norm, D);
  check_cache<T>(k_cache, v_cache, a, pos);
  const T* cp = opt_data<T>(cos, D, "cos");
  const T* sp = opt_data<T>(sin, D, "sin");
  TORCH_CHECK(cp && sp, "RoPE rows are required");
  TORCH_CHECK(router == nullptr || router->cols == H, "router shape");

  auto hf = h.to(at::kFloat).contiguous();
  std::vector<float> h2f(H), r2f(H);
  attention_half<T>(a, hf.data_ptr<float>(), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), G, S, D, pos, cp, sp, eps,
                    scale, h2f.data(), r2f.data());
  auto h2 = as_model_dtype<T>(h2f.data(), H);
  auto r2 = as_model_dtype<T>(r2f.data(), H);
  if (router == nullptr) return {h2, r2, c10::nullopt, {}, c10::nullopt};
  std::vector<float> lacc(router->rows);
  fused_matvec(r2f.data(), H, {router}, {lacc.data()});
  auto logits = as_model_dtype<T>(lacc.data(), router->rows);
  if (top_k <= 0) return {h2, r2, logits, {}, c10::nullopt};
  auto [experts, weights] = route_softmax_topk(logits, top_k, norm_topk_prob, weights_in_logits_dtype);
  return {h2, r2, logits, experts, weights};
}

}  // namespace
