// kernels._C.DecodePlan: the fused decode step's weights, cache and tables, checked ONCE.
//
// Checking ~20 tensors per layer through their Python attributes costs microseconds each; on
// every token that would be a millisecond for a 30-layer model. So the plan checks every tensor
// (dtype, device, shape, contiguity) when it is built and keeps a reference to each (their memory
// stays alive however the model changes); step() then checks only what changes per token: the ids,
// positions and logits. Whoever builds the plan (engine/infer/decode_step.py) rebuilds it when the
// model's tensors are replaced.
//
// A weight matrix is a tensor of the model dtype (dense) or, quantized (engine.quant), the tuple
// kernels/ops/quant_linear.py's _weight_args gives: (kind, n, k, codes, qabsmax, absmax2, code2, nf4,
// offset, scale), checked by quant_weight like the quantized layer's own entries.
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "checks.h"
#include "ops.h"
#include "quant_gemv.h"

namespace kernels {
namespace {

constexpr int64_t kMaxBatch = 64;     // decode_step.cpp keeps a row's gate/up values on the stack
constexpr int64_t kMaxHeadDim = 512;  // ... and one head's attention output
constexpr size_t kLayerTensors = 20;  // the entries of one layer tuple, in DecodeLayer's order

class DecodePlan {
 public:
  DecodePlan(py::handle embed, py::handle final_norm, py::handle lm_head, py::handle cache_k, py::handle cache_v,
             py::list layers, std::vector<int64_t> windows, int64_t n_heads, float eps, float norm_offset,
             float qk_norm_offset, float embed_scale, float attn_scale, int activation) {
    Checker c("DecodePlan", false);
    const TensorArg e = c.tensor(embed, "embed");
    c.dtype_in(e, {kF32, kBF16});
    c.expect(e.dim() == 2 && e.contiguous(), e, "a contiguous [V, C]");
    const int dt = e.dtype;
    m_.dtype = dt, m_.vocab = e.shape[0], m_.hidden = e.shape[1];
    const int64_t V = m_.vocab, C = m_.hidden;
    const TensorArg k = c.tensor(cache_k, "cache_k");
    c.expect(k.dtype == dt && k.dim() == 5 && k.contiguous(), k,
             std::string("a contiguous ") + dtype_name(dt) + " [L, B, nkv, max_len, hd]");
    const int64_t L = k.shape[0];
    m_.cache_batch = k.shape[1], m_.n_kv_heads = k.shape[2], m_.max_len = k.shape[3], m_.head_dim = k.shape[4];
    const int64_t nkv = m_.n_kv_heads, hd = m_.head_dim;
    const TensorArg v = c.tensor(cache_v, "cache_v");
    c.dense_like(v, k, dt);
    if (n_heads <= 0 || nkv <= 0 || n_heads % nkv)
      c.fail("n_heads", "a positive multiple of the cache's " + std::to_string(nkv) + " kv heads",
             std::to_string(n_heads));
    if (hd > kMaxHeadDim || hd % 2) c.fail("cache_k", "an even head_dim <= 512", std::to_string(hd));
    if (int64_t(py::len(layers)) != L || int64_t(windows.size()) != L)
      c.fail("layers", std::to_string(L) + " layers and windows (the cache's)",
             std::to_string(py::len(layers)) + " and " + std::to_string(windows.size()));
    if (activation < kActSilu || activation > kActRelu) c.fail("activation", "0..3", std::to_string(activation));
    m_.n_heads = n_heads, m_.eps = eps, m_.norm_offset = norm_offset, m_.qk_norm_offset = qk_norm_offset;
    m_.embed_scale = embed_scale, m_.attn_scale = attn_scale, m_.activation = activation;
    m_.embed = e.data, m_.cache_k = k.data, m_.cache_v = v.data;
    const TensorArg fn = c.tensor(final_norm, "final_norm");
    c.dense(fn, dt, {C});
    m_.final_norm = fn.data;
    keep_ = {py::reinterpret_borrow<py::object>(embed), py::reinterpret_borrow<py::object>(final_norm),
             py::reinterpret_borrow<py::object>(cache_k), py::reinterpret_borrow<py::object>(cache_v)};
    m_.lm_head = matrix(c, lm_head, "lm_head", V, C, dt, false);
    m_.intermediate = -1;
    m_.max_pos = -1;  // no RoPE layer: positions are bounded by the cache only
    const int64_t Q = n_heads * hd, KV = nkv * hd;
    for (int64_t l = 0; l < L; ++l) {
      py::tuple t = layers[size_t(l)].cast<py::tuple>();
      const std::string at = "layers[" + std::to_string(l) + "]";
      if (t.size() != kLayerTensors)
        c.fail(at, std::to_string(kLayerTensors) + " entries", std::to_string(t.size()));
      auto get = [&](size_t i, const char* name, std::vector<int64_t> shape, bool optional) -> const void* {
        const TensorArg a = c.optional(t[i], at + "." + name);
        if (!a.present) {
          if (!optional) c.fail(a.name, "a tensor", "None");
          return nullptr;
        }
        c.dense(a, dt, shape);
        keep_.push_back(py::reinterpret_borrow<py::object>(t[i]));
        return a.data;
      };
      auto mat = [&](size_t i, const char* name, int64_t n, int64_t k, bool optional) {
        return matrix(c, t[i], at + "." + name, n, k, dt, optional);
      };
      // the MLP width comes from the first up_proj; every layer must agree
      const int64_t up_rows = rows_of(c, t[13], at + ".up_proj");
      if (m_.intermediate >= 0 && up_rows != m_.intermediate)
        c.fail(at + ".up_proj", std::to_string(m_.intermediate) + " rows (one F for all layers)", std::to_string(up_rows));
      const int64_t F = m_.intermediate = up_rows;
      DecodeLayer d{};
      d.attn_norm = get(0, "attn_norm", {C}, false);
      d.wq = mat(1, "q_proj", Q, C, false), d.wk = mat(2, "k_proj", KV, C, false);
      d.wv = mat(3, "v_proj", KV, C, false);
      d.bq = get(4, "q_bias", {Q}, true), d.bk = get(5, "k_bias", {KV}, true), d.bv = get(6, "v_bias", {KV}, true);
      d.wo = mat(7, "o_proj", C, Q, false), d.bo = get(8, "o_bias", {C}, true);
      d.q_norm = get(9, "q_norm", {hd}, true), d.k_norm = get(10, "k_norm", {hd}, true);
      d.mlp_norm = get(11, "mlp_norm", {C}, false);
      d.wg = mat(12, "gate_proj", F, C, true), d.wu = mat(13, "up_proj", F, C, false);
      d.wd = mat(14, "down_proj", C, F, false);
      // one pass reads q|k|v (and gate|up) with one x layout: they must be stored alike
      same_storage(c, d.wq, d.wk, at + ".k_proj", "q_proj");
      same_storage(c, d.wq, d.wv, at + ".v_proj", "q_proj");
      if (d.wg.present()) same_storage(c, d.wu, d.wg, at + ".gate_proj", "up_proj");
      d.bg = get(15, "gate_bias", {F}, true), d.bu = get(16, "up_bias", {F}, true), d.bd = get(17, "down_bias", {C}, true);
      const TensorArg co = c.optional(t[18], at + ".cos");
      if (co.present) {
        c.expect(co.dtype == kF32 && co.dim() == 2 && co.shape[1] == hd && co.contiguous(), co,
                 "a contiguous float32 [max_pos, " + std::to_string(hd) + "]");
        const TensorArg si = c.tensor(t[19], at + ".sin");
        c.dense_like(si, co, kF32);
        m_.max_pos = m_.max_pos < 0 ? co.shape[0] : std::min(m_.max_pos, co.shape[0]);
        d.cos = static_cast<const float*>(co.data), d.sin = static_cast<const float*>(si.data);
        keep_.push_back(py::reinterpret_borrow<py::object>(t[18]));
        keep_.push_back(py::reinterpret_borrow<py::object>(t[19]));
      } else if (!t[19].is_none()) {
        c.fail(at + ".sin", "None (cos is None)", "a tensor");
      }
      if (windows[size_t(l)] < 0) c.fail(at + ".window", "0 (global) or a positive window", std::to_string(windows[size_t(l)]));
      d.window = windows[size_t(l)];
      m_.layers.push_back(d);
    }
  }

