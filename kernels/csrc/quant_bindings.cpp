// pybind11 bindings of the weight-only quantized kernels (quant_linear.cpp, cuda/quant_linear.cu), registered
// into kernels._C by bindings.cpp through bind_quant. Every buffer of a quantized weight is checked against
// [n, k] and its layout (kernels/reference.py) before a pointer is taken from it (checks.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "checks.h"
#include "ops.h"

namespace py = pybind11;

namespace kernels {

// The buffers of a quantized weight W [n, k] (layout: kernels/reference.py), each checked against n and k.
QuantWeight quant_weight(Checker& c, int kind, int64_t n, int64_t k, py::handle codes, py::handle qabsmax,
                         py::handle absmax2, py::handle code2, py::handle nf4, float offset, py::handle scale,
                         const std::string& at) {
  if (n < 0 || k < 0) c.fail(at + "shape", "non-negative [N, K]", "[" + std::to_string(n) + ", " + std::to_string(k) + "]");
  QuantWeight w{kind, nullptr, nullptr, nullptr, nullptr, nullptr, offset, nullptr, n, k};
  if (kind == kNF4) {
    const int64_t nb = (n * k + 63) / 64;
    const TensorArg q = c.tensor(codes, at + "codes");
    c.dense(q, kU8, {(n * k + 1) / 2}, " (two 4-bit codes per byte)");
    const TensorArg qa = c.tensor(qabsmax, at + "qabsmax");
    c.dense(qa, kU8, {nb}, " (one per 64 elements)");
    const TensorArg a2 = c.tensor(absmax2, at + "absmax2");
    c.dense(a2, kF32, {(nb + 255) / 256}, " (one per 256 blocks)");
    const TensorArg t2 = c.tensor(code2, at + "code2");
    c.dense(t2, kF32, {256}, " (the 8-bit dynamic map)");
    const TensorArg t4 = c.tensor(nf4, at + "nf4");
    c.dense(t4, kF32, {16}, " (the NF4 code book)");
    w.codes = static_cast<const uint8_t*>(q.data);
    w.qabsmax = static_cast<const uint8_t*>(qa.data);
    w.absmax2 = static_cast<const float*>(a2.data);
    w.code2 = static_cast<const float*>(t2.data);
    w.nf4 = static_cast<const float*>(t4.data);
  } else if (kind == kInt8) {
    const TensorArg q = c.tensor(codes, at + "codes");
    c.dense(q, kI8, {n, k}, " (the int8 weight)");
    const TensorArg sc = c.tensor(scale, at + "scale");
    c.dense(sc, kF32, {n}, " (one per output channel)");
    w.codes = static_cast<const uint8_t*>(q.data);
    w.scale = static_cast<const float*>(sc.data);
  } else {
    c.fail(at + "kind", "0 (nf4) or 1 (int8)", std::to_string(kind));
  }
  return w;
}

namespace {

// out [rows, K] = rows [row0, row0 + rows) of the quantized W, dequantized (fp32 or bf16).
template <bool kCuda>
void quant_dequant_entry(int kind, int64_t n, int64_t k, py::handle codes, py::handle qabsmax, py::handle absmax2,
                         py::handle code2, py::handle nf4, float offset, py::handle scale, int64_t row0,
                         int64_t rows, py::handle out, int n_threads, int64_t stream) {
  Checker c(kCuda ? "quant_dequant_cuda" : "quant_dequant_cpu", kCuda);
  if (!kCuda) c.threads(n_threads);
  const QuantWeight w = quant_weight(c, kind, n, k, codes, qabsmax, absmax2, code2, nf4, offset, scale, "");
  if (row0 < 0 || rows < 0 || row0 + rows > n)
    c.fail("rows", "a row range inside [0, " + std::to_string(n) + ")",
           "[" + std::to_string(row0) + ", " + std::to_string(row0 + rows) + ")");
  const TensorArg o = c.tensor(out, "out");
  c.dtype_in(o, {kF32, kBF16});
  c.expect(o.shape == std::vector<int64_t>{rows, k} && o.contiguous(), o,
           "a contiguous " + shape_str({rows, k}));
  QuantDequantArgs a{w, row0, rows, o.data, o.dtype, n_threads};
  py::gil_scoped_release release;
#ifdef ENGINE_WITH_CUDA
  if (kCuda) return quant_dequant_cuda(a, stream);
#endif
  quant_dequant_cpu(a);
}

// out [M, N] = x [M, K] @ W^T (+ bias [N]) for at most 8 rows; x, bias, out one dtype (fp32 or bf16).
template <bool kCuda>
void quant_gemv_entry(int kind, int64_t n, int64_t k, py::handle codes, py::handle qabsmax, py::handle absmax2,
                      py::handle code2, py::handle nf4, float offset, py::handle scale, py::handle x,
                      py::handle bias, py::handle out, int n_threads, int64_t stream) {
  Checker c(kCuda ? "quant_gemv_cuda" : "quant_gemv_cpu", kCuda);
  if (!kCuda) c.threads(n_threads);
  const QuantWeight w = quant_weight(c, kind, n, k, codes, qabsmax, absmax2, code2, nf4, offset, scale, "");
  if (kind == kNF4 && k % 64 != 0) c.fail("K", "a multiple of 64 for the NF4 GEMV", std::to_string(k));
  const TensorArg xa = c.tensor(x, "x");
  c.dtype_in(xa, {kF32, kBF16});
  c.expect(xa.dim() == 2 && xa.shape[1] == k && xa.shape[0] <= 8 && xa.contiguous(), xa,
           "a contiguous [M <= 8, K=" + std::to_string(k) + "]");
  const int64_t m = xa.shape[0];
  const TensorArg o = c.tensor(out, "out");
  c.dense(o, xa.dtype, {m, n}, " (x's dtype)");
  const TensorArg b = c.optional(bias, "bias");
  if (b.present) c.dense(b, xa.dtype, {n}, " (one per output channel)");
  QuantGemvArgs a{w, xa.data, b.data, o.data, xa.dtype, m, n_threads};
  py::gil_scoped_release release;
#ifdef ENGINE_WITH_CUDA
  if (kCuda) return quant_gemv_cuda(a, stream);
#endif
  quant_gemv_cpu(a);
}

}  // namespace

void bind_quant(py::module_& m) {
#define QUANT_ARGS py::arg("kind"), py::arg("n"), py::arg("k"), py::arg("codes"), py::arg("qabsmax"), \
      py::arg("absmax2"), py::arg("code2"), py::arg("nf4"), py::arg("offset"), py::arg("scale")
  m.def("quant_dequant_cpu", &quant_dequant_entry<false>, QUANT_ARGS, py::arg("row0"), py::arg("rows"),
        py::arg("out"), py::arg("n_threads"), py::arg("stream") = 0);
  m.def("quant_gemv_cpu", &quant_gemv_entry<false>, QUANT_ARGS, py::arg("x"), py::arg("bias"), py::arg("out"),
        py::arg("n_threads"), py::arg("stream") = 0);
#ifdef ENGINE_WITH_CUDA
  m.def("quant_dequant_cuda", &quant_dequant_entry<true>, QUANT_ARGS, py::arg("row0"), py::arg("rows"),
        py::arg("out"), py::arg("n_threads") = 1, py::arg("stream") = 0);
  m.def("quant_gemv_cuda", &quant_gemv_entry<true>, QUANT_ARGS, py::arg("x"), py::arg("bias"), py::arg("out"),
        py::arg("n_threads") = 1, py::arg("stream") = 0);
#endif
#undef QUANT_ARGS
}

}  // namespace kernels
