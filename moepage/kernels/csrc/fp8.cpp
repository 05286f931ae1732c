// Block-scaled FP8 matrices (fp8_core.h) for torch: x @ W^T on the stored bytes, and the decoded matrix. Each
// weight row is decoded once per call into a float buffer and dotted with every activation row, so the weight is
// never held as floats; out[t, r] is the same dot whatever T (prompt re-use is exact).
//
// Shape legend: T activation rows, C input features, R output features, br x bc one scale block.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "fp8_core.h"

namespace {

void check(const torch::Tensor& w, const torch::Tensor& scales, int64_t R, int64_t C, int64_t br, int64_t bc) {
  TORCH_CHECK(w.device().is_cpu() && scales.device().is_cpu(), "fp8: CPU tensors only");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous(), "fp8: the weight must be contiguous uint8 bytes");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous(), "fp8: scales must be contiguous float32");
  TORCH_CHECK(R >= 0 && C >= 0 && br >= 1 && bc >= 1, "fp8: bad shape [", R, ", ", C, "] or block ", br, "x", bc);
  TORCH_CHECK(w.numel() == R * C, "fp8: ", w.numel(), " weight bytes do not hold [", R, ", ", C, "]");
  TORCH_CHECK(scales.numel() == ((R + br - 1) / br) * ((C + bc - 1) / bc), "fp8: ", scales.numel(),
              " scales do not cover [", R, ", ", C, "] in ", br, "x", bc, " blocks");
}

}  // namespace

// w [R, C] bytes + scales -> float32 [R, C] (bf16: each value rounded to bf16)
torch::Tensor dequantize(torch::Tensor w, torch::Tensor scales, int64_t R, int64_t C, int64_t br, int64_t bc,
                         bool bf16) {
  check(w, scales, R, C, br, bc);
  auto out = torch::empty({R, C}, scales.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) fp8::decode_row(wp, sp, r, C, br, bc, bf16, o + r * C);
  });
  return out;
}

// x float32 [T, C] @ W^T -> float32 [T, R]
torch::Tensor linear(torch::Tensor x, torch::Tensor w, torch::Tensor scales, int64_t R, int64_t br, int64_t bc,
                     bool bf16) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "fp8 linear: x must be a contiguous float32 [T, C] CPU tensor");
  const int64_t T = x.size(0), C = x.size(1);
  check(w, scales, R, C, br, bc);
  auto out = torch::empty({T, R}, x.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
  // 64 rows a task at least: one token's bf16 rows share their block row's tables (fp8_core.h)
  const int64_t grain = std::max<int64_t>(64, 16384 / std::max<int64_t>(C, 1));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(C);
    fp8::linear_rows(xp, T, C, wp, sp, R, br, bc, bf16, r0, r1, row.data(), o);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dequantize", &dequantize, "block-scaled FP8 bytes -> float32 [R, C]", py::call_guard<py::gil_scoped_release>());
  m.def("linear", &linear, "x [T, C] @ W^T for block-scaled FP8 W [R, C] -> float32 [T, R]",
        py::call_guard<py::gil_scoped_release>());
}
