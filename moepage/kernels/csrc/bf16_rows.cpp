// The row-invariant multi-row kernels of bf16_rows.h as a torch module, for a batched decode step
// (engine/batch_step.py): the lm_head (bf16 or 12-bit), a layer's routed experts and its attention half
// (bf16_rows_attention.h) for B sequences in one call each, every row's result bit for bit what bf16_decode's
// one-row linear / experts_one_token / attention_decode (or bf16_unpack's linear_12bit) of the same build gives it
// alone.
//
// Shape legend: B sequences (rows), K input features, N output features, H hidden, I expert intermediate size,
// U distinct experts in one call, J rows that picked one expert.
#include <torch/extension.h>

#include <cmath>
#include <vector>

#include "bf16_rows.h"
#include "bf16_rows_attention.h"

namespace {

void check_bf16_2d(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.dim() == 2 && t.is_contiguous(),
              what, " must be a contiguous 2-D bfloat16 CPU tensor");
}

void check_u8(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kByte && t.is_contiguous(), what,
              " must be a contiguous uint8 CPU tensor");
}

// fp32 [B, N] (+ bias [N], added in fp32 as linear() does) -> bf16.
torch::Tensor finish(torch::Tensor acc, const c10::optional<torch::Tensor>& bias) {
  if (bias.has_value() && bias->defined()) acc.add_(bias->to(at::kFloat));
  return acc.to(at::kBFloat16);
}

// x [B, K] @ w [N, K]^T (+ bias) -> [B, N] bf16; row b equals linear(x[b:b+1], w, bias) bit for bit.
torch::Tensor linear_rows(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  check_bf16_2d(x, "x");
  check_bf16_2d(w, "w");
  const int64_t B = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "x and w disagree on K");
  const bf16rows::CoreRows xr(x.data_ptr<bf16>(), B, K);
  std::vector<int64_t> all(B);
  for (int64_t b = 0; b < B; ++b) all[b] = b;
  auto acc = torch::empty({B, N}, x.options().dtype(at::kFloat));
  float* ap = acc.data_ptr<float>();
  const bf16* wp = w.data_ptr<bf16>();
  const int64_t per = rows_per_task(K);
  parallel_tasks((N + per - 1) / per, N * K * 2, [&](int64_t t) {
    xr.gemv(all.data(), B, wp, t * per, std::min(N, (t + 1) * per), ap, N);
  });
  return finish(acc, bias);
}

// x [B, K] @ W^T -> [B, N] bf16 for W [N, K] in the 12-bit form (the parts of PackedMatrix, as linear_12bit takes
// them); row b equals linear_12bit(x[b:b+1], ...) bit for bit.
torch::Tensor linear_rows_12bit(torch::Tensor x, torch::Tensor lo, torch::Tensor codes, torch::Tensor exc,
                                torch::Tensor row_exc, torch::Tensor luts, int64_t rows_per_table) {
  check_bf16_2d(x, "x");
  for (auto [t, what] : {std::pair{&lo, "lo"}, {&codes, "codes"}, {&exc, "exc"}, {&luts, "luts"}}) check_u8(*t, what);
  TORCH_CHECK(row_exc.scalar_type() == at::kLong && row_exc.is_contiguous() && row_exc.dim() == 1 &&
              row_exc.numel() >= 1, "row_exc must be a contiguous int64 [N + 1]");
  const int64_t B = x.size(0), K = x.size(1), N = row_exc.numel() - 1;
  TORCH_CHECK(K % 64 == 0 && rows_per_table > 0 && lo.numel() == N * K && codes.numel() == N * K / 2 &&
              luts.numel() == (N + rows_per_table - 1) / rows_per_table * 16,
              "linear_rows_12bit: parts do not fit a [", N, ", ", K, "] matrix");
  const int64_t* re = row_exc.data_ptr<int64_t>();
  TORCH_CHECK(re[0] == 0 && re[N] == exc.numel(), "linear_rows_12bit: row_exc does not span the escapes");
  for (int64_t n = 0; n < N; ++n)  // every row's escapes inside exc, and at most one per value (a corrupt part reads nothing out of bounds)
    TORCH_CHECK(re[n] <= re[n + 1] && re[n + 1] - re[n] <= K, "linear_rows_12bit: row_exc is not a row index");
  const bf16rows::Packed12 w{lo.data_ptr<uint8_t>(), codes.data_ptr<uint8_t>(), exc.data_ptr<uint8_t>(), re,
                             luts.data_ptr<uint8_t>(), rows_per_table, K};
  const bf16rows::CoreRows xr(x.data_ptr<bf16>(), B, K);
  std::vector<int64_t> all(B);
  for (int64_t b = 0; b < B; ++b) all[b] = b;
  auto acc = torch::empty({B, N}, x.options().dtype(at::kFloat));
  float* ap = acc.data_ptr<float>();
  const int64_t per = rows_per_task(K);
  moepage_pool::parallel_tasks((N + per - 1) / per, at::get_num_threads(), [&](int64_t t) {
    bf16rows::gemv12(xr, all.data(), B, w, t * per, std::min(N, (t + 1) * per), ap, N);
  });
  return acc.to(at::kBFloat16);
}

