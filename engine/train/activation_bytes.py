"""Bytes per token that autograd saves in a training step, op by op, for engine.train.memory_plan.

The structure is the model's own: Block.walk (engine/model/transformer.py, beside forward) calls the ops
of `SavedBytes` in forward's order with the block's real modules (built on the meta device), so a change
to a block reaches the plan. Which path each kernel takes (fused RMSNorm/RoPE, attention that keeps its
[T, T] probabilities) is asked of kernels itself, and the LM-head loss's chunk size is kernels' own.

Each op saves only what its backward needs given which inputs require grad (a matmul keeps its input
only when its weight trains), in the dtype it has (under autocast every Linear casts its fp32 input to
bf16 on its own, and that copy is what is saved). `Sym` is a tensor per token: elements and bytes each.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

import kernels
from engine.config import LoraConfig, ModelConfig
from engine.model.transformer import Block, make_norm

FP32, HALF = 4, 2  # bytes per element


class Sym:
    """A tensor, per token: `n` elements of `b` bytes; `rg`: requires grad; `heads_first`: laid out
    [B, nh, T, hd] (the fused RoPE writes q so), not [B, T, nh * hd]."""

    def __init__(self, n: int, b: int, rg: bool, heads_first: bool = False):
        self.n, self.b, self.rg, self.heads_first = n, b, rg, heads_first


class SavedBytes:
    """What autograd saves per token, op by op. Block.walk (engine/model/transformer.py, beside forward)
    calls these methods in forward's order with the model's own modules; this class only knows ops."""

    def __init__(self, seq_len: int, amp: bool, param_bytes: int, full: bool, lora: Optional[LoraConfig],
                 paths: "KernelPaths"):
        self.T, self.amp, self.param_bytes, self.full = seq_len, amp, param_bytes, full
        self.compute = HALF if amp else param_bytes  # dtype of matmul outputs
        self.targets, self.rank = (set(lora.targets), lora.rank) if lora else (set(), 0)
        self.paths = paths
        self.names: dict[int, str] = {}  # id(Linear) -> its attribute name (LoRA targets name them)
        self.saved_ids: dict[int, Sym] = {}  # a tensor saved by several ops counts once
        self.saved = 0  # bytes per token
        self.weight_copies = 0  # bytes of bf16 weight casts autocast keeps for backward

    def save(self, *tensors: Sym) -> None:
        for t in tensors:
            if id(t) not in self.saved_ids:
                self.saved_ids[id(t)] = t
                self.saved += t.n * t.b

    @staticmethod
    def cast(x: Sym, b: int) -> Sym:
        return x if x.b == b else Sym(x.n, b, x.rg)

    def linear(self, m, x: Sym) -> Sym:
        n_in, n_out = m.in_features, m.out_features
        xin = self.cast(x, self.compute)  # autocast casts the input again for every Linear
        if self.full:  # grad of the weight needs the input
            self.save(xin)
        if self.amp and self.param_bytes != HALF and (self.full or x.rg):  # grad of x needs the (cast) weight
            self.weight_copies += HALF * n_in * n_out
        if self.names[id(m)] not in self.targets:
            return Sym(n_out, self.compute, x.rg or self.full)
        adapter = HALF if self.amp else FP32  # adapters are fp32 parameters
        self.save(self.cast(x, adapter), Sym(self.rank, adapter, True))  # inputs of lora_A and lora_B
        if self.amp:
            self.weight_copies += HALF * self.rank * (n_in + n_out)
        return Sym(n_out, self.compute, True)

    def norm(self, m, x: Sym, rows: int = 1) -> Sym:
        """RMSNorm (normalized in fp32) or LayerNorm over the last dim; `rows` normalized rows per token.
        An RMSNorm that feeds_linear writes bf16 under autocast, once for all the Linears reading it."""
        if isinstance(m, nn.LayerNorm):
            out = Sym(x.n, x.b, x.rg or self.full)
            if out.rg:
                self.save(x, Sym(2 * rows, FP32, False))  # input, mean and rstd
            return out
        offset = m.weight_offset
        natural = x.b if offset else max(x.b, self.param_bytes)
        out = Sym(x.n, HALF if m.feeds_linear and self.amp else natural, x.rg or self.full)
        if out.rg and self.paths.fused("rms_norm", x.b):  # x and 1/rms; backward recomputes
            self.save(x, Sym(rows, FP32, False))
            return out
        if x.rg:
            self.save(self.cast(x, FP32), Sym(rows, FP32, False))  # x (fp32) and 1/rms(x)
        if self.full:  # weight * normalized: the weight's grad needs the normalized input
            self.save(Sym(x.n, FP32 if offset else x.b, True))
        return out

    def rope(self, q: Sym, k: Sym) -> tuple[Sym, Sym]:
        """Saves only the cos/sin tables; writes the autocast dtype (else the wider one)."""
        b = HALF if self.amp else max(q.b, self.param_bytes)
        fused = self.paths.fused("rope", q.b)
        return Sym(q.n, b, q.rg, fused), Sym(k.n, b, k.rg, fused)

    def attention(self, q: Sym, k: Sym, v: Sym, heads: int, chunked: bool = False) -> Sym:
        """kernels.attention, cast to the autocast dtype; returns its output as o_proj reads it.
        chunked: engine.model.attention's soft-capped / scaled path (saves what SDPA saves; its output
        is concatenated heads-first, so o_proj reads a copy)."""
        b = HALF if self.amp else q.b
        q, k, v = Sym(q.n, b, q.rg, q.heads_first), self.cast(k, b), self.cast(v, b)
        rg = q.rg or k.rg or v.rg
        y = Sym(q.n, b, rg)
        probs = not chunked and self.paths.fused("attention", b, self.T)
        if rg and probs:  # q, k, a [B*nkv, T, hd] copy of v, the [T, T] probabilities
            self.save(q, k, Sym(v.n, b, True), Sym(heads * self.T, b, True))
        elif rg:  # SDPA (flash / memory-efficient): q, k, v, output and logsumexp; no T x T matrix
            self.save(q, k, v, y, Sym(heads, FP32, False))
        # o_proj reads y as [B, T, nh * hd]: a view when y is laid out like that (SDPA follows q's layout),
        # else a copy
        return y if not probs and not chunked and not q.heads_first else Sym(q.n, b, rg)

    def act(self, name: str, x: Sym) -> Sym:
        out = Sym(x.n, x.b, x.rg)
        if x.rg:  # relu's backward reads its output, the others their input
            self.save(out if name == "relu" else x)
        return out

    def mul(self, a: Sym, b: Sym) -> Sym:
        if b.rg:  # each factor is saved for the other's grad
            self.save(a)
        if a.rg:
            self.save(b)
        return Sym(a.n, max(a.b, b.b), a.rg or b.rg)

    def glu(self, name: str, gate: Sym, up: Sym) -> Sym:
        """kernels.glu: act(gate) * up. Fused, it keeps gate and up only; as torch ops, act's input or
        output and both factors of the product."""
        if not self.paths.fused("glu", gate.b, activation=name):
            return self.mul(self.act(name, gate), up)
        if gate.rg or up.rg:
            self.save(gate, up)
        return Sym(gate.n, max(gate.b, up.b), gate.rg or up.rg)

    def moe(self, m, x: Sym) -> Sym:
        """engine.model.moe.MoE: the router, then per token k rows through the grouped experts (each
        grouped matmul keeps its input), the weighted sum over k, and the shared expert if any."""
        logits = self.linear(m.router, x)
        k, C = m.top_k, x.n
        E = m.num_experts  # (no autocast weight copies: grouped_linear casts one expert at a time)
        rg = self.full or x.rg
        out = Sym(C, self.compute, rg)
        if rg:
            self.save(Sym(E, FP32, False), Sym(3 * k, 8, False))  # softmax output, top-k ids, layout indices
            # _GroupedMLP keeps only its grouped input [k, C] and route weights [k] (gate/up are recomputed;
            # the padding to ROW_BUCKET rows per expert is per layer, not per token, and left out)
            self.save(Sym(k * C, self.compute, True), Sym(k, self.compute, True))
        if logits.rg and not rg:  # a LoRA-adapted router alone: the weighted sum needs the expert outputs
            self.save(Sym(k * C, self.compute, False))
        if m.shared_expert is not None:
            shared = m.shared_expert.walk(self, x)
            gate = self.linear(m.shared_expert_gate, x)
            out = self.add(out, self.mul(self.act("sigmoid", gate), shared))
        return out

    @staticmethod
    def add(a: Sym, b: Sym) -> Sym:  # the residual keeps the wider dtype
        return Sym(a.n, max(a.b, b.b), a.rg or b.rg)


@dataclass(frozen=True)
class KernelPaths:
    """Which path kernels.* takes in a training step, asked of kernels itself: each op runs once on tiny
    tensors that require grad, and a custom autograd Function as grad_fn is its fused path."""

    device: str  # "cpu" or "cuda"

    def fused(self, op: str, b: int, keys: int = 1, activation: str = "silu") -> bool:
        """True when `op` ("rms_norm", "rope", "attention" over `keys` keys, "glu" with `activation`) takes
        the fused path in dtype `b`."""
        return _takes_fused_path(op, self.device, b, keys, activation, os.environ.get("ENGINE_KERNELS"))


@functools.cache
def _takes_fused_path(op: str, device: str, b: int, keys: int, activation: str, _env: Optional[str]) -> bool:
    if device == "cuda" and not torch.cuda.is_available():  # planning for a GPU this machine lacks: the
        return False  # fused paths kernels has beside SDPA and torch's ops are CPU training ones
    dev = torch.device(device)
    dtype = torch.bfloat16 if b == HALF else torch.float32
    def t(*shape): return torch.zeros(shape, dtype=dtype, device=dev, requires_grad=True)
    with torch.enable_grad():
        if op == "rms_norm":
            y = kernels.rms_norm(t(1, 8), torch.ones(8, dtype=dtype, device=dev), 1e-6)
        elif op == "rope":
            y = kernels.rope(t(1, 1, 1, 8), t(1, 1, 1, 8), *torch.ones(2, 1, 1, 8, device=dev))[0]
        elif op == "glu":
            y = kernels.glu(t(1, 8), t(1, 8), activation)
        else:
            y = kernels.attention(t(1, 1, keys, 8), t(1, 1, keys, 8), t(1, 1, keys, 8))
    return isinstance(y.grad_fn, torch.autograd.function.BackwardCFunction)


def logits_chunk_rows(n_rows: int, vocab: int, itemsize: int) -> int:
    """Rows per chunk of kernels.linear_cross_entropy (its own default)."""
    from kernels.ops.linear_cross_entropy import default_chunk_size

    return default_chunk_size(n_rows, vocab, itemsize)


@dataclass(frozen=True)
class Activations:
    layers: tuple  # bytes per token saved by each layer (with LoRA layer 0's input needs no grad)
    final: int  # bytes per token saved outside the layers (final norm, token ids)
    layer_inputs: int  # bytes per token of every layer's input (all that activation checkpointing keeps)
    weight_copies: tuple  # bytes of autocast bf16 weight copies kept by each layer
    head_bytes: int  # dtype of the hidden states entering the LM-head loss


def walk_layers(mc: ModelConfig, seq_len: int, amp: bool, param_bytes: int, full: bool, lora: Optional[LoraConfig],
                paths: KernelPaths) -> Activations:
    """Walk the model's own blocks (built on the meta device, one per distinct LayerSpec) with SavedBytes."""
    w = SavedBytes(seq_len, amp, param_bytes, full, lora, paths)
    x = Sym(mc.hidden_size, param_bytes, full)  # embedding output: needs grad only if the embedding trains
    blocks, layers, copies, inputs = {}, [], [], 0
    for spec in mc.layer_specs():
        key = dataclasses.replace(spec, index=0)
        if key not in blocks:
            with torch.device("meta"):  # no memory; the walk itself runs outside (kernels probes allocate)
                blocks[key] = Block(mc, spec)
            w.names.update({id(m): n.rsplit(".", 1)[-1] for n, m in blocks[key].named_modules()})
        saved, weight_copies, inputs = w.saved, w.weight_copies, inputs + x.b * x.n
        x = blocks[key].walk(w, x)
        layers.append(w.saved - saved)
        copies.append(w.weight_copies - weight_copies)
    before = w.saved
    with torch.device("meta"):
        final_norm = make_norm(mc, mc.hidden_size)
    w.norm(final_norm, x)
    final = w.saved - before + (8 if full else 0)  # + int64 token ids for the embedding's grad
    return Activations(tuple(layers), final, inputs, tuple(copies), HALF if amp else x.b)
