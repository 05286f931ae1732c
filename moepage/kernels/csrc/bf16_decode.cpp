// bf16 matrix-vector kernels for CPU decode steps, fp32 accumulation, on the core bf16_backend.h picks for the
// machine the module was compiled for (AVX512-BF16, or the portable core: AVX2 + FMA, NEON, ...).
//
// Shape legend: M rows of activations (tokens, small), K input features, N output features,
// H hidden, I expert intermediate size, E experts in one call.
//
// Rounding follows what torch does for the same bf16 ops, so results match F.linear-based code up to
// the order of fp32 additions inside one dot product: each linear output is rounded to bf16, silu and the
// gate*up product are rounded to bf16, each expert's weighted output is rounded to bf16 and the experts are
// summed into a bf16 accumulator in the order given.
#include <torch/extension.h>

#include <cmath>
#include <vector>

#include "bf16_backend.h"
#include "route_topk.h"

namespace {
void check_bf16_2d(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.dim() == 2 && t.is_contiguous(),
              what, " must be a contiguous 2-D bfloat16 CPU tensor");
}

// x [M, K] @ w [N, K]^T (+ bias [N]) -> [M, N] bf16
torch::Tensor linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  check_bf16_2d(x, "x");
  check_bf16_2d(w, "w");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "x and w disagree on K");
  auto acc = torch::empty({M, N}, x.options().dtype(at::kFloat));
  const Rows xr(x.data_ptr<bf16>(), M, K);
  const bf16* wp = w.data_ptr<bf16>();
  float* ap = acc.data_ptr<float>();
  const int64_t per = rows_per_task(K);
  parallel_tasks((N + per - 1) / per, N * K * 2, [&](int64_t t) { xr.gemv(wp, t * per, std::min(N, (t + 1) * per), ap, N); });
  if (bias.has_value() && bias->defined()) {
    // torch adds the bias in the matmul's fp32 epilogue for bf16 linear
    acc.add_(bias->to(at::kFloat));
  }
  return acc.to(at::kBFloat16);
}


