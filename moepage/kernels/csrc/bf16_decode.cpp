// bf16 matrix-vector kernels for CPU decode steps (AVX512-BF16: vdpbf16ps, fp32 accumulation).
//
// Shape legend: M rows of activations (tokens, small), K input features, N output features,
// H hidden, I expert intermediate size, E experts in one call.
//
// Rounding follows what torch does for the same bf16 ops, so results match F.linear-based code up to
// the order of fp32 additions inside one dot product: each linear output is rounded to bf16, silu and the
// gate*up product are rounded to bf16, each expert's weighted output is rounded to bf16 and the experts are
// summed into a bf16 accumulator in the order given.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <vector>

namespace {

using bf16 = c10::BFloat16;

inline __m512bh load_bh(const bf16* p, int64_t left) {
  if (left >= 32) return (__m512bh)_mm512_loadu_si512((const void*)p);
  __mmask32 m = (left <= 0) ? 0 : (__mmask32)((1ull << left) - 1);
  return (__m512bh)_mm512_maskz_loadu_epi16(m, (const void*)p);
}

// out[m, n] = sum_k x[m, k] * w[n, k] for n in [n0, n1); x: [M, K] bf16, w: [N, K] bf16, out fp32 [M, N].
void gemv_rows(const bf16* x, int64_t M, const bf16* w, int64_t K, int64_t n0, int64_t n1, float* out, int64_t N) {
  const int64_t kb = (K + 31) / 32;
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    const bf16* r0 = w + (n + 0) * K;
    const bf16* r1 = w + (n + 1) * K;
    const bf16* r2 = w + (n + 2) * K;
    const bf16* r3 = w + (n + 3) * K;
    for (int64_t m = 0; m < M; ++m) {
      const bf16* xm = x + m * K;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
      for (int64_t b = 0; b < kb; ++b) {
        const int64_t k = b * 32, left = K - k;
        __m512bh xv = load_bh(xm + k, left);
        if (m == 0) {  // stream the rows two blocks ahead into L2: ~1.4x the bandwidth of the hardware prefetcher alone
          _mm_prefetch((const char*)(r0 + 8 * K + k), _MM_HINT_T1);
          _mm_prefetch((const char*)(r1 + 8 * K + k), _MM_HINT_T1);
          _mm_prefetch((const char*)(r2 + 8 * K + k), _MM_HINT_T1);
          _mm_prefetch((const char*)(r3 + 8 * K + k), _MM_HINT_T1);
        }
        a0 = _mm512_dpbf16_ps(a0, load_bh(r0 + k, left), xv);
        a1 = _mm512_dpbf16_ps(a1, load_bh(r1 + k, left), xv);
        a2 = _mm512_dpbf16_ps(a2, load_bh(r2 + k, left), xv);
        a3 = _mm512_dpbf16_ps(a3, load_bh(r3 + k, left), xv);
      }
      out[m * N + n + 0] = _mm512_reduce_add_ps(a0);
      out[m * N + n + 1] = _mm512_reduce_add_ps(a1);
      out[m * N + n + 2] = _mm512_reduce_add_ps(a2);
      out[m * N + n + 3] = _mm512_reduce_add_ps(a3);
    }
  }
  for (; n < n1; ++n) {
    const bf16* r = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t b = 0; b < kb; ++b) {
        const int64_t k = b * 32, left = K - k;
        a = _mm512_dpbf16_ps(a, load_bh(r + k, left), load_bh(x + m * K + k, left));
      }
      out[m * N + n] = _mm512_reduce_add_ps(a);
    }
  }
}

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
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* wp = w.data_ptr<bf16>();
  float* ap = acc.data_ptr<float>();
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b0, int64_t b1) {
    gemv_rows(xp, M, wp, K, b0 * 4, std::min(N, b1 * 4), ap, N);
  });
  if (bias.has_value() && bias->defined()) {
    // torch adds the bias in the matmul's fp32 epilogue for bf16 linear
    acc.add_(bias->to(at::kFloat));
  }
  return acc.to(at::kBFloat16);
}

