"""Pure-PyTorch versions of every op: the specification the compiled kernels must match, and the
fallback used when the extension is missing or can't take the input. Exact by construction:
plain torch ops, math in fp32 (or fp64 when given fp64), gradients from autograd.

Dimension names: N = tokens (rows), V = vocabulary, d = hidden size.
"""
from __future__ import annotations

import math

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
