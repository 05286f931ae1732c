// One decode token through every layer of a resident bf16 model in one call (included by bf16_decode.cpp): per
// layer the attention half with its KV append and router logits (bf16_layer.h), the softmax top-k, and the routed
// experts resolved from a table of every expert's weights, summed onto the residual. The same functions, in the same
// order, as one attention_decode and one experts_one_token call per layer (model.py's fused path), so the hidden
// state and the KV writes are bit for bit theirs; the final norm and the lm_head stay in Python (one call each, the
// same kernels as before). The quantized twin is ggml_cpu_token.h.
//
// The plan holds the tensors it points into (weights, norms, every expert's w13 and w2), so nothing it reads is freed
// under it; whoever builds it answers for the experts' tensors staying those experts' (kernels/bf16_token.py: the
// expert cache holds every expert and none was evicted since).
//
// Shape legend: H hidden, E experts of a layer, K experts per token, I expert intermediate size, L layers,
// G kv heads, S cache positions, D head dim.
#pragma once
#include <torch/extension.h>

#include <vector>

#include "bf16_layer.h"
#include "route_topk.h"

namespace {

struct Bf16PlanLayer {
  AttnWeights attn;
  int64_t top_k;
  bool norm_topk_prob, weights_in_logits_dtype;
  std::vector<const bf16*> w13, w2;  // [E] each expert's [2I, H] and [H, I]
  std::vector<int64_t> I;             // [E]
};

class Bf16TokenPlan {
 public:
  Bf16TokenPlan(double eps, double scale) : eps_(eps), scale_(scale) {}

  void add_layer(torch::Tensor attn_norm, torch::Tensor ffn_norm, torch::Tensor wq, torch::Tensor wk,
                 torch::Tensor wv, torch::Tensor wo, c10::optional<torch::Tensor> bq,
                 c10::optional<torch::Tensor> bk, c10::optional<torch::Tensor> bv, c10::optional<torch::Tensor> bo,
                 int64_t qk_norm_mode, c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm,
                 int64_t head_dim, torch::Tensor router, int64_t top_k, bool norm_topk_prob,
                 bool weights_in_logits_dtype, std::vector<torch::Tensor> w13, std::vector<torch::Tensor> w2) {
    Bf16PlanLayer l{attn_weights(attn_norm, ffn_norm, wq, wk, wv, wo, bq, bk, bv, bo, qk_norm_mode, q_norm, k_norm,
                                 head_dim, router),
                    top_k, norm_topk_prob, weights_in_logits_dtype, {}, {}, {}};
    const int64_t H = l.attn.H, E = l.attn.E;
    TORCH_CHECK(layers_.empty() || layers_[0].attn.H == H, "every layer has the same hidden size");
    TORCH_CHECK(layers_.empty() || layers_[0].attn.D == head_dim, "every layer has the same head dim");
    TORCH_CHECK(E >= 1 && top_k >= 1 && top_k <= E, "a router and 1 <= top_k <= its experts");
    TORCH_CHECK(static_cast<int64_t>(w13.size()) == E && w2.size() == w13.size(), "one w13 and w2 per expert");
    for (int64_t e = 0; e < E; ++e) {
      check_bf16_2d(w13[e], "w13");
      check_bf16_2d(w2[e], "w2");
      TORCH_CHECK(w13[e].size(1) == H && w2[e].size(0) == H && w13[e].size(0) == 2 * w2[e].size(1), "expert shapes");
      l.w13.push_back(w13[e].data_ptr<bf16>());
      l.w2.push_back(w2[e].data_ptr<bf16>());
      l.I.push_back(w2[e].size(1));
    }
    for (auto* t : {&attn_norm, &ffn_norm, &wq, &wk, &wv, &wo, &router}) keep_.push_back(*t);
    for (auto* t : {&bq, &bk, &bv, &bo, &q_norm, &k_norm})
      if (t->has_value() && (*t)->defined()) keep_.push_back(**t);
    keep_.insert(keep_.end(), w13.begin(), w13.end());
    keep_.insert(keep_.end(), w2.begin(), w2.end());
    layers_.push_back(std::move(l));
  }

  // h [1, H] bf16 (the token's embedding row), each layer's KV cache [G, S, D], RoPE rows [D] at pos -> (the last
  // layer's output [1, H]; the K experts of every layer, L * K ids). `head` must be false: the final norm and the
  // lm_head run in Python (the argument keeps ggml_cpu_token.h's signature, which kernels/ggml_token.py calls).
  std::tuple<torch::Tensor, std::vector<int64_t>> decode(torch::Tensor h, std::vector<torch::Tensor> k_caches,
                                                         std::vector<torch::Tensor> v_caches, torch::Tensor cos,
                                                         torch::Tensor sin, int64_t pos, bool head) {
    TORCH_CHECK(!layers_.empty(), "add the layers first");
    TORCH_CHECK(!head, "the bf16 token plan returns the last layer's output; the lm_head runs in Python");
    const int64_t H = layers_[0].attn.H, D = layers_[0].attn.D;
    check_bf16_2d(h, "h");
    TORCH_CHECK(h.size(0) == 1 && h.size(1) == H, "h: [1, H]");
    TORCH_CHECK(k_caches.size() == layers_.size() && v_caches.size() == layers_.size(), "one KV cache per layer");
    const auto [cp, sp] = rope_rows(cos, sin, D);
    std::vector<std::pair<int64_t, int64_t>> gs;
    for (size_t i = 0; i < layers_.size(); ++i)
      gs.push_back(check_cache(k_caches[i], v_caches[i], layers_[i].attn, pos));
    auto out = h.clone();
    bf16* x = out.data_ptr<bf16>();
    std::vector<bf16> h2(H), r2(H);
    std::vector<int64_t> chosen, I;
    std::vector<const bf16*> w13, w2;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Bf16PlanLayer& l = layers_[i];
      const int64_t E = l.attn.E;
      std::vector<float> lacc(E);
      attention_half(l.attn, x, k_caches[i].data_ptr<bf16>(), v_caches[i].data_ptr<bf16>(), gs[i].first,
                     gs[i].second, pos, cp, sp, eps_, scale_, h2.data(), r2.data(), lacc.data());
      auto logits = torch::empty({1, E}, h.options());
      finish_linear(lacc.data(), nullptr, E, logits.data_ptr<bf16>());
      auto [ids, w] = route_softmax_topk(logits, l.top_k, l.norm_topk_prob, l.weights_in_logits_dtype);
      const auto wf = w.to(at::kFloat).contiguous();  // the per-layer path passes w.tolist(): the same floats
      const int64_t K = static_cast<int64_t>(ids.size());
      w13.resize(K), w2.resize(K), I.resize(K);
      for (int64_t j = 0; j < K; ++j) {
        w13[j] = l.w13[ids[j]], w2[j] = l.w2[ids[j]], I[j] = l.I[ids[j]];
        chosen.push_back(ids[j]);
      }
      experts_sum(r2.data(), H, K, w13.data(), w2.data(), I.data(), wf.data_ptr<float>(), h2.data(), x);
    }
    return {out, chosen};
  }

 private:
  double eps_, scale_;
  std::vector<Bf16PlanLayer> layers_;
  std::vector<torch::Tensor> keep_;
};

}  // namespace
