// The attention half of one decoder layer for B decode rows at once (bf16_rows.cpp's attention_rows): what
// bf16_decode.cpp's attention_decode does for one token, step for step with the same roundings, but the q/k/v, o and
// router projections multiply all B rows in one pass over each weight matrix (bf16_rows.h's CoreRows, the one-row
// dot): each row's outputs and KV cache writes are bit for bit those of attention_decode on that row alone. Each
// row attends over its own KV cache at its own position.
//
// Shape legend: B rows, H hidden, N query heads, G kv heads, D head dim, S cache positions, E experts.
#pragma once
#include <torch/extension.h>

#include <vector>

#include "bf16_rows.h"
#include "route_topk.h"

namespace bf16rows {

inline const bf16* opt_ptr(const c10::optional<torch::Tensor>& t, int64_t n, const char* what) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous() && t->numel() == n, what, ": bf16, ", n, " values");
  return t->data_ptr<bf16>();
}

// fp32 accumulator (+ bf16 bias in fp32) -> bf16, as bf16_decode's finish_linear rounds.
inline void finish_linear(const float* acc, const bf16* bias, int64_t n, bf16* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = bf16(bias ? acc[i] + static_cast<float>(bias[i]) : acc[i]);
}

// out[j * ldo + n] for the J = x.size() rows through several matrices that share the input, as one parallel loop:
// segment s is w[s] [rows[s], K] writing columns [col[s], col[s] + rows[s]) of each row's ldo outputs.
struct RowsSegment {
  const bf16* w;
  int64_t rows, col;
};

inline void gemv_rows_segments(const CoreRows& x, int64_t K, const std::vector<RowsSegment>& segs, float* out,
                               int64_t ldo) {
  const int64_t per = rows_per_task(K), J = x.size();
  std::vector<int64_t> all(J), first(segs.size() + 1, 0);
  for (int64_t j = 0; j < J; ++j) all[j] = j;
  for (size_t s = 0; s < segs.size(); ++s) first[s + 1] = first[s] + (segs[s].rows + per - 1) / per;
  parallel_tasks(first.back(), (first.back() * per) * K * 2, [&](int64_t t) {
    const size_t s = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
    const int64_t n0 = (t - first[s]) * per;
    x.gemv(all.data(), J, segs[s].w, n0, std::min(segs[s].rows, n0 + per), out + segs[s].col, ldo);
  });
}

using RowOut = std::tuple<torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, std::vector<int64_t>,
                          c10::optional<torch::Tensor>>;

