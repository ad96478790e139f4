"""kernels.linear_cross_entropy: linear + cross-entropy without materializing the [N, V] logits or
their gradient (the row kernel of kernels/csrc/cross_entropy.cpp on each chunk).

Tokens are processed in chunks of C rows: logits_c = hidden_c @ weight.T (+ bias) via torch's
GEMM (MKL/oneDNN), then one row-kernel call turns logits_c into its loss and, in place, its
gradient; two more GEMMs give grad_hidden_c and accumulate grad_weight (fp32). Peak extra memory
is one [C, V] chunk instead of several [N, V] tensors.

For reduction "mean"/"sum" the gradients are computed during forward (upstream grad is a
scalar, applied in backward). For "none" the upstream gradient can differ per row, and
grad_weight = sum_i g_i * dlogits_i^T hidden_i cannot be rescaled afterwards, so forward only
computes losses and backward recomputes each chunk with per-row scales g_i (Liger #678 got this
wrong by precomputing with g = 1).
"""
from __future__ import annotations

from typing import Callable

import torch

from kernels import reference
from kernels.ops.common import ThreadBuffer, check_reduction, check_targets, desc, device_problems, is_one
from kernels.ops.cross_entropy import launch_rows

NAME = "kernels.linear_cross_entropy"

# chunk_ce(logits_c, targets_c, loss_rows_c, want_grad, scale, row_scale_c): fills loss_rows_c
# and, if want_grad, overwrites logits_c with scale * row_scale_c[i] * d loss_i / d logits_c.
ChunkCE = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float, "torch.Tensor | None"], None]

_CHUNK_BYTES = 1 << 27  # 128 MiB of logits per chunk (32M fp32, 64M bf16): big GEMMs, bounded memory


