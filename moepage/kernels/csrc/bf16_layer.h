// One decoder layer's decode step for one token over plain bf16 weights, on raw pointers (included by
// bf16_decode.cpp): the attention half (norms, q/k/v/o, RoPE, KV append, attention, router logits) and the routed
// experts' weighted sum. bf16_decode.cpp's attention_decode and experts_one_token call these once per layer;
// bf16_token.h calls them for every layer of a token in one call, so both give the same bits.
//
// Shape legend: H hidden, NQ = N*D query rows, NK = G*D key/value rows, N query heads, G kv heads, D head dim,
// S cache positions, P positions attended, E router rows (experts of the layer), K experts in one sum, I expert FFN.
//
// Rounding follows torch: each linear output, norm, RoPE product and the residual sum are rounded to bf16; attention
// runs in fp32 with the softmax weights rounded to bf16 before they multiply V (SDPA's CPU flash kernel does the
// same), output divided by the fp32 sum and rounded to bf16; silu and gate*up are rounded to bf16, each expert's
// weighted output is rounded to bf16 and the experts are summed into a bf16 accumulator in the order given.
#pragma once
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "bf16_backend.h"

namespace {

void check_bf16_2d(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.dim() == 2 && t.is_contiguous(),
              what, " must be a contiguous 2-D bfloat16 CPU tensor");
}

const bf16* opt_ptr(const c10::optional<torch::Tensor>& t, int64_t n, const char* what) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kBFloat16 && t->is_contiguous() && t->numel() == n,
              what, ": bf16, ", n, " values");
  return t->data_ptr<bf16>();
}

// fp32 accumulator (+ bf16 bias in fp32) -> bf16, as linear() rounds.
void finish_linear(const float* acc, const bf16* bias, int64_t n, bf16* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = bf16(bias ? acc[i] + static_cast<float>(bias[i]) : acc[i]);
}

// Rows of several matrices that share the input x [K], as one parallel region: segment s has w [rows, K] and
// writes fp32 out [rows].
struct Segment {
  const bf16* w;
  int64_t rows;
  float* out;
};

void gemv_segments(const bf16* x, int64_t K, const std::vector<Segment>& segs) {
  const Rows xr(x, 1, K);
  const int64_t per = rows_per_task(K);
  std::vector<int64_t> first(segs.size() + 1, 0);  // each segment's first task
  for (size_t s = 0; s < segs.size(); ++s) first[s + 1] = first[s] + (segs[s].rows + per - 1) / per;
  parallel_tasks(first.back(), (first.back() * per) * K * 2, [&](int64_t t) {
    const size_t s = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
    const int64_t n0 = (t - first[s]) * per;
    xr.gemv(segs[s].w, n0, std::min(segs[s].rows, n0 + per), segs[s].out, segs[s].rows);
  });
}

// The weights of one layer's attention half (pointers into tensors its owner keeps alive). Optional ones are null.
struct AttnWeights {
  int64_t H, NQ, NK, D, qk_norm_mode, E;  // E: router rows, 0 without a router
  const bf16 *an, *fn, *wq, *wk, *wv, *wo, *bq, *bk, *bv, *bo, *qn, *kn, *router;
};

