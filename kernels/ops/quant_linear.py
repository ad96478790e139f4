"""kernels.quant_linear: F.linear with a weight-only quantized W (NF4 or int8, layout in kernels/reference.py),
through kernels/csrc/quant_linear.cpp (_C.quant_dequant_cpu, _C.quant_gemv_cpu).

Decoding (at most GEMV_MAX_ROWS rows of x) runs a fused GEMV that expands the codes in registers, so each
step reads 4 (NF4) or 8 (int8) bits per weight; on CPU the int8 GEMV rounds x to int16 per 64-element block
(reference.int16_blocks, error at most half a step of the block's max / 32767) and sums exact integer products.
Everything else (training: many tokens) dequantizes W a tile of rows at a time (at most TILE_ELEMS elements,
in x's dtype, bitwise the reference's values) and multiplies it with torch's GEMM, forward (y = x W^T) and
backward (dx = dy W): the base is frozen, so the only gradient is the input's. No dense copy of a whole weight
outlives its tile.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from kernels import reference
from kernels.ops.common import NO_PROBLEMS, ThreadBuffer, desc

NAME = "kernels.quant_linear"
KINDS = ("nf4", "int8")
_KIND_CODE = {"nf4": 0, "int8": 1}  # QuantKind in kernels/csrc/ops.h
GEMV_MAX_ROWS = 8  # rows of x up to which the fused GEMV runs (decoding); the kernel takes at most 8
# Dequantized elements per tile (16 MiB in bf16): every layer of a 0.5B model in one. At 1 << 22 its MLP
# linears (4.4M) took two tiles, and the half-width GEMMs plus the copy into the output cost ~5% of a QLoRA
# step on the Intel Xeon with AMX, for 1-2 MB less peak (bench/bench_qlora.py).
TILE_ELEMS = 1 << 23
DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized W [N, K]: NF4 (codes, qabsmax, absmax2, offset) or int8 (qweight in `codes`, scale)."""

    kind: str
    shape: tuple[int, int]
    codes: torch.Tensor                       # nf4: uint8 [ceil(N*K/2)]; int8: int8 [N, K]
    qabsmax: Optional[torch.Tensor] = None    # nf4: uint8 [ceil(N*K/64)]
    absmax2: Optional[torch.Tensor] = None    # nf4: fp32 [ceil(N*K/64/256)]
    offset: Optional[torch.Tensor] = None     # nf4: fp32 []
    scale: Optional[torch.Tensor] = None      # int8: fp32 [N]

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def tensors(self) -> dict:
        if self.kind == "nf4":
            return {"codes": self.codes, "qabsmax": self.qabsmax, "absmax2": self.absmax2, "offset": self.offset}
        return {"qweight": self.codes, "scale": self.scale}

    def dequantize(self, dtype=torch.float32, row0: int = 0, rows: Optional[int] = None) -> torch.Tensor:
        """Rows [row0, row0 + rows) of W (all by default) in `dtype`, by the reference (any device)."""
        n, k = self.shape
        rows = n - row0 if rows is None else rows
        if self.kind == "int8":
            return reference.int8_dequantize(self.codes, self.scale, dtype, row0, rows)
        flat = reference.nf4_dequantize(self.codes, self.qabsmax, self.absmax2, self.offset, (n, k), dtype,
                                        start=row0 * k, count=rows * k)
        return flat.reshape(rows, k)