def default_chunk_size(n_rows: int, vocab: int, itemsize: int = 4) -> int:
    return max(1, min(n_rows, _CHUNK_BYTES // max(vocab * itemsize, 1)))


_workspace = ThreadBuffer()  # this thread's reusable CPU logits buffer (flat)


def logits_buffer(rows: int, vocab: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialized [rows, V] tensor for a chunk's logits. On CPU it is carved from one buffer
    kept across calls: a fresh 128 MiB tensor costs ~25 ms of page faults on first touch here, a
    third of the GEMM that fills it, on every chunk of every step. CUDA's caching allocator
    already reuses memory, so there it is a plain allocation."""
    if like.device.type != "cpu":
        return torch.empty(rows, vocab, dtype=like.dtype, device=like.device)
    return _workspace.take(rows * vocab, like.dtype).view(rows, vocab)


def release_logits_buffer() -> None:
    """Free this thread's logits buffer (the next linear_cross_entropy call allocates a new one)."""
    _workspace.release()


def chunked_pass(hidden, weight, bias, targets, chunk_ce: ChunkCE, loss_rows, *, chunk_size: int,
                 scale: float, row_scale, need: tuple[bool, bool, bool]):
    """One sweep over token chunks; returns (grad_hidden, grad_weight, grad_bias) for the
    inputs flagged in `need` (None otherwise)."""
    n_rows = hidden.shape[0]
    want_grad = any(need)
    grad_h = torch.empty_like(hidden) if need[0] else None
    # Accumulate in fp32 across chunks; fp32 weights accumulate straight into their grad. A single
    # chunk needs no accumulator: its GEMM accumulates in fp32 and rounds once to weight's dtype.
    single = chunk_size >= n_rows
    grad_w = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
              if need[1] and not single else None)
    grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need[2] else None
    weight_t = weight.t()  # (d, V)
    for start in range(0, n_rows, chunk_size):
        end = min(start + chunk_size, n_rows)
        h = hidden[start:end]  # (C, d)
        logits = logits_buffer(end - start, weight.shape[0], h)  # (C, V)
        if bias is not None:
            torch.addmm(bias, h, weight_t, out=logits)
        else:
            torch.mm(h, weight_t, out=logits)
        rs = row_scale[start:end] if row_scale is not None else None
        chunk_ce(logits, targets[start:end], loss_rows[start:end], want_grad, scale, rs)
        if not want_grad:
            continue
        dlogits = logits  # (C, V), now holds the gradient
        if grad_h is not None:
            torch.mm(dlogits, weight, out=grad_h[start:end])  # (C, d)
        if need[1] and single:
            grad_w = torch.mm(dlogits.t(), h)  # (V, d)
        elif grad_w is not None:
            if dlogits.dtype == torch.float32:
                grad_w.addmm_(dlogits.t(), h)  # (V, d)
            else:
                grad_w.add_(torch.mm(dlogits.t(), h))
        if grad_b is not None:
            grad_b.add_(dlogits.sum(0, dtype=torch.float32))
    return (grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """loss of (hidden @ weight.T + bias) against targets; see kernels.linear_cross_entropy."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_ce, ignore_index, reduction, chunk_size, out_dtype):
        need = tuple(ctx.needs_input_grad[:3])
        if bias is None:
            need = (need[0], need[1], False)
        n_valid = (targets != ignore_index).sum()
        scale = 1.0 / max(int(n_valid), 1) if reduction == "mean" else 1.0
        loss_rows = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        eager = any(need) and reduction != "none"
        grads = chunked_pass(hidden, weight, bias, targets, chunk_ce, loss_rows,
                             chunk_size=chunk_size, scale=scale, row_scale=None,
                             need=need if eager else (False, False, False))
        ctx.grads = grads if eager else None
        ctx.need, ctx.chunk_ce, ctx.chunk_size, ctx.reduction = need, chunk_ce, chunk_size, reduction
        if reduction == "none" and any(need):
            ctx.save_for_backward(hidden, weight, bias, targets)
        if reduction == "none":
            return loss_rows.to(out_dtype)
        total = loss_rows.sum()
        if reduction == "mean":
            total = total / n_valid  # all rows ignored -> NaN, as torch
        return total.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            hidden, weight, bias, targets = ctx.saved_tensors
            scratch = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            grads = chunked_pass(hidden, weight, bias, targets, ctx.chunk_ce, scratch,
                                 chunk_size=ctx.chunk_size, scale=1.0,
                                 row_scale=grad_output.float().contiguous(), need=ctx.need)
        else:
            grads, ctx.grads = ctx.grads, None
            if grads is None:
                raise RuntimeError("kernels.linear_cross_entropy: backward ran twice through the "
                                   "same loss (retain_graph=True is not supported)")
            if not is_one(grad_output):
                grads = tuple(g.mul_(grad_output.to(g.dtype)) if g is not None else None
                              for g in grads)
        return grads[0], grads[1], grads[2], None, None, None, None, None, None


def native_chunk_ce(ext, ignore_index: int, softcap: float | None = None) -> ChunkCE:
    """Chunk step on the compiled row kernel: gradient written in place into the chunk's logits
    (safe: the chunk is our own temporary). softcap: the kernel caps each row as it reads it, so
    capped logits never exist either."""
    def run(logits, targets, loss_rows, want_grad, scale, row_scale):
        launch_rows(ext, logits, targets, loss_rows, logits if want_grad else None,
                    ignore_index=ignore_index, scale=scale, row_scale=row_scale, softcap=softcap)
    return run


def torch_chunk_ce(ignore_index: int, softcap: float | None = None) -> ChunkCE:
    """Chunk step in pure PyTorch (kernels/reference.py), same contract as native_chunk_ce."""
    def run(logits, targets, loss_rows, want_grad, scale, row_scale):
        rows, grad = reference.cross_entropy_rows_with_grad(logits, targets, ignore_index, scale,
                                                            row_scale, want_grad, softcap)
        loss_rows.copy_(rows)
        if want_grad:
            logits.copy_(grad)
    return run


def check(hidden, weight, targets, bias, ignore_index, reduction, chunk_size, out_dtype, softcap=None) -> None:
    if not (isinstance(hidden, torch.Tensor) and hidden.dim() == 2 and hidden.is_floating_point()):
        raise ValueError(f"{NAME}: hidden must be a floating tensor [N, d], got {desc(hidden)}")
    n_rows, d = hidden.shape
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == d
            and weight.dtype == hidden.dtype and weight.device == hidden.device):
        raise ValueError(f"{NAME}: weight must be [V, d=({d})] {hidden.dtype} on {hidden.device} "
                         f"(nn.Linear layout), got {desc(weight)}")
    vocab = weight.shape[0]
    if bias is not None and not (isinstance(bias, torch.Tensor) and tuple(bias.shape) == (vocab,)
                                 and bias.dtype == hidden.dtype and bias.device == hidden.device):
        raise ValueError(f"{NAME}: bias must be None or [V]=[{vocab}] {hidden.dtype}, got {desc(bias)}")
    check_targets(NAME, targets, n_rows, vocab, hidden.device, ignore_index)
    check_reduction(NAME, reduction)
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"{NAME}: chunk_size must be a positive int or None, got {chunk_size!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"{NAME}: softcap must be None or > 0, got {softcap!r}")


def problems(build, hidden, *_) -> tuple[list[str], list[str]]:
    return device_problems(build, "hidden", hidden), []


def _apply(chunk_ce, hidden, weight, targets, bias, ignore_index, reduction, chunk_size, out_dtype, softcap=None):
    """Both backends chunk; they differ only in the per-chunk loss/gradient (chunk_ce)."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    return LinearCrossEntropyFunction.apply(
        hidden.contiguous(), weight.contiguous(), bias, targets, chunk_ce, ignore_index, reduction,
        chunk_size or default_chunk_size(n_rows, vocab, hidden.element_size()), out_dtype or hidden.dtype)


def native(ext, hidden, weight, targets, bias, ignore_index, reduction, chunk_size, out_dtype, softcap=None):
    return _apply(native_chunk_ce(ext, ignore_index, softcap), hidden, weight, targets, bias, ignore_index,
                  reduction, chunk_size, out_dtype)


def fallback(hidden, weight, targets, bias, ignore_index, reduction, chunk_size, out_dtype, softcap=None):
    return _apply(torch_chunk_ce(ignore_index, softcap), hidden, weight, targets, bias, ignore_index,
                  reduction, chunk_size, out_dtype)
