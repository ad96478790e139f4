"""kernels: fused LM-head loss and AdamW, training layers and the decoding GEMV, with exact
pure-PyTorch fallbacks.

    cross_entropy(logits [N, V], targets [N])            fused loss + gradient in one pass
    linear_cross_entropy(hidden [N, d], weight [V, d], targets [N])   never builds [N, V]
    AdamW(params, ..., max_grad_norm=None)               torch.optim.AdamW-compatible, fused step
    linear(x [..., K], weight [N, K], bias=None)         F.linear; a GEMV for decoding (<= 8 rows)
    attention(q, k, v, mask=None)                        SDPA; batched GEMMs for bf16 CPU training
    rms_norm(x, weight, eps, weight_offset=0, out_dtype=None)   RMSNorm; fused fwd/bwd for CPU training
    rope(q, k, cos, sin, out_dtype=None)                 rotate-half RoPE + head transpose; fused for CPU training
    glu(gate, up, activation)                            act(gate) * up (SwiGLU / GeGLU); fused for CPU training
    decode_plan(embed, ..., layers, ...)                 the fused batch-B decode step over a KV cache (CPU)
    quant_linear(x [..., K], QuantizedWeight [N, K], bias=None)   weight-only NF4/int8 linear (fused decode GEMV)
    info()                                               what was built, what runs, and why
    cache_cpu_blocks(...) / release_cpu_blocks()         a bounded cache of freed CPU blocks (kernels._cpu_cache)

This file imports the compiled module (kernels._C) and decides, per call, between each op's native
path and its reference (the table OPS; each op's code is in kernels/ops/<op>.py, its kernel in
kernels/csrc/<op>.cpp). backend=None picks native when it is built and supports the input, "torch"
forces the reference, "native" forces the kernel or raises listing every reason it can't run. The
environment variable ENGINE_KERNELS=torch (or =native) applies that everywhere. The choice is
logged once, on first use.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from kernels import reference
from kernels.ops import adamw, attention as _attention, cross_entropy as _cross_entropy
from kernels.ops import linear as _linear, linear_cross_entropy as _linear_cross_entropy
from kernels.ops import glu as _glu, rms_norm as _rms_norm, rope as _rope
from kernels.ops import decode_step as _decode_step
from kernels.ops import quant_linear as _quant_linear
from kernels.ops.quant_linear import QuantizedWeight

__all__ = ["cross_entropy", "linear_cross_entropy", "linear", "attention", "rms_norm", "rope", "glu", "AdamW", "info",
           "release_workspace", "cache_cpu_blocks", "release_cpu_blocks", "reference", "decode_plan", "decode_plan_problems", "quant_linear", "QuantizedWeight"]

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

# kernels._cpu_cache (csrc/cpu_block_cache.cpp) includes c10, so it only works under the torch it was built for.
try:
    from kernels import _cpu_cache
    _CACHE_ERROR = None if _cpu_cache.torch_version == torch.__version__ else (
        f"kernels._cpu_cache was built for torch {_cpu_cache.torch_version}, this is {torch.__version__}; "
        "reinstall: pip install -e .")
except ImportError as exc:
    _cpu_cache = None
    _CACHE_ERROR = ("kernels._cpu_cache is not built (the build found no torch to compile it against)"
                    if not list(Path(__file__).parent.glob("_cpu_cache.*")) else f"kernels._cpu_cache: {exc}")
_BACKENDS = (None, "torch", "native")
_logged = False


class Op(NamedTuple):
    native: Callable       # native(ext, *args): the compiled path (its _C entries are named after the op)
    reference: Callable    # reference(*args): the pure-PyTorch path, kernels/reference.py
    problems: Callable     # problems(build, *args) -> (unsupported, by_design): why native can't run
    check: Callable        # check(*args): raise ValueError for arguments no backend accepts
    compiled: bool = True  # False: the "native" path is plain PyTorch and needs no _C (attention)


def _row(module, compiled: bool = True) -> Op:
    return Op(module.native, module.fallback, module.problems, module.check, compiled)


# For each op: the native entry, the reference, and the reasons the native path can't run.
OPS: dict[str, Op] = {
    "cross_entropy": _row(_cross_entropy),                # _C.cross_entropy_cpu / _cuda
    "linear_cross_entropy": _row(_linear_cross_entropy),  # chunks on _C.cross_entropy_cpu / _cuda
    "linear": _row(_linear),                              # _C.linear_cpu
    "rms_norm": _row(_rms_norm),                          # _C.rms_norm_cpu, _C.rms_norm_backward_cpu
    "rope": _row(_rope),                                  # _C.rope_cpu
    "glu": _row(_glu),                                    # _C.glu_cpu (forward and backward)
    "attention": _row(_attention, compiled=False),        # batched GEMMs (ops/attention.py) vs SDPA
    "quant_linear": _row(_quant_linear),                  # _C.quant_dequant_cpu, _C.quant_gemv_cpu
    # AdamW is a class: kernels.AdamW asks _select with these problems, then steps through
    # _C.adamw_cpu / _cuda (ops/adamw.py) or reference.adamw_step_.
    "AdamW": Op(None, reference.adamw_step_, adamw.problems, None),
}


def _env_backend() -> str | None:
    value = os.environ.get("ENGINE_KERNELS")
    if not value:  # the common case, read on every call: keep it cheap
        return None
    value = value.strip().lower()
    if value not in ("", "torch", "native"):
        raise ValueError(f"ENGINE_KERNELS: expected 'torch' or 'native', got {value!r}")
    return value or None


def release_workspace() -> None:
    """Free the CPU buffers kept across calls on this thread: linear_cross_entropy's logits (up to
    128 MiB) and quant_linear's dequantized tile (up to 8 MiB); engine.train calls it when training ends."""
    _linear_cross_entropy.release_logits_buffer()
    _quant_linear.release_tile_buffer()


