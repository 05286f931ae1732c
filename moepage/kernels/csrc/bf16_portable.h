// The portable core of moepage's bf16 decode kernels: one source for every CPU, written with GCC/clang vector
// extensions (8 fp32 lanes) that the compiler lowers to the ISA it builds for: two 128-bit NEON registers on
// aarch64, one ymm on AVX2 (+FMA, F16C) x86, SSE2 anywhere else. No torch, no intrinsics: tests cross-compile it
// for aarch64 and run it under qemu against the x86 build (tests/test_portable_kernels.py).
//
// Shape legend: K input features, N output rows, R query heads sharing one kv head, P cached positions,
// D head dim.
//
// The arithmetic is defined, not left to the ISA: bf16 -> fp32 by shifts (each 32-bit lane's low half << 16 is the
// even value, its high half masked is the odd one), activations widened once into that order, four fp32
// accumulators in a fixed pattern (see dot) and a fixed reduction tree. bf16 x bf16 products are exact in fp32, and
// the module is built with -ffp-contract=off, so exp and the norms round the same everywhere: any two builds of this
// file give the same bits (tests/test_portable_kernels.py runs an aarch64 build under qemu against the x86 one).
// They differ from the AVX512-BF16 path (vdpbf16ps) and from torch by the order of fp32 additions only.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace bf16p {

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

// bf16 <-> fp32 with c10::BFloat16's semantics (round to nearest even; NaN -> 0x7FC0).
inline float to_f32(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t to_bf16(float f) {
  if (std::isnan(f)) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + ((u >> 16) & 1) + 0x7FFFu) >> 16);
}

inline float round_bf16(float f) { return to_f32(to_bf16(f)); }

// 16 bf16 values as two fp32 vectors, by shifts alone: each 32-bit lane holds values 2l (low half) and 2l + 1
// (high half); `even` = lane << 16, `odd` = lane & 0xFFFF0000. Activations are stored in the same order
// (widen_permuted), so a dot product needs no shuffle on any ISA.
struct Pair {
  f32x8 even, odd;
};

inline Pair split(u32x8 v) { return {reinterpret_cast<f32x8>(v << 16), reinterpret_cast<f32x8>(v & 0xFFFF0000u)}; }

inline Pair load_bf16x16(const uint16_t* p) {
  u32x8 v;
  std::memcpy(&v, p, sizeof v);
  return split(v);
}

inline f32x8 load_f32x8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store_f32x8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof v); }

inline float hsum(f32x8 a) {
  const float s04 = a[0] + a[4], s26 = a[2] + a[6], s15 = a[1] + a[5], s37 = a[3] + a[7];
  return (s04 + s26) + (s15 + s37);
}

inline int64_t padded(int64_t K) { return (K + 15) / 16 * 16; }

// x bf16 [K] -> fp32 [padded(K)] in load_bf16x16's order: per 16 values, the 8 even ones, then the 8 odd ones;
// zeros past K.
inline void widen_permuted(const uint16_t* x, int64_t K, float* out) {
  for (int64_t c = 0; c < K; c += 16)
    for (int64_t i = 0; i < 16; ++i) out[c + (i % 2) * 8 + i / 2] = c + i < K ? to_f32(x[c + i]) : 0.0f;
}

constexpr int64_t PREFETCH_AHEAD_BYTES = 4096;  // as the AVX-512 path: one weight row streamed 4 KB ahead into L2

// sum_k w[k] * x[k]: w bf16 [K], xp the activation from widen_permuted. Chunk c of 16 values adds its even half to
// accumulator 2 (c % 2), its odd half to 2 (c % 2) + 1; a last partial chunk is zero-padded (0 * 0 adds nothing).
inline float dot(const uint16_t* w, const float* xp, int64_t K) {
  f32x8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __builtin_prefetch(reinterpret_cast<const char*>(w + k) + PREFETCH_AHEAD_BYTES, 0, 2);
    const Pair p = load_bf16x16(w + k), q = load_bf16x16(w + k + 16);
    a0 += p.even * load_f32x8(xp + k);
    a1 += p.odd * load_f32x8(xp + k + 8);
    a2 += q.even * load_f32x8(xp + k + 16);
    a3 += q.odd * load_f32x8(xp + k + 24);
  }
  if (k < K) {
    Pair p;
    if (k + 16 <= K) {
      p = load_bf16x16(w + k);
    } else {
      uint16_t t[16] = {};
      std::memcpy(t, w + k, (K - k) * sizeof(uint16_t));
      p = load_bf16x16(t);
    }
    a0 += p.even * load_f32x8(xp + k);
    a1 += p.odd * load_f32x8(xp + k + 8);
    k += 16;
  }
  if (k < K) {
    uint16_t t[16] = {};
    std::memcpy(t, w + k, (K - k) * sizeof(uint16_t));
    const Pair p = load_bf16x16(t);
    a2 += p.even * load_f32x8(xp + k);
    a3 += p.odd * load_f32x8(xp + k + 8);
  }
  return hsum((a0 + a1) + (a2 + a3));
}