// One decode token through E routed experts: x [1, H]; w13[e] [2I, H] (gate rows then up rows); w2[e] [H, I];
// weights [E] (values of the caller's routing-weight dtype); returns [1, H] bf16 = sum over e in the
// given order of bf16(bf16(expert_e(x)) * weight_e), accumulated in bf16 (+ residual [1, H], rounded once more).
torch::Tensor experts_one_token(torch::Tensor x, std::vector<torch::Tensor> w13, std::vector<torch::Tensor> w2,
                                std::vector<double> weights, c10::optional<torch::Tensor> residual) {
  check_bf16_2d(x, "x");
  TORCH_CHECK(x.size(0) == 1, "experts_one_token takes one token");
  const int64_t E = (int64_t)w13.size(), H = x.size(1);
  TORCH_CHECK((int64_t)w2.size() == E && (int64_t)weights.size() == E, "one w13, w2 and weight per expert");
  std::vector<float> wv(weights.begin(), weights.end());
  for (int64_t e = 0; e < E; ++e) {
    check_bf16_2d(w13[e], "w13");
    check_bf16_2d(w2[e], "w2");
    TORCH_CHECK(w13[e].size(1) == H && w2[e].size(0) == H && w13[e].size(0) == 2 * w2[e].size(1), "expert shapes");
  }
  // Two parallel regions of row tasks: every gate and up row of the E experts from the one widened x, then (the
  // activations computed and widened once per expert) every down row; tasks are claimed dynamically.
  std::vector<int64_t> I(E), first(E + 1, 0), per(E);
  for (int64_t e = 0; e < E; ++e) I[e] = w2[e].size(1);
  std::vector<std::vector<float>> gu(E);
  const Rows xr(x.data_ptr<bf16>(), 1, H);
  const int64_t per13 = rows_per_task(H);
  for (int64_t e = 0; e < E; ++e) {
    gu[e].resize(2 * I[e]);
    first[e + 1] = first[e] + (2 * I[e] + per13 - 1) / per13;
  }
  int64_t bytes = 0;
  for (int64_t e = 0; e < E; ++e) bytes += 4 * I[e] * H;
  parallel_tasks(first[E], bytes, [&](int64_t t) {
    const int64_t e = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1, n0 = (t - first[e]) * per13;
    xr.gemv(w13[e].data_ptr<bf16>(), n0, std::min(2 * I[e], n0 + per13), gu[e].data(), 2 * I[e]);
  });
  std::vector<Rows> acts;
  std::vector<bf16> act;
  acts.reserve(E);
  for (int64_t e = 0; e < E; ++e) {
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
  std::vector<float> h(E * H), contrib(E * H);
  parallel_tasks(first[E], bytes / 2, [&](int64_t t) {
    const int64_t e = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1, n0 = (t - first[e]) * per[e];
    acts[e].gemv(w2[e].data_ptr<bf16>(), n0, std::min(H, n0 + per[e]), h.data() + e * H, H);
  });
  for (int64_t e = 0; e < E; ++e)
    for (int64_t j = 0; j < H; ++j) contrib[e * H + j] = round_bf16(round_bf16(h[e * H + j]) * wv[e]);
  const bf16* res = nullptr;
  if (residual.has_value() && residual->defined()) {
    check_bf16_2d(*residual, "residual");
    TORCH_CHECK(residual->numel() == H, "residual shape");
    res = residual->data_ptr<bf16>();
  }
  auto out = torch::empty({1, H}, x.options());
  bf16* op = out.data_ptr<bf16>();
  for (int64_t j = 0; j < H; ++j) {
    float s = 0.0f;
    for (int64_t e = 0; e < E; ++e) s = round_bf16(s + contrib[e * H + j]);
    op[j] = res ? bf16(static_cast<float>(res[j]) + s) : bf16(s);  // the residual add rounds once, as h + out does
  }
  return out;
}


// RMSNorm over the last dim, as the reference computes it: fp32 inside, normalised value rounded to bf16, then
// multiplied by the bf16 weight and rounded again. x [R, D] bf16 (rows contiguous), w [D] bf16.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && x.is_contiguous() && w.is_contiguous(),
              "rms_norm takes contiguous bf16 tensors");
  const int64_t D = w.numel(), R = x.numel() / D;
  TORCH_CHECK(x.size(-1) == D, "x and w disagree on the normalised size");
  auto out = torch::empty_like(x);
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* wp = w.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  for (int64_t r = 0; r < R; ++r) rms_norm_row(xp + r * D, wp, D, eps, op + r * D);
  return out;
}

// Rotary embedding, rotate-half form: out = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)).
// x [1, N, T, D] bf16 with any strides over N and T (last dim contiguous); cos, sin [T, D] bf16 contiguous.
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 4 && x.stride(3) == 1, "rope takes bf16 [1, N, T, D]");
  const int64_t N = x.size(1), T = x.size(2), D = x.size(3);
  auto c = cos.contiguous(), s = sin.contiguous();
  auto out = torch::empty({1, N, T, D}, x.options());
  const bf16* cp = c.data_ptr<bf16>();
  const bf16* sp = s.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const bf16* xp = x.data_ptr<bf16>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t t = 0; t < T; ++t)
      rope_row(xp + n * x.stride(1) + t * x.stride(2), cp + t * D, sp + t * D, D, op + (n * T + t) * D);
  return out;
}

// Rows [n0, n1) of several matrices that share the input x [1, K], as one parallel loop: segment s has
// w[s] [rows[s], K] and writes fp32 out[s] [rows[s]]. One fork/join instead of one per matrix.
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

const bf16* opt_ptr(const c10::optional<torch::Tensor>& t, int64_t n, const char* what) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous() && t->numel() == n, what, ": bf16, ", n, " values");
  return t->data_ptr<bf16>();
}