// Task t of a region whose item i owns tasks [first[i], first[i + 1]).
inline int64_t owner(const std::vector<int64_t>& first, int64_t t) {
  return std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
}

// B decode rows through their routed experts in one call: x [B, H]; w13[u] [2I, H], w2[u] [H, I] for the U distinct
// experts of the step; row b sums experts picks[b] (indices into w13/w2, in that order) weighted by weights[b]
// (+ residual[b]). Each expert's weights are read once for all J rows that picked it; row b's output equals
// experts_one_token(x[b:b+1], its experts, its weights, residual[b:b+1]) bit for bit (same roundings, same sums,
// same order).
torch::Tensor experts_rows(torch::Tensor x, std::vector<torch::Tensor> w13, std::vector<torch::Tensor> w2,
                           std::vector<std::vector<int64_t>> picks, std::vector<std::vector<double>> weights,
                           c10::optional<torch::Tensor> residual) {
  check_bf16_2d(x, "x");
  const int64_t B = x.size(0), H = x.size(1), U = (int64_t)w13.size();
  TORCH_CHECK((int64_t)w2.size() == U && (int64_t)picks.size() == B && (int64_t)weights.size() == B,
              "one w13 and w2 per expert, one pick list and weight list per row");
  std::vector<int64_t> I(U);
  for (int64_t u = 0; u < U; ++u) {
    check_bf16_2d(w13[u], "w13");
    check_bf16_2d(w2[u], "w2");
    TORCH_CHECK(w13[u].size(1) == H && w2[u].size(0) == H && w13[u].size(0) == 2 * w2[u].size(1), "expert shapes");
    I[u] = w2[u].size(1);
  }
  const bf16* res = nullptr;
  if (residual.has_value() && residual->defined()) {
    check_bf16_2d(*residual, "residual");
    TORCH_CHECK(residual->size(0) == B && residual->size(1) == H, "residual shape");
    res = residual->data_ptr<bf16>();
  }
  // rows[u]: the rows that picked expert u, ascending; slot[b][s]: where row b's s-th pick sits in rows[its expert]
  std::vector<std::vector<int64_t>> rows(U), slot(B);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(weights[b].size() == picks[b].size(), "row ", b, ": one weight per pick");
    for (int64_t u : picks[b]) {
      TORCH_CHECK(u >= 0 && u < U, "row ", b, " picks expert ", u, " of ", U);
      slot[b].push_back((int64_t)rows[u].size());
      rows[u].push_back(b);
    }
  }
  const bf16rows::CoreRows xr(x.data_ptr<bf16>(), B, H);
  // gate and up rows of every expert for its rows: gu[u] [J, 2I] fp32
  std::vector<std::vector<float>> gu(U);
  std::vector<int64_t> first(U + 1, 0), per(U);
  const int64_t per13 = rows_per_task(H);
  int64_t bytes = 0;
  for (int64_t u = 0; u < U; ++u) {
    gu[u].resize(rows[u].size() * 2 * I[u]);
    first[u + 1] = first[u] + (rows[u].empty() ? 0 : (2 * I[u] + per13 - 1) / per13);
    bytes += rows[u].empty() ? 0 : 4 * I[u] * H;
  }
  parallel_tasks(first[U], bytes, [&](int64_t t) {
    const int64_t u = owner(first, t), n0 = (t - first[u]) * per13;
    xr.gemv(rows[u].data(), rows[u].size(), w13[u].data_ptr<bf16>(), n0, std::min(2 * I[u], n0 + per13), gu[u].data(),
            2 * I[u]);
  });
  // activations, as experts_one_token rounds them: acts[u] the J rows [J, I]
  std::vector<bf16rows::CoreRows> acts;
  std::vector<std::vector<int64_t>> ids(U);
  acts.reserve(U);
  std::vector<bf16> act;
  for (int64_t u = 0; u < U; ++u) {
    const int64_t J = rows[u].size();
    act.resize(J * I[u]);
    for (int64_t j = 0; j < J; ++j) {
      const float* g_ = gu[u].data() + j * 2 * I[u];
      for (int64_t i = 0; i < I[u]; ++i) {
        const float g = round_bf16(g_[i]), up = round_bf16(g_[I[u] + i]);
        const float s = round_bf16(g / (1.0f + std::exp(-g)));
        act[j * I[u] + i] = bf16(s * up);
      }
      ids[u].push_back(j);
    }
    acts.emplace_back(act.data(), J, I[u]);  // a copy of its own: act is reused
    per[u] = rows_per_task(I[u]);
    first[u + 1] = first[u] + (J ? (H + per[u] - 1) / per[u] : 0);
  }
  // down rows: down[u] [J, H] fp32
  std::vector<std::vector<float>> down(U);
  for (int64_t u = 0; u < U; ++u) down[u].resize(rows[u].size() * H);
  parallel_tasks(first[U], bytes / 2, [&](int64_t t) {
    const int64_t u = owner(first, t), n0 = (t - first[u]) * per[u];
    acts[u].gemv(ids[u].data(), ids[u].size(), w2[u].data_ptr<bf16>(), n0, std::min(H, n0 + per[u]), down[u].data(), H);
  });
  auto out = torch::empty({B, H}, x.options());
  bf16* op = out.data_ptr<bf16>();
  std::vector<float> wv;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t E = picks[b].size();
    wv.assign(weights[b].begin(), weights[b].end());  // double -> float, as experts_one_token converts
    for (int64_t j = 0; j < H; ++j) {
      float s = 0.0f;
      for (int64_t e = 0; e < E; ++e) {
        const float h = down[picks[b][e]][slot[b][e] * H + j];
        s = round_bf16(s + round_bf16(round_bf16(h) * wv[e]));
      }
      op[b * H + j] = res ? bf16(static_cast<float>(res[b * H + j]) + s) : bf16(s);
    }
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto free_gil = py::call_guard<py::gil_scoped_release>();
  m.def("linear_rows", &linear_rows, "bf16 x [B, K] @ w [N, K]^T, each row as the one-row linear sums it",
        py::arg("x"), py::arg("w"), py::arg("bias") = py::none(), free_gil);
  m.def("linear_rows_12bit", &linear_rows_12bit, "x [B, K] @ W^T for a 12-bit W, each row as linear_12bit sums it",
        free_gil);
  m.def("experts_rows", &experts_rows, "B decode rows through their routed experts, each read once for all rows",
        py::arg("x"), py::arg("w13"), py::arg("w2"), py::arg("picks"), py::arg("weights"),
        py::arg("residual") = py::none(), free_gil);
  m.def("attention_rows", &bf16rows::attention_rows,
        "B decode rows through a layer's attention half (attention_decode per row, projections read once)", free_gil);
  m.def("core", [] { return std::string(core_name()); }, "which one-row core the rows run on: avx512bf16 or portable");
}
