// Fused decode step (CPU): one new token per row through every layer of a pre-norm decoder and
// the LM head, inside ONE OpenMP parallel region.
//
// What it fuses and why: batch-1 decoding should be bound by reading each weight once per token,
// but the eager model spends per layer ~15 ATen ops (norm, 3 GEMVs, RoPE, cache writes, SDPA's
// setup for one query, o_proj, norm, 2 GEMVs, act, mul, GEMV, 2 adds) plus their Python and
// dispatch overhead, and forks the thread team ~8 times. Here each thread walks the whole step:
// it normalizes the residual row into a private buffer (a few hundred floats), streams chunks of
// the q/k/v rows (q, k and v are one index space, so the three matrices are read in one pass),
// rotates, writes the cache and attends for (row, kv head) pairs, then streams chunks of o_proj
// with the residual add fused into the GEMV's store, and the same for gate/up (both rows n read
// together, act(gate) * up written directly) and down; the LM head also picks each row's argmax.
//
// No barriers (see Phases): a thread claims ~32 KB chunks of weight rows, its own contiguous
// region first (one sequential stream per thread when both run alike), then what is left of the
// other's, and waits only until every item the next phase reads is done. A thread that is late
// (descheduled by another process, or slower) no longer stalls the other at 5 barriers per layer:
// the one that runs does the work. No allocation per layer.
//
// Numerics mirror the eager model: math in fp32, every tensor the eager path materializes is
// rounded to the model dtype at the same place (a no-op in fp32), RoPE tables as the eager path
// casts them. The GEMV is gemv.h's, so q/k/v/o/MLP outputs equal kernels.linear's bitwise; a
// quantized weight (NF4/int8, engine.quant) runs quant_gemv.h's rows, as kernels.quant_linear does,
// on x converted once per phase to their layout (reading 4 or 8 bits per weight).
// Attention for the one query is computed directly over the cache slots [lo, pos]: scores,
// fp32 softmax, weighted sum of V (SDPA's result to fp32 rounding, not bitwise).
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <thread>
#include <type_traits>
#include <vector>

#include "common.h"
#include "gemv.h"
#include "ops.h"
#include "quant_gemv.h"

namespace kernels {
namespace {

template <typename T>
inline float rnd(float v) {  // v rounded to T and back (identity for fp32)
  if constexpr (std::is_same<T, float>::value) {
    return v;
  } else {
    T t;
    store(&t, v);
    return to_f32(t);
  }
}

template <typename X>
inline X as(float v) {  // v as the GEMV's x type (rounded once for bf16)
  if constexpr (std::is_same<X, float>::value) {
    return v;
  } else {
    X t;
    store(&t, v);
    return t;
  }
}

inline float act(int kind, float g) {
  switch (kind) {
    case kActSilu: return g / (1.f + std::exp(-g));
    case kActGeluTanh: {
      const float u = 0.7978845608028654f * (g + 0.044715f * g * g * g);
      return 0.5f * g * (1.f + std::tanh(u));
    }
    case kActGelu: return 0.5f * g * (1.f + std::erf(g * 0.7071067811865476f));
    default: return g > 0.f ? g : 0.f;
  }
}

// out[0:C] = RMSNorm(x[0:C]) with weight w, rounded as kernels/reference.py rms_norm does with
// x, w and out all of dtype W.
template <typename W, typename O>
inline void norm_row(const float* x, const W* w, int64_t C, float eps, float offset, O* out) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t j = 0; j < C; ++j) ss += x[j] * x[j];
  const float r = 1.f / std::sqrt(ss / float(C) + eps);
  for (int64_t j = 0; j < C; ++j) {
    const float y = offset != 0.f ? x[j] * r * (offset + to_f32(w[j])) : to_f32(w[j]) * rnd<W>(x[j] * r);
    if constexpr (std::is_same<O, float>::value) out[j] = rnd<W>(y);
    else store(out + j, y);
  }
}

