"""RMSNorm and rotary embeddings as torch.autograd.Functions around the compiled CPU kernels
(kernels/csrc/rms_norm.cpp, rope.cpp): one pass over the activations each way instead of the
~6-10 elementwise ops (and autocast casts) autograd records for the torch versions.

The compiled module is handed in by kernels/__init__.py, which decides when these run
(training on CPU; the exact torch versions in kernels/reference.py run everywhere else).
"""
from __future__ import annotations

import torch

from kernels.fused_ce import DTYPE_CODES


class RMSNormFunction(torch.autograd.Function):
    """reference.rms_norm(x [..., C], weight [C], eps, weight_offset, out_dtype); saves x and 1/rms."""

    @staticmethod
    def forward(ctx, x, weight, eps, weight_offset, out_dtype, ext):
        C = x.shape[-1]
        x2 = x.reshape(-1, C)  # (N, C), a view for the usual contiguous activations
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        out = torch.empty(x.shape, dtype=out_dtype)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32)
        ext.rms_norm_cpu(x2.data_ptr(), DTYPE_CODES[x.dtype], x2.stride(0), weight.data_ptr(),
                         DTYPE_CODES[weight.dtype], out.data_ptr(), DTYPE_CODES[out_dtype], rstd.data_ptr(),
                         x2.shape[0], C, float(eps), float(weight_offset), torch.get_num_threads())
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape, ctx.weight_offset, ctx.ext = x.shape, float(weight_offset), ext
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, rstd = ctx.saved_tensors
        g = grad_out.reshape(x2.shape).contiguous()
        grad_x = torch.empty(x2.shape, dtype=x2.dtype) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty(weight.shape, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        ctx.ext.rms_norm_backward_cpu(
            g.data_ptr(), DTYPE_CODES[g.dtype], x2.data_ptr(), DTYPE_CODES[x2.dtype], x2.stride(0),
            weight.data_ptr(), DTYPE_CODES[weight.dtype], rstd.data_ptr(),
            grad_x.data_ptr() if grad_x is not None else 0, grad_w.data_ptr() if grad_w is not None else 0,
            x2.shape[0], x2.shape[1], ctx.weight_offset, torch.get_num_threads())
        return (grad_x.view(ctx.x_shape) if grad_x is not None else None,
                grad_w.to(weight.dtype) if grad_w is not None else None, None, None, None, None)


def _rope_launch(ext, x, out, cos, sin, inverse: bool):
    """x and out: [B, T, h, hd]-indexed views (any strides, unit stride within a head)."""
    B, T, H, D = x.shape
    ext.rope_cpu(x.data_ptr(), DTYPE_CODES[x.dtype], list(x.stride()[:3]), out.data_ptr(),
                 DTYPE_CODES[out.dtype], list(out.stride()[:3]), cos.data_ptr(), sin.data_ptr(),
                 cos.shape[0], B, T, H, D, inverse, torch.get_num_threads())


class RopeFunction(torch.autograd.Function):
    """reference.rope(q [B, T, nh, hd], k [B, T, nkv, hd], cos, sin [B|1, T, hd] fp32, out_dtype)
    -> q, k rotated and laid out [B, h, T, hd] (the transpose attention wants, for free)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, out_dtype, ext):
        outs = []
        for x in (q, k):
            B, T, H, D = x.shape
            out = torch.empty(B, H, T, D, dtype=out_dtype)  # written through its [B, T, H, D] view
            _rope_launch(ext, x, out.transpose(1, 2), cos, sin, inverse=False)
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
            _rope_launch(ctx.ext, g.transpose(1, 2), grad_x, cos, sin, inverse=True)
            grads.append(grad_x)
        return grads[0], grads[1], None, None, None, None
