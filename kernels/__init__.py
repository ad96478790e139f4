"""kernels: fused LM-head loss and AdamW, with exact pure-PyTorch fallbacks.

    cross_entropy(logits [N, V], targets [N])            fused loss + gradient in one pass
    linear_cross_entropy(hidden [N, d], weight [V, d], targets [N])   never builds [N, V]
    AdamW(params, ..., max_grad_norm=None)               torch.optim.AdamW-compatible, fused step
    linear(x [..., K], weight [N, K], bias=None)         F.linear; a GEMV for decoding (<= 8 rows)
    attention(q, k, v, mask=None)                        SDPA; batched GEMMs for bf16 CPU training (grouped_attention.py)
    rms_norm(x, weight, eps, weight_offset=0, out_dtype=None)   RMSNorm; fused fwd/bwd for CPU training
    rope(q, k, cos, sin, out_dtype=None)                 rotate-half RoPE + head transpose; fused for CPU training
    info()                                               what was built, what runs, and why

This file is the only place that imports the compiled module (kernels._C) and decides, per call,
between it and kernels/reference.py: backend=None picks native when it is built and supports the
input, "torch" forces the fallback, "native" forces the kernel or raises listing every reason it
can't run. The environment variable ENGINE_KERNELS=torch (or =native) applies that everywhere.
The choice is logged once, on first use.
"""
from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

import torch

from kernels import gemv, reference
from kernels import grouped_attention
from kernels.fused_adamw import FusedAdamW
from kernels.fused_ce import DTYPE_CODES, CrossEntropyFunction, launch_rows
from kernels.fused_norm_rope import RMSNormFunction, RopeFunction
from kernels.fused_linear_ce import (LinearCrossEntropyFunction, default_chunk_size,
                                     native_chunk_ce, release_logits_buffer, torch_chunk_ce)

__all__ = ["cross_entropy", "linear_cross_entropy", "linear", "attention", "rms_norm", "rope", "AdamW", "info",
           "release_workspace", "reference"]

logger = logging.getLogger("kernels")

try:
    from kernels import _C as _ext
    _EXT_ERROR = None
except ImportError as exc:  # not built (no compiler/CMake at install time) or broken build
    _ext = None
    _why = "not built" if not list(Path(__file__).parent.glob("_C.*")) else str(exc)
    _EXT_ERROR = (f"compiled extension kernels._C is not available ({_why}); "
                  "reinstall with a C++17 compiler and CMake: pip install -e .")

_BUILD = _ext.build_info() if _ext is not None else {}
_BACKENDS = (None, "torch", "native")
_REDUCTIONS = ("mean", "sum", "none")
_logged = False


def _env_backend() -> str | None:
    value = os.environ.get("ENGINE_KERNELS")
    if not value:  # the common case, read on every call: keep it cheap
        return None
    value = value.strip().lower()
    if value not in ("", "torch", "native"):
        raise ValueError(f"ENGINE_KERNELS: expected 'torch' or 'native', got {value!r}")
    return value or None


def release_workspace() -> None:
    """Free the CPU logits buffer that linear_cross_entropy keeps across calls on this thread (up to
    128 MiB); engine.train calls it when training ends."""
    release_logits_buffer()


def info() -> dict:
    """Build/runtime facts: native (bool), reason (why not, or None), cpu_isa, openmp, threads,
    cuda (bool), cuda_arch, env (ENGINE_KERNELS value), linear_max_rows (most rows of x that
    kernels.linear runs as a native GEMV)."""
    env = _env_backend()
    reason = _EXT_ERROR or ("ENGINE_KERNELS=torch forces the PyTorch fallback" if env == "torch" else None)
    return {"native": reason is None, "reason": reason, "cpu_isa": _BUILD.get("cpu_isa"),
            "openmp": _BUILD.get("openmp"), "threads": torch.get_num_threads(),
            "cuda": bool(_BUILD.get("cuda")), "cuda_arch": _BUILD.get("cuda_arch") or None,
            "env": env, "linear_max_rows": gemv.LINEAR_MAX_ROWS}


