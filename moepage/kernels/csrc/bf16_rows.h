// Row-invariant multi-row bf16 kernels: B activation rows against one weight matrix, every output element computed
// by exactly the fp32 operations the one-row kernel (bf16_decode's linear with M = 1) uses for it, and every weight
// row read from memory once for all rows while it sits in L1. They call the one-row dot itself
// (avx512bf16::dot_one_row where the target has AVX512-BF16, bf16p::dot elsewhere), so a sequence's logits do not
// depend on what else a batched decode step (engine/batch_step.py) holds; tests/test_bf16_rows.py checks the bytes
// against B one-row calls on the native and the haswell builds.
//
// Shape legend: B activation rows, J rows picked out of them, K input features, N output rows.
#pragma once
#include <cstring>
#include <limits>
#include <vector>

#include "bf16_12bit.h"
#include "bf16_backend.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI2__)
#define MOEPAGE_ROWS_12BIT_AVX512 1
#include "bf16_12bit_avx512.h"
#endif

namespace bf16rows {

using bf16 = c10::BFloat16;

// B activation rows x [B, K] in the form the one-row core reads (bf16 as they are for AVX512-BF16, widened to fp32
// once for the portable core), each addressable on its own.
class CoreRows {
 public:
  CoreRows(const bf16* x, int64_t B, int64_t K) : B_(B), K_(K) {
#ifdef MOEPAGE_BF16_AVX512
    xb_.assign(x, x + B * K);
#else
    stride_ = bf16p::padded(K);
    xf_.resize(B * stride_);
    for (int64_t b = 0; b < B; ++b) bf16p::widen_permuted(bits(x) + b * K, K, xf_.data() + b * stride_);
#endif
  }

  int64_t size() const { return B_; }

  // The one-row dot of activation row b with weight row r [K].
  float dot(int64_t b, const bf16* r) const {
#ifdef MOEPAGE_BF16_AVX512
    return avx512bf16::dot_one_row(xb_.data() + b * K_, r, K_);
#else
    return bf16p::dot(bits(r), xf_.data() + b * stride_, K_);
#endif
  }

  // out[j * ldo + n] = dot(rows[j], w row n) for n in [n0, n1), j < J; w bf16 [N, K]. Weight row outer, activation
  // row inner: row n is read from memory once and from L1 for the other J - 1 rows.
  void gemv(const int64_t* rows, int64_t J, const bf16* w, int64_t n0, int64_t n1, float* out, int64_t ldo) const {
    for (int64_t n = n0; n < n1; ++n) {
      const bf16* r = w + n * K_;
      for (int64_t j = 0; j < J; ++j) out[j * ldo + n] = dot(rows[j], r);
    }
  }

 private:
  int64_t B_, K_, stride_ = 0;
  std::vector<bf16> xb_;
  std::vector<float> xf_;
};

// The 12-bit form of a matrix W [N, K] (moepage/paging/bf16_12bit.py PackedMatrix; K a multiple of 64): row n's low
// bytes at lo + n K, codes at codes + n K / 2, escapes from exc + row_exc[n], table luts + (n / rows_per_table) 16.
struct Packed12 {
  const uint8_t *lo, *codes, *exc;
  const int64_t* row_exc;
  const uint8_t* luts;
  int64_t rows_per_table, K;

  // Row n decoded to bf16 bits out [K] (lossless: the values the bf16 matrix holds).
  void decode_row(int64_t n, uint16_t* out) const {
    const uint8_t* l = lo + n * K;
    const uint8_t* c = codes + n * (K / 2);
    const uint8_t* e = exc + row_exc[n];
    const uint8_t* lut = luts + (n / rows_per_table) * 16;
#ifdef MOEPAGE_ROWS_12BIT_AVX512
    const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut)));
    for (int64_t k = 0; k < K; k += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(l + k) + bf16p::PREFETCH_AHEAD_BYTES, _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(c + k / 2) + bf16p::PREFETCH_AHEAD_BYTES / 2, _MM_HINT_T1);
      __m512i w0, w1;
      bf16x12avx512::decode_block(l + k, c + k / 2, e, std::numeric_limits<int64_t>::max(), table, w0, w1);
      _mm512_storeu_si512(out + k, w0);
      _mm512_storeu_si512(out + k + 32, w1);
    }
    return;
#endif
    for (int64_t k = 0; k < K; k += 64) {
      __builtin_prefetch(l + k + bf16p::PREFETCH_AHEAD_BYTES, 0, 2);
      __builtin_prefetch(c + k / 2 + bf16p::PREFETCH_AHEAD_BYTES / 2, 0, 2);
      bf16p::u32x8 v[4];
      bf16x12::decode(l + k, c + k / 2, lut, e, v);
      std::memcpy(out + k, v, sizeof v);
    }
  }
};

// out[j * ldo + n] = dot(rows[j], W row n) for a 12-bit W, rows [n0, n1): each row decoded once into an L1 buffer,
// then the one-row dot on it for every activation row, so the sums are those of the bf16 matrix's one-row kernel
// (which linear_12bit equals bit for bit).
inline void gemv12(const CoreRows& x, const int64_t* rows, int64_t J, const Packed12& w, int64_t n0, int64_t n1,
                   float* out, int64_t ldo) {
  std::vector<uint16_t> buf(w.K);
  for (int64_t n = n0; n < n1; ++n) {
    w.decode_row(n, buf.data());
    const bf16* r = reinterpret_cast<const bf16*>(buf.data());
    for (int64_t j = 0; j < J; ++j) out[j * ldo + n] = x.dot(rows[j], r);
  }
}

}  // namespace bf16rows
