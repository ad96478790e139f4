"""kernels.rope: rotate-half rotary embeddings as a torch.autograd.Function around the compiled CPU
kernel (kernels/csrc/rope.cpp: _C.rope_cpu): one pass each way, fp32 math, one rounding to the
output dtype, and the [B, T, h, hd] -> [B, h, T, hd] transpose attention wants for free. Used for
CPU training; the exact torch version runs everywhere else.
"""
from __future__ import annotations

import torch

from kernels import reference
from kernels.ops.common import desc, layer_by_design

NAME = "kernels.rope"
OUT_DTYPES = (torch.float32, torch.bfloat16)


def check(q, k, cos, sin, out_dtype) -> None:
    """Shape errors are left to the torch version, which raises its own."""


def problems(build, q, k, cos, sin, out_dtype) -> tuple[list[str], list[str]]:
    out_dtype = out_dtype or torch.promote_types(q.dtype, cos.dtype)
    unsupported = []
    shapes_ok = (q.dim() == k.dim() == 4 and cos.dim() == sin.dim() == 3 and cos.shape == sin.shape
                 and q.shape[0] == k.shape[0] and q.shape[1] == k.shape[1] == cos.shape[1]
                 and q.shape[3] == k.shape[3] == cos.shape[2] and q.shape[3] % 2 == 0
                 and cos.shape[0] in (1, q.shape[0]))
    if not shapes_ok:
        unsupported.append(f"need q [B, T, nh, hd], k [B, T, nkv, hd] (hd even) and cos, sin [B|1, T, hd], "
                           f"got {desc(q)}, {desc(k)}, {desc(cos)}, {desc(sin)}")
    elif q.stride(-1) != 1 or k.stride(-1) != 1:
        unsupported.append("q and k need a unit stride within each head")
    by_design = layer_by_design((q, k, cos, sin))
    if q.dtype != k.dtype or out_dtype not in OUT_DTYPES:
        by_design.append(f"q, k and the output must share float32 or bfloat16, got {q.dtype}, {k.dtype}, {out_dtype}")
    return unsupported, by_design


def native(ext, q, k, cos, sin, out_dtype):
    out_dtype = out_dtype or torch.promote_types(q.dtype, cos.dtype)
    # The kernel reads fp32 tables (a bf16 table converts exactly) in [B|1, T, hd] contiguous order.
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    return RopeFunction.apply(q, k, cos, sin, out_dtype, ext)


def fallback(q, k, cos, sin, out_dtype):
    natural = torch.promote_types(q.dtype, cos.dtype)
    return reference.rope(q, k, cos, sin, None if (out_dtype or natural) == natural else out_dtype)


def _launch(ext, x, out, cos, sin, inverse: bool):
    """x and out: [B, T, h, hd]-indexed views (any strides, unit stride within a head)."""
    ext.rope_cpu(x, out, cos, sin, inverse, torch.get_num_threads())


class RopeFunction(torch.autograd.Function):
    """reference.rope(q [B, T, nh, hd], k [B, T, nkv, hd], cos, sin [B|1, T, hd] fp32, out_dtype)
    -> q, k rotated and laid out [B, h, T, hd] (the transpose attention wants, for free)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, out_dtype, ext):
        outs = []
        for x in (q, k):
            B, T, H, D = x.shape
            out = torch.empty(B, H, T, D, dtype=out_dtype)  # written through its [B, T, H, D] view
            _launch(ext, x, out.transpose(1, 2), cos, sin, inverse=False)
            outs.append(out)
        ctx.save_for_backward(cos, sin)
        ctx.dtypes, ctx.ext = (q.dtype, k.dtype), ext
        return tuple(outs)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        grads = []
        for g, dtype in zip((grad_q, grad_k), ctx.dtypes):
            if g is None:
                grads.append(None)
                continue
            g = g if g.stride(-1) == 1 else g.contiguous()
            B, H, T, D = g.shape
            grad_x = torch.empty(B, T, H, D, dtype=dtype)
            _launch(ctx.ext, g.transpose(1, 2), grad_x, cos, sin, inverse=True)
            grads.append(grad_x)
        return grads[0], grads[1], None, None, None, None
