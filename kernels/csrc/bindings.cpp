// pybind11 bindings: each entry takes torch tensors, checks every one it will take a pointer from
// (checks.h: dtype, device, shape, strides; a ValueError otherwise, never a crash), and fills the
// argument structs of ops.h. Tensors are read through their Python attributes, so the module
// builds without torch headers. kernels/ decides when to call these; they trust nothing it says.
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "checks.h"
#include "gemv.h"
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
  d["gemv_prefetch"] = gemv::kPrefetch;  // software prefetch in the GEMV (gemv.h: on for Intel)
#ifdef ENGINE_WITH_CUDA
  d["cuda"] = true;
  d["cuda_arch"] = std::string(ENGINE_CUDA_ARCHS);
#else
  d["cuda"] = false;
  d["cuda_arch"] = std::string("");
#endif
  return d;
}

// Every entry checks each tensor (checks.h) before it takes a pointer, then releases the GIL:
// the kernels are long-running and touch no Python objects.

template <void (*Fn)(const CrossEntropyArgs&), bool kCuda>
void cross_entropy_entry(py::handle logits, py::handle targets, py::handle loss, py::handle grad,
                         py::handle row_scale, int64_t ignore_index, float label_smoothing,
                         float z_loss, float softcap, float scale, int n_threads, int64_t stream) {
  Checker c(kCuda ? "cross_entropy_cuda" : "cross_entropy_cpu", kCuda);
  const TensorArg z = c.tensor(logits, "logits");
  c.dtype_in(z, {kF32, kBF16, kF16});
  c.expect(z.dim() == 2 && z.unit_last_stride(), z, "logits [N, V] with unit column stride");
  const int64_t n = z.shape[0], v = z.shape[1];
  const TensorArg t = c.tensor(targets, "targets");
  c.dense(t, kI64, {n}, " (one per row of logits)");
  const TensorArg l = c.tensor(loss, "loss");
  c.dense(l, kF32, {n}, " (one per row of logits)");
  const TensorArg g = c.optional(grad, "grad");
  if (g.present)  // rows may be strided (a chunk of a bigger buffer) but must not overlap
    c.expect(g.dtype == z.dtype && g.shape == z.shape && g.unit_last_stride() &&
                 (n <= 1 || g.stride[0] >= v), g,
             std::string(dtype_name(z.dtype)) + " " + shape_str(z.shape) +
                 " (as logits) with unit column stride and non-overlapping rows");
  const TensorArg rs = c.optional(row_scale, "row_scale");
  if (rs.present) c.dense(rs, kF32, {n}, " (one per row of logits)");
  if (!kCuda) c.threads(n_threads);
  CrossEntropyArgs a{z.data, z.dtype, n, v, n > 1 ? z.stride[0] : v,
                     static_cast<const int64_t*>(t.data), ignore_index, label_smoothing, z_loss,
                     softcap, static_cast<float*>(l.data), g.data,
                     g.present && n > 1 ? g.stride[0] : v, scale,
                     static_cast<const float*>(rs.data), n_threads, stream};
  py::gil_scoped_release release;
  Fn(a);
}

// Pointers, sizes and dtype codes of a list of grads, all of a kernel storage dtype and dense.
struct GradList {
  std::vector<int64_t> ptrs, sizes;
  std::vector<int> dtypes;
};

GradList grad_list(Checker& c, const py::list& grads) {
  GradList out;
  for (size_t i = 0; i < grads.size(); ++i) {
    const TensorArg g = c.tensor(grads[i], "grads[" + std::to_string(i) + "]");
    c.dtype_in(g, {kF32, kBF16, kF16});
    c.contiguous(g);
    out.ptrs.push_back(reinterpret_cast<int64_t>(g.data));
    out.sizes.push_back(g.numel());
    out.dtypes.push_back(g.dtype);
  }
  return out;
}

double grad_sumsq_cpu_entry(py::list grads, int n_threads) {
  Checker c("grad_sumsq_cpu", false);
  c.threads(n_threads);
  const GradList g = grad_list(c, grads);
  py::gil_scoped_release release;
  return grad_sumsq_cpu(g.ptrs, g.sizes, g.dtypes, n_threads);
}

