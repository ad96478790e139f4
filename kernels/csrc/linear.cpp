// Decoding GEMV (CPU): out[m, n] = dot(W[n, :], x[m, :]) (+ b[n]) for a handful of rows m.
//
// What it fuses and why: at batch 1, KV-cache decoding runs every linear layer as a
// matrix-vector product. Each weight is read from memory once and used for one multiply-add
// per token, so the op is bound by memory bandwidth, not arithmetic. F.linear sends it to
// MKL's sgemv over the row-major [N, K] nn.Linear layout (~10 GB/s here) or to a slower bf16
// path, while 2 cores can stream ~50 GB/s. This kernel reads W exactly once, strictly in order:
// each thread takes one contiguous block of rows and walks it row after row. Interleaving
// several rows (to share the loads of x) was measured 2x slower from DRAM; the hardware
// prefetcher wants one sequential stream. Per row: 16-wide FMAs into several fp32
// accumulators, a masked load for the K tail, one horizontal sum. bf16 uses vdpbf16ps on bf16
// pairs of W and x (exact products, fp32 accumulation); otherwise bf16 is widened to fp32.
//
// Up to kTokens rows of x share each load of W. With more rows, the row is walked once per
// group of kTokens, in K slices small enough that the slice of x and W stays in L1, so memory
// still sees each weight once.
#include <omp.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.h"
#include "ops.h"

#include "gemv.h"

namespace kernels {
namespace {

using gemv::kMinParallelMacs;
using gemv::XOf;

// out[:, n] for weight row n, using acc[0:M] as scratch.
template <typename W, typename X>
inline void row(const LinearArgs& a, const W* weight, const X* x, int64_t n, float* acc) {
  const int64_t M = a.m;
  gemv::row_dots(weight + n * a.k, x, M, a.k, acc);
  const float b = a.bias ? to_f32(static_cast<const W*>(a.bias)[n]) : 0.f;
  W* out = static_cast<W*>(a.out);
  for (int64_t m = 0; m < M; ++m)  // bf16: rounded to nearest even, once
    store(out + m * a.n + n, a.bias ? acc[m] + b : acc[m]);
}

template <typename W>
void run(const LinearArgs& a) {
  const int64_t M = a.m, N = a.n, K = a.k;
  if (M <= 0 || N <= 0) return;
  const W* weight = static_cast<const W*>(a.weight);
  using X = typename XOf<W>::type;
  std::vector<float> x32;
  const X* x = nullptr;
  if constexpr (std::is_same<X, W>::value) {
    x = static_cast<const X*>(a.x);
  } else {  // widen x once: it is read again for every weight row
    x32.resize(size_t(M * K));
    const W* xs = static_cast<const W*>(a.x);
    for (int64_t j = 0; j < M * K; ++j) x32[j] = to_f32(xs[j]);
    x = x32.data();
  }
  const int64_t want = M * N * K < kMinParallelMacs ? 1 : std::min<int64_t>(a.n_threads, N);
  const int n_threads = int(std::max<int64_t>(1, want));
#pragma omp parallel num_threads(n_threads)
  {
    // One contiguous range of rows per thread: each core streams its own part of W in order.
    const int64_t tid = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t n_end = N * (tid + 1) / nt;
    std::vector<float> acc(static_cast<size_t>(M));
    for (int64_t n = N * tid / nt; n < n_end; ++n) row(a, weight, x, n, acc.data());
  }
}

}  // namespace

void linear_cpu(const LinearArgs& a) {
  switch (a.dtype) {
    case kF32: return run<float>(a);
    case kBF16: return run<bf16>(a);
  }
}

}  // namespace kernels
