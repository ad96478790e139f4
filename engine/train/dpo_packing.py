"""A pair's chosen and rejected sides as one row that computes their shared prefix once (DPO's forward).

Both sides of a pair start with the same prompt tokens, and under causal attention a position's hidden state
depends only on the tokens up to it: the two sides' hidden states are equal, at every layer, over their longest
common prefix of input ids (L tokens; the prompt, and any equal leading completion tokens). So a pair becomes one
row (the "tree" layout: one prefix, two branches):
    [ prefix (L) | chosen's rest (n_c - L) | rejected's rest (n_j - L) | padding ]
with position ids 0..n_c-1 then L..n_j-1, and an attention mask that is causal in the row except that the
rejected branch does not see the chosen branch. Each side's scored positions (targets != IGNORE_INDEX) map into
the row: the chosen side's position t is t; the rejected side's is t below L, else n_c + t - L (the prefix's last
position scores both sides' first differing token, from the same hidden state). A side's length n is its last
scored position + 1: later positions are padding or unscored, and nothing earlier attends to them.
The row holds sum(n_c + n_j - L) tokens instead of 2 * max(n): every prompt is computed once per pair and no
side is padded to another pair's length. The same numbers as two causal rows, up to float summation order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.data.sampler import IGNORE_INDEX


@dataclass
class PackedPairs:
    """One row per pair. input_ids/position_ids int64 [B, T]; attn_mask bool [B, 1, T, T] (True = attend);
    index int64 [N] (flat positions into [B*T]), targets int64 [N], rows int64 [N] (the side: 0..2B-1, chosen
    rows first, as the unpacked batch), counts int64 [2B] (scored tokens per side)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attn_mask: torch.Tensor
    index: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor
    counts: torch.Tensor
    tokens: int  # tokens the forward computes (the rows without their padding)


def _lengths(scored: torch.Tensor) -> torch.Tensor:
    """Per row [R] of a bool [R, T]: last True position + 1 (0 when none)."""
    T = scored.shape[1]
    pos = torch.arange(1, T + 1, device=scored.device).expand_as(scored)
    return (pos * scored).amax(1)


def pack_pairs(input_ids: torch.Tensor, targets: torch.Tensor) -> PackedPairs:
    """The tree layout above of a preference batch: input_ids/targets [2B, T] (chosen rows, then rejected)."""
    R = input_ids.shape[0]
    B = R // 2
    scored = targets != IGNORE_INDEX  # (2B, T)
    n = _lengths(scored).tolist()
    ids_cpu = input_ids.cpu()
    index, tgt, side, plan = [], [], [], []
    width = 0
    for i in range(B):
        n_c, n_j = n[i], n[i + B]
        m = min(n_c, n_j)
        differ = (ids_cpu[i, :m] != ids_cpu[i + B, :m]).nonzero()
        L = int(differ[0]) if len(differ) else m
        plan.append((n_c, n_j, L))
        width = max(width, n_c + n_j - L)
    width = max(width, 1)
    device = input_ids.device
    ids = torch.zeros(B, width, dtype=input_ids.dtype, device=device)
    pos = torch.zeros(B, width, dtype=torch.long, device=device)
    group = torch.full((B, width), 3, dtype=torch.long, device=device)  # 0 prefix, 1 chosen, 2 rejected, 3 pad
    for i, (n_c, n_j, L) in enumerate(plan):
        total = n_c + n_j - L
        ids[i, :n_c] = input_ids[i, :n_c]
        ids[i, n_c:total] = input_ids[i + B, L:n_j]
        pos[i, :n_c] = torch.arange(n_c, device=device)
        pos[i, n_c:total] = torch.arange(L, n_j, device=device)
        group[i, :L], group[i, L:n_c], group[i, n_c:total] = 0, 1, 2
        for r, shift in ((i, None), (i + B, n_c - L)):
            t = scored[r].nonzero()[:, 0]  # (n_r,) scored positions of this side
            p = t if shift is None else torch.where(t < L, t, t + shift)
            index.append(i * width + p)
            tgt.append(targets[r, t])
            side.append(torch.full_like(t, r))
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    cross = (group[:, :, None] == 2) & (group[:, None, :] == 1)  # rejected queries never read chosen keys
    mask = (causal & ~cross)[:, None]  # (B, 1, T, T)
    return PackedPairs(ids, pos, mask, torch.cat(index), torch.cat(tgt), torch.cat(side), scored.sum(1),
                       sum(n_c + n_j - L for n_c, n_j, L in plan))
