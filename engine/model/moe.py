"""Mixture-of-experts MLP (Mixtral, Qwen3-MoE, Qwen2-MoE): a router picks each token's top-k experts.

N = tokens (B * T), C = hidden_size, E = num_experts, k = num_experts_per_tok, F = moe_intermediate_size,
M = N * k (token, expert) assignments.

    probs = softmax(router(x))               [N, E] fp32
    w, idx = topk(probs, k)                  [N, k]; w / w.sum() when norm_topk_prob
    y = sum_j w_j * expert_{idx_j}(x)        each expert a gated MLP: down(act(gate(x)) * up(x))
    (+ sigmoid(shared_gate(x)) * shared(x)   Qwen2-MoE's shared expert)

Experts are stacked weights, gate_up_proj [E, 2F, C] ([gate | up] rows, transformers' layout) and
down_proj [E, C, F]. They are computed grouped: the M assignments are laid out by expert (each expert's
rows padded to a multiple of ROW_BUCKET), so each active expert runs one matmul over its contiguous rows;
there is no loop over tokens. `_GroupedMLP` is one autograd Function for a whole expert MLP: it keeps only
the grouped input and the route weights for backward (recomputing gate/up there), writes every expert's
weight gradient into one [E, ...] tensor and casts one expert at a time under autocast; the weighted sum
over k is one index_add_ (no [M, C] unsort copy). The router logits of every layer can be collected for the
load-balancing auxiliary loss with `collect_router_logits(model)`.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Iterator, Optional

import torch
import torch.nn as nn

from engine.config import ModelConfig


# Each expert's rows are padded up to a multiple of ROW_BUCKET: on CPU every distinct matmul shape makes
# oneDNN build and cache a new kernel (~0.7 MB each, up to 1024 of them), and per-expert row counts change
# every step, so unpadded counts grew the process by hundreds of MB; bucketed, each op sees at most
# M / ROW_BUCKET shapes, for ~ROW_BUCKET / 2 zero rows of extra work per expert.
ROW_BUCKET = 32


class _GroupedMLP(torch.autograd.Function):
    """ys = w * down(act(gate(x)) * up(x)) per expert, for x [P, C] in padded expert groups (counts[e] rows
    each, zero rows padding) and route weights w [P] (0 on padding rows).

    Saves only x and w: backward recomputes each expert's gate/up activations, so a layer keeps [P, C]
    for backward instead of the [P, 2F] + 3 x [P, F] + [P, C] of op-by-op autograd. The stacked weights
    [E, 2F, C] / [E, C, F] are used in any dtype, cast one expert at a time to x's dtype (autocast keeps
    no [E, ...] low-precision copy), and their gradients are written straight into one tensor each."""

    @staticmethod
    def forward(ctx, x, route, gate_up, down, counts: list, act):
        out = x.new_empty(x.shape[0], down.shape[1])
        for e, rows in _groups(counts):
            g, u = torch.mm(x[rows], gate_up[e].to(x.dtype).t()).chunk(2, dim=-1)  # (n, F) each
            torch.mm(act(g) * u * route[rows, None], down[e].to(x.dtype).t(), out=out[rows])
        ctx.save_for_backward(x, route, gate_up, down)
        ctx.counts, ctx.act = counts, act
        return out

    @staticmethod
    def backward(ctx, grad):
        x, route, gate_up, down = ctx.saved_tensors
        grad = grad.contiguous()
        gx, groute = torch.zeros_like(x), torch.zeros_like(route)
        g_gate_up, g_down = torch.zeros_like(gate_up), torch.zeros_like(down)
        for e, rows in _groups(ctx.counts):
            xe, dy, we = x[rows], grad[rows], route[rows, None]  # (n, C), (n, C), (n, 1)
            w_gu, w_d = gate_up[e].to(x.dtype), down[e].to(x.dtype)
            with torch.enable_grad():  # the elementwise part's derivative, for any activation
                gu = torch.mm(xe, w_gu.t()).requires_grad_()  # (n, 2F)
                g, u = gu.chunk(2, dim=-1)
                h = ctx.act(g) * u  # (n, F)
            g_down[e].copy_(torch.mm(dy.t(), h.detach() * we))  # (C, F)
            dh = torch.mm(dy, w_d)  # (n, F): grad of the route-scaled hidden
            acc = torch.promote_types(route.dtype, torch.float32)  # bf16 rows summed in fp32
            groute[rows] = (dh * h.detach()).sum(-1, dtype=acc).to(route.dtype)
            dgu, = torch.autograd.grad(h, gu, dh * we)  # (n, 2F)
            g_gate_up[e].copy_(torch.mm(dgu.t(), xe))  # (2F, C)
            torch.mm(dgu, w_gu, out=gx[rows])
        return gx, groute, g_gate_up, g_down, None, None


def _groups(counts: list[int]):
    """(expert, row slice) of each non-empty group of consecutive rows."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
            start += n


