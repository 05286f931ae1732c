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
#include <vector>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

namespace fp8 {

constexpr int LANES = 16;  // partial sums of dot(): lane k sums the products at columns c with c % 16 == k

// E4M3 (fn: no infinities, S.1111.111 is NaN): (-1)^s 2^(e-7) (1 + m/8), subnormals 2^-6 (m/8); built from bits
// (no table, no fp32 subnormal: flush-to-zero modes cannot change it) so the loops below vectorise; exact in fp32
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

// 16 values at a time with the compiler's generic vectors (GCC and clang lower them to the target's registers:
// SSE2 / AVX2 / AVX-512 on x86, NEON on aarch64). Every operation is elementwise IEEE or integer, so the vectors
// compute exactly what the scalar functions above do, lane by lane.
typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));

inline v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store16(float* p, v16f v) { std::memcpy(p, &v, sizeof v); }

inline v16u select(v16u mask, v16u a, v16u b) { return (a & mask) | (b & ~mask); }

// 16 bytes zero-extended to 16 lanes (integer moves only: every target gives the same lanes)
inline v16u widen16(const uint8_t* p) {
#if defined(__AVX512F__)
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return (v16u)v;
#elif defined(__AVX2__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i lo = _mm256_cvtepu8_epi32(b), hi = _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));
  v16u r;
  std::memcpy(&r, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&r) + 32, &hi, 32);
  return r;
#elif defined(__ARM_NEON)
  const uint8x16_t b = vld1q_u8(p);
  const uint16x8_t lo = vmovl_u8(vget_low_u8(b)), hi = vmovl_u8(vget_high_u8(b));
  const uint32x4_t q[4] = {vmovl_u16(vget_low_u16(lo)), vmovl_u16(vget_high_u16(lo)), vmovl_u16(vget_low_u16(hi)),
                           vmovl_u16(vget_high_u16(hi))};
  v16u r;
  std::memcpy(&r, q, sizeof r);
  return r;
#else
  v16u r;
  for (int k = 0; k < LANES; ++k) r[k] = p[k];
  return r;
#endif
}

// e4m3_bits of 16 bytes
inline v16u e4m3_bits16(const uint8_t* p) {
  const v16u raw = widen16(p);
  const v16u u = raw & 0x7fu;
  const v16u normal = (u << 20) + (120u << 23);
  const v16u sub = (v16u)((v16f)((121u << 23) | ((u & 7u) << 20)) - 0.015625f);
  v16u bits = select((v16u)(u >= 8u), normal, sub);
  bits = select((v16u)(u == 0x7fu), v16u{} + 0x7fc00000u, bits);
  return bits | ((raw & 0x80u) << 24);
}