// Per tensor i: params[i] fp32/bf16/fp16 dense; grads[i] the same dtype and shape; exp_avgs[i],
// exp_avg_sqs[i] fp32 of that shape; masters[i] None or fp32 of that shape; steps[i] one fp32.
template <void (*Fn)(const AdamWArgs&), bool kCuda>
void adamw_entry(py::list params, py::list grads, py::list exp_avgs, py::list exp_avg_sqs,
                 py::list masters, py::list steps, double lr, double beta1, double beta2,
                 double eps, double weight_decay, float clip_coef, py::handle clip_sumsq,
                 double max_grad_norm, int n_threads, int64_t stream) {
  Checker c(kCuda ? "adamw_cuda" : "adamw_cpu", kCuda);
  const size_t n = params.size();
  const std::pair<const char*, const py::list*> lists[] = {
      {"grads", &grads}, {"exp_avgs", &exp_avgs}, {"exp_avg_sqs", &exp_avg_sqs},
      {"masters", &masters}, {"steps", &steps}};
  for (const auto& [name, list] : lists)
    if (list->size() != n)
      c.fail(name, std::to_string(n) + " entries (one per param)", std::to_string(list->size()));
  if (!kCuda) c.threads(n_threads);
  AdamWArgs a;
  auto ptr = [](const TensorArg& t) { return reinterpret_cast<int64_t>(t.data); };
  for (size_t i = 0; i < n; ++i) {
    const std::string at = "[" + std::to_string(i) + "]";
    const TensorArg p = c.tensor(params[i], "params" + at);
    c.dtype_in(p, {kF32, kBF16, kF16});
    c.contiguous(p);
    const TensorArg g = c.tensor(grads[i], "grads" + at);
    c.dense_like(g, p, p.dtype);
    const TensorArg m = c.tensor(exp_avgs[i], "exp_avgs" + at);
    c.dense_like(m, p, kF32);
    const TensorArg v = c.tensor(exp_avg_sqs[i], "exp_avg_sqs" + at);
    c.dense_like(v, p, kF32);
    const TensorArg w = c.optional(masters[i], "masters" + at);
    if (w.present) c.dense_like(w, p, kF32);
    const TensorArg s = c.tensor(steps[i], "steps" + at);
    c.expect(s.dtype == kF32 && s.numel() == 1, s, "one float32 (the step count)");
    a.params.push_back(ptr(p));
    a.grads.push_back(ptr(g));
    a.exp_avgs.push_back(ptr(m));
    a.exp_avg_sqs.push_back(ptr(v));
    a.masters.push_back(ptr(w));
    a.steps.push_back(ptr(s));
    a.sizes.push_back(p.numel());
    a.dtypes.push_back(p.dtype);
  }
  const TensorArg cs = c.optional(clip_sumsq, "clip_sumsq");
  if (cs.present) c.expect(cs.dtype == kF32 && cs.numel() == 1, cs, "None or one float32");
  if (cs.present && !kCuda) c.fail("clip_sumsq", "None on the CPU (pass clip_coef)", cs.describe());
  a.lr = lr, a.beta1 = beta1, a.beta2 = beta2, a.eps = eps, a.weight_decay = weight_decay;
  a.clip_coef = clip_coef, a.clip_sumsq = ptr(cs), a.max_grad_norm = max_grad_norm;
  a.n_threads = n_threads, a.stream = stream;
  py::gil_scoped_release release;
  Fn(a);
}

