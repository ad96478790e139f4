"""kernels.linear: F.linear, with the decoding GEMV of kernels/csrc/linear.cpp (_C.linear_cpu) for a
few rows of x, where the op is memory-bound and a matrix-vector kernel beats torch's GEMM.
"""
from __future__ import annotations

import math

import torch

from kernels import reference
from kernels.ops.common import NO_PROBLEMS, desc

NAME = "kernels.linear"
# Flattened rows of x up to which the GEMV is used. It streams W once for any row count, but
# its arithmetic grows with the rows; measured on 2 Zen 4 cores (bench/bench_linear.py), it
# still beats torch's GEMM (MKL/oneDNN) at 8 rows for every decode shape.
LINEAR_MAX_ROWS = 8
DTYPES = (torch.float32, torch.bfloat16)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)  # exact types: subclasses may override F.linear


def check(x, weight, bias) -> None:
    """Nothing to check: inputs the GEMV can't take go to F.linear, which raises its own errors."""


def _gemv_ok(x, weight, bias) -> bool:
    """True when the GEMV can compute F.linear(x, weight, bias). Runs on every decoding step, so
    it only reads attributes; _why_not says why when it is False."""
    if not (type(x) in _PLAIN_TENSORS and type(weight) in _PLAIN_TENSORS):  # modules hold nn.Parameter
        return False
    dtype, k = x.dtype, weight.shape[-1]
    if not (dtype in DTYPES and weight.dtype is dtype and x.is_cpu and weight.is_cpu
            and x.dim() > 0 and weight.dim() == 2 and x.shape[-1] == k and weight.is_contiguous()):
        return False
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if bias is not None:
        if not (type(bias) in _PLAIN_TENSORS and bias.dtype is dtype and bias.is_cpu
                and bias.shape == weight.shape[:1] and bias.is_contiguous()):
            return False
        grad = grad or (torch.is_grad_enabled() and bias.requires_grad)
    rows = x.numel() // k if k else math.prod(x.shape[:-1])
    return rows <= LINEAR_MAX_ROWS and not grad


def problems(build, x, weight, bias) -> tuple[list[str], list[str]]:
    """(unsupported, by_design). by_design are the inputs the GEMV is not meant for (autograd, more
    than LINEAR_MAX_ROWS rows, non-CPU tensors): F.linear is the right op there, so only an
    explicit backend="native" turns them into an error, not ENGINE_KERNELS=native."""
    return NO_PROBLEMS if _gemv_ok(x, weight, bias) else _why_not(x, weight, bias)


def _why_not(x, weight, bias) -> tuple[list[str], list[str]]:
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)
            and (bias is None or isinstance(bias, torch.Tensor))):
        return [f"x, weight and bias must be tensors, got {desc(x)}, {desc(weight)}, {desc(bias)}"], []
    unsupported, by_design = [], []
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if x.dtype not in DTYPES or any(t.dtype != x.dtype for t in tensors):
        unsupported.append("x, weight and bias must all be float32 or all bfloat16, got "
                           + ", ".join(str(t.dtype) for t in tensors))
    if x.dim() == 0 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        unsupported.append(f"x must be [..., K] and weight [N, K], got x {list(x.shape)}, "
                           f"weight {list(weight.shape)}")
    elif bias is not None and tuple(bias.shape) != (weight.shape[0],):
        unsupported.append(f"bias must be [N]=[{weight.shape[0]}], got {list(bias.shape)}")
    elif math.prod(x.shape[:-1]) > LINEAR_MAX_ROWS:
        by_design.append(f"x has {math.prod(x.shape[:-1])} rows; the GEMV takes at most "
                         f"{LINEAR_MAX_ROWS} (torch's GEMM is faster beyond)")
    if not weight.is_contiguous():
        unsupported.append(f"weight must be contiguous, got strides {weight.stride()}")
    if bias is not None and not bias.is_contiguous():
        unsupported.append(f"bias must be contiguous, got stride {bias.stride()}")
    if any(t.device.type != "cpu" for t in tensors):
        by_design.append("the GEMV runs on cpu only, got " + ", ".join(str(t.device) for t in tensors))
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        by_design.append("an input requires grad and the GEMV has no backward "
                         "(run decoding under torch.no_grad() or torch.inference_mode())")
    if not unsupported and not by_design:  # never a silent fallback, even through a bug
        unsupported.append("internal error: kernels.ops.linear._gemv_ok and _why_not disagree")
    return unsupported, by_design


def native(ext, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T (+ bias [N]) -> [..., N], all on CPU in one dtype (fp32 or
    bf16), weight and bias contiguous; x may be strided."""
    return launch(ext, x, weight, bias)


def launch(ext, x, weight, bias):
    if not x.is_contiguous():
        x = x.contiguous()  # at most a few rows, so the copy is cheap
    out = x.new_empty((*x.shape[:-1], weight.shape[0]))
    ext.linear_cpu(x, weight, bias, out, torch.get_num_threads())
    return out


def fallback(x, weight, bias):
    return reference.linear(x, weight, bias)
