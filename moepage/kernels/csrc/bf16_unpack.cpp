// Decoder of moepage's lossless 12-bit bf16 encoding (moepage/paging/bf16_12bit.py writes it).
//
// One tensor of N bf16 values, B = ceil(N / 64) blocks of 64 values:
//   lo    uint8 [N]       the low byte of each value (7 mantissa bits and the lowest exponent bit)
//   codes uint8 [B * 32]  byte j of block b: the code of value 64b+j in its low nibble, of value 64b+32+j in its high
//                         nibble; code c < 15 means high byte lut[c], code 15 means "the next byte of exc"
//   exc   uint8 [X]       the high bytes of the escaped values, in order
//   lut   uint8 [16]
// Two builds of one module, chosen by the build target's macros (kernels/native.py compiles it for the machine):
// with AVX512-VBMI2 and AVX512-BF16 a block decodes with one shuffle (the table lookup), one masked expand-load (the
// escapes) and two unpacks, and the matvec is vdpbf16ps (bf16_decode's AVX512-BF16 sums); everywhere else
// bf16_12bit.h's portable decoder (pshufb on AVX2, tbl on NEON) and bf16_portable.h's sums. Either way the matvec is
// bit for bit the bf16_decode module's linear() of the same build on the decoded matrix. (A target with AVX512-BF16
// but no VBMI2 gets the decoder only: no decoder here matches its vdpbf16ps sums' order.)
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "bf16_12bit.h"
#include "thread_pool.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI2__) && defined(__AVX512BF16__)
#define MOEPAGE_12BIT_AVX512 1
#include <immintrin.h>

#include "bf16_12bit_avx512.h"
#endif
#if defined(MOEPAGE_12BIT_AVX512) || !defined(__AVX512BF16__)
#define MOEPAGE_12BIT_LINEAR 1  // the matvec's sums are bf16_decode's on this target
#endif

namespace {

// Rows per task of the matvec: about 64 KB of packed weights (as bf16_decode sizes its tasks), a multiple of 4.
inline int64_t rows_per_task(int64_t K) { return std::max<int64_t>(4, (64 * 1024 / std::max<int64_t>(1, K + K / 2)) & ~3); }

constexpr uint8_t ESCAPE = 15;

#ifdef MOEPAGE_12BIT_AVX512
// Values [from, n) of the last, partial block, one at a time; returns the escapes used.
int64_t unpack_tail(const uint8_t* lo, const uint8_t* codes, const uint8_t* exc, int64_t exc_left, const uint8_t* lut,
                    int64_t from, int64_t n, uint16_t* out) {
  int64_t used = 0;
  for (int64_t i = from; i < n; ++i) {
    const int64_t j = i % 64, block = i / 64;
    const uint8_t byte = codes[block * 32 + (j % 32)];
    const uint8_t code = j < 32 ? (byte & 0x0F) : (byte >> 4);
    uint8_t hi;
    if (code == ESCAPE) {
      TORCH_CHECK(used < exc_left, "bf16-12bit: more escaped values than escape bytes (corrupt expert shard)");
      hi = exc[used++];
    } else {
      hi = lut[code];
    }
    out[i] = static_cast<uint16_t>(lo[i]) | (static_cast<uint16_t>(hi) << 8);
  }
  return used;
}

using bf16x12avx512::decode_block;
#endif

}  // namespace

// out bf16 [N] <- the encoded tensor; checks every escape has its byte and every escape byte is used.
void unpack_bf16(const torch::Tensor& lo, const torch::Tensor& codes, const torch::Tensor& exc, const torch::Tensor& lut,
                 torch::Tensor& out) {
  TORCH_CHECK(lo.dtype() == torch::kUInt8 && codes.dtype() == torch::kUInt8 && exc.dtype() == torch::kUInt8 &&
              lut.dtype() == torch::kUInt8, "bf16-12bit: the parts are uint8");
  TORCH_CHECK(out.dtype() == torch::kBFloat16 && out.is_contiguous() && lo.is_contiguous() && codes.is_contiguous() &&
              exc.is_contiguous() && lut.is_contiguous(), "bf16-12bit: contiguous parts and a contiguous bf16 output");
  const int64_t n = out.numel();
  const int64_t blocks = (n + 63) / 64;
  TORCH_CHECK(lo.numel() == n, "bf16-12bit: ", lo.numel(), " low bytes for ", n, " values");
  TORCH_CHECK(codes.numel() == blocks * 32, "bf16-12bit: ", codes.numel(), " code bytes for ", n, " values (want ",
              blocks * 32, ")");
  TORCH_CHECK(lut.numel() == 16, "bf16-12bit: the table has ", lut.numel(), " entries, not 16");
  const uint8_t* l = lo.data_ptr<uint8_t>();
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const uint8_t* e = exc.data_ptr<uint8_t>();
  const uint8_t* t = lut.data_ptr<uint8_t>();
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t exc_n = exc.numel();
#ifdef MOEPAGE_12BIT_AVX512
  const int64_t full = n / 64;
  const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
  const uint8_t* next = e;
  for (int64_t b = 0; b < full; ++b) {
    __m512i w0, w1;
    TORCH_CHECK(decode_block(l + b * 64, c + b * 32, next, exc_n - (next - e), table, w0, w1),
                "bf16-12bit: more escaped values than escape bytes (corrupt expert shard)");
    _mm512_storeu_si512(o + b * 64, w0);
    _mm512_storeu_si512(o + b * 64 + 32, w1);
  }
  int64_t used = next - e;
  used += unpack_tail(l, c, e + used, exc_n - used, t, full * 64, n, o);
#else
  const int64_t used = bf16x12::unpack(l, c, e, exc_n, t, n, o);
  TORCH_CHECK(used >= 0, "bf16-12bit: more escaped values than escape bytes (corrupt expert shard)");
#endif
  TORCH_CHECK(used == exc_n, "bf16-12bit: ", exc_n, " escape bytes for ", used, " escaped values (corrupt expert shard)");
}

