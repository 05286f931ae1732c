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

#include "route_topk.h"

namespace {

using bf16 = c10::BFloat16;

inline __m512bh load_bh(const bf16* p, int64_t left) {
  if (left >= 32) return (__m512bh)_mm512_loadu_si512((const void*)p);
  __mmask32 m = (left <= 0) ? 0 : (__mmask32)((1ull << left) - 1);
  return (__m512bh)_mm512_maskz_loadu_epi16(m, (const void*)p);
}

// One activation row (decode): one weight row at a time with a software prefetch 4 KB ahead into L2. Measured on
// the 2-core EPYC (bf16 311 MB lm_head and 6 MB layer matrices): 30-35 GB/s, against 26-30 GB/s for four rows at
// a time prefetched 8 rows ahead, and 20-25 GB/s without the prefetch.
constexpr int64_t PREFETCH_AHEAD_BYTES = 4096;

void gemv_one_row(const bf16* x, const bf16* w, int64_t K, int64_t n0, int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const bf16* r = w + n * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      _mm_prefetch((const char*)(r + k) + PREFETCH_AHEAD_BYTES, _MM_HINT_T1);
      _mm_prefetch((const char*)(r + k + 32) + PREFETCH_AHEAD_BYTES, _MM_HINT_T1);
      a0 = _mm512_dpbf16_ps(a0, load_bh(r + k, 32), load_bh(x + k, 32));
      a1 = _mm512_dpbf16_ps(a1, load_bh(r + k + 32, 32), load_bh(x + k + 32, 32));
    }
    for (; k < K; k += 32) a0 = _mm512_dpbf16_ps(a0, load_bh(r + k, K - k), load_bh(x + k, K - k));
    out[n] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  }
}

