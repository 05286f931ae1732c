// Prompt-sized products with ggml's own CPU kernels (ggml_cpu_gemm.h): a quantized weight times many activation
// rows, and one layer's routed SwiGLU experts for every token of a prompt chunk in four parallel regions. Opens the
// same libggml-cpu as ggml_cpu.cpp (in a link namespace of its own) and shares its headers, not its state.
//
// Shape legend: M activation rows, K input features, N weight rows, T tokens, H hidden, I expert intermediate
// size, R experts per token (top-k), E experts in the call, A routed (token, expert) pairs of those experts.
#include "ggml_cpu_gemm.h"

// Opens the ggml CPU library at `path` (as ggml_cpu.open) and ggml's interleaved Q4_K gemm beside its gemv;
// returns the CPU features it uses.
std::string open(const std::string& path) {
  void* h = open_library(path);
  if (h != nullptr && lib.gemv_q4_k_x8 != nullptr)
    gemm_kernels.gemm_q4_k_x8 = reinterpret_cast<gemv_t>(dlsym(h, "ggml_gemm_q4_K_8x8_q8_K"));
  return lib.features;
}

// Whether interleaved Q4_K rows go 4 at a time through ggml's gemm (else each through the gemv); returns the old value.
bool set_gemm(bool on) {  // for the tests: one setting for the process
  const bool was = gemm_kernels.use_gemm;
  gemm_kernels.use_gemm = on;
  return was;
}

bool has_gemm() { return gemm_kernels.gemm_q4_k_x8 != nullptr; }

// Whether the interleaved Q4_K gemm is ours (AVX-512, the library's bits) rather than the library's.
bool own_gemm() {
#if defined(MOEPAGE_HAS_Q4K_X8_AVX512)
  return has_gemm() && own_replaces_avx2();
#else
  return false;
#endif
}

std::vector<const uint8_t*> row_pointers(const std::vector<uint8_t>& q, int64_t M, int64_t rb) {
  std::vector<const uint8_t*> rows(M);
  for (int64_t m = 0; m < M; ++m) rows[m] = q.data() + m * rb;
  return rows;
}

// x [M, K] (any float dtype) @ w [N, K]^T (GGML bytes of `type`) -> float32 [M, N]
torch::Tensor linear(torch::Tensor x, torch::Tensor raw, int64_t type, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x must be a 2-D CPU tensor");
  const Kind k = kind(type);
  const int64_t M = x.size(0), K = x.size(1);
  check_weight(raw, k, N, K, "linear");
  auto xf = x.to(at::kFloat).contiguous();
  const auto xq = convert_rows(xf.data_ptr<float>(), M, K, k);
  const auto rows = row_pointers(xq, M, k.dot_row_bytes(K));
  std::vector<uint8_t> x4;
  const bool gemm = gemm_applies(k);
  if (gemm) append_x4(x4, rows.data(), M, K);
  auto out = torch::empty({M, N}, x.options().dtype(at::kFloat));
  run_products({{raw.data_ptr<uint8_t>(), &k, N, K, rows.data(), M, gemm ? x4.data() : nullptr,
                 out.data_ptr<float>(), N}});
  return out;
}

