// Runs bf16_portable.h's core loops on records read from stdin and writes their raw results to stdout, so one input
// can go through an x86 build and an aarch64 build (under qemu-aarch64) and the bytes be compared
// (tests/test_portable_kernels.py). Record: int64 op, then its int64 sizes, then its arrays (bf16 as uint16):
//   1 gemv    M K N, x [M, K], w [N, K]           -> fp32 [M, N]
//   2 attend  R P D, scale fp32, q [R, D], k [P, D], v [P, D] -> bf16 [R, D]
//   3 rms     R D, eps fp32, x [R, D], w [D]       -> bf16 [R, D]
//   4 rope    D, x [D], cos [D], sin [D]          -> bf16 [D]
//   5 exp     n, x fp32 [n] (<= 0)                -> fp32 [n]
//   6 unpack12  n X, lo [n], codes uint8 [ceil(n / 64) * 32], exc uint8 [X], lut uint8 [16]
//                                                 -> int64 escape bytes used (-1: too few), bf16 [n]
//   7 gemv12  N K T X, x [K], lo [N*K], codes [N*K/2], exc [X], row_exc int64 [N+1], luts [ceil(N/T) * 16]
//                                                 -> fp32 [N] (bf16_12bit.h's matvec; T rows per table)
#include <cstdio>
#include <vector>

#include "bf16_12bit.h"
#include "bf16_portable.h"

namespace {

template <class T>
std::vector<T> read(int64_t n) {
  std::vector<T> v(n);
  if (n && std::fread(v.data(), sizeof(T), n, stdin) != static_cast<size_t>(n)) throw 1;
  return v;
}

int64_t read1() { return read<int64_t>(1)[0]; }

template <class T>
void write(const std::vector<T>& v) {
  std::fwrite(v.data(), sizeof(T), v.size(), stdout);
}

std::vector<float> widened(const std::vector<uint16_t>& x, int64_t rows, int64_t K) {
  const int64_t Kp = bf16p::padded(K);
  std::vector<float> out(rows * Kp);
  for (int64_t r = 0; r < rows; ++r) bf16p::widen_permuted(x.data() + r * K, K, out.data() + r * Kp);
  return out;
}

}  // namespace

int main() {
  int64_t op;
  while (std::fread(&op, sizeof op, 1, stdin) == 1) {
    if (op == 1) {
      const int64_t M = read1(), K = read1(), N = read1();
      const auto x = read<uint16_t>(M * K), w = read<uint16_t>(N * K);
      std::vector<float> out(M * N);
      bf16p::gemv_rows(widened(x, M, K).data(), M, w.data(), K, 0, N, out.data(), N);
      write(out);
    } else if (op == 2) {
      const int64_t R = read1(), P = read1(), D = read1();
      const float scale = read<float>(1)[0];
      const auto q = read<uint16_t>(R * D), k = read<uint16_t>(P * D), v = read<uint16_t>(P * D);
      std::vector<float> s(R * P), o(R * bf16p::padded(D));
      std::vector<uint16_t> out(R * D);
      bf16p::attend_kv_head(widened(q, R, D).data(), R, k.data(), v.data(), P, D, scale, s.data(), o.data(),
                            out.data());
      write(out);
    } else if (op == 3) {
      const int64_t R = read1(), D = read1();
      const float eps = read<float>(1)[0];
      const auto x = read<uint16_t>(R * D), w = read<uint16_t>(D);
      std::vector<uint16_t> out(R * D);
      for (int64_t r = 0; r < R; ++r) bf16p::rms_norm_row(x.data() + r * D, w.data(), D, eps, out.data() + r * D);
      write(out);
    } else if (op == 4) {
      const int64_t D = read1();
      const auto x = read<uint16_t>(D), c = read<uint16_t>(D), s = read<uint16_t>(D);
      std::vector<uint16_t> out(D);
      bf16p::rope_row(x.data(), c.data(), s.data(), D, out.data());
      write(out);
    } else if (op == 5) {
      const int64_t n = read1();
      const auto x = read<float>(n);
      std::vector<float> out(n);
      for (int64_t i = 0; i < n; i += 8) {
        float t[8] = {};
        for (int64_t j = 0; j < 8 && i + j < n; ++j) t[j] = x[i + j];
        const bf16p::f32x8 e = bf16p::exp_nonpositive(bf16p::load_f32x8(t));
        for (int64_t j = 0; j < 8 && i + j < n; ++j) out[i + j] = e[j];
      }
      write(out);
    } else if (op == 6) {
      const int64_t n = read1(), X = read1();
      const auto lo = read<uint8_t>(n), codes = read<uint8_t>((n + 63) / 64 * 32), exc = read<uint8_t>(X);
      const auto lut = read<uint8_t>(16);
      std::vector<uint16_t> out(n);
      const std::vector<int64_t> used = {bf16x12::unpack(lo.data(), codes.data(), exc.data(), X, lut.data(), n,
                                                         out.data())};
      write(used);
      write(out);
    } else if (op == 7) {
      const int64_t N = read1(), K = read1(), T = read1(), X = read1();
      const auto x = read<uint16_t>(K);
      const auto lo = read<uint8_t>(N * K), codes = read<uint8_t>(N * K / 2);
      const auto exc = read<uint8_t>(X);
      const auto row_exc = read<int64_t>(N + 1);
      const auto luts = read<uint8_t>((N + T - 1) / T * 16);
      std::vector<float> out(N);
      bf16x12::gemv_rows(widened(x, 1, K).data(), lo.data(), codes.data(), exc.data(), row_exc.data(), luts.data(), T,
                         K, 0, N, out.data());
      write(out);
    } else {
      std::fprintf(stderr, "unknown op %lld\n", static_cast<long long>(op));
      return 2;
    }
  }
  return 0;
}
