"""The fused decode step: one new token per row through the whole model in one compiled call.

B = rows decoded together, V = vocab_size, C = hidden_size.

Decoding one token reads every weight once, so its limit is memory bandwidth; the eager forward
(engine.model.transformer) also spends ~15 small ATen ops per layer, their Python and dispatch
overhead, and SDPA's setup for a single query. `FusedDecoder` hands the whole step to
kernels.decode_plan (kernels/csrc/decode_step.cpp): norms, q/k/v in one pass, RoPE, the cache write,
attention over the cache, o_proj with the residual add, gate/up in one pass, down, the final norm
and the LM head, in one OpenMP region. The eager forward stays the readable path and the reference
(tests/infer/test_decode_step.py ties them together); prefill (T > 1) always runs it.

Which path a model gets is decided once per (model, cache) by `fused_decoder` and logged when the
decision for a model changes: any feature the fused step does not implement (learned positions,
LayerNorm, post-norms, an adapter-wrapped Linear, a config field or layer feature it does not know)
sends the model to the eager forward. Weight-only quantized linears (engine.quant's QuantLinear, NF4 or
int8, the LM head too) run in the fused step as quantized GEMVs, bitwise the layer's own kernel.
ENGINE_DECODE=eager forces the eager path, =fused forces the fused one (raising with every reason it can't run).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import weakref
from typing import Optional

import torch

import kernels
from engine.config import LayerSpec, ModelConfig
from engine.model.transformer import MLP, Attention, Block, KVCache, Linear, RMSNorm
from engine.quant.layers import QuantLinear

log = logging.getLogger("engine.infer.decode")

# ModelConfig fields whose every value the fused step implements (the values of the checked ones are
# tested in _config_reasons); any other field must keep its default, so a feature added to the model
# later reaches the eager path until the fused step learns it.
_CONFIG_HANDLED = {
    "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
    "max_position_embeddings", "norm", "norm_eps", "norm_weight_offset", "activation", "gated_mlp", "mlp_bias",
    "qkv_bias", "o_bias", "qk_norm", "sliding_window", "position", "rope_theta", "rope_scaling",
    "layer_sliding_windows", "layer_rope_thetas", "layer_rope_scalings", "pre_norm", "post_attn_norm",
    "post_mlp_norm", "mlp_class", "scale_embeddings", "tie_word_embeddings", "hf_model_type", "bos_token_id",
    "eos_token_id", "pad_token_id", "extra_hf",
}
# Most rows decoded together through the fused step by generate and the serving batcher. The step is
# correct for up to 64 rows (tested), but with several rows it measured slower than the eager forward,
# whose per-row-masked SDPA and GEMMs do well there: serving batcher, ~35M fp32, AMD EPYC shared by 8
# engineers (load ~25 on 2 cores): 1 row 5.0x eager, 4 rows 0.55-0.85x, 16 rows 0.70x. Until multi-row
# decoding is tuned on a quiet machine, only batch-1 steps take the fused path.
FUSED_MAX_ROWS = 1
_SPEC_HANDLED = {"index", "window", "rope", "pre_norm", "post_attn_norm", "post_mlp_norm", "mlp"}
_decisions: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> last logged decision


def _config_reasons(cfg: ModelConfig) -> list[str]:
    out = []
    for f in dataclasses.fields(cfg):
        if f.name in _CONFIG_HANDLED:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if getattr(cfg, f.name) != default:
            out.append(f"model.{f.name}={getattr(cfg, f.name)!r} is not implemented by the fused step")
    if cfg.norm != "rmsnorm":
        out.append(f"model.norm={cfg.norm!r}: the fused step implements rmsnorm")
    if cfg.position != "rope":
        out.append(f"model.position={cfg.position!r}: the fused step implements rope (or none per layer)")
    if cfg.mlp_class != "dense":
        out.append(f"model.mlp_class={cfg.mlp_class!r}: the fused step implements the dense MLP")
    scalings = (cfg.rope_scaling,) + tuple(cfg.layer_rope_scalings or ())
    if any(s is not None and s.kind == "longrope" for s in scalings):  # its tables switch with the length
        out.append("model.rope_scaling: longrope switches its factors per forward; the fused step uses one table")
    return out


def _spec_reasons(spec: LayerSpec) -> list[str]:
    out = []
    if not spec.pre_norm or spec.post_attn_norm or spec.post_mlp_norm:
        out.append(f"layer {spec.index}: the fused step implements pre-norm blocks without post-norms")
    for f in dataclasses.fields(spec):  # a per-layer feature added later: only its "off" values are safe
        if f.name not in _SPEC_HANDLED and getattr(spec, f.name) not in (None, False):
            out.append(f"layer {spec.index}: {f.name}={getattr(spec, f.name)!r} is not implemented by the fused step")
    return out


def _storage(lin) -> str:
    if type(lin) is QuantLinear:
        return lin.kind
    return "dense" if type(lin) is Linear else type(lin).__name__


def _linear_reason(lin) -> Optional[str]:
    """Why the fused step can't run this linear layer (None if it can): a plain Linear, or a QuantLinear
    (NF4 with in_features a multiple of its 64-element blocks)."""
    if type(lin) is Linear:
        return None
    if type(lin) is QuantLinear:
        if lin.kind == "nf4" and lin.in_features % 64:
            return f"an NF4 QuantLinear with in_features {lin.in_features} (the fused step needs a multiple of 64)"
        return None
    return f"{type(lin).__name__}, not the plain Linear or a QuantLinear"


def _module_reasons(model, dtype) -> list[str]:
    """Module types and tensors: exact classes only (a LoRA-wrapped Linear has its own forward)."""
    out = []
    if getattr(model, "pos_embed", None) is not None:
        out.append("learned position embeddings are not implemented by the fused step")
    if type(model.norm) is not RMSNorm:
        out.append(f"final norm is {type(model.norm).__name__}, not RMSNorm")
    head_reason = _linear_reason(model.lm_head)
    if head_reason or model.lm_head.bias is not None:
        out.append(f"lm_head is {head_reason or type(model.lm_head).__name__} (with bias: "
                   f"{model.lm_head.bias is not None})")
    for block in model.layers:
        i = getattr(block, "index", "?")
        if type(block) is not Block or type(block.attn) is not Attention or type(block.mlp) is not MLP:
            out.append(f"layer {i}: {type(block).__name__}/{type(getattr(block, 'attn', None)).__name__}/"
                       f"{type(getattr(block, 'mlp', None)).__name__} is not the plain Block/Attention/MLP")
            continue
        a, m = block.attn, block.mlp
        linears = {"q_proj": a.q_proj, "k_proj": a.k_proj, "v_proj": a.v_proj, "o_proj": a.o_proj,
                   "up_proj": m.up_proj, "down_proj": m.down_proj, "gate_proj": m.gate_proj}
        for name, lin in linears.items():
            reason = None if lin is None else _linear_reason(lin)
            if reason:
                out.append(f"layer {i}: {name} is {reason}")
        # one pass reads q|k|v (and gate|up) with one layout of x: each group must be stored alike
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            kinds = {_storage(linears[n]) for n in group if linears[n] is not None}
            if len(kinds) > 1:
                out.append(f"layer {i}: {'/'.join(group)} are stored differently ({sorted(kinds)})")
        norms = [block.attn_norm, block.mlp_norm] + ([a.q_norm, a.k_norm] if a.q_norm is not None else [])
        if any(type(n) is not RMSNorm for n in norms):
            out.append(f"layer {i}: a norm is not RMSNorm")
        elif a.q_norm is not None and (a.q_norm.eps != block.attn_norm.eps or a.q_norm.weight_offset != a.k_norm.weight_offset):
            out.append(f"layer {i}: q/k norms with their own eps or offsets are not implemented by the fused step")
    for name, p in model.named_parameters():
        if p.dtype != dtype or p.device.type != "cpu" or not p.is_contiguous():
            out.append(f"parameter {name}: {p.dtype} on {p.device}"
                       f"{'' if p.is_contiguous() else ', not contiguous'}; the fused step needs contiguous "
                       f"{dtype} on cpu for every tensor")
            break
    return out


def fused_reasons(model, cache: KVCache) -> list[str]:
    """Why the fused step can't decode `model` over `cache` ([] if it can)."""
    cfg, dtype = model.config, model.embed.weight.dtype
    out = _config_reasons(cfg)
    for block in model.layers:
        out += _spec_reasons(block.spec)
    out += _module_reasons(model, dtype)
    if cache.k.dtype != dtype or not cache.k.is_contiguous() or not cache.v.is_contiguous():
        out.append(f"the KV cache is {cache.k.dtype}, the model {dtype}; the fused step needs one dtype, contiguous")
    out += kernels.decode_plan_problems(model.embed.weight, cfg.activation, cache.k.shape[1], cfg.head_dim)
    return list(dict.fromkeys(out))


