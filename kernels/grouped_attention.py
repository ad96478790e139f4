"""Grouped-query attention for CPU training, as a few large batched GEMMs.

B = batch, nh = query heads, nkv = key/value heads, g = nh // nkv, T = queries, S = keys, hd = head dim.

Why: at training shapes (T = S = 256, hd = 64), F.scaled_dot_product_attention's CPU flash kernel
walks small (query block, key block) tiles and converts bf16 to fp32 tile by tile; forward +
backward takes ~1.8x as long as materializing the [T, S] scores (4M bf16 per layer of the ~35M
bench model: 8 MB, saved for backward instead of recomputed). The g query heads that share a
key/value head are stacked into one [g*T, hd] matrix, so keys and values are never repeated and
backward's dK/dV sum over the group inside the GEMM. Scores are rounded to the input dtype
before the softmax (computed in fp32 internally), as transformers' eager attention does under
autocast; kernels/__init__.py therefore uses this path for bf16/fp16 training only, and only up to
MAX_KEYS keys: the saved probabilities grow as T * S and the causal half of the GEMMs is wasted,
so at S = 1024 flash is faster (bf16 fwd+bwd, 1 thread: 0.6x at S = 256, 0.8x at 512, 1.3x at 1024).
"""
from __future__ import annotations

import math

import torch

MAX_KEYS = 512


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
