// The portable decoder of moepage's lossless 12-bit bf16 encoding (moepage/paging/bf16_12bit.py writes it) and the
// matvec on it, for every CPU: the table lookup is the one ISA-specific step (AVX2 / SSSE3 pshufb, NEON tbl, a plain
// loop elsewhere), the rest is bf16_portable.h's vector extensions. Torch-free, so tests run it under qemu-aarch64
// against the x86 builds (tests/test_portable_kernels.py). bf16_unpack.cpp uses it where the build target lacks
// AVX512-VBMI2 + AVX512-BF16.
//
// Shape legend: K values per row (a multiple of 64 for the matvec), N rows.
//
// One block of 64 values: lo [64] low bytes; codes [32], byte j holding the code of value j (low nibble) and of value
// 32 + j (high nibble); a code < 15 is the high byte lut[code], code 15 takes the next byte of the escape list.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__SSSE3__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#include "bf16_portable.h"

namespace bf16x12 {

constexpr uint8_t ESCAPE = 15;

inline uint8_t code_of(const uint8_t* codes, int j) { return j < 32 ? codes[j] & 0x0F : codes[j - 32] >> 4; }

// Bit j set for each escaped value j of a block (j < 64).
inline uint64_t escape_mask(const uint8_t* codes) {
  uint64_t m = 0;
  for (int j = 0; j < 32; ++j)
    m |= (uint64_t((codes[j] & 0x0F) == ESCAPE) << j) | (uint64_t((codes[j] >> 4) == ESCAPE) << (32 + j));
  return m;
}

// The 64 values of one block as bf16 bits in natural order, 16 per vector: v[i] holds values 16i..16i+15 (the layout
// bf16p::load_bf16x16 reads). Returns the block's escape_mask (the escaped values' high bytes are then wrong: see
// decode).
inline uint64_t lookup(const uint8_t* lo, const uint8_t* codes, const uint8_t* lut, bf16p::u32x8 v[4]) {
#if defined(__AVX2__)
  const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
  const __m256i nibble = _mm256_set1_epi8(0x0F), esc = _mm256_set1_epi8(ESCAPE);
  const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut)));
  const __m256i c0 = _mm256_and_si256(packed, nibble), c1 = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);
  const __m256i h[2] = {_mm256_shuffle_epi8(table, c0), _mm256_shuffle_epi8(table, c1)};
  for (int half = 0; half < 2; ++half) {
    const __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + 32 * half));
    const __m256i a = _mm256_unpacklo_epi8(l, h[half]);  // values 0-7 and 16-23 of this half
    const __m256i b = _mm256_unpackhi_epi8(l, h[half]);  // values 8-15 and 24-31
    const __m256i first = _mm256_permute2x128_si256(a, b, 0x20), second = _mm256_permute2x128_si256(a, b, 0x31);
    std::memcpy(&v[2 * half], &first, 32);
    std::memcpy(&v[2 * half + 1], &second, 32);
  }
  return static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(c0, esc))) |
         (static_cast<uint64_t>(static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(c1, esc)))) << 32);
#elif defined(__SSSE3__) || defined(__ARM_NEON)
  uint8_t hi[64];
#if defined(__SSSE3__)
  const __m128i table = _mm_loadu_si128(reinterpret_cast<const __m128i*>(lut)), nibble = _mm_set1_epi8(0x0F);
  __m128i any = _mm_setzero_si128();
  for (int i = 0; i < 2; ++i) {
    const __m128i p = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16 * i));
    const __m128i c0 = _mm_and_si128(p, nibble), c1 = _mm_and_si128(_mm_srli_epi16(p, 4), nibble);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + 16 * i), _mm_shuffle_epi8(table, c0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + 32 + 16 * i), _mm_shuffle_epi8(table, c1));
    any = _mm_or_si128(any, _mm_or_si128(_mm_cmpeq_epi8(c0, _mm_set1_epi8(ESCAPE)),
                                         _mm_cmpeq_epi8(c1, _mm_set1_epi8(ESCAPE))));
  }
  const bool escaped = _mm_movemask_epi8(any) != 0;
  uint16_t out[64];
  for (int i = 0; i < 4; ++i) {
    const __m128i l = _mm_loadu_si128(reinterpret_cast<const __m128i*>(lo + 16 * i));
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(hi + 16 * i));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * i), _mm_unpacklo_epi8(l, h));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * i + 8), _mm_unpackhi_epi8(l, h));
  }
#else  // NEON
  const uint8x16_t table = vld1q_u8(lut), nibble = vdupq_n_u8(0x0F), esc = vdupq_n_u8(ESCAPE);
  uint8x16_t any = vdupq_n_u8(0);
  for (int i = 0; i < 2; ++i) {
    const uint8x16_t p = vld1q_u8(codes + 16 * i);
    const uint8x16_t c0 = vandq_u8(p, nibble), c1 = vshrq_n_u8(p, 4);
    vst1q_u8(hi + 16 * i, vqtbl1q_u8(table, c0));
    vst1q_u8(hi + 32 + 16 * i, vqtbl1q_u8(table, c1));
    any = vorrq_u8(any, vorrq_u8(vceqq_u8(c0, esc), vceqq_u8(c1, esc)));
  }
  const bool escaped = vmaxvq_u8(any) != 0;
  uint16_t out[64];
  for (int i = 0; i < 4; ++i) {
    const uint8x16_t l = vld1q_u8(lo + 16 * i), h = vld1q_u8(hi + 16 * i);
    vst1q_u8(reinterpret_cast<uint8_t*>(out + 16 * i), vzip1q_u8(l, h));
    vst1q_u8(reinterpret_cast<uint8_t*>(out + 16 * i + 8), vzip2q_u8(l, h));
  }
