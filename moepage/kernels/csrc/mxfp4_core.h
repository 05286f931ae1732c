// MXFP4 matvec core, without torch (tests/csrc/mxfp4_main.cpp builds it alone for every ISA): decodes the stored
// bytes into fp32 lanes and dots them with float activations; every product is an fp32 FMA of the exactly decoded
// value, in one fixed order, so the AVX2 and the portable paths give the same bits (and the same bits for any T).
//
// Layout (the published gpt-oss safetensors `*_blocks` / `*_scales`): blocks uint8 [R, G, 16], scales uint8 [R, G];
// value 2j of a block is the low nibble of byte j, value 2j + 1 its high nibble; a value is
// FP4[code] * 2^(scale - 127) = KV[code] * 2^(scale - 128) (KV: FP4 doubled, ggml's kvalues_mxfp4), exact.
//
// The dot's order: 32 chains per (token, row), chain v sums value v of every block, g = 0, 1, ... (one FMA each);
// then lanes[k] = (c[k] + c[k + 8]) + (c[k + 16] + c[k + 24]) and 0 + lanes[0] + ... + lanes[7].
// The decode writes a block's values in "slot" order, ORDER[slot] = value (what the AVX2 byte unpacks and shifts
// give); the activations are permuted the same way once per call (permute_x), and finish() sums in value order.
//
// Shape legend: T activation rows (tokens), C input features (weight columns), R output features (weight rows),
// G = C / 32 blocks per row.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace mxfp4 {

constexpr float KV[16] = {+0.0f, +1.0f, +2.0f, +3.0f, +4.0f, +6.0f, +8.0f, +12.0f,
                          -0.0f, -1.0f, -2.0f, -3.0f, -4.0f, -6.0f, -8.0f, -12.0f};
constexpr int ORDER[32] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,  // the value held by each slot
                           16, 20, 24, 28, 17, 21, 25, 29, 18, 22, 26, 30, 19, 23, 27, 31};

// 2^(e - 128) as fp32 (ggml_e8m0_to_fp32_half): e = 0 and 1 are the subnormals 2^-128 and 2^-127
inline float e8m0_half(uint8_t e) {
  const uint32_t bits = e < 2 ? 0x00200000u << e : static_cast<uint32_t>(e - 1) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

struct HalfScales {  // e8m0_half of every byte: one load a block
  float v[256];
  HalfScales() {
    for (int e = 0; e < 256; ++e) v[e] = e8m0_half(static_cast<uint8_t>(e));
  }
};
inline const float* half_scales() {
  static const HalfScales table;
  return table.v;
}

// x [T, C] -> xp [T, C] in slot order (block by block)
inline void permute_x(const float* x, int64_t T, int64_t C, float* xp) {
  for (int64_t i = 0; i < T * C; i += 32)
    for (int l = 0; l < 32; ++l) xp[i + l] = x[i + ORDER[l]];
}

// the final sum of 32 chains held in slot order
inline float finish(const float* a) {
  float c[32], lanes[8];
  for (int l = 0; l < 32; ++l) c[ORDER[l]] = a[l];
  for (int k = 0; k < 8; ++k) lanes[k] = (c[k] + c[8 + k]) + (c[16 + k] + c[24 + k]);
  float s = 0.0f;
  for (int k = 0; k < 8; ++k) s += lanes[k];
  return s;
}

}  // namespace mxfp4

#if defined(__AVX2__) && defined(__FMA__)
#include "mxfp4_avx2.h"
#else
#include "mxfp4_portable.h"
#endif