// out[m * ldo + n] = dot(w row n, x row m) for n in [n0, n1), m < M; xp [M, padded(K)] from widen_permuted,
// w bf16 [N, K]. Every activation row gets the sums a one-row call gives it (row-invariant); each weight row is read
// from memory once.
inline void gemv_rows(const float* xp, int64_t M, const uint16_t* w, int64_t K, int64_t n0, int64_t n1, float* out,
                      int64_t ldo) {
  const int64_t Kp = padded(K);
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) out[m * ldo + n] = dot(w + n * K, xp + m * Kp, K);
}

// exp(x) for x <= 0 (softmax after subtracting the max), 8 lanes: Cephes' expf polynomial, ~1 ulp; exactly 0 below
// -80, so no product with a softmax weight turns subnormal (those weights are < 2e-35 of the largest, invisible in a
// bf16 output).
inline f32x8 exp_nonpositive(f32x8 x) {
  const i32x8 live = x >= -80.0f;
  x = x >= -80.0f ? x : f32x8{} - 80.0f;
  const f32x8 magic = f32x8{} + 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to nearest even
  const f32x8 n = (x * 1.44269504088896341f + magic) - magic;
  f32x8 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  f32x8 p = f32x8{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r) * r + (r + 1.0f);
  const i32x8 scale_bits = (__builtin_convertvector(n, i32x8) + 127) << 23;  // 2^n, n in [-116, 0]
  const f32x8 e = p * reinterpret_cast<f32x8>(scale_bits);
  return reinterpret_cast<f32x8>(reinterpret_cast<i32x8>(e) & live);
}

// The R query heads (qp [R, padded(D)] from widen_permuted) that share one kv head attend to its P cached
// positions k, v [>=P, D] (bf16 rows of D): out [R, D] bf16. s [R, P] and o [R, padded(D)] are scratch. Softmax as
// SDPA's CPU kernel: fp32 exp and sum, weights rounded to bf16 before they multiply V, output divided by the fp32
// sum and rounded to bf16. V rows are summed position by position (each product exact: bf16 x bf16).
inline void attend_kv_head(const float* qp, int64_t R, const uint16_t* k, const uint16_t* v, int64_t P, int64_t D,
                           float scale, float* s, float* o, uint16_t* out) {
  const int64_t Dp = padded(D), Dv = D - D % 16;
  for (int64_t p = 0; p < P; ++p)
    for (int64_t j = 0; j < R; ++j) s[j * P + p] = dot(k + p * D, qp + j * Dp, D) * scale;
  for (int64_t j = 0; j < R; ++j) {
    float* sj = s + j * P;
    float mx = -INFINITY;
    for (int64_t p = 0; p < P; ++p) mx = sj[p] > mx ? sj[p] : mx;
    f32x8 acc = {};
    for (int64_t p = 0; p < P; p += 8) {
      const int64_t n = P - p < 8 ? P - p : 8;
      float t[8];
      for (int i = 0; i < 8; ++i) t[i] = i < n ? sj[p + i] - mx : -INFINITY;  // padding: exp -> 0
      const f32x8 e = exp_nonpositive(load_f32x8(t));
      acc += e;
      for (int i = 0; i < n; ++i) sj[p + i] = round_bf16(e[i]);
    }
    const float sum = hsum(acc);
    float* oj = o + j * Dp;
    for (int64_t d = 0; d < Dp; ++d) oj[d] = 0.0f;
    for (int64_t p = 0; p < P; ++p) {
      const float wp = sj[p];
      const uint16_t* vr = v + p * D;
      for (int64_t d = 0; d < Dv; d += 16) {
        const Pair vv = load_bf16x16(vr + d);
        store_f32x8(oj + d, load_f32x8(oj + d) + vv.even * wp);
        store_f32x8(oj + d + 8, load_f32x8(oj + d + 8) + vv.odd * wp);
      }
      for (int64_t d = Dv; d < D; ++d) oj[d] += to_f32(vr[d]) * wp;  // the tail in natural order
    }
    for (int64_t d = 0; d < Dv; ++d) out[j * D + d] = to_bf16(oj[(d / 16) * 16 + (d % 2) * 8 + (d % 16) / 2] / sum);
    for (int64_t d = Dv; d < D; ++d) out[j * D + d] = to_bf16(oj[d] / sum);
  }
}

// RMSNorm of one bf16 row (fp32 accumulation, reference rounding); in is read before out is written (out may be in).
inline void rms_norm_row(const uint16_t* in, const uint16_t* w, int64_t D, double eps, uint16_t* out) {
  float ss = 0.0f;
  for (int64_t d = 0; d < D; ++d) {
    const float v = to_f32(in[d]);
    ss += v * v;
  }
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
  for (int64_t d = 0; d < D; ++d) out[d] = to_bf16(to_f32(w[d]) * round_bf16(to_f32(in[d]) * inv));
}

// Rotary embedding of one head's row, rotate-half form: out = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin));
// out may be x (each pair d, d + D/2 is read before it is written). D even.
inline void rope_row(const uint16_t* x, const uint16_t* cos, const uint16_t* sin, int64_t D, uint16_t* out) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < half; ++d) {
    const float a = to_f32(x[d]), b = to_f32(x[d + half]);
    out[d] = to_bf16(round_bf16(a * to_f32(cos[d])) + round_bf16(-b * to_f32(sin[d])));
    out[d + half] = to_bf16(round_bf16(b * to_f32(cos[d + half])) + round_bf16(a * to_f32(sin[d + half])));
  }
}

}  // namespace bf16p
