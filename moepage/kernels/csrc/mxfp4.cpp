// MXFP4 weights multiplied on their stored bytes (torch binding of mxfp4_core.h, which holds the layout, the decode
// and the dot's fixed order): the weight is never held as a float matrix and every product is an fp32 FMA of the
// exactly decoded value, FP4[code] * 2^(scale - 127), as transformers' convert_moe_packed_tensors (torch.ldexp)
// gives it for every byte.
//
// Row invariance: out[t, r] is the same dot, in the same order, whatever the number of rows T (prompt re-use).
//
// Shape legend: T activation rows (tokens), C input features (weight columns), R output features (weight rows),
// G blocks per row.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "mxfp4_core.h"

namespace {

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
    for (int64_t r = r0; r < r1; ++r) mxfp4::dequantize_row(b + r * G * 16, s + r * G, G, o + r * C);
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
  std::vector<float> xp(T * C);  // x in the decode's slot order
  mxfp4::permute_x(x.data_ptr<float>(), T, C, xp.data());
  const uint8_t* b = blocks.data_ptr<uint8_t>();
  const uint8_t* s = scales.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(2, 16384 / std::max<int64_t>(C, 1)) & ~int64_t(1);  // whole row pairs
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(C);
    mxfp4::linear_rows(xp.data(), T, C, b, s, r0, r1, R, o, row.data());
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dequantize", &dequantize, "MXFP4 blocks + scales -> float32 [R, C]", py::call_guard<py::gil_scoped_release>());
  m.def("linear", &linear, "x [T, C] @ W^T for MXFP4 W [R, C] -> float32 [T, R]",
        py::call_guard<py::gil_scoped_release>());
}
