"""kernels.cross_entropy: fused loss + gradient over logits [N, V] (kernels/csrc/cross_entropy.cpp,
cuda/cross_entropy.cu), as a torch.autograd.Function around the compiled row kernel.

Forward computes the loss AND the gradient in one pass over the logits (the kernel's job);
backward only multiplies the stored gradient by grad_output, and skips even that when
grad_output is exactly 1 (the usual `loss.backward()`).
"""
from __future__ import annotations

import torch

from kernels import reference
from kernels.ops.common import check_reduction, check_targets, desc, device_problems, is_one

NAME = "kernels.cross_entropy"


def check(logits, targets, ignore_index, reduction, label_smoothing, z_loss, softcap, inplace) -> None:
    if not (isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.is_floating_point()):
        raise ValueError(f"{NAME}: logits must be a floating tensor [N, V], got {desc(logits)}")
    check_targets(NAME, targets, logits.shape[0], logits.shape[1], logits.device, ignore_index)
    check_reduction(NAME, reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{NAME}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"{NAME}: z_loss must be >= 0, got {z_loss}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{NAME}: softcap must be None or > 0, got {softcap}")
    if not isinstance(inplace, bool):
        raise ValueError(f"{NAME}: inplace must be True or False, got {inplace!r}")
    if inplace and logits.is_leaf and logits.requires_grad:
        raise ValueError(f"{NAME}: inplace=True would overwrite a leaf tensor that requires grad")


def problems(build, logits, *_) -> tuple[list[str], list[str]]:
    return device_problems(build, "logits", logits), []


def native(ext, logits, targets, ignore_index, reduction, label_smoothing, z_loss, softcap, inplace):
    return CrossEntropyFunction.apply(logits, targets, ext, ignore_index, reduction,
                                      label_smoothing, z_loss, softcap, inplace)


def fallback(logits, targets, ignore_index, reduction, label_smoothing, z_loss, softcap, inplace):
    return reference.cross_entropy(logits, targets, ignore_index, reduction, label_smoothing, z_loss, softcap)


def launch_rows(ext, logits: torch.Tensor, targets: torch.Tensor, loss_rows: torch.Tensor,
                grad: torch.Tensor | None, *, ignore_index: int, scale: float,
                row_scale: torch.Tensor | None = None, label_smoothing: float = 0.0,
                z_loss: float = 0.0, softcap: float | None = None) -> None:
    """Run the native kernel on logits [N, V] (unit column stride): fills loss_rows [N] fp32 and,
    if given, grad [N, V] (may be `logits` itself) = d loss_i / d logits_i * scale * row_scale[i]."""
    if logits.device.type == "cuda":
        ext.cross_entropy_cuda(logits, targets, loss_rows, grad, row_scale, ignore_index=ignore_index,
                               label_smoothing=float(label_smoothing), z_loss=float(z_loss),
                               softcap=float(softcap or 0.0), scale=float(scale),
                               stream=torch.cuda.current_stream(logits.device).cuda_stream)
    else:
        ext.cross_entropy_cpu(logits, targets, loss_rows, grad, row_scale, ignore_index=ignore_index,
                              label_smoothing=float(label_smoothing), z_loss=float(z_loss),
                              softcap=float(softcap or 0.0), scale=float(scale),
                              n_threads=torch.get_num_threads())


class CrossEntropyFunction(torch.autograd.Function):
    """loss = reduction(cross_entropy_rows(logits, targets)); see kernels.cross_entropy."""

    @staticmethod
    def forward(ctx, logits, targets, ext, ignore_index, reduction, label_smoothing, z_loss,
                softcap, inplace):
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        n_rows = logits.shape[0]
        n_valid = (targets != ignore_index).sum()
        # The gradient is pre-scaled by 1/n_valid, so backward of a plain .backward() is free.
        # max(.., 1): with every row ignored all gradients are 0 (as torch), not 0 * inf.
        scale = 1.0 / max(int(n_valid), 1) if reduction == "mean" else 1.0
        loss_rows = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        grad = None
        if ctx.needs_input_grad[0]:
            grad = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
        launch_rows(ext, logits, targets, loss_rows, grad, ignore_index=ignore_index, scale=scale,
                    label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
        if inplace and grad is not None:
            # Tell autograd the logits changed, so any other node that saved them fails loudly.
            torch.autograd.graph.increment_version(logits)
        ctx.grad, ctx.reduction = grad, reduction
        return reference.reduce_rows(loss_rows, targets, ignore_index, reduction, logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("kernels.cross_entropy: backward ran twice through the same loss; "
                               "the fused gradient is consumed by the first backward "
                               "(retain_graph=True is not supported)")
        if ctx.reduction == "none":
            grad.mul_(grad_output.to(grad.dtype)[:, None])  # (N, V) * (N, 1)
        elif not is_one(grad_output):
            grad.mul_(grad_output.to(grad.dtype))
        return grad, None, None, None, None, None, None, None, None