def _mode() -> str:
    mode = os.environ.get("ENGINE_DECODE", "").strip().lower() or "auto"
    if mode not in ("auto", "eager", "fused"):
        raise ValueError(f"ENGINE_DECODE: expected 'eager', 'fused' or unset, got {mode!r}")
    return mode


def _log_decision(model, path: str, why: str) -> None:
    if _decisions.get(model) != (path, why):
        _decisions[model] = (path, why)
        log.info("decode: %s path (%s)", path, why)


def fused_decoder(model, cache: KVCache) -> Optional["FusedDecoder"]:
    """A FusedDecoder over `cache` when the fused step implements `model` (and ENGINE_DECODE allows),
    else None: decode with the eager forward. The choice is logged when it changes for a model."""
    mode = _mode()
    if mode == "eager":
        _log_decision(model, "eager", "ENGINE_DECODE=eager")
        return None
    reasons = fused_reasons(model, cache)
    if reasons:
        if mode == "fused":
            raise RuntimeError("ENGINE_DECODE=fused cannot run: " + "; ".join(
                f"({k}) {r}" for k, r in enumerate(reasons, 1)))
        _log_decision(model, "eager", "the fused step can't run: " + "; ".join(reasons))
        return None
    _log_decision(model, "fused", "kernels.decode_plan: one compiled call per token")
    return FusedDecoder(model, cache)


