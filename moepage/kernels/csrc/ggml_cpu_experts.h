// One decode token through E routed SwiGLU experts over GGML bytes (included by ggml_cpu.cpp): every gate and up row
// of the token's experts in one parallel region from one converted activation, then each expert's activation
// converted once for its down rows, the outputs summed in list order:
//   out = sum_e weights[e] * down_e(silu(gate_e x) * up_e x)   (fp32, not rounded)
//
// Shape legend: H hidden, I expert intermediate size, E experts of one token.
#pragma once

#include "ggml_cpu_core.h"

namespace {

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

// gates[e], ups[e]: [I, H] of kinds kg, ku; downs[e]: [H, I] of kind kd; x [H]; weights [E] -> out [H]
inline void experts_sum(const float* x, int64_t H, int64_t I, int64_t E, const uint8_t* const* gates,
                        const uint8_t* const* ups, const uint8_t* const* downs, const Kind& kg, const Kind& ku,
                        const Kind& kd, const float* weights, float* out) {
  TORCH_CHECK(I % kd.dot->blck_size == 0, "expert width ", I, " is not a multiple of the ", kd.dot->type_name,
              " block size");
  const auto xg = quantize_activations(x, 1, H, kg);
  const auto xu = ku.cpu->vec_dot_type == kg.cpu->vec_dot_type ? xg : quantize_activations(x, 1, H, ku);
  std::vector<float> gu(E * 2 * I);  // expert e: gate outputs at [2eI, 2eI + I), up outputs after them
  std::vector<Segment> segs;
  segs.reserve(2 * E);
  for (int64_t e = 0; e < E; ++e) {
    segs.push_back({gates[e], &kg, I, H, xg.data(), gu.data() + 2 * e * I});
    segs.push_back({ups[e], &ku, I, H, xu.data(), gu.data() + (2 * e + 1) * I});
  }
  matvec_segments(segs);
  std::vector<float> act(E * I);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t i = 0; i < I; ++i) act[e * I + i] = silu(gu[2 * e * I + i]) * gu[(2 * e + 1) * I + i];
  const auto aq = quantize_activations(act.data(), E, I, kd);
  std::vector<float> down(E * H);
  const int64_t ab = kd.dot_row_bytes(I);
  segs.clear();
  for (int64_t e = 0; e < E; ++e) segs.push_back({downs[e], &kd, H, I, aq.data() + e * ab, down.data() + e * H});
  matvec_segments(segs);
  std::fill(out, out + H, 0.0f);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t h = 0; h < H; ++h) out[h] += weights[e] * down[e * H + h];
}

}  // namespace
