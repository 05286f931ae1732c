// One decode token through every layer of a quantized model in one call (included by ggml_cpu.cpp): per layer the
// attention half (ggml_cpu_decode.h), the router and its softmax top-k, the routed experts (ggml_cpu_experts.h)
// resolved from a table of every expert's bytes, the residual; then the final norm and the lm_head. The same
// arithmetic, in the same order, as one attention_decode and one experts_one_token call per layer (what
// model.py runs otherwise), so the hidden state is bit for bit theirs; Python only samples.
//
// The plan holds the tensors it points into (weights, norms, every expert's bytes), so nothing it reads is freed
// under it; whoever builds it answers for the experts' bytes staying those experts' (kernels/ggml_token.py: the
// expert cache holds every expert and none was evicted since).
//
// A layer may have a shared expert (Qwen2-MoE): its matvecs run in the routed experts' two parallel regions, its
// activation and sigmoid gate through the ATen ops model.py's per-layer path calls (at::silu, at::linear,
// at::sigmoid on the same model-dtype tensors), so the bits are the per-layer path's.
//
// Shape legend: H hidden, E experts of a layer, K experts per token, I expert intermediate size, V vocab, L layers,
// G kv heads, S cache positions, D head dim, F shared expert intermediate size.
#pragma once

#include "ggml_cpu_decode.h"
#include "ggml_cpu_experts.h"

namespace {

struct PlanLayer {
  AttnLayer attn;
  Weight router;
  int64_t top_k;
  bool norm_topk_prob, weights_in_logits_dtype;
  Kind kg, ku, kd;
  int64_t I;
  std::vector<const uint8_t*> gate, up, down;  // [E] each expert's bytes
  std::unique_ptr<Weight> sg, su, sd;           // the shared expert (gate, up [F, H], down [H, F]) or null
  torch::Tensor sgate;                          // its sigmoid gate [1, H] of the model dtype, or undefined
};

class TokenPlan {
 public:
  TokenPlan(const std::string& dtype, double eps, double scale) : eps_(eps), scale_(scale) {
    TORCH_CHECK(dtype == "float32" || dtype == "bfloat16", "the token kernel runs in float32 or bfloat16");
    dtype_ = dtype == "float32" ? at::kFloat : at::kBFloat16;
  }

  void add_layer(torch::Tensor attn_norm, torch::Tensor ffn_norm, torch::Tensor wq, int64_t tq, torch::Tensor wk,
                 int64_t tk, torch::Tensor wv, int64_t tv, torch::Tensor wo, int64_t to,
                 c10::optional<torch::Tensor> bq, c10::optional<torch::Tensor> bk, c10::optional<torch::Tensor> bv,
                 c10::optional<torch::Tensor> bo, int64_t qk_norm_mode, c10::optional<torch::Tensor> q_norm,
                 c10::optional<torch::Tensor> k_norm, int64_t head_dim, torch::Tensor router, int64_t tr,
                 int64_t top_k, bool norm_topk_prob, bool weights_in_logits_dtype, std::vector<torch::Tensor> gates,
                 std::vector<torch::Tensor> ups, std::vector<torch::Tensor> downs, int64_t gate_type,
                 int64_t up_type, int64_t down_type, int64_t I) {
    const Weight q = weight(wq, tq, "q"), k = weight(wk, tk, "k"), v = weight(wv, tv, "v"), o = weight(wo, to, "o");
    PlanLayer l{dtype_ == at::kFloat
                    ? attn_layer<float>(attn_norm, ffn_norm, q, k, v, o, bq, bk, bv, bo, qk_norm_mode, q_norm, k_norm,
                                        head_dim)
                    : attn_layer<c10::BFloat16>(attn_norm, ffn_norm, q, k, v, o, bq, bk, bv, bo, qk_norm_mode, q_norm,
                                                k_norm, head_dim),
                weight(router, tr, "router"), top_k, norm_topk_prob, weights_in_logits_dtype,
                kind(gate_type), kind(up_type), kind(down_type), I, {}, {}, {}};
    const int64_t H = l.attn.H, E = l.router.rows;
    TORCH_CHECK(layers_.empty() || layers_[0].attn.H == H, "every layer has the same hidden size");
    TORCH_CHECK(l.router.cols == H && top_k >= 1 && top_k <= E, "router shape or top_k");
    TORCH_CHECK(static_cast<int64_t>(gates.size()) == E && ups.size() == gates.size() && downs.size() == gates.size(),
                "one gate, up and down per expert of the router");
    for (int64_t e = 0; e < E; ++e) {
      check_weight(gates[e], l.kg, I, H, "expert gate");
      check_weight(ups[e], l.ku, I, H, "expert up");
      check_weight(downs[e], l.kd, H, I, "expert down");
      l.gate.push_back(gates[e].data_ptr<uint8_t>());
      l.up.push_back(ups[e].data_ptr<uint8_t>());
      l.down.push_back(downs[e].data_ptr<uint8_t>());
    }
    TORCH_CHECK(H % l.kg.dot->blck_size == 0 && H % l.ku.dot->blck_size == 0 && I % l.kd.dot->blck_size == 0,
                "activation block sizes");
    for (auto* t : {&attn_norm, &ffn_norm, &wq, &wk, &wv, &wo, &router}) keep_.push_back(*t);
    for (auto* t : {&bq, &bk, &bv, &bo, &q_norm, &k_norm})
      if (t->has_value() && (*t)->defined()) keep_.push_back(**t);
    for (auto* list : {&gates, &ups, &downs}) keep_.insert(keep_.end(), list->begin(), list->end());
    layers_.push_back(std::move(l));
  }

