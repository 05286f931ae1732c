// Runs mxfp4_core.h on records read from stdin and writes the raw results to stdout, so one input goes through x86
// builds and an aarch64 build (under qemu-aarch64) and the bytes are compared (tests/test_mxfp4.py).
// Record: int64 T R C, then x fp32 [T, C], blocks uint8 [R, C/32, 16], scales uint8 [R, C/32]
//   -> out fp32 [T, R] (x @ W^T, rows split in two calls at an odd row), then the decoded W fp32 [R, C].
#include <algorithm>
#include <cstdio>
#include <vector>

#include "mxfp4_core.h"

namespace {

template <class T>
std::vector<T> read(int64_t n) {
  std::vector<T> v(n);
  if (n && std::fread(v.data(), sizeof(T), n, stdin) != static_cast<size_t>(n)) throw 1;
  return v;
}

}  // namespace

int main() {
  int64_t head[3];
  while (std::fread(head, sizeof(int64_t), 3, stdin) == 3) {
    const int64_t T = head[0], R = head[1], C = head[2], G = C / 32;
    const auto x = read<float>(T * C);
    const auto b = read<uint8_t>(R * C / 2);
    const auto s = read<uint8_t>(R * G);
    std::vector<float> xp(T * C), out(T * R), row(C), deq(R * C);
    mxfp4::permute_x(x.data(), T, C, xp.data());
    const int64_t mid = R / 2 | 1;  // an odd split: the pairwise path's single-row tail runs too
    mxfp4::linear_rows(xp.data(), T, C, b.data(), s.data(), 0, std::min(mid, R), R, out.data(), row.data());
    mxfp4::linear_rows(xp.data(), T, C, b.data(), s.data(), std::min(mid, R), R, R, out.data(), row.data());
    for (int64_t r = 0; r < R; ++r) mxfp4::dequantize_row(b.data() + r * G * 16, s.data() + r * G, G, deq.data() + r * C);
    std::fwrite(out.data(), sizeof(float), out.size(), stdout);
    std::fwrite(deq.data(), sizeof(float), deq.size(), stdout);
  }
  return 0;
}
