// torch binding of gated_delta_core.h: one decode token's recurrent update for all value heads, the state updated
// in place, heads split over torch's intra-op threads.
//
// Shape legend: Hv value heads, Dk key head dim, Dv value head dim.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "gated_delta_core.h"

namespace {

void check(const at::Tensor& t, const char* name, std::vector<int64_t> shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), name, " has shape ", t.sizes(), ", expected ", shape);
}

// state [Hv, Dk, Dv] (updated), q, k [Hv, Dk], v [Hv, Dv], decay, beta [Hv], out [Hv, Dv] (written)
void step(at::Tensor state, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& decay,
          const at::Tensor& beta, at::Tensor out) {
  TORCH_CHECK(state.dim() == 3, "state must be [Hv, Dk, Dv]");
  const int64_t Hv = state.size(0), Dk = state.size(1), Dv = state.size(2);
  check(state, "state", {Hv, Dk, Dv});
  check(q, "q", {Hv, Dk});
  check(k, "k", {Hv, Dk});
  check(v, "v", {Hv, Dv});
  check(decay, "decay", {Hv});
  check(beta, "beta", {Hv});
  check(out, "out", {Hv, Dv});
  float* S = state.data_ptr<float>();
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *dp = decay.data_ptr<float>(), *bp = beta.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, Dk * Dv));  // >= 64 KiB a task
  at::parallel_for(0, Hv, grain, [&](int64_t h0, int64_t h1) {
    std::vector<float> scratch(Dv);
    for (int64_t h = h0; h < h1; ++h)
      moepage_gated_delta::head_step(S + h * Dk * Dv, qp + h * Dk, kp + h * Dk, vp + h * Dv, dp[h], bp[h],
                                     op + h * Dv, scratch.data(), Dk, Dv);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("step", &step, "Gated DeltaNet recurrent update for one token (state in place)");
}
