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
#include "bf16_layer.h"
#include "bf16_token.h"
#include "route_topk.h"

namespace {

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
  std::vector<const bf16*> p13(E), p2(E);
  std::vector<int64_t> I(E);
  for (int64_t e = 0; e < E; ++e)
    p13[e] = w13[e].data_ptr<bf16>(), p2[e] = w2[e].data_ptr<bf16>(), I[e] = w2[e].size(1);
  const bf16* res = nullptr;
  if (residual.has_value() && residual->defined()) {
    check_bf16_2d(*residual, "residual");
    TORCH_CHECK(residual->numel() == H, "residual shape");
    res = residual->data_ptr<bf16>();
  }
  auto out = torch::empty({1, H}, x.options());
  experts_sum(x.data_ptr<bf16>(), H, E, p13.data(), p2.data(), I.data(), wv.data(), res, out.data_ptr<bf16>());
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
  TORCH_CHECK(k_cache.dim() == 3, "k_cache, v_cache: contiguous bf16 [G, S, D]");
  const AttnWeights a = attn_weights(attn_norm, ffn_norm, wq, wk, wv, wo, bq, bk, bv, bo, qk_norm_mode, q_norm,
                                     k_norm, k_cache.size(2), router);
  TORCH_CHECK(h.size(1) == a.H, "h and the attention weights disagree on H");
  const auto [G, S] = check_cache(k_cache, v_cache, a, pos);
  const auto [cp, sp] = rope_rows(cos, sin, a.D);
  const int64_t H = a.H, E = a.E;
  auto h2 = torch::empty({1, H}, h.options());
  auto r2 = torch::empty({1, H}, h.options());
  std::vector<float> lacc(E);
  attention_half(a, h.data_ptr<bf16>(), k_cache.data_ptr<bf16>(), v_cache.data_ptr<bf16>(), G, S, pos, cp, sp, eps,
                 scale, h2.data_ptr<bf16>(), r2.data_ptr<bf16>(), lacc.data());
  if (E == 0) return {h2, r2, c10::nullopt, {}, c10::nullopt};
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
  py::class_<Bf16TokenPlan>(m, "TokenPlan", "every layer of one decode token in one call (bf16_token.h)")
      .def(py::init<double, double>(), py::arg("eps"), py::arg("scale"))
      .def("add_layer", &Bf16TokenPlan::add_layer)
      .def("decode", &Bf16TokenPlan::decode, free_gil);
  m.def("core", [] { return std::string(core_name()) + "/" + threads_name(); },
        "which core and threads this build runs: avx512bf16 or portable, openmp or pool");
}