// acc [T, H] float32 += for each token, over its routed experts among `ids` (ascending), weight * expert(x row), in
// ascending expert order (fp32, as the decode sums): x [T, H]; indices [T, R] int64 and weights [T, R] float32 the
// router's choice; gates[e], ups[e] [I, H] and downs[e] [H, I] GGML bytes of one type each (experts ids[e]).
void experts_accumulate(torch::Tensor acc, torch::Tensor x, torch::Tensor indices, torch::Tensor weights,
                        std::vector<int64_t> ids, std::vector<torch::Tensor> gates, std::vector<torch::Tensor> ups,
                        std::vector<torch::Tensor> downs, int64_t gate_type, int64_t up_type, int64_t down_type,
                        int64_t I) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x must be [T, H] on the CPU");
  const int64_t T = x.size(0), H = x.size(1), E = static_cast<int64_t>(ids.size());
  TORCH_CHECK(acc.scalar_type() == at::kFloat && acc.is_contiguous() && acc.dim() == 2 && acc.size(0) == T &&
                  acc.size(1) == H, "acc must be a contiguous float32 [T, H]");
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == T && indices.scalar_type() == at::kLong &&
                  weights.sizes() == indices.sizes() && weights.scalar_type() == at::kFloat,
              "indices [T, R] int64 and weights [T, R] float32");
  TORCH_CHECK(E > 0 && static_cast<int64_t>(gates.size()) == E && static_cast<int64_t>(ups.size()) == E &&
                  static_cast<int64_t>(downs.size()) == E, "one gate, up and down per expert id");
  for (int64_t e = 1; e < E; ++e) TORCH_CHECK(ids[e - 1] < ids[e], "expert ids must ascend");
  const Kind kg = kind(gate_type), ku = kind(up_type), kd = kind(down_type);
  for (int64_t e = 0; e < E; ++e) {
    check_weight(gates[e], kg, I, H, "expert gate");
    check_weight(ups[e], ku, I, H, "expert up");
    check_weight(downs[e], kd, H, I, "expert down");
  }
  auto idx = indices.contiguous();
  auto wts = weights.contiguous();
  const int64_t R = idx.size(1);
  const int64_t* ip = idx.data_ptr<int64_t>();
  const float* wp = wts.data_ptr<float>();
  // The pairs of each expert, tokens ascending: pair a = (token, weight), experts' runs in ids order.
  std::vector<int64_t> first(E + 1, 0), tok;
  std::vector<float> wt;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t r = 0; r < R; ++r)
        if (ip[t * R + r] == ids[e]) {
          tok.push_back(t);
          wt.push_back(wp[t * R + r]);
        }
    first[e + 1] = static_cast<int64_t>(tok.size());
  }
  const int64_t A = first[E];
  if (A == 0) return;
  auto xf = x.to(at::kFloat).contiguous();
  const auto xg = convert_rows(xf.data_ptr<float>(), T, H, kg);
  const bool same = ku.cpu->vec_dot_type == kg.cpu->vec_dot_type;
  const auto xu_own = same ? std::vector<uint8_t>() : convert_rows(xf.data_ptr<float>(), T, H, ku);
  const auto& xu = same ? xg : xu_own;
  const int64_t gb = kg.dot_row_bytes(H), ub = ku.dot_row_bytes(H), ab = kd.dot_row_bytes(I);
  std::vector<const uint8_t*> grows(A), urows(A);
  for (int64_t a = 0; a < A; ++a) {
    grows[a] = xg.data() + tok[a] * gb;
    urows[a] = xu.data() + tok[a] * ub;
  }
  // gate and up: every expert's pairs against its rows, one region
  std::vector<float> gu(A * 2 * I);  // pair a: gate outputs [0, I), up outputs [I, 2I)
  std::vector<uint8_t> x4;
  std::vector<size_t> g4(E), u4(E);
  const bool gemm_g = gemm_applies(kg), gemm_u = gemm_applies(ku);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t m = first[e + 1] - first[e];
    if (gemm_g) g4[e] = append_x4(x4, grows.data() + first[e], m, H);
    if (gemm_u) u4[e] = gemm_g && same ? g4[e] : append_x4(x4, urows.data() + first[e], m, H);
  }
  std::vector<Product> ps;
  ps.reserve(2 * E);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t m = first[e + 1] - first[e];
    float* o = gu.data() + first[e] * 2 * I;
    ps.push_back({gates[e].data_ptr<uint8_t>(), &kg, I, H, grows.data() + first[e], m,
                  gemm_g ? x4.data() + g4[e] : nullptr, o, 2 * I});
    ps.push_back({ups[e].data_ptr<uint8_t>(), &ku, I, H, urows.data() + first[e], m,
                  gemm_u ? x4.data() + u4[e] : nullptr, o + I, 2 * I});
  }
  run_products(ps);
  // silu(gate) * up, converted for down, one region
  TORCH_CHECK(I % kd.dot->blck_size == 0, "expert width ", I, " is not a multiple of the ", kd.dot->type_name,
              " block size");
  std::vector<uint8_t> aq(A * ab);
  const bool f32 = kd.cpu->vec_dot_type == TYPE_F32;
  TORCH_CHECK(!f32, "float32 down weights are not taken here");
  parallel(A, [&](int64_t a) {
    std::vector<float> act(I);
    const float* g = gu.data() + a * 2 * I;
    for (int64_t i = 0; i < I; ++i) act[i] = prefill_silu(g[i]) * g[I + i];
    kd.dot_cpu->from_float(act.data(), aq.data() + a * ab, I);
  }, A * I * 8);
  const auto arows = row_pointers(aq, A, ab);
  std::vector<float> dn(A * H);
  std::vector<uint8_t> a4;
  std::vector<size_t> d4(E);
  const bool gemm_d = gemm_applies(kd);
  if (gemm_d)
    for (int64_t e = 0; e < E; ++e) d4[e] = append_x4(a4, arows.data() + first[e], first[e + 1] - first[e], I);
  ps.clear();
  for (int64_t e = 0; e < E; ++e) {
    const int64_t m = first[e + 1] - first[e];
    ps.push_back({downs[e].data_ptr<uint8_t>(), &kd, H, I, arows.data() + first[e], m,
                  gemm_d ? a4.data() + d4[e] : nullptr, dn.data() + first[e] * H, H});
  }
  run_products(ps);
  // each token's experts in ascending order (the pairs of expert e precede those of e + 1): one region over tokens
  std::vector<std::vector<int64_t>> of(T);
  for (int64_t a = 0; a < A; ++a) of[tok[a]].push_back(a);
  float* out = acc.data_ptr<float>();
  parallel(T, [&](int64_t t) {
    float* o = out + t * H;
    for (int64_t a : of[t]) {
      const float w = wt[a];
      const float* d = dn.data() + a * H;
      for (int64_t h = 0; h < H; ++h) o[h] += w * d[h];
    }
  }, A * H * 8);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto free_gil = py::call_guard<py::gil_scoped_release>();
  m.def("open", &open, "open a ggml 0.20 CPU backend library; returns the CPU features it was built for");
  m.def("set_gemm", &set_gemm, "interleaved Q4_K rows 4 at a time through ggml's gemm (True) or one by one");
  m.def("has_gemm", &has_gemm, "whether ggml's 4x8 Q4_K gemm is in use for the interleaved layout");
  m.def("use_own_kernels", &use_own_kernels, "our kernels where they give the library's bits (True) or its own");
  m.def("own_gemm", &own_gemm, "whether the interleaved Q4_K gemm is ours (AVX-512) rather than the library's");
  m.def("linear", &linear, "x [M, K] @ GGML weight [N, K]^T -> float32 [M, N], tiled over many rows", free_gil);
  m.def("experts_accumulate", &experts_accumulate, "acc [T, H] += a layer's routed SwiGLU experts for T tokens",
        free_gil);
}
