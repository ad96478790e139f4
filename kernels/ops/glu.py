"""kernels.glu: act(gate) * up, the gated MLP's activation (SwiGLU, GeGLU), as a torch.autograd.Function
around the compiled CPU kernels (kernels/csrc/glu.cpp: _C.glu_cpu): one pass each way instead of torch's
act + multiply (and their three backward ops), and act(gate) is never kept for backward. Used for CPU
training with silu or gelu_tanh; the exact torch ops run everywhere else.
"""
from __future__ import annotations

import torch

from kernels import reference
from kernels.ops.common import desc, layer_by_design

NAME = "kernels.glu"
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}  # the kernel's GluActivation codes (kernels/csrc/ops.h)


def check(gate, up, activation) -> None:
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"{NAME}: activation must be one of {sorted(reference.ACTIVATIONS)}, got {activation!r}")


def problems(build, gate, up, activation) -> tuple[list[str], list[str]]:
    unsupported = []
    if gate.shape != up.shape:
        unsupported.append(f"gate and up must have one shape, got {desc(gate)}, {desc(up)}")
    by_design = layer_by_design((gate, up))
    if activation not in ACTIVATIONS:
        by_design.append(f"activation {activation!r} runs as torch ops (fused: {', '.join(ACTIVATIONS)})")
    if gate.dtype != up.dtype:
        by_design.append(f"gate and up must share a dtype, got {gate.dtype}, {up.dtype}")
    return unsupported, by_design


def native(ext, gate, up, activation):
    return GluFunction.apply(gate, up, ACTIVATIONS[activation], ext)


def fallback(gate, up, activation):
    return reference.glu(gate, up, activation)


class GluFunction(torch.autograd.Function):
    """reference.glu(gate, up, activation) for gate, up of one shape and dtype; saves gate and up only."""

    @staticmethod
    def forward(ctx, gate, up, activation: int, ext):
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        ext.glu_cpu(gate, up, out, None, None, None, activation, torch.get_num_threads())
        ctx.save_for_backward(gate, up)
        ctx.activation, ctx.ext = activation, ext
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        grad_out = grad_out.to(gate.dtype).contiguous()
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
        ctx.ext.glu_cpu(gate, up, None, grad_out, grad_gate, grad_up, ctx.activation, torch.get_num_threads())
        return grad_gate, grad_up, None, None