// out [..., N] = x [..., K] @ weight [N, K]^T (+ bias [N]); all dense, one dtype (fp32 or bf16).
void linear_entry(py::handle x, py::handle weight, py::handle bias, py::handle out, int n_threads) {
  Checker c("linear_cpu", false);
  c.threads(n_threads);
  const TensorArg w = c.tensor(weight, "weight");
  c.dtype_in(w, {kF32, kBF16});
  c.expect(w.dim() == 2 && w.contiguous(), w, "a contiguous [N, K]");
  const int64_t n = w.shape[0], k = w.shape[1];
  const TensorArg xa = c.tensor(x, "x");
  c.expect(xa.dtype == w.dtype && xa.dim() >= 1 && xa.shape.back() == k && xa.contiguous(), xa,
           std::string("a contiguous ") + dtype_name(w.dtype) + " [..., K=" + std::to_string(k) + "]");
  std::vector<int64_t> out_shape(xa.shape.begin(), xa.shape.end() - 1);
  int64_t m = 1;
  for (int64_t s : out_shape) m *= s;
  out_shape.push_back(n);
  const TensorArg o = c.tensor(out, "out");
  c.expect(o.dtype == w.dtype && o.shape == out_shape && o.contiguous(), o,
           std::string("a contiguous ") + dtype_name(w.dtype) + " " + shape_str(out_shape));
  const TensorArg b = c.optional(bias, "bias");
  if (b.present) c.dense(b, w.dtype, {n}, " (one per row of weight)");
  LinearArgs a{xa.data, w.data, b.data, o.data, w.dtype, m, n, k, n_threads};
  py::gil_scoped_release release;
  linear_cpu(a);
}

// What rms_norm's forward and backward both take: x [N, C] (rows strided, unit column stride), weight [C],
// `rows` (out / grad_out: N * C elements, dense) and rstd [N] fp32.
struct RMSNormOperands {
  TensorArg x, w, rows, r;
  int64_t n, dim;
};

static RMSNormOperands rms_norm_operands(Checker& c, py::handle x, py::handle weight, py::handle rows,
                                         const char* rows_name, py::handle rstd) {
  RMSNormOperands o;
  o.x = c.tensor(x, "x");
  c.dtype_in(o.x, {kF32, kBF16});
  c.expect(o.x.dim() == 2 && o.x.unit_last_stride(), o.x, "x [N, C] with unit column stride");
  o.n = o.x.shape[0], o.dim = o.x.shape[1];
  o.w = c.tensor(weight, "weight");
  c.dtype_in(o.w, {kF32, kBF16});
  c.expect(o.w.shape == std::vector<int64_t>{o.dim} && o.w.contiguous(), o.w,
           "a contiguous [C] = " + shape_str({o.dim}));
  o.rows = c.tensor(rows, rows_name);
  c.dtype_in(o.rows, {kF32, kBF16});
  c.expect(o.rows.contiguous() && o.rows.numel() == o.n * o.dim && o.rows.dim() >= 1 && o.rows.shape.back() == o.dim,
           o.rows, "a contiguous [..., C] of N * C = " + std::to_string(o.n * o.dim) + " elements");
  o.r = c.tensor(rstd, "rstd");
  c.dense(o.r, kF32, {o.n}, " (one per row of x)");
  return o;
}

// x [N, C] with weight [C] -> out (N * C, dense), rstd [N].
void rms_norm_entry(py::handle x, py::handle weight, py::handle out, py::handle rstd, float eps,
                    float weight_offset, int n_threads) {
  Checker c("rms_norm_cpu", false);
  c.threads(n_threads);
  const RMSNormOperands o = rms_norm_operands(c, x, weight, out, "out", rstd);
  const int64_t n = o.n, dim = o.dim;
  RMSNormArgs a{o.x.data, o.x.dtype, n > 1 ? o.x.stride[0] : dim, o.w.data, o.w.dtype, o.rows.data, o.rows.dtype,
                static_cast<float*>(o.r.data), n, dim, eps, weight_offset, n_threads};
  py::gil_scoped_release release;
  rms_norm_cpu(a);
}

// grad_out (N * C, dense), x [N, C], weight [C], rstd [N] -> grad_x [N, C] in x's dtype (or
// None), grad_weight [C] fp32 (or None).
void rms_norm_backward_entry(py::handle grad_out, py::handle x, py::handle weight, py::handle rstd,
                             py::handle grad_x, py::handle grad_weight, float weight_offset,
                             int n_threads) {
  Checker c("rms_norm_backward_cpu", false);
  c.threads(n_threads);
  const RMSNormOperands o = rms_norm_operands(c, x, weight, grad_out, "grad_out", rstd);
  const TensorArg &xa = o.x, &w = o.w, &g = o.rows, &r = o.r;
  const int64_t n = o.n, dim = o.dim;
  const TensorArg gx = c.optional(grad_x, "grad_x");
  if (gx.present) c.dense(gx, xa.dtype, {n, dim}, " (as x)");
  const TensorArg gw = c.optional(grad_weight, "grad_weight");
  if (gw.present) c.dense_like(gw, w, kF32);
  RMSNormBackwardArgs a{g.data, g.dtype, xa.data, xa.dtype, n > 1 ? xa.stride[0] : dim, w.data,
                        w.dtype, static_cast<const float*>(r.data), gx.data,
                        static_cast<float*>(gw.data), n, dim, weight_offset, n_threads};
  py::gil_scoped_release release;
  rms_norm_backward_cpu(a);
}

