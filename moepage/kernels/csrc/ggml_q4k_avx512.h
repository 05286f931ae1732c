// ggml's gemv over 8-row interleaved Q4_K (block_q4_Kx8) with a Q8_K activation in AVX-512 registers (included by
// ggml_cpu_core.h where the module is compiled with AVX512BW): ggml's x86 gemv is AVX2 only. Each 256-bit half of a
// register does what ggml's AVX2 kernel does for one sub-block pair of the same group (the same in-lane shuffles and
// int16 sums); the halves' int32 sums are added (exact), and the float steps per lane (= per output row) are ggml's,
// so the outputs are its bits. The two halves read one block, so the weights stay one sequential stream.
//
// Shape legend: B blocks of 256 values per row; G 8-row groups; sb the 64-value pair of sub-blocks of a block.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace {

#define MOEPAGE_HAS_Q4K_X8_AVX512 1

struct BlockQ4Kx8 {  // ggml's block_q4_Kx8
  uint16_t d[8], dmin[8];  // fp16
  uint8_t scales[96];
  uint8_t qs[1024];
};
static_assert(sizeof(BlockQ4Kx8) == 1152, "ggml 0.20's block_q4_Kx8");
constexpr int PREFETCH_BLOCKS = 12;  // how far ahead the weights are prefetched (docs/performance.md)

inline __m512i join(__m256i lo, __m256i hi) { return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1); }

// one sub-block's 12 scale-and-min bytes of a group, unpacked as ggml's gemv does (6-bit scales, then mins)
inline __m128i q4k_x8_unpack(const uint8_t* twelve) {
  constexpr uint32_t kmask1 = 0x3f3f3f3f, kmask2 = 0x0f0f0f0f, kmask3 = 0x03030303;
  uint32_t u[4];
  std::memcpy(u, twelve, 12);
  u[3] = ((u[2] >> 4) & kmask2) | (((u[1] >> 6) & kmask3) << 4);
  const uint32_t a = u[1] & kmask1;
  u[1] = (u[2] & kmask2) | (((u[0] >> 6) & kmask3) << 4);
  u[2] = a;
  u[0] &= kmask1;
  return _mm_set_epi32(u[3], u[2], u[1], u[0]);
}

// one group's scales and mins of sub-blocks 2sb, 2sb + 1 as ggml arranges them: (scales_0, scales_1, mins_01)
inline void q4k_x8_scales(const uint8_t* scales, int sb, __m256i& s0, __m256i& s1, __m256i& mins) {
  const __m128i scalemask = _mm_set_epi8(7, 7, 3, 3, 6, 6, 2, 2, 5, 5, 1, 1, 4, 4, 0, 0);
  const __m128i ms0 = q4k_x8_unpack(scales + 24 * sb), ms1 = q4k_x8_unpack(scales + 12 + 24 * sb);
  s0 = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(ms0, scalemask));
  s1 = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(ms1, scalemask));
  mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(_mm_shuffle_epi32(ms0, 78), _mm_shuffle_epi32(ms1, 78)));
}

