// The AVX512-VBMI2 block decoder of moepage's lossless 12-bit bf16 encoding (layout: bf16_12bit.h), shared by
// bf16_unpack.cpp (decode and the fused one-row matvec) and bf16_rows.h (rows decoded once for several activations).
// Include only where the target has AVX512F, AVX512BW and AVX512VBMI2.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "bf16_12bit.h"

namespace bf16x12avx512 {

// The 64 values of one block: w0 = values 0..31, w1 = values 32..63 (bf16 bits); e advances past the block's
// escape bytes. Returns false, decoding nothing, when the block has more escapes than `left` bytes (a corrupt shard;
// a matrix packed in this process passes the int64 maximum).
inline bool decode_block(
    const uint8_t* lo, const uint8_t* codes, const uint8_t*& e, int64_t left, __m512i table, __m512i& w0, __m512i& w1) {
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
  const __m512i code = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(packed, nibble)),
                                          _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble), 1);  // [64]
  __m512i hi = _mm512_shuffle_epi8(table, code);
  const __mmask64 esc = _mm512_cmpeq_epi8_mask(code, _mm512_set1_epi8(bf16x12::ESCAPE));
  if (esc) {
    const int64_t k = _mm_popcnt_u64(esc);
    if (k > left) return false;
    hi = _mm512_mask_expandloadu_epi8(hi, esc, e);
    e += k;
  }
  const __m512i low = _mm512_loadu_si512(lo);
  const __m512i a = _mm512_unpacklo_epi8(low, hi);  // values 0-7, 16-23, 32-39, 48-55 of the block
  const __m512i d = _mm512_unpackhi_epi8(low, hi);  // values 8-15, 24-31, 40-47, 56-63
  w0 = _mm512_permutex2var_epi64(a, _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0), d);
  w1 = _mm512_permutex2var_epi64(a, _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4), d);
  return true;
}

}  // namespace bf16x12avx512
