"""QuantLinear: a frozen linear layer whose weight is stored NF4 or int8 (layout: kernels/reference.py) and
multiplied through kernels.quant_linear; quantize(model, kind) swaps a model's block linears for it, one tensor
at a time, so the dense and the quantized copy of the whole model never coexist.

What is quantized: every linear layer inside the transformer blocks (attention q/k/v/o, MLP). What is not: the
token embedding, the norms and the LM head. The embedding is a lookup (no matmul to speed up, and usually tied
to the head); the head feeds the fused loss kernels.linear_cross_entropy, which takes a dense weight, and its
rounding error would land on every logit directly; the norms are a few thousand numbers. They stay in the
model's dtype (bf16 for a quantized QLoRA base: frozen, and half the bytes of fp32).

Decoding is different: it reads every weight once per token, and the LM head is a large share of a small
model's bytes (Qwen2.5-0.5B: 136M of its 494M weights). quantize_lm_head gives the head its own int8 copy for
inference (cli.generate / cli.serve --quantize); int8 per output channel, even under --quantize nf4, as
llama.cpp keeps its output tensor at 6-8 bits: the head's error lands on every logit directly. The embedding
stays dense for the lookups.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

import kernels
from engine.quant.heap import fix_mmap_threshold, quantizing, trim_heap
from kernels import QuantizedWeight, reference

KINDS = ("nf4", "int8")
SKIPPED = ("lm_head",)  # top-level linears that stay dense (see the module docstring)


def _check_kind(kind, where: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"{where}: unsupported quantization {kind!r}; expected one of {KINDS}")


class _DenseSlot:
    """What the checkpoint loader copies a dense weight into (shape, copy_): quantizes it on arrival."""

    def __init__(self, layer: "QuantLinear"):
        self.layer, self.shape = layer, torch.Size((layer.out_features, layer.in_features))

    def copy_(self, dense: torch.Tensor):
        self.layer.load_dense(dense)
        return self


class QuantLinear(nn.Module):
    """y = x W^T + b with W [out, in] frozen and stored quantized (buffers; bias, if any, a frozen Parameter).

    NF4 buffers: codes uint8 [ceil(out*in/2)], qabsmax uint8 [ceil(out*in/64)], absmax2 fp32 [ceil(../256)],
    offset fp32 []; int8 buffers: qweight int8 [out, in], scale fp32 [out]. There is no dense `.weight`:
    anything that needs one (full fine-tuning, in-place merging) must dequantize() first.
    """

    def __init__(self, in_features: int, out_features: int, kind: str, bias: Optional[torch.Tensor] = None,
                 device=None):
        super().__init__()
        _check_kind(kind, "QuantLinear")
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        n = in_features * out_features
        if kind == "nf4":
            blocks = math.ceil(n / reference.NF4_BLOCK)
            self.register_buffer("codes", torch.zeros(math.ceil(n / 2), dtype=torch.uint8, device=device))
            self.register_buffer("qabsmax", torch.zeros(blocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax2", torch.zeros(math.ceil(blocks / reference.NF4_ABSMAX_BLOCK),
                                                        dtype=torch.float32, device=device))
            self.register_buffer("offset", torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: str) -> "QuantLinear":
        """Quantize a dense linear layer (its weight is read once; a meta weight gives empty buffers)."""
        w = linear.weight
        q = cls(linear.in_features, linear.out_features, kind, linear.bias, device=w.device)
        if not w.is_meta:
            q.load_dense(w)
        return q

    @torch.no_grad()
    def load_dense(self, w: torch.Tensor) -> None:
        """Quantize the dense weight `w` [out, in] into this layer's buffers (in place)."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"QuantLinear.load_dense: expected a weight [{self.out_features}, {self.in_features}], "
                             f"got {list(w.shape)}")
        with quantizing():  # the chunks' temporaries reuse heap blocks instead of fresh mappings (engine.quant.heap)
            parts = reference.nf4_quantize(w) if self.kind == "nf4" else reference.int8_quantize(w)
            for name, t in parts.items():
                getattr(self, name).copy_(t)

    def weight_slot(self) -> _DenseSlot:
        """The loader's target for this layer's dense checkpoint weight (engine.model.hf_format)."""
        return _DenseSlot(self)

    def quantized_weight(self) -> QuantizedWeight:
        shape = (self.out_features, self.in_features)
        if self.kind == "nf4":
            return QuantizedWeight("nf4", shape, self.codes, self.qabsmax, self.absmax2, self.offset)
        return QuantizedWeight("int8", shape, self.qweight, scale=self.scale)

    def forward(self, x):
        return kernels.quant_linear(x, self.quantized_weight(), self.bias)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The dense weight [out, in] in `dtype` (fp32 products rounded once): for merging and export."""
        return self.quantized_weight().dequantize(dtype)

    def to_linear(self, dtype=torch.float32) -> nn.Module:
        """A dense engine Linear with the dequantized weight (and bias) in `dtype`, frozen."""
        from engine.model.transformer import Linear

        dense = Linear(self.in_features, self.out_features, bias=self.bias is not None,
                       device=self.codes.device if self.kind == "nf4" else self.qweight.device, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(self.dequantize(dtype))
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense.requires_grad_(False)

    def quantized_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, " \
               f"bias={self.bias is not None}"


def quantize(model: nn.Module, kind: str) -> list[str]:
    """Swap every block linear of `model` (all nn.Linear but the LM head) for a QuantLinear of `kind`, in place,
    one layer at a time; return their names. Meta-device layers become empty quantized layers (for loading)."""
    _check_kind(kind, "quantize")
    fix_mmap_threshold()  # a quantized model is about memory: keep freed activations out of RSS (engine.quant.heap)
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("quantize: the model is already quantized")
    if any(type(m).__name__ == "LoRALinear" for m in model.modules()):
        raise ValueError("quantize: quantize the base before adding LoRA adapters (apply_lora after quantize)")
    names = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, nn.Linear) and full not in SKIPPED:
                setattr(parent, child_name, QuantLinear.from_linear(child, kind))
                del child  # the dense weight goes now, before the next layer is quantized
                names.append(full)
    if not names:
        raise ValueError("quantize: the model has no linear layers to quantize")
    trim_heap()  # the quantizing temporaries' heap blocks back to the OS (a meta model had none)
    return names


def quantize_lm_head(model: nn.Module, kind: str = "int8") -> None:
    """Replace model.lm_head by a QuantLinear of `kind` (for decoding: see the module docstring). A head tied to
    the embedding is read once into the quantized copy; the embedding keeps its dense weight."""
    _check_kind(kind, "quantize_lm_head")
    head = model.lm_head
    if isinstance(head, QuantLinear):
        raise ValueError("quantize_lm_head: the LM head is already quantized")
    if not isinstance(head, nn.Linear):
        raise ValueError(f"quantize_lm_head: lm_head is {type(head).__name__}, expected a Linear")
    model.lm_head = QuantLinear.from_linear(head, kind)
    trim_heap()


# Logits per fused-loss chunk on a quantized base (32 MiB; dense models: 128 MiB). 16 MiB chunks (55 rows at
# V = 151936) ran the head matmul at a fraction of its rate on the Intel Xeon with AMX (0.83 s of a 7.5 s
# 0.5B QLoRA step vs 0.38 s in 441-row chunks): 32 MiB gave +15% tokens/s there, and the peak, which sits in
# the backward, moved by 1-3 MB (bench/bench_qlora.py; docs/quantization.md).
LOSS_CHUNK_BYTES = 1 << 25


def loss_chunk_rows(model: nn.Module, rows: int, vocab: int, itemsize: int) -> Optional[int]:
    """Token rows per chunk of the fused loss (kernels.linear_cross_entropy) for `model`: None (the kernel's
    default) for a dense model; for a quantized one, as many as fit LOSS_CHUNK_BYTES of logits. A quantized base
    is about memory, and the kernel's default chunk (128 MiB of logits, kept between steps) would be an eighth
    of a 0.5B QLoRA step's 1 GB; the smaller chunk costs more passes over the head weight (a few % of the step)."""
    if not is_quantized(model):
        return None
    return max(1, min(rows, LOSS_CHUNK_BYTES // max(vocab * itemsize, 1)))


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def check_dense_trainable(model: nn.Module, where: str = "train") -> None:
    """Full fine-tuning needs dense weights: a quantized model without LoRA adapters is an error."""
    layers = quantized_layers(model)
    if layers and not any(type(m).__name__ == "LoRALinear" for m in model.modules()):
        name, layer = next(iter(layers.items()))
        raise ValueError(f"{where}: {name} is {layer.kind}-quantized and cannot be fully fine-tuned (its weight is "
                         "frozen codes); train LoRA adapters on it (lora.base_dtype: nf4|int8) or load it dense")
