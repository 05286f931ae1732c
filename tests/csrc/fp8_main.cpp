// Runs fp8_core.h on records read from stdin and writes the raw results to stdout, so one input goes through x86
// builds and an aarch64 build (under qemu-aarch64) and the bytes are compared (tests/test_fp8_kernels.py).
// Record: int64 T R C br bc bf16, then x fp32 [T, C], w uint8 [R, C], scales fp32 [ceil(R/br), ceil(C/bc)]
//   -> out fp32 [T, R] (x @ W^T), then the decoded W fp32 [R, C].
#include <cstdio>
#include <vector>

#include "fp8_core.h"

namespace {

template <class T>
std::vector<T> read(int64_t n) {
  std::vector<T> v(n);
  if (n && std::fread(v.data(), sizeof(T), n, stdin) != static_cast<size_t>(n)) throw 1;
  return v;
}

}  // namespace

int main() {
  int64_t head[6];
  while (std::fread(head, sizeof(int64_t), 6, stdin) == 6) {
    const int64_t T = head[0], R = head[1], C = head[2], br = head[3], bc = head[4];
    const bool bf16 = head[5] != 0;
    const auto x = read<float>(T * C);
    const auto w = read<uint8_t>(R * C);
    const auto s = read<float>(((R + br - 1) / br) * ((C + bc - 1) / bc));
    std::vector<float> out(T * R), row(C), deq(R * C);
    fp8::linear_rows(x.data(), T, C, w.data(), s.data(), R, br, bc, bf16, 0, R, row.data(), out.data());
    for (int64_t r = 0; r < R; ++r) fp8::decode_row(w.data(), s.data(), r, C, br, bc, bf16, deq.data() + r * C);
    std::fwrite(out.data(), sizeof(float), out.size(), stdout);
    std::fwrite(deq.data(), sizeof(float), deq.size(), stdout);
  }
  return 0;
}