// Checked views of attention_decode's weight arguments for head dim D.
AttnWeights attn_weights(const torch::Tensor& attn_norm, const torch::Tensor& ffn_norm, const torch::Tensor& wq,
                         const torch::Tensor& wk, const torch::Tensor& wv, const torch::Tensor& wo,
                         const c10::optional<torch::Tensor>& bq, const c10::optional<torch::Tensor>& bk,
                         const c10::optional<torch::Tensor>& bv, const c10::optional<torch::Tensor>& bo,
                         int64_t qk_norm_mode, const c10::optional<torch::Tensor>& q_norm,
                         const c10::optional<torch::Tensor>& k_norm, int64_t D,
                         const c10::optional<torch::Tensor>& router) {
  for (auto* t : {&wq, &wk, &wv, &wo}) check_bf16_2d(*t, "attention weight");
  AttnWeights a{};
  a.H = wq.size(1), a.NQ = wq.size(0), a.NK = wk.size(0), a.D = D, a.qk_norm_mode = qk_norm_mode;
  TORCH_CHECK(D > 0 && D % 2 == 0 && qk_norm_mode >= 0 && qk_norm_mode <= 2, "head dim or qk norm mode");
  TORCH_CHECK(wk.size(1) == a.H && wv.size(1) == a.H && wv.size(0) == a.NK && a.NQ % D == 0 && a.NK % D == 0 &&
              (a.NQ / D) % (a.NK / D) == 0 && wo.size(0) == a.H && wo.size(1) == a.NQ, "attention weight shapes");
  a.an = opt_ptr(attn_norm, a.H, "attn_norm");
  a.fn = opt_ptr(ffn_norm, a.H, "ffn_norm");
  TORCH_CHECK(a.an && a.fn, "attn_norm and ffn_norm are required");
  a.bq = opt_ptr(bq, a.NQ, "q bias"), a.bk = opt_ptr(bk, a.NK, "k bias"), a.bv = opt_ptr(bv, a.NK, "v bias");
  a.bo = opt_ptr(bo, a.H, "o bias");
  if (qk_norm_mode) {
    a.qn = opt_ptr(q_norm, qk_norm_mode == 1 ? D : a.NQ, "q_norm");
    a.kn = opt_ptr(k_norm, qk_norm_mode == 1 ? D : a.NK, "k_norm");
    TORCH_CHECK(a.qn && a.kn, "qk norm weights missing");
  }
  a.wq = wq.data_ptr<bf16>(), a.wk = wk.data_ptr<bf16>(), a.wv = wv.data_ptr<bf16>(), a.wo = wo.data_ptr<bf16>();
  if (router.has_value() && router->defined()) {
    check_bf16_2d(*router, "router");
    TORCH_CHECK(router->size(1) == a.H, "router shape");
    a.E = router->size(0);
    a.router = router->data_ptr<bf16>();
  }
  return a;
}

// k_cache, v_cache [G, S, D] for these weights at position pos -> G, S.
std::pair<int64_t, int64_t> check_cache(const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                        const AttnWeights& a, int64_t pos) {
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == at::kBFloat16 &&
              v_cache.scalar_type() == at::kBFloat16 && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "k_cache, v_cache: contiguous bf16 [G, S, D]");
  const int64_t G = k_cache.size(0), S = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == a.D && a.NK == G * a.D, "the KV cache's heads or head dim disagree with k");
  TORCH_CHECK(pos >= 0 && pos < S, "position ", pos, " outside the KV cache of ", S);
  return {G, S};
}

// cos, sin: this position's RoPE rows, bf16 [D] -> their data.
std::pair<const bf16*, const bf16*> rope_rows(const torch::Tensor& cos, const torch::Tensor& sin, int64_t D) {
  TORCH_CHECK(cos.numel() == D && sin.numel() == D && cos.is_contiguous() && sin.is_contiguous() &&
              cos.scalar_type() == at::kBFloat16 && sin.scalar_type() == at::kBFloat16 && cos.device().is_cpu() &&
              sin.device().is_cpu(), "cos, sin: bf16 [D]");
  return {cos.data_ptr<bf16>(), sin.data_ptr<bf16>()};
}

// The attention half for one token: h [H] -> h2 = h + attention [H], r2 = ffn_norm(h2) [H]; k, v appended to the
// caches kc, vc [G, S, D] at pos; router logits (fp32 accumulators) [E] into lacc when the layer has a router and
// lacc is given. cos, sin [D] this position's RoPE rows.
void attention_half(const AttnWeights& a, const bf16* hp, bf16* kc, bf16* vc, int64_t G, int64_t S, int64_t pos,
                    const bf16* cp, const bf16* sp, double eps, double scale, bf16* h2p, bf16* r2p, float* lacc) {
  const int64_t H = a.H, NQ = a.NQ, NK = a.NK, D = a.D, N = NQ / D;
  std::vector<bf16> r(H), q(NQ), k(NK), v(NK), attn(NQ);
  rms_norm_row(hp, a.an, H, eps, r.data());
  std::vector<float> acc(NQ + 2 * NK);
  gemv_segments(r.data(), H, {{a.wq, NQ, acc.data()}, {a.wk, NK, acc.data() + NQ}, {a.wv, NK, acc.data() + NQ + NK}});
  finish_linear(acc.data(), a.bq, NQ, q.data());
  finish_linear(acc.data() + NQ, a.bk, NK, k.data());
  finish_linear(acc.data() + NQ + NK, a.bv, NK, v.data());
  if (a.qk_norm_mode == 2) {
    rms_norm_row(q.data(), a.qn, NQ, eps, q.data());
    rms_norm_row(k.data(), a.kn, NK, eps, k.data());
  }
  for (int64_t n = 0; n < N; ++n) {
    if (a.qk_norm_mode == 1) rms_norm_row(q.data() + n * D, a.qn, D, eps, q.data() + n * D);
    rope_row(q.data() + n * D, cp, sp, D, q.data() + n * D);
  }
  for (int64_t g = 0; g < G; ++g) {
    if (a.qk_norm_mode == 1) rms_norm_row(k.data() + g * D, a.kn, D, eps, k.data() + g * D);
    rope_row(k.data() + g * D, cp, sp, D, k.data() + g * D);
    std::copy(k.data() + g * D, k.data() + (g + 1) * D, kc + (g * S + pos) * D);
    std::copy(v.data() + g * D, v.data() + (g + 1) * D, vc + (g * S + pos) * D);
  }
  const int64_t P = pos + 1, per_kv = N / G;
  parallel_tasks(G, G * P * D * 4, [&](int64_t g) {
    AttendScratch scratch(per_kv, P, D);
    attend_kv_head(q.data() + g * per_kv * D, per_kv, kc + g * S * D, vc + g * S * D, P, D, (float)scale, scratch,
                   attn.data() + g * per_kv * D);
  });
  std::vector<float> oacc(H);
  gemv_segments(attn.data(), NQ, {{a.wo, H, oacc.data()}});
  for (int64_t j = 0; j < H; ++j) {
    const bf16 oj(a.bo ? oacc[j] + static_cast<float>(a.bo[j]) : oacc[j]);
    h2p[j] = bf16(static_cast<float>(hp[j]) + static_cast<float>(oj));
  }
  rms_norm_row(h2p, a.fn, H, eps, r2p);
  if (a.router && lacc) gemv_segments(r2p, H, {{a.router, a.E, lacc}});
}

