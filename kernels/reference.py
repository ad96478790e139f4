"""Pure-PyTorch versions of every op: the specification the compiled kernels must match, and the
fallback used when the extension is missing or can't take the input. Exact by construction:
plain torch ops, math in fp32 (or fp64 when given fp64), gradients from autograd.

Dimension names: N = tokens (rows), V = vocabulary, d = hidden size.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F


def _math_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                       label_smoothing: float = 0.0, z_loss: float = 0.0,
                       softcap: float | None = None) -> torch.Tensor:
    """Per-row loss [N] (fp32, or fp64 for fp64 logits) of logits [N, V]; ignored rows are 0.

    loss_i = (1 - eps) * (lse - z_t) + eps * (lse - mean_j z_j) + z_loss * lse^2, where
    z = softcap * tanh(logits / softcap) (or z = logits) and lse = logsumexp(z). This is
    F.cross_entropy's label smoothing, plus PaLM's z-loss and Gemma-2's logit softcap.
    """
    valid = targets != ignore_index
    # Ignored rows (padding) get exactly zero loss and gradient even if their logits are
    # inf/NaN; F.cross_entropy would propagate NaN into their gradient.
    z = torch.where(valid[:, None], logits.to(_math_dtype(logits)), 0.0)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    # log_softmax (z - max - log sum) rather than lse - z_t: with logits near 1e4 the fp32
    # rounding of lse alone would cost ~1e-3 absolute.
    logp = torch.log_softmax(z, dim=-1)  # (N, V)
    loss = -(1.0 - label_smoothing) * logp.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    if label_smoothing > 0:
        loss = loss - label_smoothing * logp.mean(dim=-1)
    if z_loss > 0:
        lse = torch.logsumexp(z, dim=-1)  # (N,)
        loss = loss + z_loss * lse * lse
    return torch.where(valid, loss, torch.zeros_like(loss))


def reduce_rows(rows: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str,
                out_dtype: torch.dtype) -> torch.Tensor:
    """Apply `reduction` to per-row losses; "mean" divides by the non-ignored count (0/0 = NaN, as torch)."""
    if reduction == "none":
        return rows.to(out_dtype)
    total = rows.sum()
    if reduction == "mean":
        total = total / (targets != ignore_index).sum()
    return total.to(out_dtype)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                  softcap: float | None = None) -> torch.Tensor:
    """Cross-entropy of logits [N, V] (any float dtype) against int64 targets [N]; loss in logits' dtype."""
    rows = cross_entropy_rows(logits, targets, ignore_index, label_smoothing, z_loss, softcap)
    return reduce_rows(rows, targets, ignore_index, reduction, logits.dtype)


def cross_entropy_rows_with_grad(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                                 scale: float, row_scale: torch.Tensor | None,
                                 want_grad: bool, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss rows [N] fp32, d(sum_i w_i loss_i)/d logits in logits' dtype), w_i = scale * row_scale[i].

    The torch counterpart of the native kernel's single pass, used per chunk by the fallback of
    linear_cross_entropy.
    """
    with torch.enable_grad():
        z = logits.detach().requires_grad_(want_grad)
        rows = cross_entropy_rows(z, targets, ignore_index, softcap=softcap)
        if not want_grad:
            return rows.detach().float(), None
        w = torch.full_like(rows, scale) if row_scale is None else scale * row_scale.to(rows.dtype)
        (grad,) = torch.autograd.grad(rows, z, grad_outputs=w)
    return rows.detach().float(), grad


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                         reduction: str = "mean", softcap: float | None = None) -> torch.Tensor:
    """Cross-entropy of hidden [N, d] @ weight[V, d].T (+ bias [V]), logits soft-capped if `softcap`;
    materializes the [N, V] logits."""
    return cross_entropy(F.linear(hidden, weight, bias), targets, ignore_index, reduction, softcap=softcap)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T (+ bias [N]) -> [..., N]: exactly F.linear, which is also what
    kernels.linear runs whenever its GEMV can't (many rows, autograd, other dtypes or devices)."""
    return F.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., C] / rms(x) * weight [C], normalized in fp32. Llama (weight_offset=0) casts to x's
    dtype, then scales (result in the promoted dtype); Gemma stores weight - 1 (weight_offset=1)
    and scales in fp32, then casts to x's dtype. out_dtype, if given, rounds the result once more."""
    dtype = x.dtype
    n = x.float()
    n = n * torch.rsqrt(n.pow(2).mean(-1, keepdim=True) + eps)
    if weight_offset:
        y = (n * (weight_offset + weight.float())).to(dtype)
    else:
        y = weight * n.to(dtype)
    return y if out_dtype is None else y.to(out_dtype)


