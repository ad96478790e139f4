// Entry points of the compiled kernels, shared by the CPU sources, the CUDA sources and
// bindings.cpp. Everything is raw pointers + sizes, so this library never links against
// libtorch: bindings.cpp fills these structs from torch tensors only after checking each one
// (checks.h), and allocation stays in Python (kernels/ops/).
#pragma once

#include <cstdint>
#include <vector>

namespace kernels {

// Storage dtype codes; bindings.cpp derives them from each tensor's dtype (checks.h).
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Row-wise cross-entropy over logits [N, V] (row stride `row_stride`, unit column stride).
// Writes the fp32 loss of every row and, when `grad` is non-null, d(loss_i)/d(logits_i) times
// scale * row_scale[i] (row_scale may be null) in the logits' dtype. `grad` may alias `logits`.
struct CrossEntropyArgs {
  const void* logits;
  int dtype;  // DType code
  int64_t n_rows, vocab, row_stride;
  const int64_t* targets;
  int64_t ignore_index;
  float label_smoothing, z_loss, softcap;  // softcap <= 0 disables it
  float* loss;                             // [N] fp32, 0 for ignored rows
  void* grad;                              // nullable, [N, V] same dtype as logits
  int64_t grad_row_stride;
  float scale;
  const float* row_scale;  // nullable, [N] fp32
  int n_threads;
  int64_t stream;          // CUDA only: cudaStream_t as an integer
};

// One AdamW step over many tensors at once (one pass per element; optional clip coefficient
// folded in). Pointers are per tensor; `masters` entries are 0 for fp32 params.
struct AdamWArgs {
  std::vector<int64_t> params, grads, exp_avgs, exp_avg_sqs, masters, steps, sizes;
  std::vector<int> dtypes;  // param (and grad) dtype per tensor
  double lr, beta1, beta2, eps, weight_decay;
  float clip_coef;           // CPU: multiply grads by this (1 = no clipping)
  int64_t clip_sumsq;        // CUDA: device float* holding sum of squares, 0 = no clipping
  double max_grad_norm;      // CUDA: coefficient computed on device from clip_sumsq
  int n_threads;
  int64_t stream;
};

// A weight-only quantized W [n, k] (layout: kernels/reference.py). kind kNF4: codes = 4-bit codes (2 per
// byte, high nibble first, flat row-major), qabsmax [ceil(n*k/64)] indices into code2 [256], absmax2
// [ceil(n*k/64/256)], offset, nf4 [16] the code book. kind kInt8: codes = int8 [n, k], scale [n].
enum QuantKind : int { kNF4 = 0, kInt8 = 1 };
struct QuantWeight {
  int kind;
  const uint8_t* codes;
  const uint8_t* qabsmax;
  const float* absmax2;
  const float* code2;
  const float* nf4;
  float offset;
  const float* scale;
  int64_t n, k;
};

// One decode step of a pre-norm decoder (decode_step.cpp): B new tokens, one per row, through
// every layer and the LM head. Norms, embedding, biases, cache and logits share one dtype (fp32 or
// bf16), as do dense weights; a weight may instead be quantized (NF4 or int8, QuantWeight). The
// bindings check every pointer's tensor once, when the plan is built (kernels/csrc/decode_plan.cpp).
enum Activation : int { kActSilu = 0, kActGeluTanh = 1, kActGelu = 2, kActRelu = 3 };
struct DecodeMatrix {  // a weight [n, k]: dense (of the model dtype) or quantized; neither: absent
  const void* dense;   // null unless dense
  QuantWeight q;       // q.codes non-null when quantized
  bool present() const { return dense != nullptr || q.codes != nullptr; }
  bool quantized() const { return q.codes != nullptr; }
};
struct DecodeLayer {
  const void *attn_norm, *bq, *bk, *bv, *bo, *q_norm, *k_norm;  // biases, q/k norms nullable
  DecodeMatrix wq, wk, wv, wo;
  const void *mlp_norm, *bg, *bu, *bd;
  DecodeMatrix wg, wu, wd;  // wg absent: down(act(up(x)))
  const float *cos, *sin;  // [max_pos, head_dim] fp32, or null: no RoPE on this layer
  int64_t window;          // sliding window (keys pos - window < k <= pos), 0 = global
};
struct DecodeModel {
  int dtype;  // kF32 or kBF16
  int64_t hidden, n_heads, n_kv_heads, head_dim, intermediate, vocab, max_len, max_pos, cache_batch;
  float eps, norm_offset, qk_norm_offset, embed_scale, attn_scale;  // embed_scale 0: none
  int activation;  // Activation
  const void *embed, *final_norm;  // embed [V, C]
  DecodeMatrix lm_head;            // [V, C] (its dense pointer may be embed's)
  void *cache_k, *cache_v;         // [L, cache_batch, n_kv_heads, max_len, head_dim]
  std::vector<DecodeLayer> layers;
};
struct DecodeStepArgs {
  const int64_t* ids;  // [batch] token ids
  const int64_t* pos;  // [batch] cache slot of each row's new token (= tokens already cached)
  int64_t batch;
  void* logits;  // [batch, vocab]
  int n_threads;
  int64_t* argmax;  // [batch] each row's argmax of its logits (torch.argmax's ties and NaN), or null
};

// out [M, N] = x [M, K] @ weight [N, K]^T (+ bias [N]), all contiguous and of one dtype
// (fp32 or bf16; bias nullable); fp32 accumulation. Meant for small M (decoding).
struct LinearArgs {
  const void* x;
  const void* weight;
  const void* bias;  // nullable
  void* out;
  int dtype;  // DType code: kF32 or kBF16
  int64_t m, n, k;
  int n_threads;
};

// y [N, C] = RMSNorm of x rows (row stride x_row_stride, unit column stride) with weight [C];
// rstd [N] receives 1 / rms(x_i). See rms_norm.cpp for the exact Llama / Gemma semantics.
// Dtypes (x, weight, out): fp32 or bf16 each.
struct RMSNormArgs {
  const void* x;
  int x_dtype;
  int64_t x_row_stride;
  const void* weight;
  int w_dtype;
  void* out;  // [N, C] contiguous
  int out_dtype;
  float* rstd;
  int64_t n_rows, dim;
  float eps, weight_offset;
  int n_threads;
};

// Gradients of RMSNorm given grad_out [N, C] (contiguous, g_dtype) and the forward's rstd:
// grad_x [N, C] contiguous in x's dtype (nullable) and grad_weight [C] fp32 (nullable).
struct RMSNormBackwardArgs {
  const void* grad_out;
  int g_dtype;
  const void* x;
  int x_dtype;
  int64_t x_row_stride;
  const void* weight;
  int w_dtype;
  const float* rstd;
  void* grad_x;
  float* grad_weight;
  int64_t n_rows, dim;
  float weight_offset;
  int n_threads;
};

// Rotate-half RoPE of x [batch, seq, heads, head_dim] (element strides in_stride for the first
// three dims, unit stride within a head) into out (strides out_stride) with fp32 tables
// cos, sin [table_batch (1 or batch), seq, head_dim]; inverse = 1 rotates back (backward).
struct RopeArgs {
  const void* x;
  int x_dtype;
  int64_t in_stride[3];
  void* out;
  int out_dtype;
  int64_t out_stride[3];
  const float* cos;
  const float* sin;
  int64_t table_batch, batch, seq, heads, head_dim;
  int inverse;
  int n_threads;
};

// act(gate) * up over n elements (glu.cpp): gate, up, out, grad_out, grad_gate, grad_up all dense
// and of one dtype (fp32 or bf16). Forward writes out; backward reads grad_out and writes grad_gate
// and grad_up (out unused).
enum GluActivation : int { kGluSilu = 0, kGluGeluTanh = 1 };
struct GluArgs {
  const void* gate;
  const void* up;
  void* out;
  const void* grad_out;
  void* grad_gate;
  void* grad_up;
  int dtype;
  int activation;  // GluActivation
  int64_t n;
  int n_threads;
};

// out [rows, k] (fp32 or bf16, contiguous) = rows [row0, row0 + rows) of W, dequantized exactly as the reference.
struct QuantDequantArgs {
  QuantWeight w;
  int64_t row0, rows;
  void* out;
  int out_dtype;
  int n_threads;
};

// out [m, n] = x [m, k] @ W^T (+ bias [n]); x, bias and out of one dtype (fp32 or bf16); m <= 8; NF4 needs
// k % 64 == 0. fp32 accumulation.
struct QuantGemvArgs {
  QuantWeight w;
  const void* x;
  const void* bias;  // nullable
  void* out;
  int dtype;
  int64_t m;
  int n_threads;
};

void cross_entropy_cpu(const CrossEntropyArgs& a);
void rms_norm_cpu(const RMSNormArgs& a);
void rms_norm_backward_cpu(const RMSNormBackwardArgs& a);
void rope_cpu(const RopeArgs& a);
void glu_cpu(const GluArgs& a);
void glu_backward_cpu(const GluArgs& a);
void linear_cpu(const LinearArgs& a);
void decode_step_cpu(const DecodeModel& m, const DecodeStepArgs& s);
double grad_sumsq_cpu(const std::vector<int64_t>& grads, const std::vector<int64_t>& sizes,
                      const std::vector<int>& dtypes, int n_threads);
void adamw_cpu(const AdamWArgs& a);
void quant_dequant_cpu(const QuantDequantArgs& a);
void quant_gemv_cpu(const QuantGemvArgs& a);

#ifdef ENGINE_WITH_CUDA
void cross_entropy_cuda(const CrossEntropyArgs& a);
// Adds the sum of squares of all grads into the device float at `out` (no host sync).
void grad_sumsq_cuda(const std::vector<int64_t>& grads, const std::vector<int64_t>& sizes,
                     const std::vector<int>& dtypes, int64_t out, int64_t stream);
void adamw_cuda(const AdamWArgs& a);
void quant_dequant_cuda(const QuantDequantArgs& a, int64_t stream);
void quant_gemv_cuda(const QuantGemvArgs& a, int64_t stream);
#endif

}  // namespace kernels