  // logits [B, V] = the model's next-token logits after ids [B] at cache slots pos [B]; argmax
  // [B] int64 (optional) = each row's argmax of those logits, as torch.argmax picks it.
  void step(py::handle ids, py::handle pos, py::handle logits, int n_threads, py::handle argmax) {
    Checker c("DecodePlan.step", false);
    c.threads(n_threads);
    const TensorArg i = c.tensor(ids, "ids");
    c.expect(i.dtype == kI64 && i.dim() == 1 && i.contiguous() && i.shape[0] >= 1 && i.shape[0] <= m_.cache_batch &&
                 i.shape[0] <= kMaxBatch, i,
             "a contiguous int64 [B] with 1 <= B <= " + std::to_string(std::min(m_.cache_batch, kMaxBatch)));
    const int64_t B = i.shape[0];
    const TensorArg p = c.tensor(pos, "pos");
    c.dense(p, kI64, {B});
    const TensorArg o = c.tensor(logits, "logits");
    c.dense(o, m_.dtype, {B, m_.vocab});
    const TensorArg am = c.optional(argmax, "argmax");
    if (am.present) c.dense(am, kI64, {B});
    const int64_t* id = static_cast<const int64_t*>(i.data);
    const int64_t* ps = static_cast<const int64_t*>(p.data);
    const int64_t limit = m_.max_pos < 0 ? m_.max_len : std::min(m_.max_len, m_.max_pos);
    for (int64_t b = 0; b < B; ++b) {
      if (id[b] < 0 || id[b] >= m_.vocab)
        c.fail("ids[" + std::to_string(b) + "]", "a token id in [0, " + std::to_string(m_.vocab) + ")",
               std::to_string(id[b]));
      if (ps[b] < 0 || ps[b] >= limit)
        c.fail("pos[" + std::to_string(b) + "]", "a cache slot in [0, " + std::to_string(limit) + ")",
               std::to_string(ps[b]));
    }
    DecodeStepArgs a{id, ps, B, o.data, n_threads, am.present ? static_cast<int64_t*>(am.data) : nullptr};
    py::gil_scoped_release release;
    decode_step_cpu(m_, a);
  }

