// pybind11 bindings: thin wrappers that turn Python ints (tensor.data_ptr()) into pointers and
// fill the argument structs of ops.h. No tensor types cross this boundary, so the module builds
// without torch headers; kernels/__init__.py validates shapes, dtypes and devices first.
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "ops.h"

namespace py = pybind11;
using namespace kernels;

namespace {

std::string cpu_isa() {
  // The ISA this build was compiled for (-march chosen at build time, see CMakeLists.txt).
#if defined(__AVX512F__) && defined(__AVX512BW__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#elif defined(__AVX__)
  return "avx";
#elif defined(__ARM_NEON)
  return "neon";
#elif defined(__SSE2__)
  return "sse2";
#else
  return "scalar";
#endif
}

py::dict build_info() {
  py::dict d;
  d["cpu_isa"] = cpu_isa();
  d["openmp"] = _OPENMP;
  d["omp_max_threads"] = omp_get_max_threads();
#ifdef ENGINE_WITH_CUDA
  d["cuda"] = true;
  d["cuda_arch"] = std::string(ENGINE_CUDA_ARCHS);
#else
  d["cuda"] = false;
  d["cuda_arch"] = std::string("");
#endif
  return d;
}

CrossEntropyArgs ce_args(int64_t logits, int dtype, int64_t n_rows, int64_t vocab,
                         int64_t row_stride, int64_t targets, int64_t ignore_index,
                         float label_smoothing, float z_loss, float softcap, int64_t loss,
                         int64_t grad, int64_t grad_row_stride, float scale, int64_t row_scale,
                         int n_threads, int64_t stream) {
  return {reinterpret_cast<const void*>(logits), dtype, n_rows, vocab, row_stride,
          reinterpret_cast<const int64_t*>(targets), ignore_index, label_smoothing, z_loss,
          softcap, reinterpret_cast<float*>(loss), reinterpret_cast<void*>(grad),
          grad_row_stride, scale, reinterpret_cast<const float*>(row_scale), n_threads, stream};
}

AdamWArgs adamw_args(std::vector<int64_t> params, std::vector<int64_t> grads,
                     std::vector<int64_t> exp_avgs, std::vector<int64_t> exp_avg_sqs,
                     std::vector<int64_t> masters, std::vector<int64_t> steps,
                     std::vector<int64_t> sizes, std::vector<int> dtypes, double lr,
                     double beta1, double beta2, double eps, double weight_decay,
                     float clip_coef, int64_t clip_sumsq, double max_grad_norm, int n_threads,
                     int64_t stream) {
  const size_t n = params.size();
  for (const auto* v : {&grads, &exp_avgs, &exp_avg_sqs, &masters, &steps, &sizes})
    if (v->size() != n) throw std::invalid_argument("adamw: pointer lists differ in length");
  if (dtypes.size() != n) throw std::invalid_argument("adamw: dtypes length differs");
  return {std::move(params), std::move(grads), std::move(exp_avgs), std::move(exp_avg_sqs),
          std::move(masters), std::move(steps), std::move(sizes), std::move(dtypes),
          lr, beta1, beta2, eps, weight_decay, clip_coef, clip_sumsq, max_grad_norm,
          n_threads, stream};
}

#define CE_ARGS                                                                          \
  py::arg("logits"), py::arg("dtype"), py::arg("n_rows"), py::arg("vocab"),              \
      py::arg("row_stride"), py::arg("targets"), py::arg("ignore_index"),                \
      py::arg("label_smoothing"), py::arg("z_loss"), py::arg("softcap"), py::arg("loss"), \
      py::arg("grad"), py::arg("grad_row_stride"), py::arg("scale"), py::arg("row_scale"), \
      py::arg("n_threads"), py::arg("stream") = 0

#define ADAMW_ARGS                                                                           \
  py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),          \
      py::arg("masters"), py::arg("steps"), py::arg("sizes"), py::arg("dtypes"), py::arg("lr"), \
      py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),           \
      py::arg("clip_coef"), py::arg("clip_sumsq"), py::arg("max_grad_norm"),                 \
      py::arg("n_threads"), py::arg("stream") = 0