// out[m, n] = sum_k x[m, k] * w[n, k] for n in [n0, n1); x: [M, K] bf16, w: [N, K] bf16, out fp32 [M, N].
void gemv_rows(const bf16* x, int64_t M, const bf16* w, int64_t K, int64_t n0, int64_t n1, float* out, int64_t N) {
  if (M == 1) return gemv_one_row(x, w, K, n0, n1, out);
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

// RMSNorm of one bf16 row (fp32 accumulation, reference rounding), in is read before out is written.
void rms_norm_row(const bf16* in, const bf16* w, int64_t D, double eps, bf16* out) {
  float ss = 0.0f;
  for (int64_t d = 0; d < D; ++d) {
    const float v = static_cast<float>(in[d]);
    ss += v * v;
  }
  const float inv = 1.0f / std::sqrt(ss / (float)D + (float)eps);
  for (int64_t d = 0; d < D; ++d) {
    const float h = round_bf16(static_cast<float>(in[d]) * inv);
    out[d] = bf16(static_cast<float>(w[d]) * h);
  }
}

// Rotary embedding of one head's row, rotate-half form: out = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin));
// out may be x.
void rope_row(const bf16* x, const bf16* cos, const bf16* sin, int64_t D, bf16* out) {
  const int64_t half = D / 2;
  float small[512];
  std::vector<float> large(D > 512 ? D : 0);
  float* in = D > 512 ? large.data() : small;
  for (int64_t d = 0; d < D; ++d) in[d] = static_cast<float>(x[d]);
  for (int64_t d = 0; d < D; ++d) {
    const float rot = d < half ? -in[d + half] : in[d - half];
    out[d] = bf16(round_bf16(in[d] * static_cast<float>(cos[d])) + round_bf16(rot * static_cast<float>(sin[d])));
  }
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
  int64_t blocks = 0;
  std::vector<int64_t> first(segs.size() + 1, 0);
  for (size_t s = 0; s < segs.size(); ++s) {
    first[s] = blocks;
    blocks += (segs[s].rows + 3) / 4;
  }
  first[segs.size()] = blocks;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (size_t s = 0; s < segs.size(); ++s) {
      const int64_t lo = std::max(b0, first[s]), hi = std::min(b1, first[s + 1]);
      if (lo >= hi) continue;
      const int64_t n0 = (lo - first[s]) * 4, n1 = std::min(segs[s].rows, (hi - first[s]) * 4);
      gemv_rows(x, 1, segs[s].w, K, n0, n1, segs[s].out, segs[s].rows);
    }
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

// exp(x) for x <= 0 (softmax after subtracting the max), 16 lanes: Cephes' expf polynomial, ~1 ulp.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

inline __m512 bf16x16_to_ps(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// Four 16-lane partial sums -> their four totals.
inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(3, 2, 3, 2)));  // [a0 a1 a2 a3] per lane
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(t),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// The R query heads q [R, D] that share one kv head attend to its P cached positions k, v [>=P, D] (rows of D):
// out [R, D] bf16. s [R, P] and o [R, D] are scratch.
void attend_kv_head(const bf16* q, int64_t R, const bf16* k, const bf16* v, int64_t P, int64_t D, float scale,
                    float* s, float* o, bf16* out) {
  int64_t j0 = 0;
  for (; j0 + 4 <= R; j0 += 4) {  // scores of four heads per key row, reduced together
    const bf16* qj = q + j0 * D;
    for (int64_t p = 0; p < P; ++p) {
      const bf16* kr = k + p * D;
      __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t d = 0; d < D; d += 32) {
        const __m512bh kv = load_bh(kr + d, D - d);
        for (int j = 0; j < 4; ++j) a[j] = _mm512_dpbf16_ps(a[j], kv, load_bh(qj + j * D + d, D - d));
      }
      float t[4];
      _mm_storeu_ps(t, _mm_mul_ps(reduce4(a[0], a[1], a[2], a[3]), _mm_set1_ps(scale)));
      for (int j = 0; j < 4; ++j) s[(j0 + j) * P + p] = t[j];
    }
  }
  for (; j0 < R; ++j0)
    for (int64_t p = 0; p < P; ++p) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 32) a = _mm512_dpbf16_ps(a, load_bh(k + p * D + d, D - d), load_bh(q + j0 * D + d, D - d));
      s[j0 * P + p] = _mm512_reduce_add_ps(a) * scale;
    }

  // softmax weights: fp32 exp and sum, then rounded to bf16 (SDPA multiplies V by bf16 weights); sb holds them in
  // pairs of positions (an odd tail padded with 0) for vdpbf16ps
  const int64_t P2 = (P + 1) / 2 * 2;
  std::vector<uint16_t> sb(R * P2, 0);
  std::vector<float> sum(R);
  for (int64_t j = 0; j < R; ++j) {
    float* sj = s + j * P;
    __m512 vmx = _mm512_set1_ps(-INFINITY);
    int64_t p = 0;
    for (; p + 16 <= P; p += 16) vmx = _mm512_max_ps(vmx, _mm512_loadu_ps(sj + p));
    float mx = _mm512_reduce_max_ps(vmx);
    for (; p < P; ++p) mx = std::max(mx, sj[p]);
    vmx = _mm512_set1_ps(mx);
    __m512 acc = _mm512_setzero_ps();
    for (p = 0; p + 16 <= P; p += 16) {
      const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(sj + p), vmx));
      acc = _mm512_add_ps(acc, e);
      const __m256i eb = (__m256i)_mm512_cvtneps_pbh(e);  // round to nearest even, as c10::BFloat16 does
      _mm256_storeu_si256((__m256i*)(sb.data() + j * P2 + p), eb);
      _mm512_storeu_ps(sj + p, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(eb), 16)));
    }
    float tail = 0.0f;
    for (; p < P; ++p) {
      const float e = std::exp(sj[p] - mx);
      tail += e;
      const bf16 eb(e);
      sj[p] = static_cast<float>(eb);
      sb[j * P2 + p] = eb.x;
    }
    sum[j] = _mm512_reduce_add_ps(acc) + tail;
  }

  // o[j, d] = sum_p w[j, p] v[p, d]: two positions per vdpbf16ps (their V rows interleaved), 16 dims of up to four
  // heads in registers across all positions
  std::fill(o, o + R * D, 0.0f);
  const int64_t Dv = D - D % 16;
  __m512i inter;
  {
    alignas(64) int16_t idx[32];
    for (int i = 0; i < 16; ++i) idx[2 * i] = (int16_t)i, idx[2 * i + 1] = (int16_t)(32 + i);
    inter = _mm512_load_si512(idx);
  }
  const uint32_t* pairs = reinterpret_cast<const uint32_t*>(sb.data());  // [R, P2 / 2]
  for (int64_t d = 0; d < Dv; d += 16) {
    for (int64_t jj = 0; jj < R; jj += 4) {
      const int64_t nj = std::min<int64_t>(4, R - jj);
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t p = 0; p < P2; p += 2) {
        const __m256i r0 = _mm256_loadu_si256((const __m256i*)(v + p * D + d));
        const __m256i r1 = p + 1 < P ? _mm256_loadu_si256((const __m256i*)(v + (p + 1) * D + d)) : _mm256_setzero_si256();
        const __m512bh vv = (__m512bh)_mm512_permutex2var_epi16(_mm512_castsi256_si512(r0), inter,
                                                                 _mm512_castsi256_si512(r1));
        for (int64_t j = 0; j < nj; ++j)
          acc[j] = _mm512_dpbf16_ps(acc[j], vv, (__m512bh)_mm512_set1_epi32((int)pairs[(jj + j) * (P2 / 2) + p / 2]));
      }
      for (int64_t j = 0; j < nj; ++j) _mm512_storeu_ps(o + (jj + j) * D + d, acc[j]);
    }
  }
  for (int64_t p = 0; p < P; ++p)
    for (int64_t d = Dv; d < D; ++d)
      for (int64_t j = 0; j < R; ++j) o[j * D + d] += s[j * P + p] * static_cast<float>(v[p * D + d]);
  for (int64_t j = 0; j < R; ++j)
    for (int64_t d = 0; d < D; ++d) out[j * D + d] = bf16(o[j * D + d] / sum[j]);
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
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    // Softmax weights far below the maximum underflow to subnormals, which cost ~10x per operation; flushing
    // them to zero changes nothing a bf16 output can show (the sum is >= 1).
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);  // FTZ | DAZ for this thread, restored below
    std::vector<float> s(per_kv * P), o(per_kv * D);
    for (int64_t g = g0; g < g1; ++g) {
      attend_kv_head(q.data() + g * per_kv * D, per_kv, kc + g * S * D, vc + g * S * D, P, D, (float)scale,
                     s.data(), o.data(), attn.data() + g * per_kv * D);
    }
    _mm_setcsr(csr);
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
}