#ifdef MOEPAGE_12BIT_AVX512
namespace {

constexpr int64_t PREFETCH_AHEAD = 4096;  // bytes of low bytes ahead (codes: half of it), as gemv_one_row reads bf16

// out[n] = sum_k x[k] * W[n, k] for rows [n0, n1) of a matrix in the 12-bit form (K a multiple of 64, each row's
// escapes starting at row_exc[n], row n's table luts[n / rows_per_table]). The fp32 additions are bf16_decode.cpp's
// gemv_one_row's, in its order, so the result is bit for bit that of the bf16 matrix.
void gemv_12bit_rows(
    const c10::BFloat16* x, const uint8_t* lo, const uint8_t* codes, const uint8_t* exc, const int64_t* row_exc,
    const uint8_t* luts, int64_t rows_per_table, int64_t K, int64_t n0, int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const __m512i table = _mm512_broadcast_i32x4(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(luts + (n / rows_per_table) * 16)));
    const uint8_t* l = lo + n * K;
    const uint8_t* c = codes + n * (K / 2);
    const uint8_t* e = exc + row_exc[n];
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(l + k) + PREFETCH_AHEAD, _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(c + k / 2) + PREFETCH_AHEAD / 2, _MM_HINT_T1);
      __m512i w0, w1;
      decode_block(l + k, c + k / 2, e, std::numeric_limits<int64_t>::max(), table, w0, w1);
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)w0, (__m512bh)_mm512_loadu_si512(x + k));
      a1 = _mm512_dpbf16_ps(a1, (__m512bh)w1, (__m512bh)_mm512_loadu_si512(x + k + 32));
    }
    out[n] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  }
}

}  // namespace
#endif

#ifdef MOEPAGE_12BIT_LINEAR
// x [1, K] @ W^T -> [1, N] bf16 for W [N, K] in the 12-bit form: lo [N*K], codes [N*K/2], exc, row_exc [N+1] int64
// (row n's escapes start at exc[row_exc[n]]), luts [ceil(N / rows_per_table), 16] (one table per block of rows).
torch::Tensor linear_12bit(const torch::Tensor& x, const torch::Tensor& lo, const torch::Tensor& codes,
                           const torch::Tensor& exc, const torch::Tensor& row_exc, const torch::Tensor& luts,
                           int64_t rows_per_table) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "linear_12bit: x must be a contiguous bf16 [1, K]");
  const int64_t K = x.size(1), N = row_exc.numel() - 1;
  TORCH_CHECK(K % 64 == 0 && rows_per_table > 0 && lo.numel() == N * K && codes.numel() == N * K / 2 &&
              luts.numel() == (N + rows_per_table - 1) / rows_per_table * 16 && row_exc.scalar_type() == at::kLong &&
              row_exc[N].item<int64_t>() == exc.numel(),
              "linear_12bit: parts do not fit a [", N, ", ", K, "] matrix");
  auto acc = torch::empty({1, N}, x.options().dtype(at::kFloat));
  const auto* xp = x.data_ptr<at::BFloat16>();
  const uint8_t *l = lo.data_ptr<uint8_t>(), *c = codes.data_ptr<uint8_t>(), *e = exc.data_ptr<uint8_t>();
  const int64_t* r = row_exc.data_ptr<int64_t>();
  const uint8_t* t = luts.data_ptr<uint8_t>();
  float* ap = acc.data_ptr<float>();
  const int64_t per = rows_per_task(K);
#ifdef MOEPAGE_12BIT_AVX512
  const auto rows = [&](int64_t n0, int64_t n1) { gemv_12bit_rows(xp, l, c, e, r, t, rows_per_table, K, n0, n1, ap); };
#else
  std::vector<float> xf(bf16p::padded(K));
  bf16p::widen_permuted(reinterpret_cast<const uint16_t*>(xp), K, xf.data());
  const auto rows = [&](int64_t n0, int64_t n1) {
    bf16x12::gemv_rows(xf.data(), l, c, e, r, t, rows_per_table, K, n0, n1, ap);
  };
#endif
  moepage_pool::parallel_tasks((N + per - 1) / per, at::get_num_threads(),
                               [&](int64_t task) { rows(task * per, std::min(N, (task + 1) * per)); });
  return acc.to(at::kBFloat16);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef MOEPAGE_12BIT_LINEAR
  m.def("linear_12bit", &linear_12bit, "x [1, K] @ W^T for W in the 12-bit form (bf16_decode's linear, bit for bit)",
        py::call_guard<py::gil_scoped_release>());
#endif
  m.def("unpack_bf16", &unpack_bf16, "lossless 12-bit bf16 encoding -> bf16 (releases the GIL: page-in threads)",
        py::call_guard<py::gil_scoped_release>());
#ifdef MOEPAGE_12BIT_AVX512
  m.def("core", [] { return std::string("avx512"); }, "the decoder this build runs: avx512 (VBMI2) or portable");
#else
  m.def("core", [] { return std::string("portable"); }, "the decoder this build runs: avx512 (VBMI2) or portable");
#endif
}
