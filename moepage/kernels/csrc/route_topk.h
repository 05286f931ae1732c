// One token's softmax top-k routing, shared by the bf16 and the GGML decode kernels.
#pragma once
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
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
  // ascending ids (distinct) and their weights: a permutation done here, not by three more ATen ops
  idx = idx.contiguous();
  w = w.contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  std::vector<int64_t> order(top_k);
  for (int64_t i = 0; i < top_k; ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ip[a] < ip[b]; });
  std::vector<int64_t> ids(top_k);
  auto out = at::empty({top_k}, w.options());
  const size_t elt = w.element_size();
  const auto* src = static_cast<const uint8_t*>(w.data_ptr());
  auto* dst = static_cast<uint8_t*>(out.data_ptr());
  for (int64_t i = 0; i < top_k; ++i) {
    ids[i] = ip[order[i]];
    std::memcpy(dst + i * elt, src + order[i] * elt, elt);
  }
  return {ids, out};
}

}  // namespace