  // The last added layer's shared expert: GGML bytes [rows, bytes per row] with type ids, and its gate [1, H] of
  // the model dtype (or none): out = routed + sigmoid(r gate^T) * down(silu(r gate_w^T) * r up^T)
  void add_shared(torch::Tensor gate, int64_t tg, torch::Tensor up, int64_t tu, torch::Tensor down, int64_t td,
                  c10::optional<torch::Tensor> shared_gate) {
    TORCH_CHECK(!layers_.empty(), "add the layer first");
    PlanLayer& l = layers_.back();
    const int64_t H = l.attn.H;
    l.sg = std::make_unique<Weight>(weight(gate, tg, "shared gate"));
    l.su = std::make_unique<Weight>(weight(up, tu, "shared up"));
    l.sd = std::make_unique<Weight>(weight(down, td, "shared down"));
    const int64_t F = l.sg->rows;
    TORCH_CHECK(l.sg->cols == H && l.su->cols == H && l.su->rows == F && l.sd->rows == H && l.sd->cols == F,
                "shared expert shapes");
    TORCH_CHECK(H % l.sg->kind.dot->blck_size == 0 && H % l.su->kind.dot->blck_size == 0 &&
                    F % l.sd->kind.dot->blck_size == 0, "shared expert activation block sizes");
    if (shared_gate.has_value() && shared_gate->defined()) {
      TORCH_CHECK(shared_gate->dim() == 2 && shared_gate->size(0) == 1 && shared_gate->size(1) == H &&
                      shared_gate->scalar_type() == dtype_ && shared_gate->device().is_cpu(),
                  "shared expert gate: [1, H] of the model dtype");
      l.sgate = *shared_gate;
      keep_.push_back(*shared_gate);
    }
    for (auto* t : {&gate, &up, &down}) keep_.push_back(*t);
  }

  void set_head(torch::Tensor norm, torch::Tensor lm_head, int64_t type) {
    TORCH_CHECK(!layers_.empty(), "add the layers first");
    head_ = std::make_unique<Weight>(weight(lm_head, type, "lm_head"));
    TORCH_CHECK(head_->cols == layers_[0].attn.H, "lm_head shape");
    norm_ = dtype_ == at::kFloat ? opt_data<float>(norm, head_->cols, "norm")
                                 : static_cast<const void*>(opt_data<c10::BFloat16>(norm, head_->cols, "norm"));
    TORCH_CHECK(norm_ != nullptr, "the final norm is required");
    keep_.push_back(norm);
    keep_.push_back(lm_head);
  }