template <void (*Fn)(const CrossEntropyArgs&)>
void ce_entry(int64_t logits, int dtype, int64_t n_rows, int64_t vocab, int64_t row_stride,
              int64_t targets, int64_t ignore_index, float label_smoothing, float z_loss,
              float softcap, int64_t loss, int64_t grad, int64_t grad_row_stride, float scale,
              int64_t row_scale, int n_threads, int64_t stream) {
  CrossEntropyArgs a = ce_args(logits, dtype, n_rows, vocab, row_stride, targets, ignore_index,
                               label_smoothing, z_loss, softcap, loss, grad, grad_row_stride,
                               scale, row_scale, n_threads, stream);
  py::gil_scoped_release release;  // kernels are long-running and touch no Python objects
  Fn(a);
}

template <void (*Fn)(const AdamWArgs&)>
void adamw_entry(std::vector<int64_t> params, std::vector<int64_t> grads,
                 std::vector<int64_t> exp_avgs, std::vector<int64_t> exp_avg_sqs,
                 std::vector<int64_t> masters, std::vector<int64_t> steps,
                 std::vector<int64_t> sizes, std::vector<int> dtypes, double lr, double beta1,
                 double beta2, double eps, double weight_decay, float clip_coef,
                 int64_t clip_sumsq, double max_grad_norm, int n_threads, int64_t stream) {
  AdamWArgs a = adamw_args(std::move(params), std::move(grads), std::move(exp_avgs),
                           std::move(exp_avg_sqs), std::move(masters), std::move(steps),
                           std::move(sizes), std::move(dtypes), lr, beta1, beta2, eps,
                           weight_decay, clip_coef, clip_sumsq, max_grad_norm, n_threads, stream);
  py::gil_scoped_release release;
  Fn(a);
}

double sumsq_entry(std::vector<int64_t> grads, std::vector<int64_t> sizes,
                   std::vector<int> dtypes, int n_threads) {
  py::gil_scoped_release release;
  return grad_sumsq_cpu(grads, sizes, dtypes, n_threads);
}

void linear_entry(int64_t x, int64_t weight, int64_t bias, int64_t out, int dtype, int64_t m,
                  int64_t n, int64_t k, int n_threads) {
  if (dtype != kF32 && dtype != kBF16) throw std::invalid_argument("linear: dtype must be fp32 or bf16");
  LinearArgs a{reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(weight),
               reinterpret_cast<const void*>(bias), reinterpret_cast<void*>(out), dtype, m, n, k,
               n_threads};
  py::gil_scoped_release release;
  linear_cpu(a);
}

void rms_norm_entry(int64_t x, int x_dtype, int64_t x_row_stride, int64_t weight, int w_dtype,
                    int64_t out, int out_dtype, int64_t rstd, int64_t n_rows, int64_t dim, float eps,
                    float weight_offset, int n_threads) {
  RMSNormArgs a{reinterpret_cast<const void*>(x), x_dtype, x_row_stride,
                reinterpret_cast<const void*>(weight), w_dtype, reinterpret_cast<void*>(out),
                out_dtype, reinterpret_cast<float*>(rstd), n_rows, dim, eps, weight_offset,
                n_threads};
  py::gil_scoped_release release;
  rms_norm_cpu(a);
}

void rms_norm_backward_entry(int64_t grad_out, int g_dtype, int64_t x, int x_dtype,
                             int64_t x_row_stride, int64_t weight, int w_dtype, int64_t rstd,
                             int64_t grad_x, int64_t grad_weight, int64_t n_rows, int64_t dim,
                             float weight_offset, int n_threads) {
  RMSNormBackwardArgs a{reinterpret_cast<const void*>(grad_out), g_dtype,
                        reinterpret_cast<const void*>(x), x_dtype, x_row_stride,
                        reinterpret_cast<const void*>(weight), w_dtype,
                        reinterpret_cast<const float*>(rstd), reinterpret_cast<void*>(grad_x),
                        reinterpret_cast<float*>(grad_weight), n_rows, dim, weight_offset,
                        n_threads};
  py::gil_scoped_release release;
  rms_norm_backward_cpu(a);
}