// x[0:D] rotated in place (rotate-half, kernels/csrc/rope.cpp's formula), rounded to W.
template <typename W>
inline void rope_row(float* x, const float* c, const float* s, int64_t D) {
  const int64_t H = D / 2;
  for (int64_t j = 0; j < H; ++j) {
    const float lo = x[j], hi = x[j + H];
    x[j] = rnd<W>(lo * c[j] - hi * s[j]);
    x[j + H] = rnd<W>(hi * c[j + H] + lo * s[j + H]);
  }
}

constexpr int64_t kChunkBytes = 32 << 10;  // weight bytes per claimed chunk: ~2 us of streaming

// Bytes of one row of w (K elements): dense of W, int8, or NF4 (half a byte and 1/64 of an absmax byte).
template <typename W>
inline int64_t row_bytes(const DecodeMatrix& w, int64_t K) {
  if (!w.quantized()) return K * int64_t(sizeof(W));
  return w.q.kind == kInt8 ? K : K / 2 + K / qgemv::kBlock;
}

// Chunk rows of a GEMV whose weight rows are `bytes` long.
inline int64_t chunk_rows(int64_t bytes) { return std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, bytes)); }

// Work sharing without barriers. Each phase (a GEMV, the attention, the LM head) has items [0, n),
// split into one contiguous region per thread; run() claims chunks of the caller's own region,
// then of the others' (stealing what a late thread has not started), and counts finished items in
// `done` (release); wait() returns once every item is done (acquire), spinning briefly and then
// yielding the core so that a descheduled partner can finish its last chunk.
class Phases {
 public:
  Phases(int64_t n_phases, int regions) : c_(size_t(n_phases * (regions + 1))), regions_(regions) {}

  template <typename F>
  void run(int64_t phase, int64_t n, int64_t chunk, F&& f) {  // f(lo, hi) over chunks of [0, n)
    Counter* cur = &c_[size_t(phase * (regions_ + 1))];
    const int t = omp_get_thread_num();
    for (int i = 0; i < regions_; ++i) {
      const int r = (t + i) % regions_;
      const int64_t r0 = n * r / regions_, r1 = n * (r + 1) / regions_;
      for (;;) {
        const int64_t lo = r0 + cur[r].v.fetch_add(chunk, std::memory_order_relaxed);
        if (lo >= r1) break;
        const int64_t hi = std::min(lo + chunk, r1);
        f(lo, hi);
        cur[regions_].v.fetch_add(hi - lo, std::memory_order_release);
      }
    }
  }

