// GGML-quantized weights on the CPU without dequantizing whole tensors: each block is decoded into registers
// and multiplied with the activations at once (llama.cpp keeps weights quantized the same way).
//
// Shape legend: M activation rows (tokens), K input features (weight columns), N output features (weight rows),
// B values per block, S bytes per block.
//
// The block decoders follow ggml-quants.c's dequantize_row_* float operations one for one (built with
// -ffp-contract=off), so `dequantize` is bit-exact with gguf-py and `linear` equals F.linear over the
// dequantized fp32 weights up to the order of the additions in each dot product.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstring>

namespace {

inline float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

// ---- block decoders: S bytes -> B floats -------------------------------------------------------------
void q8_0(const uint8_t* b, float* y) {  // B 32, S 34: d, qs[32]
  const float d = f16(b);
  const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
  for (int j = 0; j < 32; ++j) y[j] = q[j] * d;
}

void q4_0(const uint8_t* b, float* y) {  // B 32, S 18: d, qs[16]
  const float d = f16(b);
  const uint8_t* q = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = ((q[j] & 0x0F) - 8) * d;
    y[j + 16] = ((q[j] >> 4) - 8) * d;
  }
}

void q4_1(const uint8_t* b, float* y) {  // B 32, S 20: d, m, qs[16]
  const float d = f16(b), m = f16(b + 2);
  const uint8_t* q = b + 4;
  for (int j = 0; j < 16; ++j) {
    y[j] = (q[j] & 0x0F) * d + m;
    y[j + 16] = (q[j] >> 4) * d + m;
  }
}

inline void scale_min_k4(int j, const uint8_t* s, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = s[j] & 63;
    *m = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

void q4_k(const uint8_t* b, float* y) {  // B 256, S 144: d, dmin, scales[12], qs[128]
  const float d = f16(b), dmin = f16(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* q = b + 16;
  int is = 0;
  for (int j = 0; j < 256; j += 64) {
    uint8_t sc, m;
    scale_min_k4(is + 0, scales, &sc, &m);
    const float d1 = d * sc, m1 = dmin * m;
    scale_min_k4(is + 1, scales, &sc, &m);
    const float d2 = d * sc, m2 = dmin * m;
    for (int l = 0; l < 32; ++l) *y++ = d1 * (q[l] & 0xF) - m1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * (q[l] >> 4) - m2;
    q += 32;
    is += 2;
  }
}

void q6_k(const uint8_t* b, float* y) {  // B 256, S 210: ql[128], qh[64], scales[16], d
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = f16(b + 208);
  for (int n = 0; n < 256; n += 128) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int8_t q1 = (int8_t)((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int8_t q2 = (int8_t)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int8_t q3 = (int8_t)((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int8_t q4 = (int8_t)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l + 0] = d * sc[is + 0] * q1;
      y[l + 32] = d * sc[is + 2] * q2;
      y[l + 64] = d * sc[is + 4] * q3;
      y[l + 96] = d * sc[is + 6] * q4;
    }
    y += 128;
    ql += 64;
    qh += 32;
    sc += 8;
  }
}

struct BlockType {
  void (*decode)(const uint8_t*, float*);
  int64_t B, S;
};

BlockType block_type(const std::string& name) {
  if (name == "Q8_0") return {q8_0, 32, 34};
  if (name == "Q4_0") return {q4_0, 32, 18};
  if (name == "Q4_1") return {q4_1, 32, 20};
  if (name == "Q4_K") return {q4_k, 256, 144};
  if (name == "Q6_K") return {q6_k, 256, 210};
  TORCH_CHECK(false, "no CPU kernel for GGML type ", name);
}

void check(const torch::Tensor& raw, const BlockType& t, int64_t N, int64_t K) {
  TORCH_CHECK(raw.device().is_cpu() && raw.scalar_type() == at::kByte && raw.is_contiguous(), "raw must be uint8 CPU");
  TORCH_CHECK(K % t.B == 0, "K must be a multiple of the block size");
  TORCH_CHECK(raw.numel() == N * (K / t.B) * t.S, "raw has the wrong number of bytes for [N, K]");
}

}  // namespace

// [N, K] GGML bytes -> float32 [N, K]
torch::Tensor dequantize(torch::Tensor raw, const std::string& type, int64_t N, int64_t K) {
  const BlockType t = block_type(type);
  check(raw, t, N, K);
  auto out = torch::empty({N, K}, raw.options().dtype(at::kFloat));
  const uint8_t* src = raw.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  const int64_t blocks = N * (K / t.B);
  at::parallel_for(0, blocks, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) t.decode(src + b * t.S, dst + b * t.B);
  });
  return out;
}

// x [M, K] (any float dtype) @ w [N, K]^T where w is GGML bytes -> [M, N] in x's dtype (fp32 accumulation)
torch::Tensor linear(torch::Tensor x, torch::Tensor raw, const std::string& type, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x must be a 2-D CPU tensor");
  const BlockType t = block_type(type);
  const int64_t M = x.size(0), K = x.size(1);
  check(raw, t, N, K);
  auto xf = x.to(at::kFloat).contiguous();
  auto out = torch::empty({M, N}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  const uint8_t* src = raw.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const int64_t nb = K / t.B, row_bytes = nb * t.S;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    alignas(64) float w[256];
    std::vector<__m512> acc(M);
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
      const uint8_t* row = src + n * row_bytes;
      for (int64_t b = 0; b < nb; ++b) {
        t.decode(row + b * t.S, w);
        for (int64_t m = 0; m < M; ++m) {
          const float* xb = xp + m * K + b * t.B;
          __m512 a = acc[m];
          for (int64_t i = 0; i < t.B; i += 16) a = _mm512_fmadd_ps(_mm512_load_ps(w + i), _mm512_loadu_ps(xb + i), a);
          acc[m] = a;
        }
      }
      for (int64_t m = 0; m < M; ++m) op[m * N + n] = _mm512_reduce_add_ps(acc[m]);
    }
  });
  return out.to(x.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto free_gil = py::call_guard<py::gil_scoped_release>();  // page-in threads run while a kernel computes
  m.def("dequantize", &dequantize, "GGML bytes [N, K] -> float32, bit-exact with gguf-py", free_gil);
  m.def("linear", &linear, "x [M, K] @ GGML weight [N, K]^T, one block decoded at a time", free_gil);
}