// nc rows (a multiple of 8) of interleaved Q4_K times the Q8_K activation vy -> s[nc]: per 8-row group and block,
// sub-block pairs (2sb, 2sb + 1) and (2sb + 2, 2sb + 3) side by side in the two register halves, whose int32 sums
// are folded before the block's float steps
inline void gemv_q4_k_x8_avx512(int n, float* s, const void* vx, const void* vy, int nc) {
  const int nb = n / 256;
  const auto* groups = static_cast<const BlockQ4Kx8*>(vx);
  const uint8_t* a = static_cast<const uint8_t*>(vy);  // block_q8_K: float d, int8 qs[256], int16 bsums[16]
  const __m128i deltamask = _mm_set_epi8(15, 14, 7, 6, 13, 12, 5, 4, 11, 10, 3, 2, 9, 8, 1, 0);
  const __m256i finalpermutemask = _mm256_set_epi32(7, 5, 3, 1, 6, 4, 2, 0);
  const __m512i m4b = _mm512_set1_epi8(0x0F);
  constexpr __mmask16 odd = 0xAAAA;
  const auto swap = static_cast<_MM_PERM_ENUM>(177);
  for (int x = 0; x < nc / 8; ++x) {
    const BlockQ4Kx8* g = groups + static_cast<int64_t>(x) * nb;
    __m256 acc_row = _mm256_setzero_ps(), acc_min_rows = _mm256_setzero_ps();
    for (int b = 0; b < nb; ++b) {
      for (int o = 0; o < 1152; o += 64)  // a block = 18 lines; the hardware prefetcher alone left it latency-bound
        _mm_prefetch(reinterpret_cast<const char*>(g + b + PREFETCH_BLOCKS) + o, _MM_HINT_T0);
      const uint8_t* ab = a + static_cast<int64_t>(b) * 292;
      float ad;
      std::memcpy(&ad, ab, 4);
      const int8_t* aq = reinterpret_cast<const int8_t*>(ab + 4);
      const __m256 row_scale = _mm256_set1_ps(ad);
      const __m256 col_scale =
          _mm256_cvtph_ps(_mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g[b].d)), deltamask));
      const __m256 col_dmin = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g[b].dmin)));
      __m512i iacc_b = _mm512_setzero_si512(), iacc_min_b = _mm512_setzero_si512();
      const __m256i q8sums = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ab + 260));
      const __m128i q8h = _mm_hadd_epi16(_mm256_castsi256_si128(q8sums), _mm256_extracti128_si256(q8sums, 1));
      // low half: the sums ggml's sb iteration reads first; high half: those of the next sb
      __m512i q8s = join(_mm256_broadcastsi128_si256(q8h), _mm256_broadcastsi128_si256(_mm_bsrli_si128(q8h, 4)));
      for (int sb = 0; sb < 4; sb += 2) {
        const uint8_t* qs = g[b].qs + sb * 256;
        __m512i raw[8];
        for (int r = 0; r < 8; ++r)
          raw[r] = join(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * r)),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 256 + 32 * r)));
        __m256i s0a, s1a, ma, s0b, s1b, mb;
        q4k_x8_scales(g[b].scales, sb, s0a, s1a, ma);
        q4k_x8_scales(g[b].scales, sb + 1, s0b, s1b, mb);
        const __m512i scales_0 = join(s0a, s0b), scales_1 = join(s1a, s1b), mins_01 = join(ma, mb);
        __m512i lhs[4];  // 16 activation bytes of sb (low half) and of sb + 1 (high half)
        for (int c = 0; c < 4; ++c) {
          const int8_t* lo = aq + 16 * c + sb * 64;
          lhs[c] = join(_mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lo))),
                        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lo + 64))));
        }
        __m512i iacc_0 = _mm512_setzero_si512(), iacc_1 = _mm512_setzero_si512();
        for (int c = 0; c < 4; ++c) {
          const __m512i lo0123 = _mm512_and_si512(raw[2 * c], m4b), lo4567 = _mm512_and_si512(raw[2 * c + 1], m4b);
          const __m512i hi0123 = _mm512_and_si512(_mm512_srli_epi16(raw[2 * c], 4), m4b);
          const __m512i hi4567 = _mm512_and_si512(_mm512_srli_epi16(raw[2 * c + 1], 4), m4b);
          const __m512i l0 = lhs[c / 2], l1 = lhs[c / 2 + 2];  // first sub-block: lhs 0, 1; second: lhs 2, 3
          const bool upper = c % 2;  // chunks 1, 3 take dwords 2 and 3 of their 16 bytes; 0, 2 dwords 0 and 1
          const __m512i a0 = upper ? _mm512_shuffle_epi32(l0, static_cast<_MM_PERM_ENUM>(170))
                                   : _mm512_shuffle_epi32(l0, static_cast<_MM_PERM_ENUM>(0));
          const __m512i a1 = upper ? _mm512_shuffle_epi32(l0, static_cast<_MM_PERM_ENUM>(255))
                                   : _mm512_shuffle_epi32(l0, static_cast<_MM_PERM_ENUM>(85));
          const __m512i b0 = upper ? _mm512_shuffle_epi32(l1, static_cast<_MM_PERM_ENUM>(170))
                                   : _mm512_shuffle_epi32(l1, static_cast<_MM_PERM_ENUM>(0));
          const __m512i b1 = upper ? _mm512_shuffle_epi32(l1, static_cast<_MM_PERM_ENUM>(255))
                                   : _mm512_shuffle_epi32(l1, static_cast<_MM_PERM_ENUM>(85));
          iacc_0 = _mm512_add_epi16(iacc_0, _mm512_maddubs_epi16(
              _mm512_mask_blend_epi32(odd, lo0123, _mm512_shuffle_epi32(lo4567, swap)), a0));
          iacc_0 = _mm512_add_epi16(iacc_0, _mm512_maddubs_epi16(
              _mm512_mask_blend_epi32(odd, _mm512_shuffle_epi32(lo0123, swap), lo4567), a1));
          iacc_1 = _mm512_add_epi16(iacc_1, _mm512_maddubs_epi16(
              _mm512_mask_blend_epi32(odd, hi0123, _mm512_shuffle_epi32(hi4567, swap)), b0));
          iacc_1 = _mm512_add_epi16(iacc_1, _mm512_maddubs_epi16(
              _mm512_mask_blend_epi32(odd, _mm512_shuffle_epi32(hi0123, swap), hi4567), b1));
        }
        iacc_0 = _mm512_madd_epi16(iacc_0, scales_0);
        iacc_1 = _mm512_madd_epi16(iacc_1, scales_1);
        iacc_b = _mm512_add_epi32(iacc_b, _mm512_add_epi32(iacc_0, iacc_1));
        iacc_min_b = _mm512_add_epi32(
            iacc_min_b, _mm512_madd_epi16(_mm512_shuffle_epi32(q8s, static_cast<_MM_PERM_ENUM>(0)), mins_01));
        q8s = _mm512_bsrli_epi128(q8s, 8);
      }
      // int32 sums: folding the halves gives ggml's per-block lane sums exactly
      const __m256i ib = _mm256_add_epi32(_mm512_castsi512_si256(iacc_b), _mm512_extracti64x4_epi64(iacc_b, 1));
      const __m256i im = _mm256_add_epi32(_mm512_castsi512_si256(iacc_min_b), _mm512_extracti64x4_epi64(iacc_min_b, 1));
      acc_row = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ib), _mm256_mul_ps(col_scale, row_scale), acc_row);
      acc_min_rows = _mm256_fmadd_ps(_mm256_cvtepi32_ps(im), _mm256_mul_ps(col_dmin, row_scale), acc_min_rows);
    }
    acc_row = _mm256_permutevar8x32_ps(acc_row, finalpermutemask);
    _mm256_storeu_ps(s + 8 * x, _mm256_sub_ps(acc_row, acc_min_rows));
  }
}

}  // namespace
#endif
