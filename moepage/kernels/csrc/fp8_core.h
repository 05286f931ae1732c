// Block-scaled FP8 (float8_e4m3fn) matrices multiplied on their stored bytes, the portable core (no torch, no
// intrinsics: plain loops the compiler vectorises for the build target, with a fixed summation order, so every ISA
// gives the same bits; tests/test_fp8_kernels.py runs it built for x86-64, haswell and aarch64 under qemu).
//
// Layout (DeepSeek-V3 / Kimi K2 / GLM FP8 safetensors): w uint8 [R, C], one E4M3 byte a value; scales float32
// [ceil(R / br), ceil(C / bc)] (`weight_scale_inv`), value (r, c) = E4M3[w] * scales[r / br, c / bc]: one fp32
// multiply, the same one transformers' Fp8Dequantize does in float32, optionally rounded to bf16 (round to nearest
// even) where transformers then holds the weight in bf16.
//
// Shape legend: T activation rows (tokens), C input features (weight columns), R output features (weight rows),
// br x bc one scale block, gc = ceil(C / bc) scale columns.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fp8 {

constexpr int LANES = 16;  // partial sums of dot(): lane k sums the products at columns c with c % 16 == k

// E4M3 (fn: no infinities, S.1111.111 is NaN): (-1)^s 2^(e-7) (1 + m/8), subnormals 2^-6 (m/8); built from bits
// (no table, no fp32 subnormal: flush-to-zero modes cannot change it) so the loops below vectorise; exact in fp32
typedef uint32_t __attribute__((may_alias)) u32_alias;  // a float's bits, written in place (GCC and clang)

inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline uint32_t e4m3_bits(uint8_t b) {
  const uint32_t u = b & 0x7fu;
  const uint32_t normal = (u << 20) + (120u << 23);  // e > 0: exponent e - 7 + 127, mantissa m
  // e = 0: (2^-6 + m 2^-9) - 2^-6 = m 2^-9, exact (the operands are within a factor of two)
  const uint32_t sub = to_bits(from_bits((121u << 23) | ((u & 7u) << 20)) - 0.015625f);
  uint32_t bits = u >= 8u ? normal : sub;
  bits = u == 0x7fu ? 0x7fc00000u : bits;  // NaN
  return bits | (static_cast<uint32_t>(b & 0x80u) << 24);
}

inline float e4m3_value(uint8_t b) { return from_bits(e4m3_bits(b)); }

// fp32 -> the nearest bf16 (ties to even), widened back: what torch's .to(torch.bfloat16) gives
inline float round_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u)
    u = (u | 0x00400000u) & 0xffff0000u;  // NaN stays NaN
  else
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

// row r of w [R, C] decoded into out [C]: the values, times their block's scale (one fp32 multiply, as
// transformers' E4M3 -> float32 times scale_inv), then (bf16) rounded
inline void decode_row(const uint8_t* w, const float* scales, int64_t r, int64_t C, int64_t br, int64_t bc,
                       bool bf16, float* out) {
  const int64_t gc = (C + bc - 1) / bc;
  const float* srow = scales + (r / br) * gc;
  const uint8_t* wr = w + r * C;
  u32_alias* bits = reinterpret_cast<u32_alias*>(out);
  for (int64_t c = 0; c < C; ++c) bits[c] = e4m3_bits(wr[c]);  // branch-free: vectorised
  for (int64_t c0 = 0, g = 0; c0 < C; c0 += bc, ++g) {
    const float s = srow[g];
    const int64_t c1 = c0 + bc < C ? c0 + bc : C;
    for (int64_t c = c0; c < c1; ++c) out[c] *= s;
  }
  if (bf16)
    for (int64_t c = 0; c < C; ++c) out[c] = round_bf16(out[c]);
}

// sum_c w[c] x[c] in a fixed order: 16 lane sums (the tail goes to its lanes), then the lanes in order
inline float dot(const float* w, const float* x, int64_t C) {
  float acc[LANES] = {0};
  int64_t c = 0;
  for (; c + LANES <= C; c += LANES)
    for (int k = 0; k < LANES; ++k) acc[k] += w[c + k] * x[c + k];
  for (int k = 0; c + k < C; ++k) acc[k] += w[c + k] * x[c + k];
  float s = 0.0f;
  for (int k = 0; k < LANES; ++k) s += acc[k];
  return s;
}

// out[t, r] for r in [r0, r1): x [T, C] fp32 against w's rows (row buffer: C floats of scratch)
inline void linear_rows(const float* x, int64_t T, int64_t C, const uint8_t* w, const float* scales, int64_t R,
                        int64_t br, int64_t bc, bool bf16, int64_t r0, int64_t r1, float* row, float* out) {
  for (int64_t r = r0; r < r1; ++r) {
    decode_row(w, scales, r, C, br, bc, bf16, row);
    for (int64_t t = 0; t < T; ++t) out[t * R + r] = dot(row, x + t * C, C);
  }
}

}  // namespace fp8