def check(x, qw, bias) -> None:
    """Arguments no backend accepts: ValueError naming them."""
    if not isinstance(qw, QuantizedWeight) or qw.kind not in KINDS:
        raise ValueError(f"{NAME}: weight must be a QuantizedWeight of kind {KINDS}, got {desc(qw)}")
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != qw.shape[1]:
        raise ValueError(f"{NAME}: x must be [..., K={qw.shape[1]}], got {desc(x)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (qw.shape[0],)):
        raise ValueError(f"{NAME}: bias must be [N]=[{qw.shape[0]}] or None, got {desc(bias)}")


def problems(build, x, qw, bias) -> tuple[list[str], list[str]]:
    """(unsupported, by_design): CPU, or CUDA when built with it (kernels/csrc/cuda/quant_linear.cu); on other
    devices the reference (dequantize one layer, F.linear) is the path."""
    dtype = _compute_dtype(x)
    devices = {t.device for t in (x, qw.codes, bias) if t is not None}
    if dtype in DTYPES and len(devices) == 1 and (x.is_cpu or (x.is_cuda and build.get("cuda"))):
        return NO_PROBLEMS
    unsupported, by_design = [], []
    if dtype not in DTYPES:
        unsupported.append(f"x dtype {dtype} is not supported natively (float32, bfloat16)")
    if len(devices) > 1:
        unsupported.append("x, the weight and bias must be on one device, got " + ", ".join(sorted(map(str, devices))))
    elif x.is_cuda:
        by_design.append(f"x is on {x.device} but kernels._C was built without CUDA (reinstall with ENGINE_CUDA=1)")
    elif not x.is_cpu:
        by_design.append(f"x is on {x.device}; the quantized kernels run on cpu and cuda")
    return unsupported, by_design


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute in: autocast's on x's device, else x's."""
    t = x.device.type
    return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else x.dtype


def _tiles(n: int, k: int):
    """Row ranges (row0, rows) of at most TILE_ELEMS elements, of near-equal sizes."""
    count = max(1, math.ceil(n * k / TILE_ELEMS))
    step = max(1, math.ceil(n / count))
    return [(r, min(step, n - r)) for r in range(0, n, step)]


def _entry(ext, name: str, device: torch.device):
    """(the _C entry for `device`, its keyword arguments): *_cpu with the thread count, *_cuda with the stream."""
    if device.type == "cuda":
        return getattr(ext, name + "_cuda"), {"stream": torch.cuda.current_stream(device).cuda_stream}
    return getattr(ext, name + "_cpu"), {"n_threads": torch.get_num_threads()}


_workspace = ThreadBuffer()  # this thread's reusable CPU buffer for dequantized tiles (flat)


def _tile_buffer(rows: int, k: int, dtype, device) -> torch.Tensor:
    """An uninitialized [rows, k] tensor for one dequantized tile. On CPU it is carved from one buffer kept
    across calls (each tile is consumed by the GEMM right after and never escapes this module): a QLoRA step
    dequantizes ~500 tiles of up to 16 MiB (7 linears x layers x forward, recompute, backward), and a fresh
    allocation of each is a fresh mapping under the small mmap threshold a quantized base runs with
    (engine.quant.heap), ~2 GB of first-touch page faults per step on a 0.5B model."""
    if device.type != "cpu":
        return torch.empty((rows, k), dtype=dtype, device=device)
    # exactly the tile: the buffer grows to the model's largest tile during the first step and stays there
    return _workspace.take(rows * k, dtype).view(rows, k)


def release_tile_buffer() -> None:
    """Free this thread's dequantized-tile buffer (the next tiled call allocates a new one)."""
    _workspace.release()


def _dequant(ext, qw: QuantizedWeight, dtype, row0: int, rows: int) -> torch.Tensor:
    out = _tile_buffer(rows, qw.shape[1], dtype, qw.device)
    fn, kw = _entry(ext, "quant_dequant", qw.device)
    fn(*_weight_args(qw), row0, rows, out, **kw)
    return out


_TABLES: dict = {}  # device -> (DYNAMIC_MAP, NF4_CODE) there


def _weight_args(qw: QuantizedWeight):
    n, k = qw.shape
    if qw.kind == "nf4":
        dev = qw.device
        if dev not in _TABLES:
            _TABLES[dev] = (reference.DYNAMIC_MAP.to(dev), reference.NF4_CODE.to(dev))
        code2, nf4 = _TABLES[dev]
        # offset: a 0-d tensor; .item() on CUDA syncs once per call, which the GEMV's launch needs anyway
        return (0, n, k, qw.codes, qw.qabsmax, qw.absmax2, code2, nf4, float(qw.offset), None)
    return (1, n, k, qw.codes, None, None, None, None, 0.0, qw.scale)


class _QuantLinearFn(torch.autograd.Function):
    """y = x W^T + b with W quantized and frozen: backward returns dx only."""

    @staticmethod
    def forward(ctx, x, bias, qw, ext):
        ctx.qw, ctx.ext = qw, ext
        n, k = qw.shape
        x2 = x.reshape(-1, k)
        m = x2.shape[0]
        if m <= GEMV_MAX_ROWS and (qw.kind == "int8" or k % 64 == 0):
            out = x2.new_empty((m, n))
            fn, kw = _entry(ext, "quant_gemv", x.device)
            fn(*_weight_args(qw), x2.contiguous(), bias, out, **kw)
            return out.reshape(*x.shape[:-1], n)
        tiles = _tiles(n, k)
        if len(tiles) == 1:
            w = _dequant(ext, qw, x.dtype, 0, n)
            out = torch.addmm(bias, x2, w.t()) if bias is not None else x2 @ w.t()
        else:
            out = x2.new_empty((m, n))
            for row0, rows in tiles:
                w = _dequant(ext, qw, x.dtype, row0, rows)
                part = x2 @ w.t() if bias is None else torch.addmm(bias[row0:row0 + rows], x2, w.t())
                out[:, row0:row0 + rows] = part
        return out.reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        qw, ext = ctx.qw, ctx.ext
        n, k = qw.shape
        dy2 = dy.reshape(-1, n)
        dx = None
        for row0, rows in _tiles(n, k):  # dx = sum over row tiles of dy[:, tile] @ W[tile]
            w = _dequant(ext, qw, dy.dtype, row0, rows)
            part = dy2[:, row0:row0 + rows]
            # in place: an out-of-place addmm holds two [tokens, K] dx at once, and a QLoRA step peaks in
            # down_proj's backward, where K is intermediate_size
            dx = part @ w if dx is None else dx.addmm_(part, w)
        return dx.reshape(*dy.shape[:-1], k), None, None, None


def native(ext, x, qw, bias):
    """x [..., K] @ W^T (+ bias) on CPU in the compute dtype (autocast's, else x's): fp32 or bf16."""
    dtype = _compute_dtype(x)
    x = x.to(dtype)
    bias = None if bias is None else bias.to(dtype).contiguous()
    return _QuantLinearFn.apply(x, bias, qw, ext)


def fallback(x, qw, bias):
    """The reference: this layer's W dequantized in the compute dtype, then F.linear (autograd w.r.t. x)."""
    dtype = _compute_dtype(x)
    return reference.quant_linear(x.to(dtype), qw.kind, qw.tensors(), qw.shape,
                                  None if bias is None else bias.to(dtype))