def _weight(lin):
    """What the plan takes for a linear layer: its dense weight, its QuantizedWeight, or None (absent)."""
    if lin is None:
        return None
    return lin.weight if type(lin) is Linear else lin.quantized_weight()


class FusedDecoder:
    """model's decode step over `cache` (a KVCache of the model's dtype), compiled: `step(ids [B], pos [B])
    -> logits [B, V]` writes each row's k/v at slot pos[b] and attends to slots [0, pos[b]] of its row.

    Built per cache (generate makes one per call): it keeps the plan's tensors alive, and a model
    whose tensors are replaced later (a .to(), a reload) needs a new FusedDecoder.
    """

    def __init__(self, model, cache: KVCache):
        cfg, dtype = model.config, model.embed.weight.dtype
        self.vocab = cfg.vocab_size
        tables = self._rope_tables(model, cache.max_len, dtype)
        layers, windows = [], []
        for block in model.layers:
            a, m = block.attn, block.mlp
            cos, sin = tables.get(block.spec.rope, (None, None))
            bias = lambda lin: None if lin is None else lin.bias  # noqa: E731
            layers.append((block.attn_norm.weight, _weight(a.q_proj), _weight(a.k_proj), _weight(a.v_proj),
                           bias(a.q_proj), bias(a.k_proj), bias(a.v_proj), _weight(a.o_proj), bias(a.o_proj),
                           None if a.q_norm is None else a.q_norm.weight, None if a.k_norm is None else a.k_norm.weight,
                           block.mlp_norm.weight, _weight(m.gate_proj), _weight(m.up_proj), _weight(m.down_proj),
                           bias(m.gate_proj), bias(m.up_proj), bias(m.down_proj), cos, sin))
            windows.append(block.spec.window or 0)
        first = model.layers[0].attn
        qk_offset = first.q_norm.weight_offset if first.q_norm is not None else 0.0
        # Gemma's sqrt(C) is rounded to the model dtype first, as the eager forward does
        scale = float(torch.tensor(cfg.hidden_size**0.5, dtype=dtype)) if cfg.scale_embeddings else 0.0
        self.plan = kernels.decode_plan(
            model.embed.weight, model.norm.weight, _weight(model.lm_head), cache.k, cache.v, layers, windows,
            cfg.num_heads, float(cfg.norm_eps), float(cfg.norm_weight_offset), float(qk_offset), scale,
            cfg.head_dim**-0.5, cfg.activation)
        self.logits = torch.empty(cache.k.shape[1], cfg.vocab_size, dtype=dtype)  # reused every step
        self.argmax = torch.empty(cache.k.shape[1], dtype=torch.long)
        self.threads = torch.get_num_threads()

    @staticmethod
    def _rope_tables(model, max_len: int, dtype) -> dict:
        """LayerRope -> (cos, sin) [max_len, hd] fp32 holding the values the eager forward rotates with
        (its fp32 tables cast to the model dtype): one table per distinct RoPE, as the model shares them."""
        positions = torch.arange(max_len)[None]
        ropes = model._rope(positions, dtype, max_len)  # the model's own tables: one definition of RoPE
        return {r: (cs[0][0].float().contiguous(), cs[1][0].float().contiguous())
                for r, cs in ropes.items() if r is not None}

    def step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] (model dtype; a view of a buffer the next step overwrites) after token ids [B]
        (int64) at cache slots pos [B] (int64). The caller advances the cache."""
        B = ids.shape[0]
        self.plan.step(ids.contiguous(), pos.contiguous(), self.logits[:B], self.threads)
        return self.logits[:B]

    def step_greedy(self, ids: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`step`, plus each row's argmax [B] int64 picked inside the LM head (torch.argmax's choice
        on those logits: NaN first, then the lowest index of the largest). Saves ATen's argmax over V
        logits per token (~0.2-0.5 ms for V = 49152 in bf16, measured on the shared AMD EPYC)."""
        B = ids.shape[0]
        self.plan.step(ids.contiguous(), pos.contiguous(), self.logits[:B], self.threads, self.argmax[:B])
        return self.logits[:B], self.argmax[:B]
