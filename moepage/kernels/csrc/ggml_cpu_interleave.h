// ggml's 8-row interleaved layout of Q4_K weights (included by ggml_cpu_core.h), the one llama.cpp's CPU backend
// repacks Q4_K matrices into on AVX2 and on NEON with int8 matmul (ggml-cpu/repack.cpp: block_q4_Kx8, interleave
// 8): rows 8g..8g+7 of a matrix become one run of blocks, block b of the run holding block b of those 8 rows,
// their quants interleaved 8 bytes at a time and their 6-bit scales and mins regrouped per sub-block. The size is
// unchanged (8 x 144 bytes per block). ggml's `ggml_gemv_q4_K_8x8_q8_K` multiplies 8 rows per pass over it, faster
// than 8 row-by-row vec_dot calls; `interleave_q4_k` and `deinterleave_q4_k` are each other's inverse, bit for bit.
//
// Shape legend: R rows of 8-row groups, B blocks per row.
#pragma once

#include <cstdint>
#include <cstring>

namespace {

constexpr int Q4_K_BYTES = 144, Q4_K_QS = 128, Q4_K_SCALES = 12, Q4_K_X8_BYTES = 8 * Q4_K_BYTES;

// Q4_K's 12 scale bytes <-> 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4 and its inverse)
void unpack_scales(const uint8_t* q, uint8_t* sc, uint8_t* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = q[j] & 63;
    mn[j] = q[j + 4] & 63;
    sc[j + 4] = (q[j + 8] & 15) | ((q[j] >> 6) << 4);
    mn[j + 4] = (q[j + 8] >> 4) | ((q[j + 4] >> 6) << 4);
  }
}

void pack_scales(const uint8_t* sc, const uint8_t* mn, uint8_t* q) {
  for (int j = 0; j < 4; ++j) {
    q[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
    q[j + 4] = (mn[j] & 63) | ((mn[j + 4] >> 4) << 6);
    q[j + 8] = (sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4);
  }
}

// 8 Q4_K blocks (one per row) -> one block_q4_Kx8: d[8], dmin[8] (f16), scales[96], qs[1024]
void interleave_block(const uint8_t* const in[8], uint8_t* out) {
  for (int r = 0; r < 8; ++r) {
    std::memcpy(out + 2 * r, in[r], 2);       // d
    std::memcpy(out + 16 + 2 * r, in[r] + 2, 2);  // dmin
  }
  uint8_t sc[8][8], mn[8][8];  // [row][sub-block]
  for (int r = 0; r < 8; ++r) unpack_scales(in[r] + 4, sc[r], mn[r]);
  uint8_t* scales = out + 32;
  for (int sb = 0; sb < 8; ++sb) {  // 12 bytes per sub-block: its scale and min for the 8 rows (repack.cpp's order)
    uint8_t* o = scales + (sb % 4) * 12 + (sb / 4) * 48;
    for (int j = 0; j < 4; ++j) {
      o[j] = (sc[j][sb] & 63) | ((sc[j + 4][sb] & 48) << 2);
      o[4 + j] = (mn[j][sb] & 63) | ((mn[j + 4][sb] & 48) << 2);
      o[8 + j] = (sc[j + 4][sb] & 15) | ((mn[j + 4][sb] & 15) << 4);
    }
  }
  uint8_t* qs = out + 32 + 96;
  for (int i = 0; i < 8 * Q4_K_QS / 8; ++i) std::memcpy(qs + 8 * i, in[i % 8] + 16 + (i / 8) * 8, 8);
}

void deinterleave_block(const uint8_t* in, uint8_t* const out[8]) {
  for (int r = 0; r < 8; ++r) {
    std::memcpy(out[r], in + 2 * r, 2);
    std::memcpy(out[r] + 2, in + 16 + 2 * r, 2);
  }
  uint8_t sc[8][8], mn[8][8];
  const uint8_t* scales = in + 32;
  for (int sb = 0; sb < 8; ++sb) {
    const uint8_t* o = scales + (sb % 4) * 12 + (sb / 4) * 48;
    for (int j = 0; j < 4; ++j) {
      sc[j][sb] = o[j] & 63;
      mn[j][sb] = o[4 + j] & 63;
      sc[j + 4][sb] = (o[8 + j] & 15) | ((o[j] >> 6) << 4);
      mn[j + 4][sb] = (o[8 + j] >> 4) | ((o[4 + j] >> 6) << 4);
    }
  }
  for (int r = 0; r < 8; ++r) pack_scales(sc[r], mn[r], out[r] + 4);
  const uint8_t* qs = in + 32 + 96;
  for (int i = 0; i < 8 * Q4_K_QS / 8; ++i) std::memcpy(out[i % 8] + 16 + (i / 8) * 8, qs + 8 * i, 8);
}

// One group of 8 rows (B blocks each, plain row-major Q4_K at src) -> B interleaved blocks at dst (not src)
void interleave_group(const uint8_t* src, uint8_t* dst, int64_t B) {
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* in[8];
    for (int r = 0; r < 8; ++r) in[r] = src + (r * B + b) * Q4_K_BYTES;
    interleave_block(in, dst + b * Q4_K_X8_BYTES);
  }
}

void deinterleave_group(const uint8_t* src, uint8_t* dst, int64_t B) {
  for (int64_t b = 0; b < B; ++b) {
    uint8_t* out[8];
    for (int r = 0; r < 8; ++r) out[r] = dst + (r * B + b) * Q4_K_BYTES;
    deinterleave_block(src + b * Q4_K_X8_BYTES, out);
  }
}

}  // namespace
