// One token's softmax top-k routing, shared by the bf16 and the GGML decode kernels.
#pragma once
#include <torch/extension.h>

#include <tuple>
#include <vector>

namespace {

// kernels/routing.py's softmax_topk for one token's router logits [1, E], through the same ATen ops (so ties
// between equal scores break the same way): the K experts in ascending id order (the order their outputs are
// summed in) and their weights [K] in that order.
inline std::tuple<std::vector<int64_t>, torch::Tensor> route_softmax_topk(const torch::Tensor& logits, int64_t top_k,
                                                                          bool norm_topk_prob,
                                                                          bool weights_in_logits_dtype) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(0) == 1 && top_k >= 1 && top_k <= logits.size(1),
              "route_softmax_topk takes logits [1, E] and 1 <= top_k <= E");
  auto probs = at::softmax(logits, -1, at::kFloat);
  auto [w, idx] = at::topk(probs, top_k, -1);
  if (norm_topk_prob) w = w / w.sum(-1, true);
  if (weights_in_logits_dtype) w = w.to(logits.scalar_type());
  auto order = at::argsort(idx[0]);
  auto ids = idx[0].index_select(0, order).contiguous();
  return {std::vector<int64_t>(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + top_k), w[0].index_select(0, order)};
}

}  // namespace