// One token x [H] through K experts (w13[e] [2I[e], H]: gate rows then up rows; w2[e] [H, I[e]]) weighted by wv [K]:
// out [H] = sum over e in the given order of bf16(bf16(expert_e(x)) * wv[e]), accumulated in bf16 (+ res [H],
// rounded once more; res may be null). out may be res.
void experts_sum(const bf16* x, int64_t H, int64_t K, const bf16* const* w13, const bf16* const* w2, const int64_t* I,
                 const float* wv, const bf16* res, bf16* out) {
  // Two parallel regions of row tasks: every gate and up row of the K experts from the one widened x, then (the
  // activations computed and widened once per expert) every down row; tasks are claimed dynamically.
  std::vector<int64_t> first(K + 1, 0), per(K);
  std::vector<std::vector<float>> gu(K);
  const Rows xr(x, 1, H);
  const int64_t per13 = rows_per_task(H);
  int64_t bytes = 0;
  for (int64_t e = 0; e < K; ++e) {
    gu[e].resize(2 * I[e]);
    first[e + 1] = first[e] + (2 * I[e] + per13 - 1) / per13;
    bytes += 4 * I[e] * H;
  }
  parallel_tasks(first[K], bytes, [&](int64_t t) {
    const int64_t e = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1, n0 = (t - first[e]) * per13;
    xr.gemv(w13[e], n0, std::min(2 * I[e], n0 + per13), gu[e].data(), 2 * I[e]);
  });
  std::vector<Rows> acts;
  std::vector<bf16> act;
  acts.reserve(K);
  for (int64_t e = 0; e < K; ++e) {
    act.resize(I[e]);
    for (int64_t i = 0; i < I[e]; ++i) {
      const float g = round_bf16(gu[e][i]), u = round_bf16(gu[e][I[e] + i]);
      const float s = round_bf16(g / (1.0f + std::exp(-g)));
      act[i] = bf16(s * u);
    }
    acts.emplace_back(act.data(), 1, I[e]);  // widened (portable) or copied (AVX512-BF16): act is reused
    per[e] = rows_per_task(I[e]);
    first[e + 1] = first[e] + (H + per[e] - 1) / per[e];
  }
  std::vector<float> h(K * H), contrib(K * H);
  parallel_tasks(first[K], bytes / 2, [&](int64_t t) {
    const int64_t e = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1, n0 = (t - first[e]) * per[e];
    acts[e].gemv(w2[e], n0, std::min(H, n0 + per[e]), h.data() + e * H, H);
  });
  for (int64_t e = 0; e < K; ++e)
    for (int64_t j = 0; j < H; ++j) contrib[e * H + j] = round_bf16(round_bf16(h[e * H + j]) * wv[e]);
  for (int64_t j = 0; j < H; ++j) {
    float s = 0.0f;
    for (int64_t e = 0; e < K; ++e) s = round_bf16(s + contrib[e * H + j]);
    out[j] = res ? bf16(static_cast<float>(res[j]) + s) : bf16(s);  // the residual add rounds once, as h + out does
  }
}

}  // namespace