def _log_once() -> None:
    global _logged
    if _logged:
        return
    _logged = True
    i = info()
    if i["native"]:
        logger.info("kernels: native (cpu_isa=%s, threads=%d, cuda=%s)", i["cpu_isa"],
                    i["threads"], i["cuda_arch"] or "off")
    else:
        logger.warning("kernels: using the pure-PyTorch fallback: %s", i["reason"])


def _select(name: str, backend: str | None, problems: list[str]):
    """The compiled module if `name` should run natively on this input, else None."""
    if not _logged:
        _log_once()
    if backend not in _BACKENDS:
        raise ValueError(f"{name}: backend must be None, 'torch' or 'native', got {backend!r}")
    env = _env_backend()
    if backend == "torch":
        return None
    if not problems and _ext is not None and env != "torch":  # the usual answer, fast
        return _ext
    if backend is None and env == "native":
        backend = "native"
    reasons = ([_EXT_ERROR] if _ext is None else []) + (
        ["ENGINE_KERNELS=torch is set"] if env == "torch" else []) + list(dict.fromkeys(problems))
    if not reasons:
        return _ext
    if backend == "native":
        listed = "; ".join(f"({k}) {r}" for k, r in enumerate(reasons, 1))
        raise RuntimeError(f"{name}: backend='native' cannot run: {listed}")
    return None


def _tensor_problems(arg: str, t: torch.Tensor) -> list[str]:
    out = []
    if t.dtype not in DTYPE_CODES:
        out.append(f"{arg} dtype {t.dtype} is not supported natively (float32, bfloat16, float16)")
    if t.device.type == "cuda" and not _BUILD.get("cuda"):
        out.append(f"{arg} is on {t.device} but kernels._C was built without CUDA "
                   "(reinstall with ENGINE_CUDA=1)")
    elif t.device.type not in ("cpu", "cuda"):
        out.append(f"{arg} is on {t.device}; native kernels run on cpu and cuda")
    return out


def _desc(x) -> str:
    return f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _check_targets(name: str, targets, n_rows: int, vocab: int, device, ignore_index: int) -> None:
    if not (isinstance(targets, torch.Tensor) and targets.dtype == torch.int64
            and tuple(targets.shape) == (n_rows,)):
        raise ValueError(f"{name}: targets must be int64 of shape [N]=[{n_rows}], got {_desc(targets)}")
    if targets.device != device:
        raise ValueError(f"{name}: targets must be on {device}, got {targets.device}")
    if device.type == "cpu":  # on CUDA this check would synchronize; the kernel writes NaN instead
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        if bool(bad.any()):
            raise ValueError(f"{name}: targets must be in [0, V)=[0, {vocab}) or "
                             f"ignore_index={ignore_index}, got {int(targets[bad][0])}")


