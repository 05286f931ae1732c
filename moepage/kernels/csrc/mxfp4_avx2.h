// MXFP4 decode + dot for AVX2 + FMA (included by mxfp4_core.h, which defines the order this must follow): a block's
// 32 codes go through two byte lookups (each FP4 value doubled is a bf16 number: KV_HI / KV_LO are its two bytes),
// are widened to fp32 by the unpacks, and are multiplied by the block's halved scale (exact: a power of two).
//
// Shape legend as in mxfp4_core.h (T tokens, C columns, R rows, G blocks per row).
#pragma once

#include <immintrin.h>

namespace mxfp4 {

// the 32 values of one block as 4 registers in slot order (mxfp4_core.h's ORDER)
inline void decode_block(const uint8_t* b, __m256 scale, __m256 w[4]) {
  const __m256i kv_hi = _mm256_setr_epi8(0x00, 0x3F, 0x40, 0x40, 0x40, 0x40, 0x41, 0x41, char(0x80), char(0xBF),
                                         char(0xC0), char(0xC0), char(0xC0), char(0xC0), char(0xC1), char(0xC1),
                                         0x00, 0x3F, 0x40, 0x40, 0x40, 0x40, 0x41, 0x41, char(0x80), char(0xBF),
                                         char(0xC0), char(0xC0), char(0xC0), char(0xC0), char(0xC1), char(0xC1));
  const __m256i kv_lo = _mm256_setr_epi8(0x00, char(0x80), 0x00, 0x40, char(0x80), char(0xC0), 0x00, 0x40,
                                         0x00, char(0x80), 0x00, 0x40, char(0x80), char(0xC0), 0x00, 0x40,
                                         0x00, char(0x80), 0x00, 0x40, char(0x80), char(0xC0), 0x00, 0x40,
                                         0x00, char(0x80), 0x00, 0x40, char(0x80), char(0xC0), 0x00, 0x40);
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  const __m128i m = _mm_set1_epi8(0x0F);
  // bytes 0..15: codes of values 0, 2, ..., 30; bytes 16..31: values 1, 3, ..., 31
  const __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m));
  const __m256i hi = _mm256_shuffle_epi8(kv_hi, codes), lo = _mm256_shuffle_epi8(kv_lo, codes);
  const __m256i h0 = _mm256_unpacklo_epi8(lo, hi), h1 = _mm256_unpackhi_epi8(lo, hi);  // bf16 bits
  const __m256i top = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  w[0] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(h0, 16)), scale);    // values 0,4,8,12,1,5,9,13
  w[1] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_and_si256(h0, top)), scale);    // 2 + the same
  w[2] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(h1, 16)), scale);    // 16 + ...
  w[3] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_and_si256(h1, top)), scale);    // 18 + ...
}

inline float finish(const __m256* a) {
  // register 0 lanes (0, 2) hold values (k, k + 8) for k = 0, 4 and lanes (4, 6) for k = 1, 5; register 2 the same
  // + 16; registers 1 and 3 the same + 2: the lanes of pairs, then of the pairs' sums, then the fixed scalar order
  const auto pair = [](__m256 v) { return _mm256_add_ps(v, _mm256_shuffle_ps(v, v, _MM_SHUFFLE(1, 0, 3, 2))); };
  alignas(32) float q[16];
  _mm256_store_ps(q, _mm256_add_ps(pair(a[0]), pair(a[2])));  // lanes[k] for k = 0, 4 (at 0, 1), 1, 5 (at 4, 5)
  _mm256_store_ps(q + 8, _mm256_add_ps(pair(a[1]), pair(a[3])));  // k + 2
  const float lanes[8] = {q[0], q[4], q[8], q[12], q[1], q[5], q[9], q[13]};
  float s = 0.0f;
  for (int k = 0; k < 8; ++k) s += lanes[k];
  return s;
}

// one row's values in value order (the dequantized matrix)
inline void dequantize_row(const uint8_t* b, const uint8_t* s, int64_t G, float* out) {
  const float* H = half_scales();
  for (int64_t g = 0; g < G; ++g) {
    __m256 w[4];
    alignas(32) float slots[32];
    decode_block(b + g * 16, _mm256_broadcast_ss(H + s[g]), w);
    for (int j = 0; j < 4; ++j) _mm256_store_ps(slots + 8 * j, w[j]);
    for (int i = 0; i < 32; ++i) out[g * 32 + ORDER[i]] = slots[i];
  }
}

// NR rows (blocks / scales of row i at b + i * G * 16, s + i * G) times one token's permuted activations xp
template <int NR>
inline void rows_dot(const uint8_t* b, const uint8_t* s, int64_t G, const float* xp, float* out) {
  const float* H = half_scales();
  __m256 a[NR][4];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < 4; ++j) a[i][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 x[4];
    for (int j = 0; j < 4; ++j) x[j] = _mm256_loadu_ps(xp + g * 32 + 8 * j);
    for (int i = 0; i < NR; ++i) {
      __m256 w[4];
      decode_block(b + (i * G + g) * 16, _mm256_broadcast_ss(H + s[i * G + g]), w);
      for (int j = 0; j < 4; ++j) a[i][j] = _mm256_fmadd_ps(w[j], x[j], a[i][j]);
    }
  }
  for (int i = 0; i < NR; ++i) out[i] = finish(a[i]);
}

// one decoded row (slot order, C values) times NT tokens' permuted activations (token k at xp + k * C); out[k * R]
template <int NT>
inline void tokens_dot(const float* w, const float* xp, int64_t C, float* out, int64_t R) {
  __m256 a[NT][4];
  for (int k = 0; k < NT; ++k)
    for (int j = 0; j < 4; ++j) a[k][j] = _mm256_setzero_ps();
  for (int64_t c = 0; c < C; c += 32) {
    __m256 wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = _mm256_loadu_ps(w + c + 8 * j);
    for (int k = 0; k < NT; ++k)
      for (int j = 0; j < 4; ++j) a[k][j] = _mm256_fmadd_ps(wv[j], _mm256_loadu_ps(xp + k * C + c + 8 * j), a[k][j]);
  }
  for (int k = 0; k < NT; ++k) out[k * R] = finish(a[k]);
}

// out[t, r] for rows [r0, r1) of W (blocks, scales) and all T tokens; buf holds C floats
inline void linear_rows(const float* xp, int64_t T, int64_t C, const uint8_t* blocks, const uint8_t* scales,
                        int64_t r0, int64_t r1, int64_t R, float* out, float* buf) {
  const int64_t G = C / 32;
  int64_t r = r0;
  if (T == 1) {  // decoded in registers, two rows a pass
    for (; r + 2 <= r1; r += 2) rows_dot<2>(blocks + r * G * 16, scales + r * G, G, xp, out + r);
    for (; r < r1; ++r) rows_dot<1>(blocks + r * G * 16, scales + r * G, G, xp, out + r);
    return;
  }
  const float* H = half_scales();
  for (; r < r1; ++r) {  // the row decoded once into buf, then four tokens a pass
    for (int64_t g = 0; g < G; ++g) {
      __m256 w[4];
      decode_block(blocks + (r * G + g) * 16, _mm256_broadcast_ss(H + scales[r * G + g]), w);
      for (int j = 0; j < 4; ++j) _mm256_storeu_ps(buf + g * 32 + 8 * j, w[j]);
    }
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) tokens_dot<4>(buf, xp + t * C, C, out + t * R + r, R);
    for (; t < T; ++t) tokens_dot<1>(buf, xp + t * C, C, out + t * R + r, R);
  }
}

}  // namespace mxfp4
