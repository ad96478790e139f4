"""Argument checks and native-path reasons shared by several ops."""
from __future__ import annotations

import threading

import torch

NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the loss and AdamW kernels store
NO_PROBLEMS: tuple[list[str], list[str]] = ([], [])  # shared by the fast paths: never mutate
REDUCTIONS = ("mean", "sum", "none")


class ThreadBuffer:
    """One flat CPU tensor per thread, kept across calls and carved into views, for scratch an op fills and
    consumes within one call: a fresh large tensor costs its first-touch page faults on every call."""

    def __init__(self):
        self._local = threading.local()

    @property
    def buf(self):
        """This thread's buffer, or None."""
        return getattr(self._local, "buf", None)

    def take(self, numel: int, dtype, reserve: int = 0) -> torch.Tensor:
        """A flat uninitialized view of `numel` elements; a new buffer (of max(numel, reserve)) when the kept one
        is too small or of another dtype."""
        buf = self.buf
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            self._local.buf = buf = None  # free the old one first: never two buffers at once
            self._local.buf = buf = torch.empty(max(numel, reserve), dtype=dtype)
        return buf[:numel]

    def release(self) -> None:
        """Free this thread's buffer (the next take allocates a new one)."""
        self._local.buf = None


def desc(x) -> str:
    return f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def device_problems(build: dict, arg: str, t: torch.Tensor) -> list[str]:
    """Why the loss/AdamW kernels can't take tensor `t` ([] if they can); build: _C.build_info()."""
    out = []
    if t.dtype not in NATIVE_DTYPES:
        out.append(f"{arg} dtype {t.dtype} is not supported natively (float32, bfloat16, float16)")
    if t.device.type == "cuda" and not build.get("cuda"):
        out.append(f"{arg} is on {t.device} but kernels._C was built without CUDA "
                   "(reinstall with ENGINE_CUDA=1)")
    elif t.device.type not in ("cpu", "cuda"):
        out.append(f"{arg} is on {t.device}; native kernels run on cpu and cuda")
    return out


def check_targets(name: str, targets, n_rows: int, vocab: int, device, ignore_index: int) -> None:
    if not (isinstance(targets, torch.Tensor) and targets.dtype == torch.int64
            and tuple(targets.shape) == (n_rows,)):
        raise ValueError(f"{name}: targets must be int64 of shape [N]=[{n_rows}], got {desc(targets)}")
    if targets.device != device:
        raise ValueError(f"{name}: targets must be on {device}, got {targets.device}")
    if device.type == "cpu":  # on CUDA this check would synchronize; the kernel writes NaN instead
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        if bool(bad.any()):
            raise ValueError(f"{name}: targets must be in [0, V)=[0, {vocab}) or "
                             f"ignore_index={ignore_index}, got {int(targets[bad][0])}")


def check_reduction(name: str, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def is_one(t: torch.Tensor) -> bool:
    """True when a CPU scalar grad_output is exactly 1 (then scaling the gradient is a no-op).
    On CUDA we don't ask: .item() would synchronize."""
    return t.device.type == "cpu" and t.numel() == 1 and t.item() == 1.0


def layer_by_design(tensors) -> list[str]:
    """Where the fused RMSNorm / RoPE are not meant to run (the torch op is the intended one there):
    without autograd (inference stays bitwise equal to transformers), off CPU, outside fp32/bf16,
    and under torch.compile (inductor fuses the torch ops itself)."""
    out = []
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        out.append("no autograd: inference runs the exact torch ops")
    if any(t.device.type != "cpu" for t in tensors):
        out.append("the fused kernel runs on cpu only, got " + ", ".join(sorted({str(t.device) for t in tensors})))
    if any(t.dtype not in (torch.float32, torch.bfloat16) for t in tensors):
        out.append("dtypes must be float32 or bfloat16, got " + ", ".join(str(t.dtype) for t in tensors))
    if torch.compiler.is_compiling():
        out.append("under torch.compile the torch ops are compiled instead")
    return out