#endif
  std::memcpy(v, out, sizeof out);
  return escaped ? escape_mask(codes) : 0;
#else  // any other CPU: one value at a time
  uint16_t out[64];
  bool escaped = false;
  for (int j = 0; j < 64; ++j) {
    const uint8_t c = code_of(codes, j);
    escaped |= c == ESCAPE;
    out[j] = static_cast<uint16_t>(lo[j] | (lut[c] << 8));
  }
  std::memcpy(v, out, sizeof out);
  return escaped ? escape_mask(codes) : 0;
#endif
}

// One block's 64 values into v (as lookup), the escaped ones' high bytes taken from e in order; e advances past them.
inline void decode(const uint8_t* lo, const uint8_t* codes, const uint8_t* lut, const uint8_t*& e, bf16p::u32x8 v[4]) {
  uint64_t m = lookup(lo, codes, lut, v);
  if (!m) return;
  uint16_t out[64];
  std::memcpy(out, v, sizeof out);
  for (; m; m &= m - 1) {  // ascending value order, as the escape bytes are stored
    const int j = __builtin_ctzll(m);
    out[j] = static_cast<uint16_t>(lo[j] | (*e++ << 8));
  }
  std::memcpy(v, out, sizeof out);
}

// out bf16 bits [n] <- n values (any n; the last block may be partial) with `exc_n` escape bytes. Returns the escape
// bytes used, or -1 when the blocks need more than there are (a corrupt shard; nothing past that block is written).
inline int64_t unpack(const uint8_t* lo, const uint8_t* codes, const uint8_t* exc, int64_t exc_n, const uint8_t* lut,
                      int64_t n, uint16_t* out) {
  const uint8_t* e = exc;
  const int64_t full = n / 64;
  for (int64_t b = 0; b < full; ++b) {
    bf16p::u32x8 v[4];
    if (const uint64_t m = lookup(lo + b * 64, codes + b * 32, lut, v)) {
      if (__builtin_popcountll(m) > exc_n - (e - exc)) return -1;
      decode(lo + b * 64, codes + b * 32, lut, e, v);
    }
    std::memcpy(out + b * 64, v, sizeof v);
  }
  for (int64_t i = full * 64; i < n; ++i) {  // the partial block
    const uint8_t c = code_of(codes + full * 32, static_cast<int>(i % 64));
    if (c == ESCAPE && e - exc >= exc_n) return -1;
    out[i] = static_cast<uint16_t>(lo[i] | ((c == ESCAPE ? *e++ : lut[c]) << 8));
  }
  return e - exc;
}

// sum_k x[k] * W[n, k] for one row of a matrix in the 12-bit form (K a multiple of 64; e: the row's first escape
// byte), xp from bf16p::widen_permuted: bf16p::dot's additions in its order, so the result is bit for bit that of the
// bf16 row.
inline float dot_row(const uint8_t* lo, const uint8_t* codes, const uint8_t* e, const uint8_t* lut, const float* xp,
                     int64_t K) {
  bf16p::f32x8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
  for (int64_t k = 0; k < K; k += 64) {
    __builtin_prefetch(lo + k + bf16p::PREFETCH_AHEAD_BYTES, 0, 2);
    __builtin_prefetch(codes + k / 2 + bf16p::PREFETCH_AHEAD_BYTES / 2, 0, 2);
    bf16p::u32x8 v[4];
    decode(lo + k, codes + k / 2, lut, e, v);
    for (int c = 0; c < 2; ++c) {
      const bf16p::Pair p = bf16p::split(v[2 * c]), q = bf16p::split(v[2 * c + 1]);
      const float* x = xp + k + 32 * c;
      a0 += p.even * bf16p::load_f32x8(x);
      a1 += p.odd * bf16p::load_f32x8(x + 8);
      a2 += q.even * bf16p::load_f32x8(x + 16);
      a3 += q.odd * bf16p::load_f32x8(x + 24);
    }
  }
  return bf16p::hsum((a0 + a1) + (a2 + a3));
}

// out[n] for rows [n0, n1) of a 12-bit matrix: lo [N*K], codes [N*K/2], row n's escapes from exc + row_exc[n], its
// table luts + (n / rows_per_table) * 16.
inline void gemv_rows(const float* xp, const uint8_t* lo, const uint8_t* codes, const uint8_t* exc,
                      const int64_t* row_exc, const uint8_t* luts, int64_t rows_per_table, int64_t K, int64_t n0,
                      int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n)
    out[n] = dot_row(lo + n * K, codes + n * (K / 2), exc + row_exc[n], luts + (n / rows_per_table) * 16, xp, K);
}

}  // namespace bf16x12