// round_bf16 of 16 values
inline v16f round_bf16_16(v16f f) {
  const v16u u = (v16u)f;
  const v16u nan = (v16u)((u & 0x7fffffffu) > 0x7f800000u);
  return (v16f)select(nan, (u | 0x00400000u) & 0xffff0000u, (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u);
}

// 16 decoded values times their scales (a vector: one block's scale broadcast, or one scale per column)
inline v16f value16(const uint8_t* p, v16f scale, bool bf16) {
  const v16f v = (v16f)e4m3_bits16(p) * scale;
  return bf16 ? round_bf16_16(v) : v;
}

inline float value1(uint8_t b, float scale, bool bf16) {
  const float v = e4m3_value(b) * scale;
  return bf16 ? round_bf16(v) : v;
}

// row r of w [R, C] decoded into out [C]: the values, times their block's scale (one fp32 multiply, as
// transformers' E4M3 -> float32 times scale_inv), then (bf16) rounded
inline void decode_row(const uint8_t* w, const float* scales, int64_t r, int64_t C, int64_t br, int64_t bc,
                       bool bf16, float* out) {
  const int64_t gc = (C + bc - 1) / bc;
  const float* srow = scales + (r / br) * gc;
  const uint8_t* wr = w + r * C;
  int64_t c = 0;
  if (bc % LANES == 0) {  // a 16-column chunk lies in one block: its scale broadcast
    for (; c + LANES <= C; c += LANES) store16(out + c, value16(wr + c, v16f{} + srow[c / bc], bf16));
  } else {  // each column's scale, then the values in place
    for (int64_t k = 0; k < C; ++k) out[k] = srow[k / bc];
    for (; c + LANES <= C; c += LANES) store16(out + c, value16(wr + c, load16(out + c), bf16));
  }
  for (; c < C; ++c) out[c] = value1(wr[c], srow[c / bc], bf16);
}

// the 16 lane sums in order (lane k summed the products at columns c with c % 16 == k)
inline float lanes_sum(v16f acc) {
  float s = 0.0f;
  for (int k = 0; k < LANES; ++k) s += acc[k];
  return s;
}

// sum_c w[c] x[c] in a fixed order: 16 lane sums (the tail goes to its lanes), then the lanes in order
inline float dot(const float* w, const float* x, int64_t C) {
  v16f acc = {};
  int64_t c = 0;
  for (; c + LANES <= C; c += LANES) acc += load16(w + c) * load16(x + c);
  for (int k = 0; c + k < C; ++k) acc[k] += w[c + k] * x[c + k];
  return lanes_sum(acc);
}

// out[r] for one activation row and ROWS weight rows r0.. decoded on the fly (16 values of each row per step, the
// activation chunk loaded once for all), the products summed as dot() sums them: the same bits as decode_row + dot
template <int ROWS>
inline void fused_rows(const float* x, int64_t C, const uint8_t* w, const float* scales, int64_t br, int64_t bc,
                       bool bf16, int64_t r0, float* out) {
  const int64_t gc = (C + bc - 1) / bc;
  const uint8_t* wr[ROWS];
  const float* srow[ROWS];
  v16f acc[ROWS];
  for (int i = 0; i < ROWS; ++i) {
    wr[i] = w + (r0 + i) * C;
    srow[i] = scales + ((r0 + i) / br) * gc;
    acc[i] = v16f{};
  }
  int64_t c = 0;
  for (int64_t c0 = 0; c0 + LANES <= C; c0 += bc) {  // one block column at a time (bc a multiple of 16)
    const int64_t c1 = c0 + bc <= C ? c0 + bc : C;
    v16f s[ROWS];
    for (int i = 0; i < ROWS; ++i) s[i] = v16f{} + srow[i][c0 / bc];
    for (c = c0; c + LANES <= c1; c += LANES) {
      const v16f xv = load16(x + c);
      for (int i = 0; i < ROWS; ++i) acc[i] += value16(wr[i] + c, s[i], bf16) * xv;
    }
  }
  for (int i = 0; i < ROWS; ++i) {
    for (int64_t k = c; k < C; ++k) acc[i][k - c] += value1(wr[i][k], srow[i][k / bc], bf16) * x[k];
    out[i] = lanes_sum(acc[i]);
  }
}

#if defined(__AVX512BW__)
// bf16 mode, one activation row, bc a multiple of 32 (AVX-512BW): within a block every value is one of 128
// magnitudes (its scale fixed), so each block's 128 bf16 values, computed by value16 as above, become a table that
// 32 bytes at a time index (vpermt2w); the byte's sign flips the entry's (-(v s) = (-v) s, and round_bf16 is
// symmetric). The tables of a block row are made once for all its rows; each row is then read start to end. The
// products and the lane sums are fused_rows' in the same order: the same bits.
inline void bf16_table_rows(const float* x, int64_t C, const uint8_t* w, const float* scales, int64_t br,
                            int64_t bc, int64_t r0, int64_t r1, float* out) {
  alignas(64) static const uint8_t codes[128] = {
      0,   1,   2,   3,   4,   5,   6,   7,   8,   9,   10,  11,  12,  13,  14,  15,  16,  17,  18,  19,  20,  21,
      22,  23,  24,  25,  26,  27,  28,  29,  30,  31,  32,  33,  34,  35,  36,  37,  38,  39,  40,  41,  42,  43,
      44,  45,  46,  47,  48,  49,  50,  51,  52,  53,  54,  55,  56,  57,  58,  59,  60,  61,  62,  63,  64,  65,
      66,  67,  68,  69,  70,  71,  72,  73,  74,  75,  76,  77,  78,  79,  80,  81,  82,  83,  84,  85,  86,  87,
      88,  89,  90,  91,  92,  93,  94,  95,  96,  97,  98,  99,  100, 101, 102, 103, 104, 105, 106, 107, 108, 109,
      110, 111, 112, 113, 114, 115, 116, 117, 118, 119, 120, 121, 122, 123, 124, 125, 126, 127};
  const int64_t gc = (C + bc - 1) / bc;
  std::vector<uint16_t> tables(128 * gc);  // [gc, 128]: a block's 128 bf16 values
  const __m512i sign_bit = _mm512_set1_epi16(static_cast<short>(0x8000)), high = _mm512_set1_epi16(0x40);
  for (int64_t g0 = r0; g0 < r1;) {
    const int64_t block_end = (g0 / br + 1) * br;  // the rows of one scale row
    const int64_t g1 = r1 < block_end ? r1 : block_end;
    const float* srow = scales + (g0 / br) * gc;
    for (int64_t g = 0; g < gc; ++g) {
      uint16_t* table = tables.data() + 128 * g;
      for (int k = 0; k < 128; k += LANES) {
        const __m512i bits = (__m512i)value16(codes + k, v16f{} + srow[g], true);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(table + k), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
      }
    }
    for (int64_t r = g0; r < g1; ++r) {
      const uint8_t* wr = w + r * C;
      v16f a = {};
      for (int64_t c0 = 0, g = 0; c0 < C; c0 += bc, ++g) {
        const int64_t c1 = c0 + bc < C ? c0 + bc : C;
        const uint16_t* table = tables.data() + 128 * g;
        const __m512i t0 = _mm512_loadu_si512(table), t1 = _mm512_loadu_si512(table + 32);
        const __m512i t2 = _mm512_loadu_si512(table + 64), t3 = _mm512_loadu_si512(table + 96);
        int64_t c = c0;
        for (; c + 32 <= c1; c += 32) {
          const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + c)));
          const __m512i lo = _mm512_permutex2var_epi16(t0, b, t1), hi = _mm512_permutex2var_epi16(t2, b, t3);
          __m512i v = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(b, high), lo, hi);
          v = _mm512_xor_si512(v, _mm512_and_si512(_mm512_slli_epi16(b, 8), sign_bit));
          const v16f f0 = (v16f)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16);
          const v16f f1 = (v16f)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16);
          a += f0 * load16(x + c);
          a += f1 * load16(x + c + LANES);
        }
        for (; c + LANES <= c1; c += LANES) a += value16(wr + c, v16f{} + srow[g], true) * load16(x + c);
        for (int64_t k = c; k < c1; ++k) a[k - c] += value1(wr[k], srow[g], true) * x[k];  // the ragged last block
      }
      out[r] = lanes_sum(a);
    }
    g0 = g1;
  }
}
#endif

