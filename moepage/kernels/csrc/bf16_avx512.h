// The AVX512-BF16 specialisation of moepage's bf16 decode kernels (vdpbf16ps, fp32 accumulation), included by
// bf16_decode.cpp when the build's -march has AVX512-BF16 (native.py decides per machine). Measured faster than the
// portable core (bf16_portable.h) on the AVX512-BF16 EPYC: docs/performance.md.
//
// Shape legend: M rows of activations, K input features, N output features, R query heads sharing one kv head,
// P cached positions, D head dim.
#pragma once
#include <torch/extension.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace avx512bf16 {

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

// sum_k x[k] * r[k] for one weight row r [K]: two interleaved accumulators. The one-row gemv and the row-invariant
// multi-row kernels (bf16_rows.h) both call this, so a row's sums are the same whatever else is in the step.
inline float dot_one_row(const bf16* x, const bf16* r, int64_t K) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    _mm_prefetch((const char*)(r + k) + PREFETCH_AHEAD_BYTES, _MM_HINT_T1);
    _mm_prefetch((const char*)(r + k + 32) + PREFETCH_AHEAD_BYTES, _MM_HINT_T1);
    a0 = _mm512_dpbf16_ps(a0, load_bh(r + k, 32), load_bh(x + k, 32));
    a1 = _mm512_dpbf16_ps(a1, load_bh(r + k + 32, 32), load_bh(x + k + 32, 32));
  }
  for (; k < K; k += 32) a0 = _mm512_dpbf16_ps(a0, load_bh(r + k, K - k), load_bh(x + k, K - k));
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

void gemv_one_row(const bf16* x, const bf16* w, int64_t K, int64_t n0, int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n) out[n] = dot_one_row(x, w + n * K, K);
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

}  // namespace avx512bf16
