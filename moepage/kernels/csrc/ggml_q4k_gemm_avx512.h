// ggml's 4-row gemm over 8-row interleaved Q4_K (block_q4_Kx8) times block_q8_Kx4 activations in AVX-512
// registers (included by ggml_cpu_gemm.h where the module is compiled with AVX512BW): the libggml-python wheel's x86
// gemm is its AVX2 one. As in llama.cpp's own AVX-512 build of `ggml_gemm_q4_K_8x8_q8_K`, each 256-bit half of a
// register does for one 8-row group exactly what the AVX2 kernel does (the same in-lane shuffles, saturating int16
// pair sums in the same order, int32 sums and float steps), so every output is the AVX2 kernel's bits; a register
// covers two groups (16 weight rows), and the unpacked weights of a block serve up to 16 activation rows.
//
// Shape legend: B blocks of 256 values per row; P groups of 4 activation rows (one block_q8_Kx4 row of blocks);
// j the four 32-byte chunks of a sub-block pair; k the sub-block of the pair (low or high nibbles); sp the two
// dword patterns of the int8 pair sums.
#pragma once

#if defined(MOEPAGE_HAS_Q4K_X8_AVX512)

namespace {

constexpr int64_t Q8_KX4_BYTES = 1168;  // block_q8_Kx4: float d[4], int8 qs[1024], int16 bsums[64]

constexpr _MM_PERM_ENUM sh(int imm) { return static_cast<_MM_PERM_ENUM>(imm); }

// P groups of 4 activation rows (a, P * stride bytes) x the 16 weight rows of groups g0, g1 -> s rows, 16 floats each
template <int P>
inline void gemm_q4_k_x8_tile(int nb, float* s, size_t bs, const BlockQ4Kx8* g0, const BlockQ4Kx8* g1,
                              const uint8_t* a, int64_t stride) {
  const __m512i m4b = _mm512_set1_epi8(0x0F);
  const __m256i order = _mm256_set_epi32(3, 2, 1, 0, 7, 6, 5, 4);
  __m512 acc[4 * P], acc_min[4 * P];
  for (int i = 0; i < 4 * P; ++i) acc[i] = acc_min[i] = _mm512_setzero_ps();
  for (int b = 0; b < nb; ++b) {
    const auto halves = [](const uint16_t* lo, const uint16_t* hi) {  // 8 fp16 of each group -> 16 floats
      return _mm512_cvtph_ps(_mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(hi)),
                                              _mm_loadu_si128(reinterpret_cast<const __m128i*>(lo))));
    };
    const __m512 col_scale = halves(g0[b].d, g1[b].d), col_dmin = halves(g0[b].dmin, g1[b].dmin);
    for (int sb = 0; sb < 4; ++sb) {
      __m512i ra[2][4][2], rb[2][4][2];  // [k][j][sp]: columns 0145 (89CD), 2367 (ABEF) of the two groups
      for (int j = 0; j < 4; ++j) {
        const uint8_t* q0 = g0[b].qs + sb * 256 + 64 * j;
        const uint8_t* q1 = g1[b].qs + sb * 256 + 64 * j;
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q0));
        const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q0 + 32));
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q1));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q1 + 32));
        const __m512i wa = join(_mm256_blend_epi32(w0, _mm256_permutevar8x32_epi32(w1, order), 240),
                                     _mm256_blend_epi32(v0, _mm256_permutevar8x32_epi32(v1, order), 240));
        const __m512i wb = join(_mm256_blend_epi32(_mm256_permutevar8x32_epi32(w0, order), w1, 240),
                                     _mm256_blend_epi32(_mm256_permutevar8x32_epi32(v0, order), v1, 240));
        for (int k = 0; k < 2; ++k) {
          const __m512i ca = _mm512_and_si512(k ? _mm512_srli_epi16(wa, 4) : wa, m4b);
          const __m512i cb = _mm512_and_si512(k ? _mm512_srli_epi16(wb, 4) : wb, m4b);
          ra[k][j][0] = _mm512_shuffle_epi32(ca, sh(136));
          ra[k][j][1] = _mm512_shuffle_epi32(ca, sh(221));
          rb[k][j][0] = _mm512_shuffle_epi32(cb, sh(136));
          rb[k][j][1] = _mm512_shuffle_epi32(cb, sh(221));
        }
      }
      const __m256i ms0 =
          _mm256_set_m128i(q4k_x8_unpack(g1[b].scales + 24 * sb), q4k_x8_unpack(g0[b].scales + 24 * sb));
      const __m256i ms1 = _mm256_set_m128i(q4k_x8_unpack(g1[b].scales + 12 + 24 * sb),
                                           q4k_x8_unpack(g0[b].scales + 12 + 24 * sb));
      const __m512i scales[2] = {_mm512_cvtepu8_epi16(_mm256_unpacklo_epi8(ms0, ms0)),
                                 _mm512_cvtepu8_epi16(_mm256_unpacklo_epi8(ms1, ms1))};
      const __m512i mins_01 = _mm512_cvtepu8_epi16(
          _mm256_unpacklo_epi8(_mm256_shuffle_epi32(ms0, 78), _mm256_shuffle_epi32(ms1, 78)));
      const __m512i sca[2] = {_mm512_shuffle_epi32(scales[0], sh(68)), _mm512_shuffle_epi32(scales[1], sh(68))};
      const __m512i scb[2] = {_mm512_shuffle_epi32(scales[0], sh(238)), _mm512_shuffle_epi32(scales[1], sh(238))};
      for (int p = 0; p < P; ++p) {
        const uint8_t* ab = a + p * stride + static_cast<int64_t>(b) * Q8_KX4_BYTES;
        const uint8_t* aq = ab + 16 + 256 * sb;
        __m512i iacc_row[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                               _mm512_setzero_si512()};
        for (int k = 0; k < 2; ++k) {
          __m512i l01[4][2], l23[4][2];  // [j][sp]: rows 0, 1 and rows 2, 3 of the group
          for (int j = 0; j < 4; ++j) {
            const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(aq + 128 * k + 32 * j));
            const __m512i y01 = _mm512_broadcast_i32x4(_mm256_castsi256_si128(y));
            const __m512i y23 = _mm512_broadcast_i32x4(_mm256_extracti128_si256(y, 1));
            l01[j][0] = _mm512_shuffle_epi32(y01, sh(160));
            l01[j][1] = _mm512_shuffle_epi32(y01, sh(245));
            l23[j][0] = _mm512_shuffle_epi32(y23, sh(160));
            l23[j][1] = _mm512_shuffle_epi32(y23, sh(245));
          }
          // ggml's order: chunks 3, 2, 1, 0 added in int16, then the two patterns, then scaled into int32
          const auto dot = [&](__m512i (&r)[4][2], __m512i (&l)[4][2], int sp) {
            return _mm512_add_epi16(
                _mm512_add_epi16(_mm512_add_epi16(_mm512_maddubs_epi16(r[3][sp], l[3][sp]),
                                                  _mm512_maddubs_epi16(r[2][sp], l[2][sp])),
                                 _mm512_maddubs_epi16(r[1][sp], l[1][sp])),
                _mm512_maddubs_epi16(r[0][sp], l[0][sp]));
          };
          const __m512i m00 = _mm512_madd_epi16(_mm512_add_epi16(dot(ra[k], l01, 0), dot(ra[k], l01, 1)), sca[k]);
          const __m512i m01 = _mm512_madd_epi16(_mm512_add_epi16(dot(rb[k], l01, 0), dot(rb[k], l01, 1)), scb[k]);
          const __m512i m10 = _mm512_madd_epi16(_mm512_add_epi16(dot(ra[k], l23, 0), dot(ra[k], l23, 1)), sca[k]);
          const __m512i m11 = _mm512_madd_epi16(_mm512_add_epi16(dot(rb[k], l23, 0), dot(rb[k], l23, 1)), scb[k]);
          const __m512i rows[4] = {
              _mm512_mask_blend_epi32(0xCCCC, m00, _mm512_shuffle_epi32(m01, sh(78))),
              _mm512_mask_blend_epi32(0xCCCC, _mm512_shuffle_epi32(m00, sh(78)), m01),
              _mm512_mask_blend_epi32(0xCCCC, m10, _mm512_shuffle_epi32(m11, sh(78))),
              _mm512_mask_blend_epi32(0xCCCC, _mm512_shuffle_epi32(m10, sh(78)), m11)};
          for (int r = 0; r < 4; ++r) iacc_row[r] = k ? _mm512_add_epi32(iacc_row[r], rows[r]) : rows[r];
        }
        const __m256i bsums = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ab + 16 + 1024 + 32 * sb));
        const __m512i hsum = _mm512_broadcast_i32x4(
            _mm_hadd_epi16(_mm256_castsi256_si128(bsums), _mm256_extracti128_si256(bsums, 1)));
        const __m512 row_scale = _mm512_broadcast_f32x4(_mm_loadu_ps(reinterpret_cast<const float*>(ab)));
        const __m512 rs[4] = {_mm512_shuffle_ps(row_scale, row_scale, 0), _mm512_shuffle_ps(row_scale, row_scale, 85),
                              _mm512_shuffle_ps(row_scale, row_scale, 170),
                              _mm512_shuffle_ps(row_scale, row_scale, 255)};
        const __m512i hs[4] = {_mm512_shuffle_epi32(hsum, sh(0)), _mm512_shuffle_epi32(hsum, sh(85)),
                               _mm512_shuffle_epi32(hsum, sh(170)), _mm512_shuffle_epi32(hsum, sh(255))};
        for (int r = 0; r < 4; ++r) {
          acc[4 * p + r] =
              _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc_row[r]), _mm512_mul_ps(col_scale, rs[r]), acc[4 * p + r]);
          const __m512i mins = _mm512_madd_epi16(hs[r], mins_01);
          acc_min[4 * p + r] =
              _mm512_fmadd_ps(_mm512_cvtepi32_ps(mins), _mm512_mul_ps(col_dmin, rs[r]), acc_min[4 * p + r]);
        }
      }
    }
  }
  for (int i = 0; i < 4 * P; ++i) _mm512_storeu_ps(s + i * bs, _mm512_sub_ps(acc[i], acc_min[i]));
}