  // h [1, H] (the token's embedding row), each layer's KV cache, RoPE rows [D] at pos -> (logits [1, V], or the last
  // layer's output [1, H] when head is false; the K experts of every layer, L * K ids)
  std::tuple<torch::Tensor, std::vector<int64_t>> decode(torch::Tensor h, std::vector<torch::Tensor> k_caches,
                                                         std::vector<torch::Tensor> v_caches, torch::Tensor cos,
                                                         torch::Tensor sin, int64_t pos, bool head) {
    TORCH_CHECK(head_ != nullptr, "set the head first");
    TORCH_CHECK(h.dim() == 2 && h.size(0) == 1 && h.size(1) == layers_[0].attn.H && h.scalar_type() == dtype_ &&
                    h.device().is_cpu(), "h: [1, H] of the model dtype on the CPU");
    TORCH_CHECK(k_caches.size() == layers_.size() && v_caches.size() == layers_.size(), "one KV cache per layer");
    if (dtype_ == at::kFloat) return decode_t<float>(h, k_caches, v_caches, cos, sin, pos, head);
    return decode_t<c10::BFloat16>(h, k_caches, v_caches, cos, sin, pos, head);
  }

 private:
  template <class T>
  std::tuple<torch::Tensor, std::vector<int64_t>> decode_t(const torch::Tensor& h, std::vector<torch::Tensor>& kcs,
                                                           std::vector<torch::Tensor>& vcs, const torch::Tensor& cos,
                                                           const torch::Tensor& sin, int64_t pos, bool head) {
    const int64_t H = layers_[0].attn.H, D = kcs[0].dim() == 3 ? kcs[0].size(2) : 0;
    const T* cp = opt_data<T>(cos, D, "cos");
    const T* sp = opt_data<T>(sin, D, "sin");
    TORCH_CHECK(cp && sp, "RoPE rows [D] of the model dtype are required");
    for (size_t i = 0; i < layers_.size(); ++i) {
      check_cache<T>(kcs[i], vcs[i], layers_[i].attn, pos);
      TORCH_CHECK(kcs[i].size(2) == D, "every layer has the same head dim");
    }
    auto hf = h.to(at::kFloat).contiguous();
    std::vector<float> x(hf.data_ptr<float>(), hf.data_ptr<float>() + H), h2(H), r2(H), sum(H), shared(H);
    std::vector<int64_t> chosen;
    std::vector<const uint8_t*> g, u, d;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const PlanLayer& l = layers_[i];
      const int64_t G = kcs[i].size(0), S = kcs[i].size(1);
      attention_half<T>(l.attn, x.data(), kcs[i].data_ptr<T>(), vcs[i].data_ptr<T>(), G, S, D, pos, cp, sp, eps_,
                        scale_, h2.data(), r2.data());
      std::vector<float> lacc(l.router.rows);
      fused_matvec(r2.data(), H, {&l.router}, {lacc.data()});
      auto [ids, w] = route_softmax_topk(as_model_dtype<T>(lacc.data(), l.router.rows), l.top_k, l.norm_topk_prob,
                                         l.weights_in_logits_dtype);
      const auto wf = w.to(at::kFloat).contiguous();
      const float* wp = static_cast<const float*>(wf.data_ptr());
      const int64_t K = static_cast<int64_t>(ids.size());
      g.resize(K), u.resize(K), d.resize(K);
      for (int64_t j = 0; j < K; ++j) {
        g[j] = l.gate[ids[j]], u[j] = l.up[ids[j]], d[j] = l.down[ids[j]];
        chosen.push_back(ids[j]);
      }
      if (!l.sg) {
        experts_sum(r2.data(), H, l.I, K, g.data(), u.data(), d.data(), l.kg, l.ku, l.kd, wp, sum.data());
        for (int64_t j = 0; j < H; ++j) x[j] = round_to<T>(h2[j] + round_to<T>(sum[j]));  // residual + experts, in T
        continue;
      }
      shared_sum<T>(l, r2.data(), g, u, d, wp, sum.data(), shared.data());
      for (int64_t j = 0; j < H; ++j)  // residual + (experts + shared expert), each sum rounded to T
        x[j] = round_to<T>(h2[j] + round_to<T>(round_to<T>(sum[j]) + shared[j]));
    }
    if (!head) return {as_model_dtype<T>(x.data(), H), chosen};
    rms_norm_row<T>(x.data(), static_cast<const T*>(norm_), H, eps_, r2.data());
    return {head_logits<T>(r2.data()), chosen};
  }