inline float round_bf16(float v) { return static_cast<float>(bf16(v)); }

// One decode token through E routed experts: x [1, H]; w13[e] [2I, H] (gate rows then up rows); w2[e] [H, I];
// weights [E] (values of the caller's routing-weight dtype); returns [1, H] bf16 = sum over e in the
// given order of bf16(bf16(expert_e(x)) * weight_e), accumulated in bf16.
torch::Tensor experts_one_token(torch::Tensor x, std::vector<torch::Tensor> w13, std::vector<torch::Tensor> w2,
                                std::vector<double> weights) {
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
  std::vector<float> contrib(E * H);
  const bf16* xp = x.data_ptr<bf16>();
  at::parallel_for(0, E, 1, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t I = w2[e].size(1);
      std::vector<float> gu(2 * I), h(H);
      std::vector<bf16> act(I);
      gemv_rows(xp, 1, w13[e].data_ptr<bf16>(), H, 0, 2 * I, gu.data(), 2 * I);
      for (int64_t i = 0; i < I; ++i) {
        const float g = round_bf16(gu[i]), u = round_bf16(gu[I + i]);
        const float s = round_bf16(g / (1.0f + std::exp(-g)));
        act[i] = bf16(s * u);
      }
      gemv_rows(act.data(), 1, w2[e].data_ptr<bf16>(), I, 0, H, h.data(), H);
      float* c = contrib.data() + e * H;
      for (int64_t j = 0; j < H; ++j) c[j] = round_bf16(round_bf16(h[j]) * wv[e]);
    }
  });
  auto out = torch::empty({1, H}, x.options());
  bf16* op = out.data_ptr<bf16>();
  for (int64_t j = 0; j < H; ++j) {
    float s = 0.0f;
    for (int64_t e = 0; e < E; ++e) s = round_bf16(s + contrib[e * H + j]);
    op[j] = bf16(s);
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
  for (int64_t r = 0; r < R; ++r) {
    const bf16* row = xp + r * D;
    float ss = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      const float v = static_cast<float>(row[d]);
      ss += v * v;
    }
    const float inv = 1.0f / std::sqrt(ss / (float)D + (float)eps);
    for (int64_t d = 0; d < D; ++d) {
      const float h = round_bf16(static_cast<float>(row[d]) * inv);
      op[r * D + d] = bf16(static_cast<float>(wp[d]) * h);
    }
  }
  return out;
}

// Rotary embedding, rotate-half form: out = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)).
// x [1, N, T, D] bf16 with any strides over N and T (last dim contiguous); cos, sin [T, D] bf16 contiguous.
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 4 && x.stride(3) == 1, "rope takes bf16 [1, N, T, D]");
  const int64_t N = x.size(1), T = x.size(2), D = x.size(3), half = D / 2;
  auto c = cos.contiguous(), s = sin.contiguous();
  auto out = torch::empty({1, N, T, D}, x.options());
  const bf16* cp = c.data_ptr<bf16>();
  const bf16* sp = s.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const bf16* xp = x.data_ptr<bf16>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t t = 0; t < T; ++t) {
      const bf16* row = xp + n * x.stride(1) + t * x.stride(2);
      bf16* o = op + (n * T + t) * D;
      for (int64_t d = 0; d < D; ++d) {
        const float xv = static_cast<float>(row[d]);
        const float rot = d < half ? -static_cast<float>(row[d + half]) : static_cast<float>(row[d - half]);
        const float a = round_bf16(xv * static_cast<float>(cp[t * D + d]));
        const float b = round_bf16(rot * static_cast<float>(sp[t * D + d]));
        o[d] = bf16(a + b);
      }
    }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "bf16 x [M, K] @ w [N, K]^T (+ bias) for small M");
  m.def("experts_one_token", &experts_one_token, "one token through a list of routed SwiGLU experts");
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim, reference rounding");
  m.def("rope", &rope, "rotate-half rotary embedding, reference rounding");
}
