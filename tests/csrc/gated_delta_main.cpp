// Runs gated_delta_core.h's head_step on records read from stdin and writes the results to stdout, so one input can
// go through x86 builds and an aarch64 build (under qemu-aarch64) and the bytes be compared
// (tests/test_gated_delta_kernel.py). Record: int64 Hv Dk Dv, then float32 S [Hv, Dk, Dv], q [Hv, Dk], k [Hv, Dk],
// v [Hv, Dv], decay [Hv], beta [Hv]  ->  float32 out [Hv, Dv], then the updated S [Hv, Dk, Dv].
#include <cstdint>
#include <cstdio>
#include <vector>

#include "gated_delta_core.h"

namespace {

template <class T>
bool read(std::vector<T>& v, int64_t n) {
  v.resize(n);
  return !n || std::fread(v.data(), sizeof(T), n, stdin) == static_cast<size_t>(n);
}

}  // namespace

int main() {
  std::vector<int64_t> dims;
  while (read(dims, 3)) {
    const int64_t Hv = dims[0], Dk = dims[1], Dv = dims[2];
    std::vector<float> S, q, k, v, decay, beta;
    if (!read(S, Hv * Dk * Dv) || !read(q, Hv * Dk) || !read(k, Hv * Dk) || !read(v, Hv * Dv) || !read(decay, Hv) ||
        !read(beta, Hv))
      return 1;
    std::vector<float> out(Hv * Dv), scratch(Dv);
    for (int64_t h = 0; h < Hv; ++h)
      moepage_gated_delta::head_step(S.data() + h * Dk * Dv, q.data() + h * Dk, k.data() + h * Dk, v.data() + h * Dv,
                                     decay[h], beta[h], out.data() + h * Dv, scratch.data(), Dk, Dv);
    std::fwrite(out.data(), sizeof(float), out.size(), stdout);
    std::fwrite(S.data(), sizeof(float), S.size(), stdout);
  }
  return 0;
}
