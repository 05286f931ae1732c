// Quantized GEMMs for prompts (many activation rows) with ggml's own CPU kernels (included by ggml_gemm.cpp):
// every activation row converted once to the weight type's vec_dot type (ggml's from_float, as for one decode
// token), then each weight tile multiplied by every row while it is in cache: 8-row interleaved Q4_K through ggml's
// `gemm_q4_K_8x8_q8_K` (4 activation rows x 8 weight rows a pass; the rows' Q8_K blocks rearranged into its 4-row
// layout, the same bytes; a last group of fewer than 4 rows padded with copies of its last row), every other type
// through `vec_dot` per (weight row, activation row) pair.
//
// Row invariance: each output is one weight row (or 8-row group) against one converted activation row, and the
// gemm computes each of its 4 rows on its own (the same operations whatever the other 3 hold), so a row's result
// does not depend on how many rows a call has, on their grouping, the tiling or the threads. vec_dot rows are bit
// for bit the decode's; gemm rows differ from the decode's gemv in the last bits (another summation order), so
// prompt rows never mix the two (tests/test_quant_prefill.py).
//
// Shape legend: M activation rows, K input features, N weight rows (outputs), B blocks of 256 per row,
// T tokens, H hidden, I expert intermediate size, A routed (token, expert) pairs, E experts of the layer.
#pragma once

#include "ggml_cpu_core.h"
#include "ggml_q4k_gemm_avx512.h"

