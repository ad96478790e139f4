"""kernels.attention: grouped-query attention for CPU training, as a few large batched GEMMs (pure
PyTorch: this op has no compiled entry; "native" means this path, SDPA is the reference).

B = batch, nh = query heads, nkv = key/value heads, g = nh // nkv, T = queries, S = keys, hd = head dim.

Why: at training shapes (T = S = 256, hd = 64), F.scaled_dot_product_attention's CPU flash kernel
walks small (query block, key block) tiles and converts bf16 to fp32 tile by tile; forward +
backward takes ~1.8x as long as materializing the [T, S] scores (4M bf16 per layer of the ~35M
bench model: 8 MB, saved for backward instead of recomputed). The g query heads that share a
key/value head are stacked into one [g*T, hd] matrix, so keys and values are never repeated and
backward's dK/dV sum over the group inside the GEMM. Scores are rounded to the input dtype
before the softmax (computed in fp32 internally), as transformers' eager attention does under
autocast; kernels.attention therefore uses this path for bf16/fp16 training only, and only up to
MAX_KEYS keys: the saved probabilities grow as T * S and the causal half of the GEMMs is wasted,
so at S = 1024 flash is faster (bf16 fwd+bwd, 1 thread: 0.6x at S = 256, 0.8x at 512, 1.3x at 1024).
"""
from __future__ import annotations

import math

import torch

from kernels import reference
from kernels.ops.common import NO_PROBLEMS, desc

NAME = "kernels.attention"
MAX_KEYS = 512


def check(q, k, v, mask) -> None:
    """Shape errors are left to SDPA, which raises its own."""


def problems(build, q, k, v, mask, forced: bool = False) -> tuple[list[str], list[str]]:
    """(unsupported, by_design). by_design: SDPA is the better op anyway (_sdpa_is_better), checked
    first so that inference and fp32 pay no mask inspection. Unlike the compiled ops, a forced
    backend="native" runs the grouped path in the by_design cases too (any dtype, autograd or not),
    so `forced` asks for the unsupported reasons only."""
    if not forced and isinstance(q, torch.Tensor) and _sdpa_is_better(q, k, v):
        return [], ["SDPA is the better op here (the grouped path is for bf16/fp16 CPU training "
                    f"up to {MAX_KEYS} keys)"]
    unsupported = _unsupported(q, k, v, mask)
    return (unsupported, []) if unsupported else NO_PROBLEMS


def _unsupported(q, k, v, mask) -> list[str]:
    """Why GroupedAttention can't compute reference.attention(q, k, v, mask) ([] if it can)."""
    if not (all(isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point() for t in (q, k, v))
            and q.dtype == k.dtype == v.dtype):
        return [f"q, k, v must be 4-D tensors of one floating dtype, got {desc(q)}, {desc(k)}, {desc(v)}"]
    (B, nh, T, hd), (_, nkv, S, _) = q.shape, k.shape
    out = []
    if nkv == 0 or nh % nkv or k.shape != v.shape or k.shape[0] != B or k.shape[3] != hd:
        out.append(f"need q [B, nh, T, hd] and k, v [B, nkv, S, hd] with nkv dividing nh, got "
                   f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if mask is None:
        if T != S:
            out.append(f"causal attention with T={T} queries and S={S} keys (a KV cache) needs a mask")
    elif not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.device == q.device
              and mask.shape[-2:] == (T, S)
              and (mask.dim() == 2 or (mask.dim() == 4 and mask.shape[0] in (1, B) and mask.shape[1] == 1))):
        out.append(f"mask must be bool [T, S] or [B|1, 1, T, S] = [{B}, 1, {T}, {S}], got {desc(mask)}")
    elif not bool(mask.any(-1).all()):  # SDPA returns 0 for such a row, the softmax NaN
        out.append("mask has a query row that sees no key")
    return out


def _sdpa_is_better(q, k, v) -> bool:
    """True where SDPA is the better op anyway: off CPU, fp32 (SDPA's CPU kernel is as fast there),
    without autograd (inference and decoding save no [T, S] probabilities), for long sequences
    or under torch.compile (it has its own SDPA patterns)."""
    return not (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
                and k.shape[-2] <= MAX_KEYS and not torch.compiler.is_compiling()
                and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))


def native(ext, q, k, v, mask):
    """ext is unused: the grouped path is plain PyTorch."""
    bias = additive_bias(mask, q.shape[2], k.shape[2], q.dtype, q.device)
    return GroupedAttention.apply(q, k, v, bias)


def fallback(q, k, v, mask):
    return reference.attention(q, k, v, mask)


def additive_bias(mask: torch.Tensor | None, T: int, S: int, dtype, device) -> torch.Tensor:
    """0 where a query may attend, -inf elsewhere: [T, S] for mask None (causal, T == S) or a bool
    mask of shape [T, S] / [B|1, 1, T, S]; returns [T, S] or [B, T, S]."""
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=device).tril()
    mask = mask.reshape(-1, T, S) if mask.dim() == 4 else mask
    if mask.dim() == 3 and mask.shape[0] == 1:
        mask = mask[0]
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))


class GroupedAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(hd) + bias) v for q [B, nh, T, hd], k/v [B, nkv, S, hd], bias [T, S] or
    [B, T, S] (see additive_bias; every row must see at least one key). Output [B, nh, T, hd]."""

    @staticmethod
    def forward(ctx, q, k, v, bias):
        B, nh, T, hd = q.shape
        nkv, S = k.shape[1], k.shape[2]
        g, scale = nh // nkv, 1.0 / math.sqrt(hd)
        qg = q.reshape(B * nkv, g * T, hd)  # head h = kv * g + j reads kv head h // g
        kg, vg = k.reshape(B * nkv, S, hd), v.reshape(B * nkv, S, hd)
        if bias.dim() == 2:  # one mask for every batch row: broadcast over the GEMM batch
            base = bias.repeat(g, 1)  # (g*T, S)
        else:
            base = bias[:, None, None].expand(B, nkv, g, T, S).reshape(B * nkv, g * T, S)
        # scores = base + scale * q k^T: the GEMM starts from the bias, no extra pass over [T, S]
        p = torch.baddbmm(base, qg, kg.transpose(1, 2), alpha=scale).softmax(-1)  # (B*nkv, g*T, S)
        y = torch.bmm(p, vg)  # (B*nkv, g*T, hd)
        ctx.save_for_backward(qg, kg, vg, p)
        ctx.shapes, ctx.scale = (q.shape, k.shape), scale
        return y.view(B, nh, T, hd)

    @staticmethod
    def backward(ctx, grad_y):
        qg, kg, vg, p = ctx.saved_tensors
        q_shape, kv_shape = ctx.shapes
        gy = grad_y.reshape(qg.shape)  # (B*nkv, g*T, hd)
        grad_v = torch.bmm(p.transpose(1, 2), gy)  # sums the g query heads of each kv head
        grad_p = torch.bmm(gy, vg.transpose(1, 2))  # (B*nkv, g*T, S)
        grad_s = torch._softmax_backward_data(grad_p, p, -1, p.dtype)  # p * (grad_p - rowsum(grad_p * p))
        grad_q = torch.bmm(grad_s, kg).mul_(ctx.scale)
        grad_k = torch.bmm(grad_s.transpose(1, 2), qg).mul_(ctx.scale)
        return grad_q.view(q_shape), grad_k.view(kv_shape), grad_v.view(kv_shape), None