// ggml_gemm_q4_K_8x8_q8_K's contract (nr a multiple of 4, nc of 8): pairs of 8-row groups here, an odd last group
// through `tail` (the library's kernel: the same bits)
inline void gemm_q4_k_x8_avx512(int n, float* s, size_t bs, const void* vx, const void* vy, int nr, int nc,
                                gemv_t tail) {
  const int nb = n / 256;
  const auto* groups = static_cast<const BlockQ4Kx8*>(vx);
  const auto* a = static_cast<const uint8_t*>(vy);
  const int64_t stride = static_cast<int64_t>(nb) * Q8_KX4_BYTES;  // bytes of one group of 4 activation rows
  const int anc = nc - nc % 16;
  for (int y = 0; y < nr / 4; y += 4) {
    const int p = std::min(4, nr / 4 - y);
    for (int x = 0; x < anc / 8; x += 2) {
      const BlockQ4Kx8* g0 = groups + static_cast<int64_t>(x) * nb;
      float* out = s + static_cast<int64_t>(y) * 4 * bs + 8 * x;
      const uint8_t* ay = a + y * stride;
      switch (p) {
        case 4: gemm_q4_k_x8_tile<4>(nb, out, bs, g0, g0 + nb, ay, stride); break;
        case 3: gemm_q4_k_x8_tile<3>(nb, out, bs, g0, g0 + nb, ay, stride); break;
        case 2: gemm_q4_k_x8_tile<2>(nb, out, bs, g0, g0 + nb, ay, stride); break;
        default: gemm_q4_k_x8_tile<1>(nb, out, bs, g0, g0 + nb, ay, stride); break;
      }
    }
  }
  if (anc < nc) tail(n, s + anc, bs, groups + static_cast<int64_t>(anc / 8) * nb, vy, nr, nc - anc);
}

}  // namespace
#endif
