// MXFP4 decode + dot in plain C++ (included by mxfp4_core.h where AVX2 + FMA is not the target, e.g. aarch64): the
// same slot order and the same FMAs (std::fma: one rounding, as the AVX2 path's) as mxfp4_avx2.h, so the same bits.
//
// Shape legend as in mxfp4_core.h (T tokens, C columns, R rows, G blocks per row).
#pragma once

namespace mxfp4 {

inline void dequantize_row(const uint8_t* b, const uint8_t* s, int64_t G, float* out) {
  const float* H = half_scales();
  for (int64_t g = 0; g < G; ++g)
    for (int j = 0; j < 16; ++j) {
      out[g * 32 + 2 * j] = KV[b[g * 16 + j] & 0x0F] * H[s[g]];
      out[g * 32 + 2 * j + 1] = KV[b[g * 16 + j] >> 4] * H[s[g]];
    }
}

// one row's values in slot order
inline void decode_row_slots(const uint8_t* b, const uint8_t* s, int64_t G, float* out) {
  const float* H = half_scales();
  for (int64_t g = 0; g < G; ++g)
    for (int i = 0; i < 32; ++i) {
      const int v = ORDER[i];
      out[g * 32 + i] = KV[(b[g * 16 + v / 2] >> (4 * (v & 1))) & 0x0F] * H[s[g]];
    }
}

inline void linear_rows(const float* xp, int64_t T, int64_t C, const uint8_t* blocks, const uint8_t* scales,
                        int64_t r0, int64_t r1, int64_t R, float* out, float* buf) {
  const int64_t G = C / 32;
  for (int64_t r = r0; r < r1; ++r) {
    decode_row_slots(blocks + r * G * 16, scales + r * G, G, buf);
    for (int64_t t = 0; t < T; ++t) {
      const float* x = xp + t * C;
      float a[32] = {0};
      for (int64_t c = 0; c < C; c += 32)
        for (int i = 0; i < 32; ++i) a[i] = std::fma(buf[c + i], x[c + i], a[i]);
      out[t * R + r] = finish(a);
    }
  }
}

}  // namespace mxfp4