def _check_reduction(name: str, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _refcount_probe(x, *args, **kwargs) -> tuple[int, int]:
    return sys.getrefcount(x), torch._C._storage_Use_Count(x.untyped_storage()._cdata)


# References a temporary argument has inside a function (interpreter-dependent, so measured).
_TEMP_REFS, _TEMP_STORAGE_REFS = _refcount_probe(torch.empty(1))


def _inplace_is_safe(logits: torch.Tensor, refs: int) -> bool:
    """True when nothing but this call can observe `logits`: a non-leaf temporary (no Python
    name, no view, no tensor saved for backward shares its storage). Then overwriting it with
    the gradient is invisible. Anything unusual (C callers, views, hooks) is treated as unsafe."""
    return (logits.requires_grad and logits.grad_fn is not None and logits._base is None
            and refs <= _TEMP_REFS and logits._use_count() == 1
            and torch._C._storage_Use_Count(logits.untyped_storage()._cdata) <= _TEMP_STORAGE_REFS)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                  softcap: float | None = None, backend: str | None = None,
                  inplace: bool | None = None) -> torch.Tensor:
    """Cross-entropy of logits [N, V] (fp32/bf16/fp16) vs int64 targets [N]; loss in logits' dtype.

    Same meaning as F.cross_entropy (+ z_loss * logsumexp^2 and optional tanh softcap); "mean"
    averages over non-ignored rows (NaN if all are ignored, like torch). The native path computes
    the gradient during forward and can write it over `logits`, saving an [N, V] buffer (and its
    page faults): inplace=None does so only when provably safe (see _inplace_is_safe),
    True always (the caller promises not to read logits again), False never.
    """
    refs = sys.getrefcount(logits)  # first statement: see _TEMP_REFS
    name = "kernels.cross_entropy"
    if not (isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.is_floating_point()):
        raise ValueError(f"{name}: logits must be a floating tensor [N, V], got {_desc(logits)}")
    _check_targets(name, targets, logits.shape[0], logits.shape[1], logits.device, ignore_index)
    _check_reduction(name, reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{name}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"{name}: z_loss must be >= 0, got {z_loss}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{name}: softcap must be None or > 0, got {softcap}")
    if inplace and logits.is_leaf and logits.requires_grad:
        raise ValueError(f"{name}: inplace=True would overwrite a leaf tensor that requires grad")
    if inplace is None:
        inplace = _inplace_is_safe(logits, refs)
    ext = _select(name, backend, _tensor_problems("logits", logits))
    if ext is None:
        return reference.cross_entropy(logits, targets, ignore_index, reduction, label_smoothing,
                                       z_loss, softcap)
    return CrossEntropyFunction.apply(logits, targets, ext, ignore_index, reduction,
                                      label_smoothing, z_loss, softcap, inplace)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                         reduction: str = "mean", chunk_size: int | None = None,
                         backend: str | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Cross-entropy of hidden [N, d] @ weight [V, d].T (+ bias [V]) vs targets [N], computed in
    token chunks (default: ~32M logits per chunk) so [N, V] never exists. Both backends chunk;
    they differ in the per-chunk loss/gradient (compiled kernel vs kernels/reference.py).
    The loss is accumulated in fp32 and returned in `out_dtype` (default: hidden's dtype, like
    F.cross_entropy); a bf16 training loop asks for float32 so a summed loss keeps its digits."""
    name = "kernels.linear_cross_entropy"
    if not (isinstance(hidden, torch.Tensor) and hidden.dim() == 2 and hidden.is_floating_point()):
        raise ValueError(f"{name}: hidden must be a floating tensor [N, d], got {_desc(hidden)}")
    n_rows, d = hidden.shape
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == d
            and weight.dtype == hidden.dtype and weight.device == hidden.device):
        raise ValueError(f"{name}: weight must be [V, d=({d})] {hidden.dtype} on {hidden.device} "
                         f"(nn.Linear layout), got {_desc(weight)}")
    vocab = weight.shape[0]
    if bias is not None and not (isinstance(bias, torch.Tensor) and tuple(bias.shape) == (vocab,)
                                 and bias.dtype == hidden.dtype and bias.device == hidden.device):
        raise ValueError(f"{name}: bias must be None or [V]=[{vocab}] {hidden.dtype}, got {_desc(bias)}")
    _check_targets(name, targets, n_rows, vocab, hidden.device, ignore_index)
    _check_reduction(name, reduction)
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"{name}: chunk_size must be a positive int or None, got {chunk_size!r}")
    ext = _select(name, backend, _tensor_problems("hidden", hidden))
    chunk_ce = (native_chunk_ce(ext, ignore_index, launch_rows) if ext is not None
                else torch_chunk_ce(ignore_index))
    return LinearCrossEntropyFunction.apply(
        hidden.contiguous(), weight.contiguous(), bias, targets, chunk_ce, ignore_index, reduction,
        chunk_size or default_chunk_size(n_rows, vocab, hidden.element_size()), out_dtype or hidden.dtype)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)  # exact types: subclasses may override F.linear


def _gemv_rows(x, weight, bias) -> int:
    """Rows of x when the GEMV can compute F.linear(x, weight, bias), else -1. Runs on every
    decoding step, so it only reads attributes; _linear_problems says why when it is -1."""
    if not (type(x) in _PLAIN_TENSORS and type(weight) in _PLAIN_TENSORS):  # modules hold nn.Parameter
        return -1
    dtype, k = x.dtype, weight.shape[-1]
    if not (dtype in gemv.DTYPES and weight.dtype is dtype and x.is_cpu and weight.is_cpu
            and x.dim() > 0 and weight.dim() == 2 and x.shape[-1] == k and weight.is_contiguous()):
        return -1
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if bias is not None:
        if not (type(bias) in _PLAIN_TENSORS and bias.dtype is dtype and bias.is_cpu
                and bias.shape == weight.shape[:1] and bias.is_contiguous()):
            return -1
        grad = grad or (torch.is_grad_enabled() and bias.requires_grad)
    rows = x.numel() // k if k else math.prod(x.shape[:-1])
    return rows if rows <= gemv.LINEAR_MAX_ROWS and not grad else -1


def _linear_problems(x, weight, bias) -> tuple[list[str], list[str]]:
    """Why the GEMV can't compute F.linear(x, weight, bias) (the cases _gemv_rows rejects), as
    (unsupported, by_design). by_design are the inputs it is not meant for (autograd, more than
    LINEAR_MAX_ROWS rows, non-CPU tensors): F.linear is the right op there, so only an explicit
    backend="native" turns them into an error, not ENGINE_KERNELS=native."""
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)
            and (bias is None or isinstance(bias, torch.Tensor))):
        return [f"x, weight and bias must be tensors, got {_desc(x)}, {_desc(weight)}, {_desc(bias)}"], []
    unsupported, by_design = [], []
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if x.dtype not in gemv.DTYPES or any(t.dtype != x.dtype for t in tensors):
        unsupported.append("x, weight and bias must all be float32 or all bfloat16, got "
                           + ", ".join(str(t.dtype) for t in tensors))
    if x.dim() == 0 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        unsupported.append(f"x must be [..., K] and weight [N, K], got x {list(x.shape)}, "
                           f"weight {list(weight.shape)}")
    elif bias is not None and tuple(bias.shape) != (weight.shape[0],):
        unsupported.append(f"bias must be [N]=[{weight.shape[0]}], got {list(bias.shape)}")
    elif math.prod(x.shape[:-1]) > gemv.LINEAR_MAX_ROWS:
        by_design.append(f"x has {math.prod(x.shape[:-1])} rows; the GEMV takes at most "
                         f"{gemv.LINEAR_MAX_ROWS} (torch's GEMM is faster beyond)")
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
        unsupported.append("internal error: kernels._gemv_rows and _linear_problems disagree")
    return unsupported, by_design


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           backend: str | None = None) -> torch.Tensor:
    """F.linear(x [..., K], weight [N, K], bias [N] or None) -> [..., N] in x's dtype.

    Decoding (at most LINEAR_MAX_ROWS rows of x, fp32 or bf16 on CPU, no autograd) runs a
    memory-bound GEMV that streams each weight once at DRAM speed (fp32 accumulation, bf16
    rounded once); anything else is F.linear itself (see kernels/reference.py).
    """
    name = "kernels.linear"
    rows = _gemv_rows(x, weight, bias)
    if rows >= 0:
        ext = _select(name, backend, [])
    else:
        unsupported, by_design = _linear_problems(x, weight, bias)
        if by_design and backend is None:
            backend = "torch"  # training, prefill, GPU: F.linear by design, whatever ENGINE_KERNELS says
        ext = _select(name, backend, unsupported + by_design)
    if ext is None:
        return reference.linear(x, weight, bias)
    return gemv.launch(ext, x, weight, bias, rows)


def _layer_by_design(tensors) -> list[str]:
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


def _select_layer(name: str, backend: str | None, unsupported: list[str], by_design: list[str]):
    """_select for ops whose torch version is the intended one in the by_design cases: there only
    an explicit backend="native" raises, not ENGINE_KERNELS=native (as kernels.linear)."""
    if by_design and backend is None:
        backend = "torch"
    return _select(name, backend, unsupported + by_design)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0,
             out_dtype: torch.dtype | None = None, backend: str | None = None) -> torch.Tensor:
    """RMSNorm of x [..., C] with weight [C]: exactly reference.rms_norm (Llama / Gemma semantics,
    optional final rounding to out_dtype). CPU training (autograd, fp32/bf16) runs the fused kernel
    (kernels/csrc/rms_norm.cpp: same math in fp32, sums in another order, so not bitwise)."""
    name = "kernels.rms_norm"
    tensors = (x, weight)
    unsupported = []
    if not (x.dim() >= 1 and weight.dim() == 1 and weight.shape[0] == x.shape[-1]):
        unsupported.append(f"x must be [..., C] and weight [C], got {_desc(x)}, {_desc(weight)}")
    natural = x.dtype if weight_offset else torch.promote_types(x.dtype, weight.dtype)
    out_dtype = out_dtype or natural
    by_design = _layer_by_design(tensors)
    if out_dtype not in (torch.float32, torch.bfloat16):
        by_design.append(f"out_dtype must be float32 or bfloat16, got {out_dtype}")
    ext = _select_layer(name, backend, unsupported, by_design)
    if ext is None:
        return reference.rms_norm(x, weight, eps, weight_offset, None if out_dtype == natural else out_dtype)
    return RMSNormFunction.apply(x, weight.contiguous(), eps, weight_offset, out_dtype, ext)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         out_dtype: torch.dtype | None = None, backend: str | None = None):
    """Rotate-half RoPE of q [B, T, nh, hd] and k [B, T, nkv, hd] with cos/sin [B|1, T, hd] ->
    (q, k) rotated, [B, h, T, hd]: exactly reference.rope. CPU training runs the fused kernel
    (kernels/csrc/rope.cpp: fp32 math, one rounding to the output dtype, no separate transpose)."""
    name = "kernels.rope"
    natural = torch.promote_types(q.dtype, cos.dtype)
    out_dtype = out_dtype or natural
    unsupported = []
    shapes_ok = (q.dim() == k.dim() == 4 and cos.dim() == sin.dim() == 3 and cos.shape == sin.shape
                 and q.shape[0] == k.shape[0] and q.shape[1] == k.shape[1] == cos.shape[1]
                 and q.shape[3] == k.shape[3] == cos.shape[2] and q.shape[3] % 2 == 0
                 and cos.shape[0] in (1, q.shape[0]))
    if not shapes_ok:
        unsupported.append(f"need q [B, T, nh, hd], k [B, T, nkv, hd] (hd even) and cos, sin [B|1, T, hd], "
                           f"got {_desc(q)}, {_desc(k)}, {_desc(cos)}, {_desc(sin)}")
    elif q.stride(-1) != 1 or k.stride(-1) != 1:
        unsupported.append("q and k need a unit stride within each head")
    by_design = _layer_by_design((q, k, cos, sin))
    if q.dtype != k.dtype or out_dtype not in (torch.float32, torch.bfloat16):
        by_design.append(f"q, k and the output must share float32 or bfloat16, got {q.dtype}, {k.dtype}, {out_dtype}")
    ext = _select_layer(name, backend, unsupported, by_design)
    if ext is None:
        return reference.rope(q, k, cos, sin, None if out_dtype == natural else out_dtype)
    # The kernel reads fp32 tables (a bf16 table converts exactly) in [B|1, T, hd] contiguous order.
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    return RopeFunction.apply(q, k, cos, sin, out_dtype, ext)


def _attention_unsupported(q, k, v, mask) -> list[str]:
    """Why GroupedAttention can't compute reference.attention(q, k, v, mask) ([] if it can)."""
    if not (all(isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point() for t in (q, k, v))
            and q.dtype == k.dtype == v.dtype):
        return [f"q, k, v must be 4-D tensors of one floating dtype, got {_desc(q)}, {_desc(k)}, {_desc(v)}"]
    (B, nh, T, hd), (_, nkv, S, _) = q.shape, k.shape
    out = []
    if nkv == 0 or nh % nkv or k.shape != v.shape or k.shape[0] != B or k.shape[3] != hd:
        out.append(f"need q [B, nh, T, hd] and k, v [B, nkv, S, hd] with nkv dividing nh, got "
                   f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if mask is None:
        if T != S:
            out.append(f"causal attention with T={T} queries and S={S} keys (a KV cache) needs a mask")
    elif not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.device == q.device
              and mask.shape[-2:] == (T, S)
              and (mask.dim() == 2 or (mask.dim() == 4 and mask.shape[0] in (1, B) and mask.shape[1] == 1))):
        out.append(f"mask must be bool [T, S] or [B|1, 1, T, S] = [{B}, 1, {T}, {S}], got {_desc(mask)}")
    elif not bool(mask.any(-1).all()):  # SDPA returns 0 for such a row, the softmax NaN
        out.append("mask has a query row that sees no key")
    return out


