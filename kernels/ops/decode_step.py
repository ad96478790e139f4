"""kernels.decode_plan: the fused decode step of kernels/csrc/decode_step.cpp (_C.DecodePlan), which runs
one token per row through every layer of a pre-norm decoder and the LM head in one OpenMP region.

The engine describes its model as plain tensors (engine/infer/decode_step.py decides whether a model
fits and falls back to its eager forward when not); this module only says whether the compiled step
can run at all and builds it. There is no pure-PyTorch twin here: the eager model forward is the
reference the fused step is tested against (tests/infer/test_decode_step.py).

A weight matrix (q/k/v/o, gate/up/down, the LM head) is a dense tensor of the model's dtype or a
QuantizedWeight (NF4/int8): the step then runs the quantized GEMV rows kernels.quant_linear uses.
"""
from __future__ import annotations

import torch

from kernels.ops.quant_linear import QuantizedWeight, _weight_args

NAME = "kernels.decode_plan"
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3}  # decode_step.cpp's Activation codes
DTYPES = (torch.float32, torch.bfloat16)
MAX_BATCH, MAX_HEAD_DIM = 64, 512  # decode_plan.cpp's kMaxBatch, kMaxHeadDim


def problems(embed: torch.Tensor, activation: str, n_rows: int, head_dim: int) -> list[str]:
    """Why the compiled step can't take this model ([] if it can); the tensors themselves are
    checked by _C.DecodePlan when the plan is built."""
    out = []
    if embed.dtype not in DTYPES:
        out.append(f"the fused decode step runs float32 or bfloat16 weights, got {embed.dtype}")
    if embed.device.type != "cpu":
        out.append(f"the fused decode step runs on cpu only, got {embed.device}")
    if activation not in ACTIVATIONS:
        out.append(f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
    if n_rows > MAX_BATCH:
        out.append(f"{n_rows} cache rows; the fused decode step takes at most {MAX_BATCH}")
    if head_dim > MAX_HEAD_DIM or head_dim % 2:
        out.append(f"head_dim {head_dim}: the fused decode step needs an even head_dim <= {MAX_HEAD_DIM}")
    return out


def _entry(t):
    """A layer entry as _C.DecodePlan takes it: tensors and None as they are, a QuantizedWeight as the tuple of
    its buffers (decode_plan.cpp checks each against its shape and layout)."""
    return _weight_args(t) if isinstance(t, QuantizedWeight) else t


def build(ext, embed, final_norm, lm_head, cache_k, cache_v, layers, windows, n_heads, eps, norm_offset,
          qk_norm_offset, embed_scale, attn_scale, activation):
    """_C.DecodePlan over these tensors (see decode_plan.cpp for the order of each layer's tuple)."""
    layers = [tuple(_entry(t) for t in layer) for layer in layers]
    return ext.DecodePlan(embed, final_norm, _entry(lm_head), cache_k, cache_v, layers, windows, n_heads, eps,
                          norm_offset, qk_norm_offset, embed_scale, attn_scale, ACTIVATIONS[activation])
