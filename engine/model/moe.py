"""Mixture-of-experts MLP (Mixtral, Qwen3-MoE, Qwen2-MoE): a router picks each token's top-k experts.

N = tokens (B * T), C = hidden_size, E = num_experts, k = num_experts_per_tok, F = moe_intermediate_size,
M = N * k (token, expert) assignments.

    probs = softmax(router(x))               [N, E] fp32
    w, idx = topk(probs, k)                  [N, k]; w / w.sum() when norm_topk_prob
    y = sum_j w_j * expert_{idx_j}(x)        each expert a gated MLP: down(act(gate(x)) * up(x))
    (+ sigmoid(shared_gate(x)) * shared(x)   Qwen2-MoE's shared expert)

Experts are stacked weights, gate_up_proj [E, 2F, C] ([gate | up] rows, transformers' layout) and
down_proj [E, C, F]. They are computed grouped: the M assignments are sorted by expert, so each active
expert runs one matmul over its contiguous rows; there is no loop over tokens. `_GroupedLinear` writes
every expert's weight gradient into one [E, ...] tensor (indexing `w[e]` under autograd would allocate a
full-size zero gradient per expert) and casts one expert at a time under autocast. The router logits of every layer can be collected for the
load-balancing auxiliary loss with `collect_router_logits(model)`.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Iterator, Optional

import torch
import torch.nn as nn

from engine.config import ModelConfig


class _GroupedLinear(torch.autograd.Function):
    """y[rows of expert e] = x[rows of e] @ w[e].T, for x [M, in] sorted by expert and w [E, out, in].

    w is the parameter itself, in any dtype: each active expert's slice is cast to x's dtype when used, so
    autocast keeps no [E, out, in] low-precision copy for backward, and the weight gradient is written
    straight into one tensor of w's dtype (inactive experts: zero)."""

    @staticmethod
    def forward(ctx, x, w, counts: list):
        out = x.new_empty(x.shape[0], w.shape[1])
        start = 0
        for e, n in enumerate(counts):
            if n:
                torch.mm(x[start:start + n], w[e].to(x.dtype).t(), out=out[start:start + n])
                start += n
        ctx.save_for_backward(x, w)
        ctx.counts = counts
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        grad = grad.contiguous()
        gx = x.new_empty(x.shape) if ctx.needs_input_grad[0] else None
        gw = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        start = 0
        for e, n in enumerate(ctx.counts):
            if not n:
                continue
            g = grad[start:start + n]
            if gx is not None:
                torch.mm(g, w[e].to(g.dtype), out=gx[start:start + n])
            if gw is not None:
                gw[e].copy_(torch.mm(g.t(), x[start:start + n]))
            start += n
        return gx, gw, None


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """x [M, in] (rows sorted by expert, counts[e] rows for expert e) @ w[e].T -> [M, out], in x's dtype."""
    with torch.autocast(x.device.type, enabled=False):  # the caller casts x; mm with out= refuses autocast
        return _GroupedLinear.apply(x, w, counts)


class Experts(nn.Module):
    """E gated MLPs as stacked weights: gate_up_proj [E, 2F, C] ([gate | up]), down_proj [E, C, F]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from engine.model.transformer import ACTIVATIONS

        E, C, F = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * F, C))
        self.down_proj = nn.Parameter(torch.empty(E, C, F))
        self.activation, self.act = cfg.activation, ACTIVATIONS[cfg.activation]

    def forward(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """xs [M, C] sorted by expert (counts[e] rows each) -> [M, C]."""
        g, u = grouped_linear(xs, self.gate_up_proj, counts).chunk(2, dim=-1)  # (M, F) each
        return grouped_linear(self.act(g) * u, self.down_proj, counts)


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
        order = experts.reshape(-1).argsort(stable=True)  # (M,) assignments grouped by expert
        counts = torch.bincount(experts.reshape(-1), minlength=self.num_experts).tolist()
        xs = flat[order // self.top_k].to(logits.dtype)  # (M, C): under autocast, the router's dtype
        ys = self.experts(xs, counts)  # (M, C)
        unsorted = torch.empty_like(ys).index_copy_(0, order, ys).view(-1, self.top_k, C)  # (N, k, C)
        y = torch.bmm(weights.unsqueeze(1).to(ys.dtype), unsorted).squeeze(1)  # (N, C): weighted sum over k
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return y.view(B, T, C)  # x's dtype, or autocast's (as a dense MLP's Linears would give)

    def walk(self, w, x):
        """forward's ops in order, on the memory planner's symbolic tensors (engine.train.activation_bytes)."""
        return w.moe(self, x)


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