  void wait(int64_t phase, int64_t n) {
    const std::atomic<int64_t>& done = c_[size_t(phase * (regions_ + 1) + regions_)].v;
    for (int spin = 0; done.load(std::memory_order_acquire) < n; ++spin) {
      if (spin < 2048) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  struct alignas(64) Counter { std::atomic<int64_t> v{0}; };  // one cache line each: no false sharing
  std::vector<Counter> c_;  // [phase][region cursors..., done]
  int regions_;
};

// Is logit v at index i a better argmax than (best, at)? torch.argmax's order: NaN is the largest
// value, and among equal values the lowest index wins.
inline bool better(float v, int64_t i, float best, int64_t at) {
  if (at < 0) return true;
  if (std::isnan(best)) return std::isnan(v) && i < at;
  if (std::isnan(v)) return true;
  return v > best || (v == best && i < at);
}

template <typename W>
struct Step {
  using X = typename gemv::XOf<W>::type;  // what the GEMV reads x as
  const DecodeModel& m;
  const DecodeStepArgs& s;
  int64_t B, C, Q, KV, NQKV, F, hd;
  std::vector<float> h, qkv;     // residual [B, C]; q|k|v [B, NQKV] (fp32 holding W-rounded values)
  std::vector<X> y, a;           // attention output [B, Q]; act(gate) * up [B, F]
  int nt;                        // threads asked for (= regions per phase)
  Phases phases;                 // embed, 5 per layer, LM head
  std::vector<float> best;       // [nt, B] each thread's best logit per row so far (argmax)
  std::vector<int64_t> best_at;  // [nt, B] its index, -1: none yet

  Step(const DecodeModel& model, const DecodeStepArgs& args)
      : m(model), s(args), nt(std::max(1, args.n_threads)), phases(5 * int64_t(model.layers.size()) + 2, nt) {
    B = s.batch, C = m.hidden, hd = m.head_dim, Q = m.n_heads * hd, KV = m.n_kv_heads * hd;
    NQKV = Q + 2 * KV, F = m.intermediate;
    h.resize(size_t(B * C)), qkv.resize(size_t(B * NQKV)), y.resize(size_t(B * Q)), a.resize(size_t(B * F));
    best.assign(size_t(nt * B), 0.f), best_at.assign(size_t(nt * B), -1);
  }

  // argmax[b] over the threads' partial results (the order does not matter: `better` is total).
  void finish_argmax() const {
    for (int64_t b = 0; b < B; ++b) {
      float v = 0.f;
      int64_t at = -1;
      for (int t = 0; t < nt; ++t)
        if (best_at[t * B + b] >= 0 && better(best[t * B + b], best_at[t * B + b], v, at))
          v = best[t * B + b], at = best_at[t * B + b];
      s.argmax[b] = at;
    }
  }

  // Rows [n0, n1) of a GEMV over the B rows of x [B, K]: each output row n calls put(b, n, value). A
  // quantized weight reads xq instead (x in qgemv::quant_x's layout for its kind, rows x_stride apart).
  template <typename Put>
  void gemv(const DecodeMatrix& weight, const void* bias, const X* x, const float* xq, int64_t K, int64_t n0,
            int64_t n1, float* acc, Put put) {
    const W* bs = static_cast<const W*>(bias);
    if (weight.quantized()) {
      for (int64_t n = n0; n < n1; ++n) {
        qgemv::rows(weight.q, n, xq, B, acc);
        for (int64_t b = 0; b < B; ++b) put(b, n, bs ? acc[b] + to_f32(bs[n]) : acc[b]);
      }
      return;
    }
    const W* w = static_cast<const W*>(weight.dense);
    for (int64_t n = n0; n < n1; ++n) {
      gemv::row_dots(w + n * K, x, B, K, acc);
      for (int64_t b = 0; b < B; ++b) put(b, n, bs ? acc[b] + to_f32(bs[n]) : acc[b]);
    }
  }

  void attention(const DecodeLayer& L, int64_t layer, int64_t b, int64_t g, std::vector<float>& scores) {
    const int64_t pos = s.pos[b], group = m.n_heads / m.n_kv_heads;
    const int64_t slot = ((layer * m.cache_batch + b) * m.n_kv_heads + g) * m.max_len;  // cache row (l, b, g)
    W* kc = static_cast<W*>(m.cache_k) + slot * hd;
    W* vc = static_cast<W*>(m.cache_v) + slot * hd;
    float* k = qkv.data() + b * NQKV + Q + g * hd;
    const float* v = k + KV;
    const float* c = L.cos ? L.cos + pos * hd : nullptr;
    const float* sn = L.sin ? L.sin + pos * hd : nullptr;
    if (L.k_norm) norm_row<W, float>(k, static_cast<const W*>(L.k_norm), hd, m.eps, m.qk_norm_offset, k);
    if (c) rope_row<W>(k, c, sn, hd);
    for (int64_t d = 0; d < hd; ++d) store(kc + pos * hd + d, k[d]), store(vc + pos * hd + d, v[d]);
    const int64_t first = L.window > 0 ? std::max<int64_t>(0, pos - L.window + 1) : 0;
    for (int64_t j = 0; j < group; ++j) {
      const int64_t head = g * group + j;
      float* q = qkv.data() + b * NQKV + head * hd;
      if (L.q_norm) norm_row<W, float>(q, static_cast<const W*>(L.q_norm), hd, m.eps, m.qk_norm_offset, q);
      if (c) rope_row<W>(q, c, sn, hd);
      X qx[512];  // q as the GEMV reads x (exact: q already holds W-rounded values)
      for (int64_t d = 0; d < hd; ++d) qx[d] = as<X>(q[d]);
      float top = -INFINITY;
      for (int64_t t = first; t <= pos; ++t) {  // q . k_t with the GEMV's vector tile (vdpbf16ps in bf16)
        float dot = 0.f;
        gemv::tile<1>(kc + t * hd, qx, hd, hd, &dot);
        scores[t] = dot * m.attn_scale;
        top = std::max(top, scores[t]);
      }
      float total = 0.f;
      for (int64_t t = first; t <= pos; ++t) total += (scores[t] = std::exp(scores[t] - top));
      float out[512];  // head_dim <= 512, checked at plan time
      std::fill(out, out + hd, 0.f);
      for (int64_t t = first; t <= pos; ++t) {
        const W* vt = vc + t * hd;
        const float p = scores[t] / total;
#pragma omp simd
        for (int64_t d = 0; d < hd; ++d) out[d] += p * to_f32(vt[d]);
      }
      X* yo = y.data() + b * Q + head * hd;
      for (int64_t d = 0; d < hd; ++d) yo[d] = as<X>(rnd<W>(out[d]));
    }
  }

  void run_thread() {
    const W* embed = static_cast<const W*>(m.embed);
    std::vector<X> xn(size_t(B * C));  // this thread's copy of the normalized residual
    std::vector<float> acc(static_cast<size_t>(B)), scores(static_cast<size_t>(m.max_len));
    int64_t xq_row = 0;  // floats per row of a phase's x for quantized weights (either kind's layout)
    for (int64_t K : {C, Q, F}) xq_row = std::max({xq_row, qgemv::x_stride(kNF4, K), qgemv::x_stride(kInt8, K)});
    std::vector<float> xq(size_t(B * xq_row));
    int64_t xq_phase = -1;  // the phase xq was converted for
    bool normed = false;  // xn holds the current norm (computed once a chunk that reads it is claimed)
    // xn = norm(h) with `weight`, on the first chunk this thread claims in a phase that reads it:
    // h cannot change while that chunk is unfinished (the phase that writes h waits for it).
    auto norm_once = [&](const void* weight) {
      if (normed) return;
      for (int64_t b = 0; b < B; ++b)
        norm_row<W, X>(&h[b * C], static_cast<const W*>(weight), C, m.eps, m.norm_offset, &xn[b * C]);
      normed = true;
    };
    // xq = x [B, K] in the layout of w's kind, once per phase (x is complete while the phase runs); null
    // for a dense w.
    auto quant_in = [&](int64_t phase, const DecodeMatrix& w, const X* x, int64_t K) -> const float* {
      if (!w.quantized()) return nullptr;
      if (xq_phase != phase) {
        const int64_t S = qgemv::x_stride(w.q.kind, K);
        for (int64_t b = 0; b < B; ++b) qgemv::quant_x(x + b * K, K, w.q.kind, xq.data() + b * S);
        xq_phase = phase;
      }
      return xq.data();
    };
    phases.run(0, B, 1, [&](int64_t b0, int64_t b1) {  // embedding rows (ids checked by the entry)
      for (int64_t i = b0 * C; i < b1 * C; ++i) {
        const float e = to_f32(embed[s.ids[i / C] * C + i % C]);
        h[i] = m.embed_scale != 0.f ? rnd<W>(e * m.embed_scale) : e;
      }
    });
    phases.wait(0, B);
    const int64_t qk = Q + KV;
    auto put_qkv = [&](int64_t off) {
      return [this, off](int64_t b, int64_t n, float v) { qkv[b * NQKV + off + n] = rnd<W>(v); };
    };
    auto add_h = [this](int64_t b, int64_t n, float v) { h[b * C + n] = rnd<W>(h[b * C + n] + rnd<W>(v)); };
    for (int64_t l = 0; l < int64_t(m.layers.size()); ++l) {
      const DecodeLayer& L = m.layers[l];
      const int64_t ph = 1 + 5 * l;
      normed = false;
      // q, k and v rows as one index space: one pass over the three matrices
      phases.run(ph, NQKV, chunk_rows(row_bytes<W>(L.wq, C)), [&](int64_t lo, int64_t hi) {
        norm_once(L.attn_norm);
        const float* x = quant_in(ph, L.wq, xn.data(), C);  // q, k, v are stored alike (checked by the plan)
        if (lo < Q) gemv(L.wq, L.bq, xn.data(), x, C, lo, std::min(hi, Q), acc.data(), put_qkv(0));
        if (hi > Q && lo < qk)
          gemv(L.wk, L.bk, xn.data(), x, C, std::max(lo, Q) - Q, std::min(hi, qk) - Q, acc.data(), put_qkv(Q));
        if (hi > qk) gemv(L.wv, L.bv, xn.data(), x, C, std::max(lo, qk) - qk, hi - qk, acc.data(), put_qkv(qk));
      });
      phases.wait(ph, NQKV);
      phases.run(ph + 1, B * m.n_kv_heads, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) attention(L, l, i / m.n_kv_heads, i % m.n_kv_heads, scores);
      });
      phases.wait(ph + 1, B * m.n_kv_heads);
      // o_proj, its output added into the residual row as it is stored
      phases.run(ph + 2, C, chunk_rows(row_bytes<W>(L.wo, Q)), [&](int64_t lo, int64_t hi) {
        gemv(L.wo, L.bo, y.data(), quant_in(ph + 2, L.wo, y.data(), Q), Q, lo, hi, acc.data(), add_h);
      });
      phases.wait(ph + 2, C);
      normed = false;
      phases.run(ph + 3, F, chunk_rows(2 * row_bytes<W>(L.wu, C)), [&](int64_t lo, int64_t hi) {
        norm_once(L.mlp_norm);
        const float* x = quant_in(ph + 3, L.wu, xn.data(), C);  // gate and up are stored alike
        for (int64_t n = lo; n < hi; ++n) {  // gate row n and up row n: act(gate) * up straight into a
          float gate[64], up[64];  // B <= 64, checked by the entry
          if (L.wg.present()) {
            gemv(L.wg, L.bg, xn.data(), x, C, n, n + 1, acc.data(), [&](int64_t b, int64_t, float v) { gate[b] = v; });
          }
          gemv(L.wu, L.bu, xn.data(), x, C, n, n + 1, acc.data(), [&](int64_t b, int64_t, float v) { up[b] = v; });
          for (int64_t b = 0; b < B; ++b) {
            const float u = rnd<W>(up[b]);
            const float v = L.wg.present() ? rnd<W>(rnd<W>(act(m.activation, rnd<W>(gate[b]))) * u) : rnd<W>(act(m.activation, u));
            a[b * F + n] = as<X>(v);
          }
        }
      });
      phases.wait(ph + 3, F);
      phases.run(ph + 4, C, chunk_rows(row_bytes<W>(L.wd, F)), [&](int64_t lo, int64_t hi) {
        gemv(L.wd, L.bd, a.data(), quant_in(ph + 4, L.wd, a.data(), F), F, lo, hi, acc.data(), add_h);
      });
      phases.wait(ph + 4, C);
    }
    normed = false;
    W* logits = static_cast<W*>(s.logits);
    const int t = omp_get_thread_num();
    float* my_best = &best[t * B];
    int64_t* my_at = &best_at[t * B];
    const int64_t head = 1 + 5 * int64_t(m.layers.size());
    phases.run(head, m.vocab, chunk_rows(row_bytes<W>(m.lm_head, C)), [&](int64_t lo, int64_t hi) {
      norm_once(m.final_norm);
      const float* x = quant_in(head, m.lm_head, xn.data(), C);
      gemv(m.lm_head, nullptr, xn.data(), x, C, lo, hi, acc.data(), [&](int64_t b, int64_t n, float v) {
        store(logits + b * m.vocab + n, v);
        const float r = rnd<W>(v);  // the logit as stored: argmax sees what torch.argmax would
        if (better(r, n, my_best[b], my_at[b])) my_best[b] = r, my_at[b] = n;
      });
    });
  }
};

template <typename W>
void run(const DecodeModel& m, const DecodeStepArgs& s) {
  Step<W> step(m, s);
#pragma omp parallel num_threads(step.nt)
  step.run_thread();
  if (s.argmax) step.finish_argmax();
}

}  // namespace

void decode_step_cpu(const DecodeModel& m, const DecodeStepArgs& s) {
  if (s.batch <= 0) return;
  if (m.dtype == kBF16) run<bf16>(m, s);
  else run<float>(m, s);
}

}  // namespace kernels
