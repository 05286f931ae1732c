// One decode token through E routed SwiGLU experts over GGML bytes (included by ggml_cpu.cpp): every gate and up row
// of the token's experts in one parallel region from one converted activation, then each expert's activation
// converted once for its down rows, the outputs summed in list order:
//   out = sum_e weights[e] * down_e(silu(gate_e x) * up_e x)   (fp32, not rounded)
//
// A shared expert (Qwen2-MoE) rides in the same two parallel regions: its gate and up rows beside the routed ones,
// its down rows beside theirs; its activation between them is the caller's (model-dtype roundings, ATen's silu).
//
// Shape legend: H hidden, I expert intermediate size, E experts of one token, S shared expert intermediate size.
#pragma once

#include "ggml_cpu_core.h"

namespace {

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

// The shared expert's matrices (gate, up [S, H], down [H, S]) and what happens between its two halves.
struct SharedFFN {
  const uint8_t *gate, *up, *down;
  const Kind *kg, *ku, *kd;
  int64_t S;
  std::function<void(float* g, float* u, float* act)> activation;  // raw gate, up outputs [S] -> act [S]
  float* out;                                                       // [H]: the raw down outputs
};

// x converted for kind k: an already converted activation of the same vec_dot type, or a new one kept in `store`
inline const uint8_t* activation_for(const float* x, int64_t H, const Kind& k,
                                     std::initializer_list<std::pair<const Kind*, const uint8_t*>> have,
                                     std::vector<uint8_t>& store) {
  for (const auto& [hk, p] : have)
    if (hk->cpu->vec_dot_type == k.cpu->vec_dot_type) return p;
  store = quantize_activations(x, 1, H, k);
  return store.data();
}

// gates[e], ups[e]: [I, H] of kinds kg, ku; downs[e]: [H, I] of kind kd; x [H]; weights [E] -> out [H]
inline void experts_sum(const float* x, int64_t H, int64_t I, int64_t E, const uint8_t* const* gates,
                        const uint8_t* const* ups, const uint8_t* const* downs, const Kind& kg, const Kind& ku,
                        const Kind& kd, const float* weights, float* out, const SharedFFN* sh = nullptr) {
  TORCH_CHECK(I % kd.dot->blck_size == 0, "expert width ", I, " is not a multiple of the ", kd.dot->type_name,
              " block size");
  std::vector<uint8_t> xg, xu, xsg, xsu;
  xg = quantize_activations(x, 1, H, kg);
  const uint8_t* pu = activation_for(x, H, ku, {{&kg, xg.data()}}, xu);
  std::vector<float> gu(E * 2 * I);  // expert e: gate outputs at [2eI, 2eI + I), up outputs after them
  std::vector<Segment> segs;
  segs.reserve(2 * E + 2);
  for (int64_t e = 0; e < E; ++e) {
    segs.push_back({gates[e], &kg, I, H, xg.data(), gu.data() + 2 * e * I});
    segs.push_back({ups[e], &ku, I, H, pu, gu.data() + (2 * e + 1) * I});
  }
  std::vector<float> sgu(sh ? 2 * sh->S : 0);  // the shared expert's gate outputs, then its up outputs
  if (sh) {
    segs.push_back({sh->gate, sh->kg, sh->S, H, activation_for(x, H, *sh->kg, {{&kg, xg.data()}, {&ku, pu}}, xsg),
                    sgu.data()});
    segs.push_back({sh->up, sh->ku, sh->S, H, activation_for(x, H, *sh->ku, {{&kg, xg.data()}, {&ku, pu}}, xsu),
                    sgu.data() + sh->S});
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
  std::vector<uint8_t> saq;
  if (sh) {
    std::vector<float> sact(sh->S);
    sh->activation(sgu.data(), sgu.data() + sh->S, sact.data());
    saq = quantize_activations(sact.data(), 1, sh->S, *sh->kd);
    segs.push_back({sh->down, sh->kd, H, sh->S, saq.data(), sh->out});
  }
  matvec_segments(segs);
  std::fill(out, out + H, 0.0f);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t h = 0; h < H; ++h) out[h] += weights[e] * down[e * H + h];
}

}  // namespace