def cache_cpu_blocks(min_bytes: int, max_bytes: int, limit_bytes: int, per_size: int) -> str | None:
    """From now on, torch's freed CPU blocks of min_bytes <= size < max_bytes are kept (at most limit_bytes in
    all, per_size of one size) and handed to the next request of that size: no fresh pages to fault in.
    Process-wide, like torch's allocator it replaces. None when installed, else why it could not be."""
    for name, value in (("min_bytes", min_bytes), ("max_bytes", max_bytes), ("limit_bytes", limit_bytes),
                        ("per_size", per_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"kernels.cache_cpu_blocks: {name}: expected an int >= 0, got {value!r}")
    if min_bytes > max_bytes:
        raise ValueError(f"kernels.cache_cpu_blocks: min_bytes {min_bytes} > max_bytes {max_bytes}")
    if _CACHE_ERROR is not None:
        return _CACHE_ERROR
    if not _cpu_cache.install(min_bytes, max_bytes, limit_bytes, per_size):
        return "torch keeps another CPU allocator (set with a higher priority)"
    return None


def release_cpu_blocks(uninstall: bool = False) -> dict:
    """Give every block cache_cpu_blocks holds back to the OS (and with uninstall=True, put torch's allocator
    back); returns its counters: installed, hits, misses, cached_bytes, limit_bytes ({} when not built)."""
    if _cpu_cache is None or _CACHE_ERROR is not None:
        return {}
    if uninstall:
        _cpu_cache.uninstall()
    else:
        _cpu_cache.release()
    return dict(_cpu_cache.stats())


def info() -> dict:
    """Build/runtime facts: native (bool), reason (why not, or None), cpu_isa, openmp, threads,
    cuda (bool), cuda_arch, env (ENGINE_KERNELS value), linear_max_rows (most rows of x that
    kernels.linear runs as a native GEMV), gemv_prefetch (the GEMV prefetches weights ahead in
    software: on by default on Intel CPUs, ENGINE_GEMV_PREFETCH=0/1 overrides)."""
    env = _env_backend()
    reason = _EXT_ERROR or ("ENGINE_KERNELS=torch forces the PyTorch fallback" if env == "torch" else None)
    return {"native": reason is None, "reason": reason, "cpu_isa": _BUILD.get("cpu_isa"),
            "openmp": _BUILD.get("openmp"), "threads": torch.get_num_threads(),
            "cuda": bool(_BUILD.get("cuda")), "cuda_arch": _BUILD.get("cuda_arch") or None,
            "env": env, "linear_max_rows": _linear.LINEAR_MAX_ROWS,
            "gemv_prefetch": bool(_BUILD.get("gemv_prefetch", False)),
            "cpu_block_cache": _CACHE_ERROR or "built"}


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


def _check_backend(name: str, backend) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"{name}: backend must be None, 'torch' or 'native', got {backend!r}")


def _raise_cannot_run(name: str, reasons: list[str]):
    listed = "; ".join(f"({k}) {r}" for k, r in enumerate(reasons, 1))
    raise RuntimeError(f"{name}: backend='native' cannot run: {listed}")