// attention_decode's arguments with h [B, H] and, per row, its cos/sin [D], k/v cache [G, S, D] and position;
// returns attention_decode's 5-tuple for each row.
std::vector<RowOut> attention_rows(
    torch::Tensor h, torch::Tensor attn_norm, torch::Tensor ffn_norm, double eps,
    torch::Tensor wq, torch::Tensor wk, torch::Tensor wv, torch::Tensor wo,
    c10::optional<torch::Tensor> bq, c10::optional<torch::Tensor> bk, c10::optional<torch::Tensor> bv,
    c10::optional<torch::Tensor> bo, int64_t qk_norm_mode, c10::optional<torch::Tensor> q_norm,
    c10::optional<torch::Tensor> k_norm, std::vector<torch::Tensor> cos, std::vector<torch::Tensor> sin,
    std::vector<torch::Tensor> k_cache, std::vector<torch::Tensor> v_cache, std::vector<int64_t> pos, double scale,
    c10::optional<torch::Tensor> router, int64_t top_k, bool norm_topk_prob, bool weights_in_logits_dtype) {
  TORCH_CHECK(h.device().is_cpu() && h.scalar_type() == at::kBFloat16 && h.dim() == 2 && h.is_contiguous(),
              "h must be a contiguous bf16 [B, H]");
  const int64_t B = h.size(0), H = h.size(1);
  TORCH_CHECK((int64_t)cos.size() == B && (int64_t)sin.size() == B && (int64_t)k_cache.size() == B &&
              (int64_t)v_cache.size() == B && (int64_t)pos.size() == B, "one cos, sin, k/v cache and position per row");
  for (auto* t : {&wq, &wk, &wv, &wo})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->dim() == 2 && t->is_contiguous(), "attention weight: bf16 2-D");
  TORCH_CHECK(B >= 1 && k_cache[0].dim() == 3, "k_cache: [G, S, D]");
  const int64_t G = k_cache[0].size(0), D = k_cache[0].size(2);
  const int64_t NQ = wq.size(0), NK = wk.size(0), N = NQ / D;
  TORCH_CHECK(wq.size(1) == H && wk.size(1) == H && wv.size(1) == H && NK == G * D && wv.size(0) == NK &&
              NQ % D == 0 && N % G == 0 && wo.size(0) == H && wo.size(1) == NQ, "attention weight shapes");
  for (int64_t b = 0; b < B; ++b) {
    const auto &kc = k_cache[b], &vc = v_cache[b];
    TORCH_CHECK(kc.dim() == 3 && kc.is_contiguous() && vc.is_contiguous() && kc.sizes() == vc.sizes() &&
                kc.size(0) == G && kc.size(2) == D && kc.scalar_type() == at::kBFloat16 &&
                vc.scalar_type() == at::kBFloat16, "k_cache, v_cache: contiguous bf16 [G, S, D]");
    TORCH_CHECK(pos[b] >= 0 && pos[b] < kc.size(1), "position ", pos[b], " outside the KV cache of ", kc.size(1));
    TORCH_CHECK(cos[b].numel() == D && sin[b].numel() == D && cos[b].is_contiguous() && sin[b].is_contiguous() &&
                cos[b].scalar_type() == at::kBFloat16 && sin[b].scalar_type() == at::kBFloat16, "cos, sin: bf16 [D]");
  }
  const bf16* an = opt_ptr(attn_norm, H, "attn_norm");
  const bf16* fn = opt_ptr(ffn_norm, H, "ffn_norm");
  const bf16 *pbq = opt_ptr(bq, NQ, "q bias"), *pbk = opt_ptr(bk, NK, "k bias"), *pbv = opt_ptr(bv, NK, "v bias");
  const bf16* pbo = opt_ptr(bo, H, "o bias");
  const int64_t qn_size = qk_norm_mode == 1 ? D : NQ, kn_size = qk_norm_mode == 1 ? D : NK;
  const bf16* qn = qk_norm_mode ? opt_ptr(q_norm, qn_size, "q_norm") : nullptr;
  const bf16* kn = qk_norm_mode ? opt_ptr(k_norm, kn_size, "k_norm") : nullptr;
  TORCH_CHECK(qk_norm_mode == 0 || (qn && kn), "qk norm weights missing");
  int64_t E = 0;
  if (router.has_value() && router->defined()) {
    TORCH_CHECK(router->scalar_type() == at::kBFloat16 && router->dim() == 2 && router->is_contiguous() &&
                router->size(1) == H, "router shape");
    E = router->size(0);
  }

  const bf16* hp = h.data_ptr<bf16>();
  std::vector<bf16> r(B * H), q(B * NQ), k(B * NK), v(B * NK), attn(B * NQ);
  for (int64_t b = 0; b < B; ++b) rms_norm_row(hp + b * H, an, H, eps, r.data() + b * H);
  const int64_t L = NQ + 2 * NK;
  std::vector<float> acc(B * L);
  gemv_rows_segments(CoreRows(r.data(), B, H), H, {{wq.data_ptr<bf16>(), NQ, 0}, {wk.data_ptr<bf16>(), NK, NQ},
                                                   {wv.data_ptr<bf16>(), NK, NQ + NK}}, acc.data(), L);
  for (int64_t b = 0; b < B; ++b) {
    bf16 *qb = q.data() + b * NQ, *kb = k.data() + b * NK, *vb = v.data() + b * NK;
    finish_linear(acc.data() + b * L, pbq, NQ, qb);
    finish_linear(acc.data() + b * L + NQ, pbk, NK, kb);
    finish_linear(acc.data() + b * L + NQ + NK, pbv, NK, vb);
    if (qk_norm_mode == 2) {
      rms_norm_row(qb, qn, NQ, eps, qb);
      rms_norm_row(kb, kn, NK, eps, kb);
    }
    const bf16 *cp = cos[b].data_ptr<bf16>(), *sp = sin[b].data_ptr<bf16>();
    for (int64_t n = 0; n < N; ++n) {
      if (qk_norm_mode == 1) rms_norm_row(qb + n * D, qn, D, eps, qb + n * D);
      rope_row(qb + n * D, cp, sp, D, qb + n * D);
    }
    const int64_t S = k_cache[b].size(1);
    bf16* kc = k_cache[b].data_ptr<bf16>();
    bf16* vc = v_cache[b].data_ptr<bf16>();
    for (int64_t g = 0; g < G; ++g) {
      if (qk_norm_mode == 1) rms_norm_row(kb + g * D, kn, D, eps, kb + g * D);
      rope_row(kb + g * D, cp, sp, D, kb + g * D);
      std::copy(kb + g * D, kb + (g + 1) * D, kc + (g * S + pos[b]) * D);
      std::copy(vb + g * D, vb + (g + 1) * D, vc + (g * S + pos[b]) * D);
    }
  }
  // every row's kv heads as the tasks of one region (row b's head g: task b G + g)
  const int64_t per_kv = N / G;
  int64_t attend_bytes = 0;
  for (int64_t b = 0; b < B; ++b) attend_bytes += G * (pos[b] + 1) * D * 4;
  parallel_tasks(B * G, attend_bytes, [&](int64_t t) {
    const int64_t b = t / G, g = t % G, P = pos[b] + 1, S = k_cache[b].size(1);
    AttendScratch scratch(per_kv, P, D);
    const bf16* kc = k_cache[b].data_ptr<bf16>();
    const bf16* vc = v_cache[b].data_ptr<bf16>();
    attend_kv_head(q.data() + b * NQ + g * per_kv * D, per_kv, kc + g * S * D, vc + g * S * D, P, D, (float)scale,
                   scratch, attn.data() + b * NQ + g * per_kv * D);
  });

  std::vector<float> oacc(B * H);
  gemv_rows_segments(CoreRows(attn.data(), B, NQ), NQ, {{wo.data_ptr<bf16>(), H, 0}}, oacc.data(), H);
  auto h2 = torch::empty({B, H}, h.options());
  auto r2 = torch::empty({B, H}, h.options());
  bf16* h2p = h2.data_ptr<bf16>();
  bf16* r2p = r2.data_ptr<bf16>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < H; ++j) {
      const float o = oacc[b * H + j];
      const bf16 oj(pbo ? o + static_cast<float>(pbo[j]) : o);
      h2p[b * H + j] = bf16(static_cast<float>(hp[b * H + j]) + static_cast<float>(oj));
    }
    rms_norm_row(h2p + b * H, fn, H, eps, r2p + b * H);
  }
  std::vector<float> lacc(B * E);
  if (E) gemv_rows_segments(CoreRows(r2p, B, H), H, {{router->data_ptr<bf16>(), E, 0}}, lacc.data(), E);
  std::vector<RowOut> out;
  out.reserve(B);
  for (int64_t b = 0; b < B; ++b) {
    auto hb = h2.narrow(0, b, 1).clone(), rb = r2.narrow(0, b, 1).clone();
    if (E == 0) {
      out.emplace_back(hb, rb, c10::nullopt, std::vector<int64_t>{}, c10::nullopt);
      continue;
    }
    auto logits = torch::empty({1, E}, h.options());
    finish_linear(lacc.data() + b * E, nullptr, E, logits.data_ptr<bf16>());
    if (top_k <= 0) {
      out.emplace_back(hb, rb, logits, std::vector<int64_t>{}, c10::nullopt);
      continue;
    }
    auto [experts, weights] = route_softmax_topk(logits, top_k, norm_topk_prob, weights_in_logits_dtype);
    out.emplace_back(hb, rb, logits, experts, weights);
  }
  return out;
}

}  // namespace bf16rows