void rope_entry(int64_t x, int x_dtype, std::vector<int64_t> in_stride, int64_t out, int out_dtype,
                std::vector<int64_t> out_stride, int64_t cos, int64_t sin, int64_t table_batch,
                int64_t batch, int64_t seq, int64_t heads, int64_t head_dim, bool inverse,
                int n_threads) {
  if (in_stride.size() != 3 || out_stride.size() != 3)
    throw std::invalid_argument("rope: in_stride and out_stride need 3 entries (batch, seq, head)");
  RopeArgs a{reinterpret_cast<const void*>(x), x_dtype, {in_stride[0], in_stride[1], in_stride[2]},
             reinterpret_cast<void*>(out), out_dtype,
             {out_stride[0], out_stride[1], out_stride[2]}, reinterpret_cast<const float*>(cos),
             reinterpret_cast<const float*>(sin), table_batch, batch, seq, heads, head_dim,
             inverse ? 1 : 0, n_threads};
  py::gil_scoped_release release;
  rope_cpu(a);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Compiled kernels for the `kernels` package; call them through kernels/__init__.py.";
  m.def("build_info", &build_info);
  m.def("cross_entropy_cpu", &ce_entry<cross_entropy_cpu>, CE_ARGS);
  m.def("grad_sumsq_cpu", &sumsq_entry, py::arg("grads"), py::arg("sizes"), py::arg("dtypes"),
        py::arg("n_threads"));
  m.def("adamw_cpu", &adamw_entry<adamw_cpu>, ADAMW_ARGS);
  m.def("linear_cpu", &linear_entry, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("out"), py::arg("dtype"), py::arg("m"), py::arg("n"), py::arg("k"),
        py::arg("n_threads"));
  m.def("rms_norm_cpu", &rms_norm_entry, py::arg("x"), py::arg("x_dtype"), py::arg("x_row_stride"),
        py::arg("weight"), py::arg("w_dtype"), py::arg("out"), py::arg("out_dtype"),
        py::arg("rstd"), py::arg("n_rows"), py::arg("dim"), py::arg("eps"),
        py::arg("weight_offset"), py::arg("n_threads"));
  m.def("rms_norm_backward_cpu", &rms_norm_backward_entry, py::arg("grad_out"), py::arg("g_dtype"),
        py::arg("x"), py::arg("x_dtype"), py::arg("x_row_stride"), py::arg("weight"),
        py::arg("w_dtype"), py::arg("rstd"), py::arg("grad_x"), py::arg("grad_weight"),
        py::arg("n_rows"), py::arg("dim"), py::arg("weight_offset"), py::arg("n_threads"));
  m.def("rope_cpu", &rope_entry, py::arg("x"), py::arg("x_dtype"), py::arg("in_stride"),
        py::arg("out"), py::arg("out_dtype"), py::arg("out_stride"), py::arg("cos"),
        py::arg("sin"), py::arg("table_batch"), py::arg("batch"), py::arg("seq"),
        py::arg("heads"), py::arg("head_dim"), py::arg("inverse"), py::arg("n_threads"));
#ifdef ENGINE_WITH_CUDA
  m.def("cross_entropy_cuda", &ce_entry<cross_entropy_cuda>, CE_ARGS);
  m.def("grad_sumsq_cuda", [](std::vector<int64_t> grads, std::vector<int64_t> sizes,
                              std::vector<int> dtypes, int64_t out, int64_t stream) {
    grad_sumsq_cuda(grads, sizes, dtypes, out, stream);
  }, py::arg("grads"), py::arg("sizes"), py::arg("dtypes"), py::arg("out"), py::arg("stream"));
  m.def("adamw_cuda", &adamw_entry<adamw_cuda>, ADAMW_ARGS);
#endif
}