namespace {

// silu as the decode's experts compute it (ggml_cpu_experts.h), so a prompt row's activation is the decode's bits
inline float prefill_silu(float v) { return v / (1.0f + std::exp(-v)); }

struct GemmKernels {
  gemv_t gemm_q4_k_x8 = nullptr;  // ggml_gemm_q4_K_8x8_q8_K, where the interleaved layout has its gemv
  bool use_gemm = true;           // off: every interleaved row through the gemv (the tests compare the two)
};
GemmKernels gemm_kernels;

constexpr int64_t Q8_K_BLOCK = 292, Q8_KX4_BLOCK = 4 * Q8_K_BLOCK;

// The interleaved Q4_K gemm: ours where it gives the library's (AVX2) bits faster, else the library's.
inline void gemm_q4_k_x8(int n, float* s, size_t bs, const void* vx, const void* vy, int nr, int nc) {
#if defined(MOEPAGE_HAS_Q4K_X8_AVX512)
  if (own_replaces_avx2()) return gemm_q4_k_x8_avx512(n, s, bs, vx, vy, nr, nc, gemm_kernels.gemm_q4_k_x8);
#endif
  gemm_kernels.gemm_q4_k_x8(n, s, bs, vx, vy, nr, nc);
}

// 4 rows of Q8_K blocks -> ggml's block_q8_Kx4 (d[4], qs[1024] eight bytes of each row in turn, bsums[64] four of
// each row in turn): a permutation of the bytes, so the 4-row gemm reads exactly the values from_float gave.
inline void interleave_q8_k_rows(const uint8_t* const rows[4], uint8_t* out, int64_t B) {
  for (int64_t b = 0; b < B; ++b) {
    uint8_t* o = out + b * Q8_KX4_BLOCK;
    for (int r = 0; r < 4; ++r) {
      const uint8_t* in = rows[r] + b * Q8_K_BLOCK;
      std::memcpy(o + 4 * r, in, 4);  // d
      for (int c = 0; c < 32; ++c) std::memcpy(o + 16 + c * 32 + r * 8, in + 4 + c * 8, 8);
      for (int g = 0; g < 16; ++g) std::memcpy(o + 16 + 1024 + 2 * ((g >> 2) * 16 + r * 4 + (g & 3)), in + 260 + 2 * g, 2);
    }
  }
}

// One product: out[m * ldo + n] = weight row n . activation row m (rows[m]: w's vec_dot type), n < N, m < M.
// x4: the M rows as ceil(M / 4) block_q8_Kx4 groups for the interleaved gemm (null: each row through the gemv).
struct Product {
  const uint8_t* w;
  const Kind* k;
  int64_t N, K;
  const uint8_t* const* rows;
  int64_t M;
  const uint8_t* x4;
  float* out;
  int64_t ldo;
};

constexpr int64_t SUBTILE = 16;  // weight rows a vec_dot pass keeps in L1 while every activation row goes by

inline void product_tile(const Product& p, int64_t n0, int64_t n1) {
  const int64_t wb = p.k->row_bytes(p.K);
  if (p.k->gemv != nullptr && p.x4 != nullptr) {  // 8-row interleaved through the gemm: n0, n1 multiples of 8
    const int64_t full = p.M & ~int64_t(3), nc = n1 - n0;
    if (full > 0) gemm_q4_k_x8(p.K, p.out + n0, p.ldo, p.w + n0 * wb, p.x4, full, nc);
    if (p.M > full) {  // the padded last group into scratch, its real rows copied out
      std::vector<float> tmp(4 * nc);
      gemm_q4_k_x8(p.K, tmp.data(), nc, p.w + n0 * wb, p.x4 + full * (p.K / 256) * Q8_K_BLOCK, 4, nc);
      for (int64_t m = full; m < p.M; ++m)
        std::memcpy(p.out + m * p.ldo + n0, tmp.data() + (m - full) * nc, nc * sizeof(float));
    }
    return;
  }
  if (p.k->gemv != nullptr) {
    for (int64_t m = 0; m < p.M; ++m) p.k->gemv(p.K, p.out + m * p.ldo + n0, p.ldo, p.w + n0 * wb, p.rows[m], 1, n1 - n0);
    return;
  }
  for (int64_t s0 = n0; s0 < n1; s0 += SUBTILE) {
    const int64_t s1 = std::min(n1, s0 + SUBTILE);
    for (int64_t m = 0; m < p.M; ++m)
      for (int64_t n = s0; n < s1; ++n)
        p.k->vec_dot(p.K, p.out + m * p.ldo + n, 0, p.w + n * wb, 0, p.rows[m], 0, 1);
  }
}

// Weight rows per task: about 32 KiB of weights, a multiple of 16 rows (the AVX-512 gemm takes 8-row groups in
// pairs; an odd one goes through the library's kernel).
inline int64_t tile_rows(const Product& p) {
  const int64_t wb = p.k->row_bytes(p.K);
  return std::max<int64_t>(16, (32 * 1024 / std::max<int64_t>(1, wb)) & ~int64_t(15));
}

// Every product's tiles in one parallel region.
inline void run_products(const std::vector<Product>& ps) {
  std::vector<int64_t> first(ps.size() + 1, 0), per(ps.size());
  int64_t work = 0;
  for (size_t i = 0; i < ps.size(); ++i) {
    per[i] = tile_rows(ps[i]);
    first[i + 1] = first[i] + (ps[i].M > 0 ? (ps[i].N + per[i] - 1) / per[i] : 0);
    work += ps[i].N * ps[i].k->row_bytes(ps[i].K) * std::max<int64_t>(1, ps[i].M);
  }
  parallel(first.back(), [&](int64_t task) {
    const size_t i = std::upper_bound(first.begin(), first.end(), task) - first.begin() - 1;
    const int64_t n0 = (task - first[i]) * per[i];
    product_tile(ps[i], n0, std::min(ps[i].N, n0 + per[i]));
  }, work);
}

// Activation rows converted for kind k: x [M, K] float32 -> M rows of k's vec_dot type, in parallel.
inline std::vector<uint8_t> convert_rows(const float* x, int64_t M, int64_t K, const Kind& k) {
  TORCH_CHECK(K % k.dot->blck_size == 0, K, " activations are not a multiple of the ", k.dot->type_name,
              " block size ", k.dot->blck_size);
  const int64_t rb = k.dot_row_bytes(K);
  std::vector<uint8_t> out(M * rb);
  if (k.cpu->vec_dot_type == TYPE_F32) {
    std::memcpy(out.data(), x, M * K * sizeof(float));
    return out;
  }
  parallel(M, [&](int64_t m) { k.dot_cpu->from_float(x + m * K, out.data() + m * rb, K); }, M * K * 4);
  return out;
}

// Whether products with kind k use the 4-row gemm (then their rows need a block_q8_Kx4 copy).
inline bool gemm_applies(const Kind& k) {
  return k.gemv != nullptr && gemm_kernels.use_gemm && gemm_kernels.gemm_q4_k_x8 != nullptr;
}

// The M rows as ceil(M / 4) block_q8_Kx4 groups (the last padded with its last row), appended to buf; returns the
// offset of the first group.
inline size_t append_x4(std::vector<uint8_t>& buf, const uint8_t* const* rows, int64_t M, int64_t K) {
  const int64_t B = K / 256, M4 = (M + 3) & ~int64_t(3);
  const size_t at = buf.size();
  buf.resize(at + M4 * B * Q8_K_BLOCK);
  for (int64_t m = 0; m < M4; m += 4) {
    const uint8_t* group[4];
    for (int r = 0; r < 4; ++r) group[r] = rows[std::min(m + r, M - 1)];
    interleave_q8_k_rows(group, buf.data() + at + m * B * Q8_K_BLOCK, B);
  }
  return at;
}

}  // namespace