def _select(name: str, backend: str | None, problems: tuple[list[str], list[str]]):
    """The compiled module if `name` should run natively, else None. by_design reasons send
    backend=None to the reference even under ENGINE_KERNELS=native; only backend="native" raises."""
    if not _logged:
        _log_once()
    _check_backend(name, backend)
    if backend == "torch":
        return None
    unsupported, by_design = problems
    env = _env_backend()
    if not unsupported and not by_design and _ext is not None and env != "torch":  # the usual answer, fast
        return _ext
    if by_design and backend is None:
        return None
    if backend is None and env == "native":
        backend = "native"
    reasons = ([_EXT_ERROR] if _ext is None else []) + (
        ["ENGINE_KERNELS=torch is set"] if env == "torch" else []) + list(dict.fromkeys(unsupported + by_design))
    if not reasons:
        return _ext
    if backend == "native":
        _raise_cannot_run(name, reasons)
    return None


def _run(op_name: str, backend: str | None, *args):
    """Check the arguments, pick the path for this input, run it."""
    op, name = OPS[op_name], "kernels." + op_name
    op.check(*args)
    if op.compiled:
        ext = _select(name, backend, op.problems(_BUILD, *args))
        return op.reference(*args) if ext is None else op.native(ext, *args)
    # Plain-PyTorch native path: runs without _C; ENGINE_KERNELS=native does not force it.
    _check_backend(name, backend)
    if backend == "native":
        unsupported = op.problems(_BUILD, *args, forced=True)[0]
        if unsupported:
            _raise_cannot_run(name, unsupported)
        return op.native(None, *args)
    if backend == "torch" or _env_backend() == "torch" or any(op.problems(_BUILD, *args)):
        return op.reference(*args)
    return op.native(None, *args)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                  softcap: float | None = None, backend: str | None = None,
                  inplace: bool = False) -> torch.Tensor:
    """Cross-entropy of logits [N, V] (fp32/bf16/fp16) vs int64 targets [N]; loss in logits' dtype.

    Same meaning as F.cross_entropy (+ z_loss * logsumexp^2 and optional tanh softcap); "mean"
    averages over non-ignored rows (NaN if all are ignored, like torch). The native path computes
    the gradient during forward; inplace=True writes it over `logits`, saving an [N, V] buffer (and
    its page faults): the caller promises not to read logits again (autograd's version counter
    catches nodes that saved them). Ignored by the reference.
    """
    return _run("cross_entropy", backend, logits, targets, ignore_index, reduction, label_smoothing,
                z_loss, softcap, inplace)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                         reduction: str = "mean", chunk_size: int | None = None,
                         backend: str | None = None, out_dtype: torch.dtype | None = None,
                         softcap: float | None = None) -> torch.Tensor:
    """Cross-entropy of hidden [N, d] @ weight [V, d].T (+ bias [V]) vs targets [N], computed in
    token chunks (default: ~32M logits per chunk) so [N, V] never exists. Both backends chunk;
    they differ in the per-chunk loss/gradient (compiled kernel vs kernels/reference.py).
    The loss is accumulated in fp32 and returned in `out_dtype` (default: hidden's dtype, like
    F.cross_entropy); a bf16 training loop asks for float32 so a summed loss keeps its digits.
    softcap: logits -> softcap * tanh(logits / softcap) first (Gemma 2's final cap), inside the chunks."""
    return _run("linear_cross_entropy", backend, hidden, weight, targets, bias, ignore_index, reduction,
                chunk_size, out_dtype, softcap)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           backend: str | None = None) -> torch.Tensor:
    """F.linear(x [..., K], weight [N, K], bias [N] or None) -> [..., N] in x's dtype.

    Decoding (at most LINEAR_MAX_ROWS rows of x, fp32 or bf16 on CPU, no autograd) runs a
    memory-bound GEMV that streams each weight once at DRAM speed (fp32 accumulation, bf16
    rounded once); anything else is F.linear itself (see kernels/reference.py).
    """
    return _run("linear", backend, x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0,
             out_dtype: torch.dtype | None = None, backend: str | None = None) -> torch.Tensor:
    """RMSNorm of x [..., C] with weight [C]: exactly reference.rms_norm (Llama / Gemma semantics,
    optional final rounding to out_dtype). CPU training (autograd, fp32/bf16) runs the fused kernel
    (kernels/csrc/rms_norm.cpp: same math in fp32, sums in another order, so not bitwise)."""
    return _run("rms_norm", backend, x, weight, eps, weight_offset, out_dtype)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         out_dtype: torch.dtype | None = None, backend: str | None = None):
    """Rotate-half RoPE of q [B, T, nh, hd] and k [B, T, nkv, hd] with cos/sin [B|1, T, hd] ->
    (q, k) rotated, [B, h, T, hd]: exactly reference.rope. CPU training runs the fused kernel
    (kernels/csrc/rope.cpp: fp32 math, one rounding to the output dtype, no separate transpose)."""
    return _run("rope", backend, q, k, cos, sin, out_dtype)


