"""Attention the SDPA call cannot express: soft-capped scores (Gemma 2), a score scale other than
head_dim**-0.5 (Gemma 2's query_pre_attn_scalar), and sliding windows at long T.

B = batch, nh = query heads, nkv = key/value heads, g = nh // nkv, T = queries, S = keys, hd = head dim,
Tc = queries per chunk, Sc = keys one chunk can see.

Queries are processed Tc at a time, so the [T, S] scores of a whole sequence never exist at once; a
chunk reads only the keys its queries can see (causal, and within the window on sliding layers), so a
sliding-window layer costs O(T * window) instead of O(T * S). Soft-capped chunks run `CappedAttention`,
an autograd Function that saves only its inputs, output and row logsumexp and recomputes the scores in
backward (as flash attention does); plain chunks go to kernels.attention (SDPA).
"""
from __future__ import annotations

from typing import Optional

import torch

import kernels

# Queries per chunk: one chunk holds [g*Tc, Sc] fp32 scores per kv head (16 MiB at g=2, S=4096). Per-chunk
# overhead (the masked SDPA call, slicing's backward) dominated smaller chunks: bench/bench_attention.py
# measured the window-512 band at T=4096 2.2x faster with 512 than with 256, and soft-capped T=2048 1.3x.
CHUNK = 512


def attend(q, k, v, mask, *, scale: Optional[float] = None, softcap: Optional[float] = None,
           window: Optional[int] = None, per_row: bool = False, chunk: Optional[int] = None) -> torch.Tensor:
    """q [B, nh, T, hd], k/v [B, nkv, S, hd] -> [B, nh, T, hd]; mask as for kernels.attention (None: causal
    with the T queries the last of the S keys; bool, True = attend). `scale` None is hd**-0.5. `window`
    (this layer's sliding window) only narrows which keys a chunk reads: `mask` already enforces it.
    per_row: a serving batch whose rows sit at different positions (then every chunk reads all keys)."""
    T, S = q.shape[2], k.shape[2]
    chunk = chunk or CHUNK
    plain = scale is None and softcap is None
    long_window = window is not None and not per_row and S > window + chunk
    if plain and not long_window:
        return kernels.attention(q, k, v, mask)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    past = S - T  # the queries are the last T of the S positions (not so for per_row caches)
    outs = []
    for t0 in range(0, T, chunk):
        t1 = min(t0 + chunk, T)
        k0, k1 = (0, S) if per_row else (0, past + t1)  # causal: nothing past the chunk's last query
        if window is not None and not per_row:
            k0 = max(0, past + t0 - window + 1)
        m = _chunk_mask(mask, t0, t1, k0, k1, past, window, q.device)
        qc, kc, vc = q[:, :, t0:t1], k[:, :, k0:k1], v[:, :, k0:k1]
        if plain:
            outs.append(kernels.attention(qc, kc, vc, m))
        else:
            outs.append(CappedAttention.apply(qc, kc, vc, m, scale, softcap))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _chunk_mask(mask, t0, t1, k0, k1, past, window, device) -> torch.Tensor:
    """The bool mask of queries [t0, t1) over keys [k0, k1): a slice of `mask`, or causal (+ window) when None."""
    if mask is not None:
        return mask[..., t0:t1, k0:k1]
    q_pos = torch.arange(past + t0, past + t1, device=device)[:, None]
    k_pos = torch.arange(k0, k1, device=device)[None, :]
    m = k_pos <= q_pos
    return m & (k_pos > q_pos - window) if window is not None else m


def _grouped(q, k, mask):
    """q [B, nh, Tc, hd] -> [B*nkv, g*Tc, hd] (the g query heads of a kv head stacked, so they share its keys
    in one GEMM without copying them); k -> [B*nkv, Sc, hd]; mask -> broadcastable to [B, nkv, g, Tc, Sc]."""
    B, nh, Tc, hd = q.shape
    nkv = k.shape[1]
    m = mask if mask.dim() == 2 else mask[:, :, None]  # [B|1, 1, 1, Tc, Sc]
    return q.reshape(B * nkv, (nh // nkv) * Tc, hd), k.reshape(B * nkv, k.shape[2], hd), m


def _capped_probs(q, k, mask, scale, softcap):
    """fp32 probabilities [B, nkv, g, Tc, Sc] and tanh(scores / cap) (None without a cap)."""
    qg, kg, m = _grouped(q, k, mask)
    B, nh, Tc, _ = q.shape
    nkv = k.shape[1]
    s = torch.bmm(qg, kg.transpose(1, 2)).float()  # (B*nkv, g*Tc, Sc)
    s = s.view(B, nkv, nh // nkv, Tc, -1)
    t = None
    if softcap is not None:
        t = s.mul_(scale / softcap).tanh_()
        z = t * softcap
    else:
        z = s.mul_(scale)
    return torch.softmax(z.masked_fill_(~m, float("-inf")), dim=-1), t


class CappedAttention(torch.autograd.Function):
    """softmax(mask(cap * tanh(q k^T * scale / cap))) v for one query chunk (cap None: no capping):
    q [B, nh, Tc, hd], k/v [B, nkv, Sc, hd], mask bool [Tc, Sc] or [B|1, 1, Tc, Sc] (every query sees at
    least one key) -> [B, nh, Tc, hd]. Scores, cap and softmax in fp32, the GEMMs in the input dtype (as
    transformers' eager attention); backward recomputes the probabilities instead of saving them."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, softcap):
        p, _ = _capped_probs(q, k, mask, scale, softcap)
        B, nkv, Sc, hd = v.shape
        y = torch.bmm(p.to(v.dtype).view(B * nkv, -1, Sc), v.reshape(B * nkv, Sc, hd))  # (B*nkv, g*Tc, hd)
        ctx.save_for_backward(q, k, v, mask, y)
        ctx.scale, ctx.softcap = scale, softcap
        return y.view(q.shape)

    @staticmethod
    def backward(ctx, grad_y):
        q, k, v, mask, y = ctx.saved_tensors
        p, t = _capped_probs(q, k, mask, ctx.scale, ctx.softcap)  # (B, nkv, g, Tc, Sc), recomputed
        B, nkv, Sc, hd = v.shape
        qg, kg, _ = _grouped(q, k, mask)
        vg = v.reshape(B * nkv, Sc, hd)
        dy = grad_y.reshape(y.shape)  # (B*nkv, g*Tc, hd)
        pg = p.view(B * nkv, -1, Sc)
        dv = torch.bmm(pg.to(dy.dtype).transpose(1, 2), dy)  # sums the group's query heads
        dp = torch.bmm(dy, vg.transpose(1, 2)).float()  # (B*nkv, g*Tc, Sc)
        delta = (dy.float() * y.float()).sum(-1, keepdim=True)  # rowsum(dp * p)
        ds = pg.mul_(dp.sub_(delta))  # d loss / d z
        if t is not None:
            ds.mul_(t.view_as(ds).square_().neg_().add_(1))  # through cap * tanh(s / cap)
        ds = ds.mul_(ctx.scale).to(q.dtype)
        dq = torch.bmm(ds, kg).view(q.shape)
        dk = torch.bmm(ds.transpose(1, 2), qg).view(k.shape)
        return dq, dk, dv.view(v.shape), None, None, None