# The activations a model may use (ModelConfig.activation), as torch defines them; the model's MLPs use these.
ACTIVATIONS = {"silu": F.silu, "gelu_tanh": partial(F.gelu, approximate="tanh"), "gelu": F.gelu, "relu": F.relu}


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up (SwiGLU / GeGLU): exactly the two torch ops, each rounded to its dtype."""
    return ACTIVATIONS[activation](gate) * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE (HF's layout): q [B, T, nh, hd], k [B, T, nkv, hd], cos/sin [B|1, T, hd] ->
    (x * cos + rotate_half(x) * sin) laid out [B, h, T, hd] for x in (q, k), rounded to out_dtype if given."""
    cos, sin = cos[:, None], sin[:, None]  # (B|1, 1, T, hd): broadcast over heads

    def rotate(x):
        x = x.transpose(1, 2)  # (B, h, T, hd)
        y = x * cos + rotate_half(x) * sin
        return y if out_dtype is None else y.to(out_dtype)

    return rotate(q), rotate(k)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, nh, T, hd], k/v [B, nkv, S, hd] -> [B, nh, T, hd]: the model's SDPA call. mask None is
    causal when T > 1 (a single query sees every key); a bool mask is True where a query may attend."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                          enable_gqa=k.shape[1] != q.shape[1])


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of all grads (fp32 0-dim tensor), computed like torch.nn.utils.clip_grad_norm_."""
    if not grads:
        return torch.tensor(0.0)
    device = grads[0].device
    norms = [torch.linalg.vector_norm(g, dtype=torch.float32).to(device) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (norm + 1e-6)): the factor clip_grad_norm_ multiplies the grads by."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


@torch.no_grad()
def adamw_step_(params: list[torch.Tensor], grads: list[torch.Tensor],
                exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                masters: list[torch.Tensor | None], steps: list[torch.Tensor], *, lr: float,
                beta1: float, beta2: float, eps: float, weight_decay: float,
                clip_coef: float | torch.Tensor = 1.0) -> None:
    """One torch.optim.AdamW step (same op order), in place. `steps` are already incremented.

    masters[i] is the fp32 master copy of a low-precision param (updated, then rounded into
    params[i]) or None. Grads are multiplied by clip_coef without being modified.
    """
    for p, g, m, v, master, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, masters, steps):
        w = p if master is None else master
        g = g.to(m.dtype)
        if not (isinstance(clip_coef, float) and clip_coef == 1.0):
            g = g * clip_coef
        step = float(step_t)
        w.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        w.addcdiv_(m, denom, value=-step_size)
        if master is not None:
            p.copy_(master)


# ---- weight-only quantization (kernels.quant_linear) ------------------------------------------------------
# NF4 is bitsandbytes' layout (quantize_4bit(quant_type="nf4", blocksize=64, compress_statistics=True)),
# checked code for code and value for value against bitsandbytes 0.50 on CPU (tests/kernels/test_quant_linear.py).
# A weight W [N, K] (n = N * K elements, row-major, blocks running across row ends when K % 64 != 0):
#   codes    uint8 [ceil(n / 2)]   element 2j in the high nibble of byte j, element 2j + 1 in the low one
#   qabsmax  uint8 [nb = ceil(n / 64)]   block b's absmax, double-quantized: an index into DYNAMIC_MAP
#   absmax2  fp32  [ceil(nb / 256)]      the absmax of (absmax - offset) per 256 blocks
#   offset   fp32  []                    mean of the block absmaxes
#   W[i] = NF4_CODE[code_i] * (DYNAMIC_MAP[qabsmax[b]] * absmax2[b // 256] + offset),  b = i // 64, in fp32.
# int8 (per output channel, symmetric): scale [N] fp32 = max_k |W[n, k]| / 127, q = round(W / scale) in [-127, 127].
NF4_BLOCK = 64          # elements per absmax (QLoRA's block)
NF4_ABSMAX_BLOCK = 256  # absmaxes per second-level scale (QLoRA's double quantization)
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230552196503, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def _dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)): 256 sorted fp32 values in [-1, 1]."""
    data = []
    for i in range(7):  # exponent 10^-6 .. 10^0, 2^i fraction steps each, both signs
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = ((bounds[:-1] + bounds[1:]) / 2.0)
        data += ((10 ** (-6 + i)) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC_MAP = _dynamic_map()


def _nearest(values: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of a sorted `code` for each value (ties to the lower entry), as uint8."""
    mid = (code[:-1] + code[1:]) / 2
    return torch.bucketize(values, mid, out_int32=True).to(torch.uint8)


def _block_absmax(flat: torch.Tensor, block: int) -> torch.Tensor:
    pad = (-flat.numel()) % block
    return torch.nn.functional.pad(flat.abs(), (0, pad)).view(-1, block).amax(dim=1)


QUANTIZE_CHUNK = 1 << 20  # elements quantized at a time (a multiple of 64): bounds the fp32 temporaries to ~20 MB


def nf4_quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """W (any shape, fp32/bf16/fp16) -> {"codes", "qabsmax", "absmax2", "offset"} (layout above).

    Works QUANTIZE_CHUNK elements at a time (block-aligned, so every value is the whole-tensor computation's):
    quantizing one large weight never holds more than a few fp32 copies of a chunk."""
    flat = w.detach().reshape(-1)
    n = flat.numel()
    chunks = [(c, min(c + QUANTIZE_CHUNK, n)) for c in range(0, n, QUANTIZE_CHUNK)]
    absmax = torch.cat([_block_absmax(flat[c0:c1].float(), NF4_BLOCK) for c0, c1 in chunks])  # (nb,)
    codes = torch.empty((n + 1) // 2, dtype=torch.uint8, device=flat.device)
    for c0, c1 in chunks:
        per_elem = absmax[c0 // NF4_BLOCK:-(-c1 // NF4_BLOCK)].clamp(min=1e-38).repeat_interleave(NF4_BLOCK)
        scaled = torch.clamp(flat[c0:c1].float() * (1.0 / per_elem[:c1 - c0]), -1, 1)
        q = _nearest(torch.nn.functional.pad(scaled, (0, (c1 - c0) % 2)), NF4_CODE)
        codes[c0 // 2:(c1 + 1) // 2] = (q[0::2] << 4) | q[1::2]
    offset = absmax.mean()
    centered = absmax - offset
    absmax2 = _block_absmax(centered, NF4_ABSMAX_BLOCK)
    second = absmax2.repeat_interleave(NF4_ABSMAX_BLOCK)[:centered.numel()]
    qabsmax = _nearest(torch.clamp(centered * (1.0 / second), -1, 1), DYNAMIC_MAP)
    # A group whose absmaxes all equal the mean has absmax2 = 0 (0/0): code 0, as bitsandbytes (any code
    # dequantizes to `offset` there).
    qabsmax = torch.where(second > 0, qabsmax, 0).to(torch.uint8)
    return {"codes": codes, "qabsmax": qabsmax, "absmax2": absmax2, "offset": offset}


def nf4_absmax(qabsmax: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor, first: int = 0) -> torch.Tensor:
    """The fp32 absmax of 64-blocks [first, first + len(qabsmax)) from their double-quantized form."""
    blocks = torch.arange(first, first + qabsmax.numel(), device=qabsmax.device)
    return DYNAMIC_MAP.to(qabsmax.device)[qabsmax.long()] * absmax2[blocks // NF4_ABSMAX_BLOCK] + offset


def nf4_dequantize(codes, qabsmax, absmax2, offset, shape, dtype=torch.float32, start: int = 0,
                   count: int | None = None) -> torch.Tensor:
    """Elements [start, start + count) of the flattened weight of `shape` (all by default), in `dtype`;
    reshaped to `shape` when whole, else flat. Only the codes and absmaxes of that range are read."""
    n = math.prod(shape)
    count = n - start if count is None else count
    b0, b1 = start // NF4_BLOCK, -(-(start + count) // NF4_BLOCK)
    scales = nf4_absmax(qabsmax[b0:b1], absmax2, offset, b0)
    byte0, byte1 = start // 2, -(-(start + count) // 2)
    q = codes[byte0:byte1]
    idx = torch.stack([q >> 4, q & 15], dim=1).reshape(-1)[start % 2:start % 2 + count]
    w = NF4_CODE.to(codes.device)[idx.long()] * scales.repeat_interleave(NF4_BLOCK)[start - b0 * NF4_BLOCK:][:count]
    w = w.to(dtype)
    return w.reshape(shape) if (start, count) == (0, n) else w


def int8_quantize(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """W [N, K] -> {"qweight": int8 [N, K], "scale": fp32 [N]} (symmetric per output channel, zero rows scale 0)."""
    w = w.detach()
    rows = max(1, QUANTIZE_CHUNK // max(w.shape[1], 1))  # a few rows at a time, as nf4_quantize
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    for r in range(0, w.shape[0], rows):
        part = w[r:r + rows].float()
        scale[r:r + rows] = part.abs().amax(dim=1) / 127.0
        q[r:r + rows] = torch.round(part / scale[r:r + rows].clamp(min=1e-38)[:, None]).clamp(-127, 127)
    return {"qweight": q, "scale": scale}


def int8_dequantize(qweight, scale, dtype=torch.float32, row0: int = 0, rows: int | None = None) -> torch.Tensor:
    """Rows [row0, row0 + rows) of the int8 weight, in `dtype` (fp32 product, one rounding)."""
    rows = qweight.shape[0] - row0 if rows is None else rows
    return (qweight[row0:row0 + rows].float() * scale[row0:row0 + rows, None]).to(dtype)


INT8_GEMV_X_BLOCK = 64  # x elements per int16 scale in the compiled int8 GEMV (kernels/csrc/quant_gemv.h)


def int16_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] as the compiled CPU int8 GEMV (decoding) multiplies it: per 64-element block of the last
    dim, scale = max |x| / 32767 and q = round(x * (32767 / max)) in fp32 (ties to even), so q * scale is x
    to within half a step, max / 65534 (about 2^-16 of the block's max |x|). Returns (q int16 [..., nb * 64]
    zero-padded past K, scale fp32 [..., nb]); the kernel's products are the exact integer sums of q * code
    per block, times scale and the row's weight scale."""
    xf = x.float()
    k = xf.shape[-1]
    pad = (-k) % INT8_GEMV_X_BLOCK
    blocks = F.pad(xf, (0, pad)).reshape(*xf.shape[:-1], -1, INT8_GEMV_X_BLOCK)
    top = blocks.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(top > 0, 32767.0 / top, torch.zeros_like(top))
    q = torch.round(blocks * inv).clamp(-32767, 32767).nan_to_num(0.0)
    return q.to(torch.int16).reshape(*xf.shape[:-1], -1), (top / 32767.0).squeeze(-1)


def quant_linear(x: torch.Tensor, kind: str, tensors: dict, shape, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x [..., K], dequantized W [N, K] in x's dtype, bias) for kind "nf4" or "int8"; the spec the
    compiled kernels match (up to fp32 summation order). Dequantizes this one layer's weight."""
    if kind == "nf4":
        w = nf4_dequantize(tensors["codes"], tensors["qabsmax"], tensors["absmax2"], tensors["offset"], shape, x.dtype)
    else:
        w = int8_dequantize(tensors["qweight"], tensors["scale"], x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