// out[t, r] for r in [r0, r1): x [T, C] fp32 against w's rows (row buffer: C floats of scratch)
inline void linear_rows(const float* x, int64_t T, int64_t C, const uint8_t* w, const float* scales, int64_t R,
                        int64_t br, int64_t bc, bool bf16, int64_t r0, int64_t r1, float* row, float* out) {
  int64_t r = r0;
#if defined(__AVX512BW__)
  if (T == 1 && bf16 && bc % 32 == 0) return bf16_table_rows(x, C, w, scales, br, bc, r0, r1, out);
#endif
  if (T == 1 && bc % LANES == 0) {  // one token: no row buffer, four rows a pass
    float o[4];
    for (; r + 4 <= r1; r += 4) {
      fused_rows<4>(x, C, w, scales, br, bc, bf16, r, o);
      for (int i = 0; i < 4; ++i) out[r + i] = o[i];
    }
    for (; r < r1; ++r) fused_rows<1>(x, C, w, scales, br, bc, bf16, r, out + r);
    return;
  }
  for (; r < r1; ++r) {
    decode_row(w, scales, r, C, br, bc, bf16, row);
    for (int64_t t = 0; t < T; ++t) out[t * R + r] = dot(row, x + t * C, C);
  }
}

}  // namespace fp8
