"""Fused cross-entropy as a torch.autograd.Function around the compiled row kernel.

Forward computes the loss AND the gradient in one pass over the logits (the kernel's job);
backward only multiplies the stored gradient by grad_output, and skips even that when
grad_output is exactly 1 (the usual `loss.backward()`). The compiled module is handed in by
kernels/__init__.py, which is the only place that imports it.
"""
from __future__ import annotations

import torch

from kernels import reference

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def launch_rows(ext, logits: torch.Tensor, targets: torch.Tensor, loss_rows: torch.Tensor,
                grad: torch.Tensor | None, *, ignore_index: int, scale: float,
                row_scale: torch.Tensor | None = None, label_smoothing: float = 0.0,
                z_loss: float = 0.0, softcap: float | None = None) -> None:
    """Run the native kernel on logits [N, V] (unit column stride): fills loss_rows [N] fp32 and,
    if given, grad [N, V] (may be `logits` itself) = d loss_i / d logits_i * scale * row_scale[i]."""
    n_rows, vocab = logits.shape
    on_cuda = logits.device.type == "cuda"
    fn = ext.cross_entropy_cuda if on_cuda else ext.cross_entropy_cpu
    fn(logits=logits.data_ptr(), dtype=DTYPE_CODES[logits.dtype], n_rows=n_rows, vocab=vocab,
       row_stride=logits.stride(0), targets=targets.data_ptr(), ignore_index=ignore_index,
       label_smoothing=float(label_smoothing), z_loss=float(z_loss),
       softcap=float(softcap) if softcap is not None else 0.0, loss=loss_rows.data_ptr(),
       grad=grad.data_ptr() if grad is not None else 0,
       grad_row_stride=grad.stride(0) if grad is not None else 0, scale=float(scale),
       row_scale=row_scale.data_ptr() if row_scale is not None else 0,
       n_threads=torch.get_num_threads(),
       stream=torch.cuda.current_stream(logits.device).cuda_stream if on_cuda else 0)


def is_one(t: torch.Tensor) -> bool:
    """True when a CPU scalar grad_output is exactly 1 (then scaling the gradient is a no-op).
    On CUDA we don't ask: .item() would synchronize."""
    return t.device.type == "cpu" and t.numel() == 1 and t.item() == 1.0


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