// fp32 accumulator (+ bf16 bias in fp32) -> bf16, as linear() rounds.
void finish_linear(const float* acc, const bf16* bias, int64_t n, bf16* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = bf16(bias ? acc[i] + static_cast<float>(bias[i]) : acc[i]);
}


using DecodeOut = std::tuple<torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, std::vector<int64_t>,
                             c10::optional<torch::Tensor>>;

// The attention half of one decoder layer for one decode token, and the MoE block's inputs:
//   r = attn_norm(h); q, k, v = r Wq, r Wk, r Wv (+ biases); q/k norm (1: per head [D], 2: over all heads);
//   RoPE at this position; k, v written to the layer's cache at `pos`; softmax(q k^T * scale) v over positions
//   0..pos (GQA: query head n reads kv head n / (N/G)); h2 = h + o Wo (+ bias); r2 = ffn_norm(h2);
//   logits = r2 Wr when a router is given.
// h [1, H]; Wq [N*D, H]; Wk, Wv [G*D, H]; Wo [H, N*D]; cos, sin [D] for this position; k_cache, v_cache [G, S, D].
// Rounding follows torch: each linear output, norm, RoPE product and the residual sum are rounded to bf16;
// attention runs in fp32 with the softmax weights rounded to bf16 before they multiply V (SDPA's CPU flash
// kernel does the same), output divided by the fp32 sum and rounded to bf16.
DecodeOut attention_decode(
    torch::Tensor h, torch::Tensor attn_norm, torch::Tensor ffn_norm, double eps,
    torch::Tensor wq, torch::Tensor wk, torch::Tensor wv, torch::Tensor wo,
    c10::optional<torch::Tensor> bq, c10::optional<torch::Tensor> bk, c10::optional<torch::Tensor> bv,
    c10::optional<torch::Tensor> bo, int64_t qk_norm_mode, c10::optional<torch::Tensor> q_norm,
    c10::optional<torch::Tensor> k_norm, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
    torch::Tensor v_cache, int64_t pos, double scale, c10::optional<torch::Tensor> router, int64_t top_k,
    bool norm_topk_prob, bool weights_in_logits_dtype) {
  check_bf16_2d(h, "h");
  TORCH_CHECK(h.size(0) == 1, "attention_decode takes one token");
  for (auto* t : {&wq, &wk, &wv, &wo}) check_bf16_2d(*t, "attention weight");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == at::kBFloat16 &&
              v_cache.scalar_type() == at::kBFloat16, "k_cache, v_cache: contiguous bf16 [G, S, D]");
  const int64_t H = h.size(1), G = k_cache.size(0), S = k_cache.size(1), D = k_cache.size(2);
  const int64_t NQ = wq.size(0), NK = wk.size(0), N = NQ / D;
  TORCH_CHECK(wq.size(1) == H && wk.size(1) == H && wv.size(1) == H && NK == G * D && wv.size(0) == NK &&
              NQ % D == 0 && N % G == 0 && wo.size(0) == H && wo.size(1) == NQ, "attention weight shapes");
  TORCH_CHECK(pos >= 0 && pos < S, "position ", pos, " outside the KV cache of ", S);
  TORCH_CHECK(cos.numel() == D && sin.numel() == D && cos.is_contiguous() && sin.is_contiguous() &&
              cos.scalar_type() == at::kBFloat16 && sin.scalar_type() == at::kBFloat16, "cos, sin: bf16 [D]");
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
    check_bf16_2d(*router, "router");
    TORCH_CHECK(router->size(1) == H, "router shape");
    E = router->size(0);
  }

  const bf16* hp = h.data_ptr<bf16>();
  std::vector<bf16> r(H), q(NQ), k(NK), v(NK), attn(NQ);
  rms_norm_row(hp, an, H, eps, r.data());
  std::vector<float> acc(NQ + 2 * NK);
  gemv_segments(r.data(), H, {{wq.data_ptr<bf16>(), NQ, acc.data()}, {wk.data_ptr<bf16>(), NK, acc.data() + NQ},
                              {wv.data_ptr<bf16>(), NK, acc.data() + NQ + NK}});
  finish_linear(acc.data(), pbq, NQ, q.data());
  finish_linear(acc.data() + NQ, pbk, NK, k.data());
  finish_linear(acc.data() + NQ + NK, pbv, NK, v.data());
  if (qk_norm_mode == 2) {
    rms_norm_row(q.data(), qn, NQ, eps, q.data());
    rms_norm_row(k.data(), kn, NK, eps, k.data());
  }
  const bf16 *cp = cos.data_ptr<bf16>(), *sp = sin.data_ptr<bf16>();
  for (int64_t n = 0; n < N; ++n) {
    if (qk_norm_mode == 1) rms_norm_row(q.data() + n * D, qn, D, eps, q.data() + n * D);
    rope_row(q.data() + n * D, cp, sp, D, q.data() + n * D);
  }
  bf16* kc = k_cache.data_ptr<bf16>();
  bf16* vc = v_cache.data_ptr<bf16>();
  for (int64_t g = 0; g < G; ++g) {
    if (qk_norm_mode == 1) rms_norm_row(k.data() + g * D, kn, D, eps, k.data() + g * D);
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
  gemv_segments(attn.data(), NQ, {{wo.data_ptr<bf16>(), H, oacc.data()}});
  auto h2 = torch::empty({1, H}, h.options());
  auto r2 = torch::empty({1, H}, h.options());
  bf16* h2p = h2.data_ptr<bf16>();
  for (int64_t j = 0; j < H; ++j) {
    const bf16 oj(pbo ? oacc[j] + static_cast<float>(pbo[j]) : oacc[j]);
    h2p[j] = bf16(static_cast<float>(hp[j]) + static_cast<float>(oj));
  }
  rms_norm_row(h2p, fn, H, eps, r2.data_ptr<bf16>());
  if (E == 0) return {h2, r2, c10::nullopt, {}, c10::nullopt};
  std::vector<float> lacc(E);
  gemv_segments(r2.data_ptr<bf16>(), H, {{router->data_ptr<bf16>(), E, lacc.data()}});
  auto logits = torch::empty({1, E}, h.options());
  finish_linear(lacc.data(), nullptr, E, logits.data_ptr<bf16>());
  if (top_k <= 0) return {h2, r2, logits, {}, c10::nullopt};
  auto [experts, weights] = route_softmax_topk(logits, top_k, norm_topk_prob, weights_in_logits_dtype);
  return {h2, r2, logits, experts, weights};
}


}  // namespace

// Every entry point releases the GIL: while the decode thread computes, the expert page-in threads run their
// Python (file opens, header parsing, bookkeeping) on the other core instead of waiting for the kernel to return.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto free_gil = py::call_guard<py::gil_scoped_release>();
  m.def("linear", &linear, "bf16 x [M, K] @ w [N, K]^T (+ bias) for small M", free_gil);
  m.def("experts_one_token", &experts_one_token, "one token through a list of routed SwiGLU experts",
        py::arg("x"), py::arg("w13"), py::arg("w2"), py::arg("weights"), py::arg("residual") = py::none(), free_gil);
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim, reference rounding", free_gil);
  m.def("rope", &rope, "rotate-half rotary embedding, reference rounding", free_gil);
  m.def("route_softmax_topk", &route_softmax_topk, "one token's softmax top-k routing, experts ascending", free_gil);
  m.def("attention_decode", &attention_decode,
        "one decode token through a layer's attention half, its FFN norm and router", free_gil);
  m.def("core", [] { return std::string(core_name()) + "/" + threads_name(); },
        "which core and threads this build runs: avx512bf16 or portable, openmp or pool");
}