// x [B, T, H, D] -> out [B, T, H, D] (any strides, unit stride within a head) rotated by fp32
// tables cos, sin [B|1, T, D] (dense); inverse rotates back (backward).
void rope_entry(py::handle x, py::handle out, py::handle cos, py::handle sin, bool inverse,
                int n_threads) {
  Checker c("rope_cpu", false);
  c.threads(n_threads);
  const TensorArg xa = c.tensor(x, "x");
  c.dtype_in(xa, {kF32, kBF16});
  c.expect(xa.dim() == 4 && xa.unit_last_stride() && xa.shape[3] % 2 == 0, xa,
           "x [B, T, H, D] with D even and unit stride within a head");
  const TensorArg o = c.tensor(out, "out");
  c.dtype_in(o, {kF32, kBF16});
  c.expect(o.shape == xa.shape && o.unit_last_stride(), o,
           shape_str(xa.shape) + " (as x) with unit stride within a head");
  const int64_t b = xa.shape[0], t = xa.shape[1], d = xa.shape[3];
  const TensorArg co = c.tensor(cos, "cos");
  c.expect(co.dtype == kF32 && co.dim() == 3 && (co.shape[0] == 1 || co.shape[0] == b) &&
               co.shape[1] == t && co.shape[2] == d && co.contiguous(), co,
           "a contiguous float32 [B|1, T, D] = [" + std::to_string(b) + "|1, " + std::to_string(t) +
               ", " + std::to_string(d) + "]");
  const TensorArg si = c.tensor(sin, "sin");
  c.dense_like(si, co, kF32);
  RopeArgs a{xa.data, xa.dtype, {xa.stride[0], xa.stride[1], xa.stride[2]}, o.data, o.dtype,
             {o.stride[0], o.stride[1], o.stride[2]}, static_cast<const float*>(co.data),
             static_cast<const float*>(si.data), co.shape[0], b, t, xa.shape[2], d,
             inverse ? 1 : 0, n_threads};
  py::gil_scoped_release release;
  rope_cpu(a);
}

// act(gate) * up: gate, up and every other tensor dense, one shape and one dtype (fp32 or bf16).
// Forward (grad_out None) writes out; backward reads grad_out and writes grad_gate, grad_up.
void glu_entry(py::handle gate, py::handle up, py::handle out, py::handle grad_out, py::handle grad_gate,
               py::handle grad_up, int activation, int n_threads) {
  const bool backward = !grad_out.is_none();
  Checker c(backward ? "glu_backward_cpu" : "glu_cpu", false);
  c.threads(n_threads);
  if (activation != kGluSilu && activation != kGluGeluTanh)
    c.fail("activation", "0 (silu) or 1 (gelu_tanh)", std::to_string(activation));
  const TensorArg g = c.tensor(gate, "gate");
  c.dtype_in(g, {kF32, kBF16});
  c.contiguous(g);
  const TensorArg u = c.tensor(up, "up");
  c.dense_like(u, g, g.dtype);
  GluArgs a{g.data, u.data, nullptr, nullptr, nullptr, nullptr, g.dtype, activation, g.numel(), n_threads};
  if (backward) {
    const TensorArg dy = c.tensor(grad_out, "grad_out");
    c.dense_like(dy, g, g.dtype);
    const TensorArg dg = c.tensor(grad_gate, "grad_gate");
    c.dense_like(dg, g, g.dtype);
    const TensorArg du = c.tensor(grad_up, "grad_up");
    c.dense_like(du, g, g.dtype);
    a.grad_out = dy.data, a.grad_gate = dg.data, a.grad_up = du.data;
  } else {
    const TensorArg o = c.tensor(out, "out");
    c.dense_like(o, g, g.dtype);
    a.out = o.data;
  }
  py::gil_scoped_release release;
  backward ? glu_backward_cpu(a) : glu_cpu(a);
}

