// A C entry over kernels/csrc/gemv.h for tests/kernels/test_gemv_isa.py, which compiles it with
// the ISA flags under test (-mavx2 -mfma -mno-avx512f for the AVX2 path, -march=native for this
// CPU's) and loads it with ctypes: each compiled path of row_dots is tied to a float64 reference.
#include <cstdint>
#include <type_traits>
#include <vector>

#include "gemv.h"

using kernels::bf16;

extern "C" {

const char* gemv_path() { return kernels::gemv::path(); }

// out[m * N + n] = dot(w[n * K : n * K + K], x[m]) for m < M, n < N: fp32 weights and x.
void gemv_f32(const float* w, const float* x, int64_t M, int64_t N, int64_t K, float* out) {
  std::vector<float> acc(static_cast<size_t>(M));
  for (int64_t n = 0; n < N; ++n) {
    kernels::gemv::row_dots(w + n * K, x, M, K, acc.data());
    for (int64_t m = 0; m < M; ++m) out[m * N + n] = acc[m];
  }
}

// The same with bf16 weights (raw bits). x is given twice, as fp32 and as bf16 bits of the same
// (bf16-representable) values: the path reads whichever its x type is (XOf<bf16>).
void gemv_bf16(const uint16_t* w, const float* x32, const uint16_t* x16, int64_t M, int64_t N, int64_t K,
               float* out) {
  using X = kernels::gemv::XOf<bf16>::type;
  const X* x = std::is_same<X, float>::value ? reinterpret_cast<const X*>(x32) : reinterpret_cast<const X*>(x16);
  const bf16* wb = reinterpret_cast<const bf16*>(w);
  std::vector<float> acc(static_cast<size_t>(M));
  for (int64_t n = 0; n < N; ++n) {
    kernels::gemv::row_dots(wb + n * K, x, M, K, acc.data());
    for (int64_t m = 0; m < M; ++m) out[m * N + n] = acc[m];
  }
}
}