class Experts(nn.Module):
    """E gated MLPs as stacked weights: gate_up_proj [E, 2F, C] ([gate | up]), down_proj [E, C, F]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from engine.model.transformer import ACTIVATIONS

        E, C, F = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * F, C))
        self.down_proj = nn.Parameter(torch.empty(E, C, F))
        self.activation, self.act = cfg.activation, ACTIVATIONS[cfg.activation]

    def forward(self, xs: torch.Tensor, route: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """xs [P, C] in expert groups (counts[e] rows each), route weights [P] -> route * expert(xs) [P, C]."""
        with torch.autocast(xs.device.type, enabled=False):  # the caller casts xs; mm with out= refuses autocast
            return _GroupedMLP.apply(xs, route.to(xs.dtype), self.gate_up_proj, self.down_proj, counts, self.act)


class MoE(nn.Module):
    """The MLP of a mixture-of-experts layer: x [B, T, C] -> [B, T, C] (see the module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from engine.model.transformer import MLP, Linear  # transformer.py registers this class: import late

        C = cfg.hidden_size
        self.num_experts, self.top_k, self.norm_topk_prob = cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.router = Linear(C, cfg.num_experts, bias=False)
        self.experts = Experts(cfg)
        self.shared_expert = self.shared_expert_gate = None
        if cfg.shared_expert_intermediate_size:
            dense = replace(cfg, intermediate_size=cfg.shared_expert_intermediate_size, mlp_class="dense")
            self.shared_expert = MLP(dense)
            self.shared_expert_gate = Linear(C, 1, bias=False)
        self._router_sink: Optional[list] = None  # set by collect_router_logits

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, C] -> (router logits [N, E], top-k weights [N, k] in x's compute dtype, expert ids [N, k])."""
        logits = self.router(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))  # fp32 at least
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(logits.dtype), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(-1, C)  # (N, C)
        logits, weights, experts = self.route(flat)
        if self._router_sink is not None:
            self._router_sink.append(logits)
        N = flat.shape[0]
        dest, token, counts = _padded_layout(experts, self.num_experts)  # (M,), (P,), E padded row counts
        xs = flat.to(logits.dtype)[token]  # (P, C) grouped by expert: under autocast, the router's dtype
        pad = torch.ones(len(token), dtype=torch.bool, device=x.device).index_fill_(0, dest, False)
        xs = xs.masked_fill(pad[:, None], 0)  # padding rows are zeros (never a real token's values)
        route = weights.new_zeros(len(token)).index_put((dest,), weights.reshape(-1))  # (P,), 0 on padding
        ys = self.experts(xs, route, counts)  # (P, C) = route * expert(x), zero on padding rows
        y = ys.new_zeros(N, C).index_add_(0, token, ys)  # (N, C): the weighted sum over the k experts
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return y.view(B, T, C)  # x's dtype, or autocast's (as a dense MLP's Linears would give)

    def walk(self, w, x):
        """forward's ops in order, on the memory planner's symbolic tensors (engine.train.activation_bytes)."""
        return w.moe(self, x)


def _padded_layout(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """experts [N, k] ids -> (dest [M]: each (token, slot) assignment's row in the padded grouped layout,
    token [P]: the token of each row (0 on padding), counts: rows per expert, multiples of ROW_BUCKET)."""
    ids = experts.reshape(-1)  # (M,) assignment n*k + j
    k = experts.shape[1]
    counts = torch.bincount(ids, minlength=num_experts)  # (E,)
    padded = (counts + ROW_BUCKET - 1) // ROW_BUCKET * ROW_BUCKET
    order = ids.argsort(stable=True)  # (M,) assignments grouped by expert
    shift = (torch.cumsum(padded, 0) - padded) - (torch.cumsum(counts, 0) - counts)  # (E,) padding before e
    dest = torch.empty_like(order).index_put_((order,), torch.arange(len(ids), device=ids.device) + shift[ids[order]])
    token = torch.zeros(int(padded.sum()), dtype=torch.long, device=ids.device).index_put_(
        (dest,), torch.arange(len(ids), device=ids.device) // k)
    return dest, token, padded.tolist()


@contextlib.contextmanager
def collect_router_logits(model: nn.Module) -> Iterator[list]:
    """Inside the block, each MoE layer's forward appends its router logits [N, E] to the yielded list."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    sink: list = []
    for m in layers:
        m._router_sink = sink
    try:
        yield sink
    finally:
        for m in layers:
            m._router_sink = None


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch Transformer's auxiliary loss (eq. 4-6) over every layer's router logits [N, E]: E times the
    dot product of the fraction of top-k assignments per expert and the mean router probability per
    expert, both pooled over layers and tokens (transformers' `load_balancing_loss_func`). mask [N]: the
    tokens to count (1) or not (0); None counts all. Returns a 0-dim fp32 tensor."""
    if not router_logits:  # no MoE layer ran (every layer dense): nothing to balance
        return torch.zeros(())
    device = router_logits[0].device
    assigned = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    weight = None if mask is None else mask.reshape(-1, 1).to(device, torch.float32)  # (N, 1)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # (N, E)
        chosen = torch.topk(probs, top_k, dim=-1).indices  # (N, k)
        hits = torch.zeros_like(probs).scatter_add_(1, chosen, torch.ones_like(chosen, dtype=probs.dtype))
        if weight is not None:
            hits, probs = hits * weight, probs * weight
        assigned = assigned + hits.sum(0)
        prob_sum = prob_sum + probs.sum(0)
        rows = rows + (probs.shape[0] if weight is None else weight.sum())
    return num_experts * torch.sum((assigned / rows) * (prob_sum / rows))
