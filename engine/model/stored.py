"""Stored: where one native tensor lives in a Hugging Face file (the value type of the weight-name tables)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stored:
    """Where one native tensor lives in an HF file. `{}` in `name` is the layer index."""

    name: str
    transposed: bool = False  # GPT-2's Conv1D keeps weights as [in, out]
    # This tensor is slice `part` of the `parts` native tensors fused along the output dim, in part order
    # (GPT-2's c_attn holds [q | k | v]). Each slice is as long as its native tensor, so the slices may
    # differ in size (Phi-3's qkv_proj with fewer k/v heads than q heads; gate_up_proj).
    part: int = 0
    parts: int = 1
