"""The KV cache generation and serving decode into: preallocated per-layer keys and values.

L = layers, B = batch rows, nkv = key/value heads, T = new tokens, S = keys visible, hd = head dim.
"""
from __future__ import annotations

import copy

import torch

from engine.config import ModelConfig


class KVCache:
    """Preallocated keys and values of every layer, [L, B, nkv, max_len, hd]; `pos` tokens are filled.

    With `per_row=True` rows hold different numbers of tokens, as continuous batching needs (engine.infer.serve):
    `lengths` [B] counts each row's tokens, a step writes row b's new tokens at lengths[b] onwards, the
    model masks every slot past a row's own length, and `pos` is the longest row (the slots a step reads).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device=None,
                 per_row: bool = False):
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len, self.pos = max_len, 0
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device) if per_row else None

    def update(self, layer: int, k, v):
        """Write this step's k, v (B, nkv, T, hd) at `pos`; return all keys/values so far (B, nkv, S, hd)."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} tokens do not fit in max_len={self.max_len}")
        if self.lengths is None:
            self.k[layer, :, :, self.pos:end] = k
            self.v[layer, :, :, self.pos:end] = v
        else:  # row b's T new tokens go to slots lengths[b] + arange(T)
            slots = self.lengths[:, None] + torch.arange(k.shape[2], device=k.device)  # (B, T)
            index = slots[:, None, :, None].expand_as(k)  # (B, nkv, T, hd)
            self.k[layer].scatter_(2, index, k)
            self.v[layer].scatter_(2, index, v)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, T: int):
        """Count T more tokens in every row (the model calls this after each forward)."""
        self.pos += T
        if self.lengths is not None:
            self.lengths += T

    def rows(self, start: int, stop: int) -> "KVCache":
        """Rows [start, stop) as a cache sharing this one's memory (and `lengths`): a slice of a serving batch."""
        view = copy.copy(self)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        if self.lengths is not None:
            view.lengths = self.lengths[start:stop]
        return view
