// MXFP4 weights multiplied on their stored bytes: each row is decoded into a float buffer (one block of 32 values
// at a time: an E8M0 scale byte and 16 bytes of two FP4 E2M1 codes each) and dotted with every activation row, so
// the weight is never held as floats and every product is an fp32 dot of the exactly decoded values.
//
// Layout (the published gpt-oss safetensors `*_blocks` / `*_scales`): blocks uint8 [R, G, 16], scales uint8 [R, G],
// G = C / 32; value 2j of a block is the low nibble of byte j, value 2j + 1 its high nibble; a value is
// FP4[code] * 2^(scale - 127), computed exactly (one fp32 multiply that cannot round), as transformers'
// convert_moe_packed_tensors (torch.ldexp) gives it for every byte.
//
// Row invariance: out[t, r] is the same dot, in the same order, whatever the number of rows T (prompt re-use).
//
// Shape legend: T activation rows (tokens), C input features (weight columns), R output features (weight rows),
// G blocks per row.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// FP4 E2M1 values doubled (ggml's kvalues_mxfp4), times the halved scale: exactly ldexp(FP4, e - 127) for every e
constexpr float KV[16] = {+0.0f, +1.0f, +2.0f, +3.0f, +4.0f, +6.0f, +8.0f, +12.0f,
                          -0.0f, -1.0f, -2.0f, -3.0f, -4.0f, -6.0f, -8.0f, -12.0f};
constexpr int LANES = 16;  // partial sums of the portable dot (the compiler keeps them in vector registers)

// 2^(e - 128) as fp32 (ggml_e8m0_to_fp32_half): e = 0 and 1 are the subnormals 2^-128 and 2^-127
inline float e8m0_half(uint8_t e) {
  const uint32_t bits = e < 2 ? 0x00200000u << e : static_cast<uint32_t>(e - 1) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

// 8 values from their codes (bytes 0..15): |FP4| * 2 by a lane permute, the sign from bit 3 (so code 8 is -0.0, as
// the reference's lookup gives), times the halved scale
inline __m256 decode8(__m128i codes8, __m256 scale) {
  const __m256 magnitude = _mm256_setr_ps(0.0f, 1.0f, 2.0f, 3.0f, 4.0f, 6.0f, 8.0f, 12.0f);
  const __m256i c = _mm256_cvtepu8_epi32(codes8);
  const __m256 v = _mm256_permutevar8x32_ps(magnitude, c);  // uses the low 3 bits of each lane
  const __m256i sign = _mm256_slli_epi32(_mm256_srli_epi32(c, 3), 31);
  return _mm256_mul_ps(_mm256_xor_ps(v, _mm256_castsi256_ps(sign)), scale);
}

// the 32 values of one block, in value order (value 2j is the low nibble of byte j, 2j + 1 its high nibble)
inline void decode_block(const uint8_t* b, float s, float* o) {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  const __m128i lo = _mm_and_si128(q, _mm_set1_epi8(0x0F));
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(0x0F));
  const __m128i c0 = _mm_unpacklo_epi8(lo, hi);  // codes of values 0..15
  const __m128i c1 = _mm_unpackhi_epi8(lo, hi);  // codes of values 16..31
  const __m256 scale = _mm256_set1_ps(s);
  _mm256_storeu_ps(o, decode8(c0, scale));
  _mm256_storeu_ps(o + 8, decode8(_mm_srli_si128(c0, 8), scale));
  _mm256_storeu_ps(o + 16, decode8(c1, scale));
  _mm256_storeu_ps(o + 24, decode8(_mm_srli_si128(c1, 8), scale));
}

inline float dot(const float* w, const float* x, int64_t C) {  // C a multiple of 32
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t c = 0; c < C; c += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + c), _mm256_loadu_ps(x + c), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + c + 8), _mm256_loadu_ps(x + c + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + c + 16), _mm256_loadu_ps(x + c + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + c + 24), _mm256_loadu_ps(x + c + 24), a3);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  float s = 0.0f;
  for (float v : lanes) s += v;
  return s;
}
#else
inline void decode_block(const uint8_t* b, float s, float* o) {
  for (int j = 0; j < 16; ++j) {
    o[2 * j] = KV[b[j] & 0x0F] * s;
    o[2 * j + 1] = KV[b[j] >> 4] * s;
  }
}

inline float dot(const float* w, const float* x, int64_t C) {
  float acc[LANES] = {0};
  for (int64_t c = 0; c < C; c += LANES)
    for (int k = 0; k < LANES; ++k) acc[k] += w[c + k] * x[c + k];
  float s = 0.0f;
  for (int k = 0; k < LANES; ++k) s += acc[k];
  return s;
}
#endif

inline void decode_row(const uint8_t* blocks, const uint8_t* scales, int64_t G, float* out) {
  for (int64_t g = 0; g < G; ++g) decode_block(blocks + g * 16, e8m0_half(scales[g]), out + g * 32);
}

void check(const torch::Tensor& blocks, const torch::Tensor& scales, int64_t R, int64_t C) {
  TORCH_CHECK(blocks.device().is_cpu() && scales.device().is_cpu(), "mxfp4: CPU tensors only");
  TORCH_CHECK(blocks.scalar_type() == at::kByte && scales.scalar_type() == at::kByte, "mxfp4: uint8 bytes expected");
  TORCH_CHECK(blocks.is_contiguous() && scales.is_contiguous(), "mxfp4: contiguous bytes expected");
  TORCH_CHECK(R >= 0 && C >= 0 && C % 32 == 0, "mxfp4: a row of ", C, " values is not whole 32-value blocks");
  TORCH_CHECK(blocks.numel() == R * C / 2 && scales.numel() == R * C / 32, "mxfp4: ", blocks.numel(), " block bytes and ",
              scales.numel(), " scale bytes do not hold [", R, ", ", C, "]");
}

}  // namespace

// blocks [R, C/32, 16], scales [R, C/32] -> float32 [R, C]
torch::Tensor dequantize(torch::Tensor blocks, torch::Tensor scales, int64_t R, int64_t C) {
  check(blocks, scales, R, C);
  auto out = torch::empty({R, C}, blocks.options().dtype(at::kFloat));
  const uint8_t* b = blocks.data_ptr<uint8_t>();
  const uint8_t* s = scales.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  const int64_t G = C / 32;
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) decode_row(b + r * G * 16, s + r * G, G, o + r * C);
  });
  return out;
}

// x float32 [T, C] @ W^T, W = (blocks, scales) [R, C] -> float32 [T, R]
torch::Tensor linear(torch::Tensor x, torch::Tensor blocks, torch::Tensor scales, int64_t R) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "mxfp4 linear: x must be a contiguous float32 [T, C] CPU tensor");
  const int64_t T = x.size(0), C = x.size(1);
  check(blocks, scales, R, C);
  auto out = torch::empty({T, R}, x.options());
  const uint8_t* b = blocks.data_ptr<uint8_t>();
  const uint8_t* s = scales.data_ptr<uint8_t>();
  const float* xp = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t G = C / 32;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(C);
    for (int64_t r = r0; r < r1; ++r) {
      decode_row(b + r * G * 16, s + r * G, G, row.data());
      for (int64_t t = 0; t < T; ++t) o[t * R + r] = dot(row.data(), xp + t * C, C);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dequantize", &dequantize, "MXFP4 blocks + scales -> float32 [R, C]", py::call_guard<py::gil_scoped_release>());
  m.def("linear", &linear, "x [T, C] @ W^T for MXFP4 W [R, C] -> float32 [T, R]",
        py::call_guard<py::gil_scoped_release>());
}
