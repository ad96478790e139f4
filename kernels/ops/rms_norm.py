"""kernels.rms_norm: RMSNorm as a torch.autograd.Function around the compiled CPU kernels
(kernels/csrc/rms_norm.cpp: _C.rms_norm_cpu, _C.rms_norm_backward_cpu): one pass over the
activations each way instead of the ~6-10 elementwise ops (and autocast casts) autograd records
for the torch version. Used for CPU training; the exact torch version runs everywhere else.
"""
from __future__ import annotations

import torch

from kernels import reference
from kernels.ops.common import desc, layer_by_design

NAME = "kernels.rms_norm"
OUT_DTYPES = (torch.float32, torch.bfloat16)


def check(x, weight, eps, weight_offset, out_dtype) -> None:
    """Shape errors are left to the torch version, which raises its own."""


def _out_dtypes(x, weight, weight_offset, out_dtype):
    """(natural, requested) output dtype: Llama rounds to x's dtype, Gemma (weight_offset) to the promotion."""
    natural = x.dtype if weight_offset else torch.promote_types(x.dtype, weight.dtype)
    return natural, out_dtype or natural


def problems(build, x, weight, eps, weight_offset, out_dtype) -> tuple[list[str], list[str]]:
    unsupported = []
    if not (x.dim() >= 1 and weight.dim() == 1 and weight.shape[0] == x.shape[-1]):
        unsupported.append(f"x must be [..., C] and weight [C], got {desc(x)}, {desc(weight)}")
    by_design = layer_by_design((x, weight))
    out_dtype = _out_dtypes(x, weight, weight_offset, out_dtype)[1]
    if out_dtype not in OUT_DTYPES:
        by_design.append(f"out_dtype must be float32 or bfloat16, got {out_dtype}")
    return unsupported, by_design


def native(ext, x, weight, eps, weight_offset, out_dtype):
    out_dtype = _out_dtypes(x, weight, weight_offset, out_dtype)[1]
    return RMSNormFunction.apply(x, weight.contiguous(), eps, weight_offset, out_dtype, ext)


def fallback(x, weight, eps, weight_offset, out_dtype):
    natural, out_dtype = _out_dtypes(x, weight, weight_offset, out_dtype)
    return reference.rms_norm(x, weight, eps, weight_offset, None if out_dtype == natural else out_dtype)


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
        ext.rms_norm_cpu(x2, weight, out, rstd, float(eps), float(weight_offset), torch.get_num_threads())
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape, ctx.weight_offset, ctx.ext = x.shape, float(weight_offset), ext
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, rstd = ctx.saved_tensors
        g = grad_out.reshape(x2.shape).contiguous()
        grad_x = torch.empty(x2.shape, dtype=x2.dtype) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty(weight.shape, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        ctx.ext.rms_norm_backward_cpu(g, x2, weight, rstd, grad_x, grad_w, ctx.weight_offset,
                                      torch.get_num_threads())
        return (grad_x.view(ctx.x_shape) if grad_x is not None else None,
                grad_w.to(weight.dtype) if grad_w is not None else None, None, None, None, None)
