// Q6_K x Q8_K dot product with AVX-512 (included by ggml_cpu_core.h where the module is compiled with AVX512BW):
// ggml has no AVX-512 Q6_K kernel, its AVX2 one does 32 bytes per instruction. This one does 64, and its result is
// the AVX2 kernel's bit for bit: per 256-value block it forms the same eight int32 lane sums (lane L: values 4L..4L+3
// of every 32-value run, times their scale, minus 32 x the Q8_K block sums of scale pairs 2L, 2L+1; integer sums, so
// their order is free), then the same float steps (acc_L = fma(d, float(sum_L), acc_L), the same horizontal sum).
//
// Shape legend: B blocks of 256 values per row; j the 128-value half of a block; k its 32-value run.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace {

#define MOEPAGE_HAS_Q6K_AVX512 1

struct BlockQ6K {  // ggml's block_q6_K
  uint8_t ql[128];  // low 4 bits
  uint8_t qh[64];   // high 2 bits
  int8_t scales[16];
  uint16_t d;  // fp16
};
struct BlockQ8K {  // ggml's block_q8_K
  float d;
  int8_t qs[256];
  int16_t bsums[16];
};
static_assert(sizeof(BlockQ6K) == 210 && sizeof(BlockQ8K) == 292, "ggml 0.20's block layouts");
constexpr int PREFETCH_BYTES = 8192;  // how far ahead the weights are prefetched (docs/performance.md)

inline float hsum_float_8(__m256 x) {  // ggml's order: halves, then pairs, then the last two
  __m128 r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

// ggml's vec_dot signature: s[0] = x . y over n values (n a multiple of 256), x Q6_K, y Q8_K
inline void vec_dot_q6_k_avx512(int n, float* s, size_t, const void* vx, size_t, const void* vy, size_t, int) {
  const auto* x = static_cast<const BlockQ6K*>(vx);
  const auto* y = static_cast<const BlockQ8K*>(vy);
  const int nb = n / 256;
  const __m512i m15 = _mm512_set1_epi8(15);
  // low half of a zmm: run k = 0 (or 2), high half: k = 1 (or 3); the high bits of one qh byte serve four runs
  const __m512i hmask01 = _mm512_inserti64x4(_mm512_set1_epi8(3), _mm256_set1_epi8(12), 1);
  const __m512i hshift01 = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
  const __m512i hmask23 = _mm512_inserti64x4(_mm512_set1_epi8(48), _mm256_set1_epi8(-64), 1);
  const __m512i hshift23 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
  // int16 lane t of a zmm of runs (k, k + 1) of half j takes scale 8j + 2k + t / 8
  __m512i scale_idx[4];
  for (int q = 0; q < 4; ++q) {
    alignas(64) int16_t idx[32];
    for (int t = 0; t < 32; ++t) idx[t] = static_cast<int16_t>(4 * q + t / 8);
    scale_idx[q] = _mm512_load_si512(idx);
  }
  __m256 acc = _mm256_setzero_ps();
  for (int i = 0; i < nb; ++i) {
    for (int o = 0; o < 256; o += 64)  // the rows after this one: the hardware prefetcher alone left it latency-bound
      _mm_prefetch(reinterpret_cast<const char*>(x + i) + PREFETCH_BYTES + o, _MM_HINT_T0);
    const float d = y[i].d * _cvtsh_ss(x[i].d);
    const __m128i scales = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x[i].scales));
    const __m256i scales_16 = _mm256_cvtepi8_epi16(scales);
    const __m256i q8sums = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y[i].bsums));
    const __m256i q8sclsub = _mm256_slli_epi32(_mm256_madd_epi16(q8sums, scales_16), 5);
    const __m512i sc = _mm512_castsi256_si512(scales_16);
    __m512i sumi = _mm512_setzero_si512();
    for (int j = 0; j < 2; ++j) {
      const __m512i ql = _mm512_loadu_si512(x[i].ql + 64 * j);
      const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[i].qh + 32 * j)));
      const __m512i q01 = _mm512_or_si512(_mm512_and_si512(ql, m15),
                                          _mm512_sllv_epi16(_mm512_and_si512(qh, hmask01), hshift01));
      const __m512i q23 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m15),
                                          _mm512_srlv_epi16(_mm512_and_si512(qh, hmask23), hshift23));
      const __m512i p01 = _mm512_maddubs_epi16(q01, _mm512_loadu_si512(y[i].qs + 128 * j));
      const __m512i p23 = _mm512_maddubs_epi16(q23, _mm512_loadu_si512(y[i].qs + 128 * j + 64));
      sumi = _mm512_add_epi32(sumi, _mm512_madd_epi16(p01, _mm512_permutexvar_epi16(scale_idx[2 * j], sc)));
      sumi = _mm512_add_epi32(sumi, _mm512_madd_epi16(p23, _mm512_permutexvar_epi16(scale_idx[2 * j + 1], sc)));
    }
    __m256i s8 = _mm256_add_epi32(_mm512_castsi512_si256(sumi), _mm512_extracti64x4_epi64(sumi, 1));
    s8 = _mm256_sub_epi32(s8, q8sclsub);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(s8), acc);
  }
  *s = hsum_float_8(acc);
}

}  // namespace
#endif
