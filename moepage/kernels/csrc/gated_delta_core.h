// The Gated DeltaNet recurrent update for one token and one value head, in plain C++ (no torch, no intrinsics:
// the loops over Dv vectorise for whatever target it is built for: x86-64 baseline, haswell, native, aarch64).
//
// The same operations, in the same order, as moepage/kernels/gated_delta.py's recurrent_gated_delta_rule (itself
// transformers' torch_recurrent_gated_delta_rule): every product rounded before it is added (built with
// -ffp-contract=off, as kernels/cpu.py builds), sums over Dk taken in index order from 0.
//
// Shape legend: Dk key head dim, Dv value head dim. S is one head's state [Dk, Dv] row-major float32.
#pragma once

#include <cstdint>

namespace moepage_gated_delta {

// S = decay S;  delta = beta (v - S^T k);  S = S + k delta^T;  out = S^T q.
// q, k [Dk] (l2-normalised, q scaled by Dk^-0.5), v, out, scratch [Dv]; decay = exp(g) and beta are scalars.
inline void head_step(float* S, const float* q, const float* k, const float* v, float decay, float beta, float* out,
                      float* scratch, int64_t Dk, int64_t Dv) {
  float* mem = scratch;  // S^T k, then delta
  for (int64_t j = 0; j < Dv; ++j) mem[j] = 0.0f;
  for (int64_t i = 0; i < Dk; ++i) {
    float* row = S + i * Dv;
    const float ki = k[i];
    for (int64_t j = 0; j < Dv; ++j) {
      const float s = row[j] * decay;
      row[j] = s;
      const float p = s * ki;
      mem[j] = mem[j] + p;
    }
  }
  for (int64_t j = 0; j < Dv; ++j) mem[j] = (v[j] - mem[j]) * beta;
  for (int64_t j = 0; j < Dv; ++j) out[j] = 0.0f;
  for (int64_t i = 0; i < Dk; ++i) {
    float* row = S + i * Dv;
    const float ki = k[i], qi = q[i];
    for (int64_t j = 0; j < Dv; ++j) {
      const float u = ki * mem[j];
      const float s = row[j] + u;
      row[j] = s;
      const float p = s * qi;
      out[j] = out[j] + p;
    }
  }
}

}  // namespace moepage_gated_delta