def glu(gate: torch.Tensor, up: torch.Tensor, activation: str, backend: str | None = None) -> torch.Tensor:
    """act(gate) * up for gate, up [..., F]: exactly reference.glu (activation: silu, gelu_tanh, gelu,
    relu). CPU training with silu / gelu_tanh (fp32 or bf16) runs the fused kernel (kernels/csrc/glu.cpp:
    fp32 math rounded where torch rounds, its own exp/tanh, so within a rounding of torch, not bitwise)."""
    return _run("glu", backend, gate, up, activation)


def quant_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None,
                 backend: str | None = None) -> torch.Tensor:
    """F.linear(x [..., K], W [N, K] dequantized, bias [N]) -> [..., N] for a weight-only quantized W (NF4 or
    int8, kernels/reference.py), in autocast's dtype (else x's); gradient w.r.t. x only (W is frozen).

    CPU: a fused GEMV for up to 8 rows (decoding), else W dequantized a tile at a time into torch's GEMM
    (kernels/ops/quant_linear.py). Elsewhere, the reference (one layer dequantized, F.linear)."""
    return _run("quant_linear", backend, x, weight, bias)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              backend: str | None = None) -> torch.Tensor:
    """Grouped-query attention q [B, nh, T, hd], k/v [B, nkv, S, hd] -> [B, nh, T, hd], meaning
    reference.attention (mask None: causal; bool mask: True = attend).

    bf16/fp16 CPU training takes kernels/ops/attention.py (pure PyTorch, no compiled code: scores
    rounded to the input dtype, ~1.7x faster than SDPA there) up to 512 keys; everything else, and
    ENGINE_KERNELS=torch, is SDPA itself. backend="native" forces the grouped path (any dtype,
    autograd or not) or raises listing why it can't run.
    """
    if isinstance(q, torch.Tensor) and torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)  # the cast autocast applies to SDPA
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return _run("attention", backend, q, k, v, mask)


class AdamW(adamw.FusedAdamW):
    """torch.optim.AdamW with a fused step: one pass per element (multi-tensor), optional global
    grad-norm clipping folded in (max_grad_norm; pre-clip norm in .last_grad_norm; skip_nonfinite: an inf/NaN norm
    skips the step, .last_step_skipped), fp32 master
    weights for bf16/fp16 params. state_dict is interchangeable with torch.optim.AdamW's."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 max_grad_norm=None, backend=None, skip_nonfinite=False):
        _check_backend("kernels.AdamW", backend)
        super().__init__(params, lr, betas, eps, weight_decay, max_grad_norm, backend, skip_nonfinite)
        _log_once()

    def _native_ext(self, params, grads):
        return _select("kernels.AdamW", self.backend, OPS["AdamW"].problems(_BUILD, params, grads))


def decode_plan_problems(embed: torch.Tensor, activation: str, n_rows: int, head_dim: int) -> list[str]:
    """Why kernels.decode_plan can't run for this model ([] if it can): no _C, ENGINE_KERNELS=torch,
    dtype, device, activation, batch or head size (kernels/ops/decode_step.py)."""
    _log_once()
    reasons = [_EXT_ERROR] if _ext is None else []
    if _env_backend() == "torch":
        reasons.append("ENGINE_KERNELS=torch is set")
    return reasons + _decode_step.problems(embed, activation, n_rows, head_dim)


def decode_plan(embed, final_norm, lm_head, cache_k, cache_v, layers, windows, n_heads: int, eps: float,
                norm_offset: float, qk_norm_offset: float, embed_scale: float, attn_scale: float,
                activation: str):
    """The fused decode step over these weights and KV cache (each weight matrix a tensor or a
    QuantizedWeight), checked once: `.step(ids [B] int64, pos [B] int64, logits [B, V] out, n_threads,
    argmax=None)` (argmax: optional [B] int64 out, each row's torch.argmax of its logits). Raises RuntimeError listing decode_plan_problems."""
    reasons = decode_plan_problems(embed, activation, cache_k.shape[1], cache_k.shape[-1])
    if reasons:
        _raise_cannot_run(_decode_step.NAME, reasons)
    return _decode_step.build(_ext, embed, final_norm, lm_head, cache_k, cache_v, layers, windows, n_heads, eps,
                              norm_offset, qk_norm_offset, embed_scale, attn_scale, activation)
