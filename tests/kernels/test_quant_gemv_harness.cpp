// A C entry over kernels/csrc/quant_gemv.h for tests/kernels/test_quant_gemv_isa.py, which compiles it with
// the ISA flags under test (-mavx2 -mfma -mno-avx512f: the portable NF4/int8 rows a CPU without AVX-512
// gets; -march=native: this CPU's) and loads it with ctypes: each compiled path of qgemv::rows, x prepared
// by qgemv::quant_x as the kernels prepare it, is tied to a float64 reference.
#include <cstdint>
#include <vector>

#include "quant_gemv.h"

extern "C" {

// 1 when this build has the AVX-512 rows, 0 for the portable ones.
int qgemv_avx512() {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  return 1;
#else
  return 0;
#endif
}

// out[m * N + n] = dot(W[n, :], x[m, :]) for m < M, n < N; W NF4 (kind 0) or int8 (kind 1) as
// kernels/reference.py lays it out, x fp32 [M, K].
void qgemv_rows(int kind, const uint8_t* codes, const uint8_t* qabsmax, const float* absmax2, const float* code2,
                const float* nf4, float offset, const float* scale, int64_t N, int64_t K, const float* x,
                int64_t M, float* out) {
  const kernels::QuantWeight w{kind, codes, qabsmax, absmax2, code2, nf4, offset, scale, N, K};
  const int64_t S = kernels::qgemv::x_stride(kind, K);
  std::vector<float> xs(static_cast<size_t>(M * S)), sums(static_cast<size_t>(M));
  for (int64_t m = 0; m < M; ++m) kernels::qgemv::quant_x(x + m * K, K, kind, xs.data() + m * S);
  for (int64_t n = 0; n < N; ++n) {
    kernels::qgemv::rows(w, n, xs.data(), M, sums.data());
    for (int64_t m = 0; m < M; ++m) out[m * N + n] = sums[m];
  }
}
}