  // Routed experts (sum [H], fp32) and the shared expert (shared [H], its gated output rounded to T) of layer l for
  // r [H], as SparseMoE.__call__ computes them: g = r gate^T, u = r up^T rounded to T; silu(g) (ATen), times u,
  // rounded; its down product rounded to T; times sigmoid(r sgate^T) (ATen) rounded to T.
  template <class T>
  void shared_sum(const PlanLayer& l, const float* r, const std::vector<const uint8_t*>& g,
                  const std::vector<const uint8_t*>& u, const std::vector<const uint8_t*>& d, const float* w,
                  float* sum, float* shared) const {
    const int64_t H = l.attn.H, F = l.sg->rows, K = static_cast<int64_t>(g.size());
    const SharedFFN sh{l.sg->data, l.su->data, l.sd->data, &l.sg->kind, &l.su->kind, &l.sd->kind, F,
                       [&](float* gate, float* up, float* act) {
                         const auto st = at::silu(as_model_dtype<T>(gate, F));
                         const T* sp = st.template data_ptr<T>();
                         for (int64_t i = 0; i < F; ++i)
                           act[i] = round_to<T>(static_cast<float>(sp[i]) * round_to<T>(up[i]));
                       },
                       shared};
    experts_sum(r, H, l.I, K, g.data(), u.data(), d.data(), l.kg, l.ku, l.kd, w, sum, &sh);
    for (int64_t j = 0; j < H; ++j) shared[j] = round_to<T>(shared[j]);
    if (!l.sgate.defined()) return;
    const auto gate = at::sigmoid(at::linear(as_model_dtype<T>(r, H), l.sgate));  // [1, 1] of T
    const float gv = static_cast<float>(gate.template data_ptr<T>()[0]);
    for (int64_t j = 0; j < H; ++j) shared[j] = round_to<T>(gv * shared[j]);
  }

  // r [H] -> logits [1, V] of T: each task multiplies its rows and rounds them to T (the values fused_matvec and
  // as_model_dtype give, with no serial pass over the V logits after the parallel region)
  template <class T>
  torch::Tensor head_logits(const float* r) const {
    const Weight& w = *head_;
    const int64_t V = w.rows, K = w.cols, wb = w.kind.row_bytes(K), per = rows_per_task(wb);
    const auto xq = quantize_activations(r, 1, K, w.kind);
    auto out = torch::empty({1, V}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    T* o = static_cast<T*>(out.data_ptr());
    parallel((V + per - 1) / per, [&](int64_t task) {
      const int64_t n0 = task * per, n1 = std::min(V, n0 + per);
      thread_local std::vector<float> acc;
      acc.resize(n1 - n0);
      if (w.kind.gemv != nullptr) {
        w.kind.gemv(K, acc.data(), n1 - n0, w.data + n0 * wb, xq.data(), 1, n1 - n0);
      } else {
        for (int64_t n = n0; n < n1; ++n) w.kind.vec_dot(K, &acc[n - n0], 0, w.data + n * wb, 0, xq.data(), 0, 1);
      }
      for (int64_t n = n0; n < n1; ++n) o[n] = static_cast<T>(acc[n - n0]);
    }, V * wb);
    return out;
  }

  at::ScalarType dtype_;
  double eps_, scale_;
  std::vector<PlanLayer> layers_;
  std::unique_ptr<Weight> head_;
  const void* norm_ = nullptr;
  std::vector<torch::Tensor> keep_;
};

}  // namespace