 private:
  // A weight matrix [n, k] (see the top of this file): dense of dtype dt, a quantized tuple, or None if optional.
  DecodeMatrix matrix(Checker& c, py::handle h, const std::string& at, int64_t n, int64_t k, int dt, bool optional) {
    DecodeMatrix mtx{};
    if (py::isinstance<py::tuple>(h)) {
      py::tuple q = h.cast<py::tuple>();
      if (q.size() != 10) c.fail(at, "a quantized weight tuple of 10 entries", std::to_string(q.size()) + " entries");
      const int64_t qn = q[1].cast<int64_t>(), qk = q[2].cast<int64_t>();
      if (qn != n || qk != k)
        c.fail(at, "a quantized weight " + shape_str({n, k}), "one of " + shape_str({qn, qk}));
      mtx.q = quant_weight(c, q[0].cast<int>(), n, k, q[3], q[4], q[5], q[6], q[7], q[8].cast<float>(), q[9], at + ".");
      if (mtx.q.kind == kNF4 && k % qgemv::kBlock)  // the NF4 rows read whole 64-blocks of one row
        c.fail(at, "an NF4 weight with in_features a multiple of 64", std::to_string(k));
      keep_.push_back(py::reinterpret_borrow<py::object>(h));
      return mtx;
    }
    const TensorArg a = c.optional(h, at);
    if (!a.present) {
      if (!optional) c.fail(at, "a tensor", "None");
      return mtx;
    }
    c.dense(a, dt, {n, k});
    keep_.push_back(py::reinterpret_borrow<py::object>(h));
    mtx.dense = a.data;
    return mtx;
  }

  static int64_t rows_of(Checker& c, py::handle h, const std::string& at) {
    if (py::isinstance<py::tuple>(h)) return h.cast<py::tuple>()[1].cast<int64_t>();
    const TensorArg a = c.tensor(h, at);
    if (a.dim() != 2) c.fail(at, "a 2-D weight", a.describe());
    return a.shape[0];
  }

  static void same_storage(Checker& c, const DecodeMatrix& a, const DecodeMatrix& b, const std::string& at,
                           const char* like) {
    auto kind = [](const DecodeMatrix& m) { return m.quantized() ? (m.q.kind == kNF4 ? "nf4" : "int8") : "dense"; };
    if (std::string(kind(a)) != kind(b)) c.fail(at, std::string("stored like ") + like + " (" + kind(a) + ")", kind(b));
  }

  DecodeModel m_{};
  std::vector<py::object> keep_;  // every tensor m_ points into
};

}  // namespace

void bind_decode_plan(py::module_& m) {
  py::class_<DecodePlan>(m, "DecodePlan")
      .def(py::init<py::handle, py::handle, py::handle, py::handle, py::handle, py::list, std::vector<int64_t>,
                    int64_t, float, float, float, float, float, int>(),
           py::arg("embed"), py::arg("final_norm"), py::arg("lm_head"), py::arg("cache_k"), py::arg("cache_v"),
           py::arg("layers"), py::arg("windows"), py::arg("n_heads"), py::arg("eps"), py::arg("norm_offset"),
           py::arg("qk_norm_offset"), py::arg("embed_scale"), py::arg("attn_scale"), py::arg("activation"))
      .def("step", &DecodePlan::step, py::arg("ids"), py::arg("pos"), py::arg("logits"), py::arg("n_threads"),
           py::arg("argmax") = py::none());
}

}  // namespace kernels