#ifdef ENGINE_WITH_CUDA
void grad_sumsq_cuda_entry(py::list grads, py::handle out, int64_t stream) {
  Checker c("grad_sumsq_cuda", true);
  const GradList g = grad_list(c, grads);
  const TensorArg o = c.tensor(out, "out");
  c.expect(o.dtype == kF32 && o.numel() == 1, o, "one float32");
  py::gil_scoped_release release;
  grad_sumsq_cuda(g.ptrs, g.sizes, g.dtypes, reinterpret_cast<int64_t>(o.data), stream);
}
#endif

}  // namespace

#define CE_ARGS                                                                            \
  py::arg("logits"), py::arg("targets"), py::arg("loss"), py::arg("grad"), py::arg("row_scale"), \
      py::kw_only(), py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("z_loss"),   \
      py::arg("softcap"), py::arg("scale"), py::arg("n_threads") = 1, py::arg("stream") = 0

#define ADAMW_ARGS                                                                            \
  py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),           \
      py::arg("masters"), py::arg("steps"), py::kw_only(), py::arg("lr"), py::arg("beta1"),   \
      py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("clip_coef") = 1.0f, \
      py::arg("clip_sumsq") = py::none(), py::arg("max_grad_norm") = 0.0,                     \
      py::arg("n_threads") = 1, py::arg("stream") = 0

namespace kernels { void bind_decode_plan(py::module_& m); }  // decode_plan.cpp: kernels._C.DecodePlan
namespace kernels { void bind_quant(py::module_& m); }  // quant_bindings.cpp: kernels._C.quant_*

PYBIND11_MODULE(_C, m) {
  m.doc() = "Compiled kernels for the `kernels` package; call them through kernels/__init__.py.";
  m.def("build_info", &build_info);
  m.def("cross_entropy_cpu", &cross_entropy_entry<cross_entropy_cpu, false>, CE_ARGS);
  m.def("grad_sumsq_cpu", &grad_sumsq_cpu_entry, py::arg("grads"), py::arg("n_threads"));
  m.def("adamw_cpu", &adamw_entry<adamw_cpu, false>, ADAMW_ARGS);
  m.def("linear_cpu", &linear_entry, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("out"), py::arg("n_threads"));
  m.def("rms_norm_cpu", &rms_norm_entry, py::arg("x"), py::arg("weight"), py::arg("out"),
        py::arg("rstd"), py::arg("eps"), py::arg("weight_offset"), py::arg("n_threads"));
  m.def("rms_norm_backward_cpu", &rms_norm_backward_entry, py::arg("grad_out"), py::arg("x"),
        py::arg("weight"), py::arg("rstd"), py::arg("grad_x"), py::arg("grad_weight"),
        py::arg("weight_offset"), py::arg("n_threads"));
  m.def("rope_cpu", &rope_entry, py::arg("x"), py::arg("out"), py::arg("cos"), py::arg("sin"),
        py::arg("inverse"), py::arg("n_threads"));
  m.def("glu_cpu", &glu_entry, py::arg("gate"), py::arg("up"), py::arg("out"), py::arg("grad_out"),
        py::arg("grad_gate"), py::arg("grad_up"), py::arg("activation"), py::arg("n_threads"));
  bind_decode_plan(m);
  bind_quant(m);
#ifdef ENGINE_WITH_CUDA
  m.def("cross_entropy_cuda", &cross_entropy_entry<cross_entropy_cuda, true>, CE_ARGS);
  m.def("grad_sumsq_cuda", &grad_sumsq_cuda_entry, py::arg("grads"), py::arg("out"),
        py::arg("stream"));
  m.def("adamw_cuda", &adamw_entry<adamw_cuda, true>, ADAMW_ARGS);
#endif
}