def _attention_by_design(q, k, v) -> bool:
    """True where SDPA is the better op anyway: off CPU, fp32 (SDPA's CPU kernel is as fast there),
    without autograd (inference and decoding save no [T, S] probabilities), for long sequences
    (see kernels/grouped_attention.py) or under torch.compile (it has its own SDPA patterns)."""
    return not (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
                and k.shape[-2] <= grouped_attention.MAX_KEYS and not torch.compiler.is_compiling()
                and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              backend: str | None = None) -> torch.Tensor:
    """Grouped-query attention q [B, nh, T, hd], k/v [B, nkv, S, hd] -> [B, nh, T, hd], meaning
    reference.attention (mask None: causal; bool mask: True = attend).

    bf16/fp16 CPU training takes kernels/grouped_attention.py (pure PyTorch, no compiled code: scores
    rounded to the input dtype, ~1.7x faster than SDPA there) up to 512 keys; everything else, and
    ENGINE_KERNELS=torch, is SDPA itself. backend="native" forces the grouped path (any dtype,
    autograd or not) or raises listing why it can't run.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"kernels.attention: backend must be None, 'torch' or 'native', got {backend!r}")
    if isinstance(q, torch.Tensor) and torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)  # the cast autocast applies to SDPA
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if backend == "native":
        unsupported = _attention_unsupported(q, k, v, mask)
        if unsupported:
            listed = "; ".join(f"({i}) {r}" for i, r in enumerate(unsupported, 1))
            raise RuntimeError(f"kernels.attention: backend='native' cannot run: {listed}")
    elif (backend == "torch" or _env_backend() == "torch" or not isinstance(q, torch.Tensor)
          or _attention_by_design(q, k, v) or _attention_unsupported(q, k, v, mask)):
        return reference.attention(q, k, v, mask)
    bias = grouped_attention.additive_bias(mask, q.shape[2], k.shape[2], q.dtype, q.device)
    return grouped_attention.GroupedAttention.apply(q, k, v, bias)


class AdamW(FusedAdamW):
    """torch.optim.AdamW with a fused step: one pass per element (multi-tensor), optional global
    grad-norm clipping folded in (max_grad_norm; pre-clip norm in .last_grad_norm), fp32 master
    weights for bf16/fp16 params. state_dict is interchangeable with torch.optim.AdamW's."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 max_grad_norm=None, backend=None):
        if backend not in _BACKENDS:
            raise ValueError(f"kernels.AdamW: backend must be None, 'torch' or 'native', got {backend!r}")
        super().__init__(params, lr, betas, eps, weight_decay, max_grad_norm, backend)
        _log_once()

    def _native_ext(self, params, grads):
        problems = []
        devices = {p.device for p in params}
        if len(devices) > 1:
            problems.append(f"params span several devices {sorted(map(str, devices))}")
        for p, g in zip(params, grads):
            problems += _tensor_problems("param", p)
            if not (p.is_contiguous() and g.is_contiguous()):
                problems.append("params and grads must be contiguous")
        return _select("kernels.AdamW", self.backend, problems)
