"""RoPE frequencies: the per-pair inverse frequencies of every rope type the families use (default,
linear, llama3, yarn, longrope), computed in fp32 exactly as transformers' modeling_rope_utils does.
The cos/sin tables built from them live in Transformer._rope (one per distinct LayerRope).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from engine.config import LayerRope, RopeScaling


def rope_inv_freq(dim: int, theta: float, s: Optional[RopeScaling], long: bool = False) -> torch.Tensor:
    """Per-pair rotation frequencies [dim/2] in fp32 for base `theta` over `dim` rotated dims, rescaled
    for long context by `s` (longrope: its long factors if `long`, else its short ones)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if s is None:
        return inv_freq
    if s.kind == "linear":
        return inv_freq / s.factor
    if s.kind == "longrope":  # Phi-3: a learned divisor per pair
        return inv_freq / torch.tensor(s.long_factor if long else s.short_factor, dtype=torch.float32)
    if s.kind == "yarn":
        return _yarn_inv_freq(inv_freq, dim, theta, s)
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(inv_freq: torch.Tensor, dim: int, theta: float, s: RopeScaling) -> torch.Tensor:
    """YaRN: pairs that turn fewer than beta_slow times over the original context are interpolated
    (divided by factor), more than beta_fast times kept, a linear ramp between (transformers' formula)."""
    def correction_dim(rotations):
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high  # no division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
    return inv_freq / s.factor * (1 - keep) + inv_freq * keep


def rope_uses_long(rope: Optional[LayerRope], seq_len: int) -> bool:
    """longrope switches to its long factors once a forward reaches past the original context."""
    s = rope.scaling if rope is not None else None
    return s is not None and s.kind == "longrope" and seq_len > s.original_max_position_embeddings
