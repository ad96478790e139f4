"""The whole decoder-only Transformer in one file.

B = batch, T = time (new tokens), S = keys visible (cached + new), C = hidden_size,
nh = query heads, nkv = key/value heads, hd = head_dim, V = vocab_size.

Every family (Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, OLMo 2, SmolLM3, GPT-2) is this one module with different ModelConfig
fields; engine.model.families maps their weight names onto ours. What may change from layer to layer
(sliding window, RoPE base and scaling or none, post-norms, the MLP class) reaches each Block as its
LayerSpec (ModelConfig.layer_specs()); layers that share a RoPE share its cos/sin table, and layers that
share a window share its mask.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

import kernels

from engine.config import LayerSpec, ModelConfig
from engine.model.attention import attend
from engine.model.kv_cache import KVCache  # noqa: F401 (re-exported: engine.KVCache, decode_step)
from engine.model.rope import rope_inv_freq, rope_uses_long  # noqa: F401 (rope_inv_freq: re-exported)
from engine.model.moe import Experts, MoE
from engine.model.recompute import checkpointed

ACTIVATIONS = kernels.reference.ACTIVATIONS  # ModelConfig.activation -> torch function (one definition)
ROPE_TABLE_MIN = 4096  # positions: the shortest cos/sin table Transformer._rope builds (it grows by doubling)


class Linear(nn.Linear):
    """nn.Linear whose forward goes through `kernels.linear`: F.linear, except that batch-1 decoding
    (a few rows, no autograd) takes a fused GEMV that reads the weight at DRAM speed when compiled."""

    def forward(self, x):
        return kernels.linear(x, self.weight, self.bias)

    def reset_parameters(self):
        if not self.weight.is_meta:  # see _Embedding: init on meta tensors only imports torch._dynamo
            super().reset_parameters()


class _Embedding(nn.Embedding):
    """nn.Embedding that skips its init on meta tensors: from_pretrained builds the model on "meta",
    where init writes nothing, but torch routes meta `normal_` through torch._refs, which imports
    torch._dynamo and sympy: ~70 MB of resident memory and ~1 s, measured (bench/bench_moe.py)."""

    def reset_parameters(self):
        if not self.weight.is_meta:
            super().reset_parameters()


class RMSNorm(nn.Module):
    """x / rms(x) * w, computed in fp32; Gemma's variant stores w - 1 (`weight_offset=1`).

    feeds_linear: under autocast, write the output in the autocast dtype, as the Linears reading it
    would cast it (once each) anyway; autocast's other consumers keep the natural dtype.
    """

    def __init__(self, dim: int, eps: float, weight_offset: float = 0.0, feeds_linear: bool = False):
        super().__init__()
        self.eps, self.weight_offset, self.feeds_linear = eps, weight_offset, feeds_linear
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - weight_offset))

    def forward(self, x):
        # Llama casts, then scales in the model dtype; Gemma scales in fp32, then casts (kernels.reference)
        out_dtype = autocast_dtype(x) if self.feeds_linear else None
        return kernels.rms_norm(x, self.weight, self.eps, self.weight_offset, out_dtype)


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast gives ops on x's device, or None when autocast is off."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None


def make_norm(cfg: ModelConfig, dim: int, feeds_linear: bool = False) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(dim, eps=cfg.norm_eps)
    return RMSNorm(dim, cfg.norm_eps, cfg.norm_weight_offset, feeds_linear)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: Optional[LayerSpec] = None):
        super().__init__()
        C, nh, nkv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.nh, self.nkv, self.hd = nh, nkv, hd
        self.q_proj = Linear(C, nh * hd, bias=cfg.qkv_bias)
        self.k_proj = Linear(C, nkv * hd, bias=cfg.qkv_bias)
        self.v_proj = Linear(C, nkv * hd, bias=cfg.qkv_bias)
        self.o_proj = Linear(nh * hd, C, bias=cfg.o_bias)
        # q/k norm: per head (Qwen3, Gemma 3: Gemma's (1 + w)) or over the whole projection (OLMo 2)
        per_head = cfg.qk_norm_scope == "head"
        self.qk_norm_per_head = per_head
        self.q_norm = RMSNorm(hd if per_head else nh * hd, cfg.norm_eps, cfg.norm_weight_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd if per_head else nkv * hd, cfg.norm_eps, cfg.norm_weight_offset) if cfg.qk_norm else None
        self.rotary_dim = cfg.rotary_dim  # < hd: partial RoPE (Phi-4-mini), the rest of each head passes through
        # Gemma 2 scales scores by query_pre_attn_scalar**-0.5; SDPA's default is hd**-0.5
        self.scale = (cfg.query_pre_attn_scalar or hd) ** -0.5
        self.softcap = cfg.attn_softcap
        self.window = spec.window if spec is not None else cfg.sliding_window

    def forward(self, x, rope, mask, cache: Optional[KVCache], layer: int):
        B, T, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        if self.q_norm is not None and not self.qk_norm_per_head:  # OLMo 2: over all heads at once
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(B, T, self.nh, self.hd), k.view(B, T, self.nkv, self.hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd)
        if self.q_norm is not None and self.qk_norm_per_head:  # Qwen3 normalizes each head before rotating it
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # rotate-half (HF's layout, so q/k weights load without permutation)
            q, k = self._rotate(q, k, rope)  # (B, nh|nkv, T, hd)
        else:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.transpose(1, 2)  # (B, nkv, T, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, S, hd)
        # mask None: plain causal when T > 1; a single new token sees every cached key. Plain layers go to
        # kernels.attention (SDPA, or the grouped bf16 training path); soft-capped / rescaled ones and long
        # sliding-window ones to engine.model.attention's query chunks.
        scale = None if self.scale == self.hd ** -0.5 else self.scale
        y = attend(q, k, v, mask, scale=scale, softcap=self.softcap, window=self.window,
                   per_row=cache is not None and cache.lengths is not None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))

    def _rotate(self, q, k, rope):
        """RoPE on the first rotary_dim dims of each head: q [B, T, nh, hd], k [B, T, nkv, hd] -> [B, h, T, hd]."""
        if self.rotary_dim == self.hd:
            return kernels.rope(q, k, *rope, out_dtype=autocast_dtype(q))
        r = self.rotary_dim
        q_rot, k_rot = kernels.rope(q[..., :r], k[..., :r], *rope, out_dtype=autocast_dtype(q))
        q = torch.cat((q_rot, q[..., r:].transpose(1, 2).to(q_rot.dtype)), dim=-1)
        k = torch.cat((k_rot, k[..., r:].transpose(1, 2).to(k_rot.dtype)), dim=-1)
        return q, k

    def walk(self, w, x, rope: bool):
        """forward's ops in order, on the memory planner's symbolic tensors (engine.train.memory_plan)."""
        q, k, v = w.linear(self.q_proj, x), w.linear(self.k_proj, x), w.linear(self.v_proj, x)
        if self.q_norm is not None:
            rows = (self.nh, self.nkv) if self.qk_norm_per_head else (1, 1)
            q, k = w.norm(self.q_norm, q, rows=rows[0]), w.norm(self.k_norm, k, rows=rows[1])
        if rope:
            q, k = w.rope(q, k)
        chunked = self.softcap is not None or self.scale != self.hd ** -0.5  # engine.model.attention's path
        return w.linear(self.o_proj, w.attention(q, k, v, self.nh, chunked) if chunked else w.attention(q, k, v, self.nh))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, F_ = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(C, F_, bias=cfg.mlp_bias) if cfg.gated_mlp else None
        self.up_proj = Linear(C, F_, bias=cfg.mlp_bias)
        self.down_proj = Linear(F_, C, bias=cfg.mlp_bias)
        self.activation = cfg.activation
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x):
        if self.gate_proj is not None:  # SwiGLU / GeGLU: act(gate) * up, one fused op in CPU training
            return self.down_proj(kernels.glu(self.gate_proj(x), self.up_proj(x), self.activation))
        return self.down_proj(self.act(self.up_proj(x)))

    def walk(self, w, x):
        """forward's ops in order, on the memory planner's symbolic tensors."""
        if self.gate_proj is not None:
            gate = w.linear(self.gate_proj, x)
            return w.linear(self.down_proj, w.glu(self.activation, gate, w.linear(self.up_proj, x)))
        return w.linear(self.down_proj, w.act(self.activation, w.linear(self.up_proj, x)))


MLPS = {"dense": MLP, "moe": MoE}  # ModelConfig.mlp_class (per layer: LayerSpec.mlp) -> the class each Block builds


class Block(nn.Module):
    """One layer: x + [post_attn_norm](attn([attn_norm](x))), then the same around the MLP.

    `spec` says what this layer does (ModelConfig.layer_specs()[i]); parts it leaves out are None, not
    Identity modules, so a decoding step pays no call for them."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec | int):
        super().__init__()
        spec = cfg.layer_specs()[spec] if isinstance(spec, int) else spec  # Block(cfg, layer_index) works too
        self.spec, self.index = spec, spec.index
        C = cfg.hidden_size
        self.attn_norm = make_norm(cfg, C, feeds_linear=True) if spec.pre_norm else None
        self.attn = Attention(cfg, spec)
        self.post_attn_norm = make_norm(cfg, C) if spec.post_attn_norm else None
        self.mlp_norm = make_norm(cfg, C, feeds_linear=True) if spec.pre_norm else None
        self.mlp = MLPS[spec.mlp](cfg)
        self.post_mlp_norm = make_norm(cfg, C) if spec.post_mlp_norm else None

    def forward(self, x, rope, mask, cache):
        """x [B, T, C] -> [B, T, C]; rope: this layer's (cos, sin) or None; mask: this layer's (see _mask)."""
        # each submodule read once: nn.Module attribute lookups are a decoding step's Python overhead
        pre, post = self.attn_norm, self.post_attn_norm
        h = self.attn(x if pre is None else pre(x), rope, mask, cache, self.index)
        x = x + (h if post is None else post(h))
        pre, post = self.mlp_norm, self.post_mlp_norm
        h = self.mlp(x if pre is None else pre(x))
        return x + (h if post is None else post(h))

    def walk(self, w, x):
        """forward's ops in order, on the memory planner's symbolic tensors: a change to forward changes
        the plan only if it changes here too, beside it."""
        h = self.attn.walk(w, x if self.attn_norm is None else w.norm(self.attn_norm, x), self.spec.rope is not None)
        x = w.add(x, h if self.post_attn_norm is None else w.norm(self.post_attn_norm, h))
        h = self.mlp.walk(w, x if self.mlp_norm is None else w.norm(self.mlp_norm, x))
        return w.add(x, h if self.post_mlp_norm is None else w.norm(self.post_mlp_norm, h))


class Transformer(nn.Module):
    """Decoder-only LM. `model(input_ids [B, T]) -> logits [B, T, V]`; `hidden_states` stops before the head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = _Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_embed = _Embedding(cfg.max_position_embeddings, cfg.hidden_size) if cfg.position == "learned" else None
        self.layers = nn.ModuleList(Block(cfg, spec) for spec in cfg.layer_specs())
        self._ropes = tuple(dict.fromkeys(b.spec.rope for b in self.layers if b.spec.rope is not None))
        self._windows = tuple(dict.fromkeys(b.spec.window for b in self.layers))
        self._longrope = any(r.scaling is not None and r.scaling.kind == "longrope" for r in self._ropes)
        self.norm = make_norm(cfg, cfg.hidden_size)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.gradient_checkpointing = False  # recompute each block in backward to save activation memory
        self._rope_cache: dict = {}  # (device, LayerRope, long) -> (cos, sin) [n, rotary_dim] fp32 (see _rope); not in .to(dtype)
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    def allocate(self, device) -> "Transformer":
        """Module.to_empty(device) (uninitialized storage for every meta tensor), then tie_weights.
        Through torch.empty: to_empty's empty_like on meta tensors runs torch._refs, which imports
        sympy (~33 MB resident, measured); the loaders build on meta and then call this."""
        self._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
        self.tie_weights()
        return self

    def tie_weights(self):
        """Share the embedding with the LM head when the config says so (again after `to_empty`)."""
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):  # not a quantized head copy
            self.lm_head.weight = self.embed.weight

    def reset_parameters(self):
        """GPT-2 style init: N(0, 0.02), residual projections scaled by 1/sqrt(2L), biases 0, norms 1."""
        if self.embed.weight.is_meta:  # nothing to write (see _Embedding)
            return
        std = 0.02
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                residual = name.endswith(("o_proj", "down_proj"))  # keeps the residual stream's variance flat
                nn.init.normal_(m.weight, 0.0, std / math.sqrt(2 * self.config.num_layers) if residual else std)
            elif isinstance(m, Experts):
                nn.init.normal_(m.gate_up_proj, 0.0, std)
                nn.init.normal_(m.down_proj, 0.0, std / math.sqrt(2 * self.config.num_layers))
            elif isinstance(m, RMSNorm):
                nn.init.constant_(m.weight, 1.0 - m.weight_offset)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        self._rope_cache = {}

    # ------------------------------------------------------------------ forward
    def _rope(self, position_ids, dtype, seq_len: int, positions: Optional[int] = None) -> dict:
        """LayerRope -> (cos, sin) (B|1, T, rotary_dim) of `position_ids`, for every distinct RoPE of the layers.
        seq_len: one past the largest position (longrope picks its long factors past the original context);
        positions: one past the largest of position_ids when that is more (default seq_len).

        The fp32 tables cover the positions seen so far, rounded up to a power of two (at least
        ROPE_TABLE_MIN), not max_position_embeddings: a 32k-context model's two tables are 16 MB at
        rotary_dim 64 (128 MB for a 128k Llama 3 at 128), resident for the whole run, while training at
        seq_len 512 reads 0.25 MB of them. Each entry is computed on its own, so a longer table holds the
        same values in its first rows."""
        device, out = position_ids.device, {}
        need = max(seq_len, positions or 0)
        for rope in self._ropes:
            long = rope_uses_long(rope, seq_len)
            key = (device, rope, long)
            table = self._rope_cache.get(key)
            if table is None or table[0].shape[0] < need:
                n = min(self.config.max_position_embeddings, max(ROPE_TABLE_MIN, 1 << (need - 1).bit_length()))
                t = torch.arange(n, device=device, dtype=torch.float32)  # n >= need: the forward checks the limit
                freqs = torch.outer(t, rope_inv_freq(self.config.rotary_dim, *rope, long=long).to(device))
                emb = torch.cat((freqs, freqs), dim=-1)  # [n, rotary_dim]
                # yarn / longrope scale cos and sin (HF's attention_factor: sharper attention at long range)
                factor = rope.scaling.attention_factor if rope.scaling is not None else 1.0
                self._rope_cache[key] = (emb.cos() * factor, emb.sin() * factor)
            cos, sin = self._rope_cache[key]
            out[rope] = cos[position_ids].to(dtype), sin[position_ids].to(dtype)
        out[None] = None  # layers without RoPE
        return out

    def _mask(self, T: int, past: int, attn_mask, device, lengths=None, window: Optional[int] = None):
        """A bool mask (True = attend) of shape broadcastable to (B, nh, T, S), or None for plain causal.

        lengths [B] (a per-row cache): row b's queries sit at slots lengths[b] + arange(T), so the slots
        past them, padding up to the longest row, are masked too.
        """
        S = past + T
        needs_window = window is not None and S > window
        if attn_mask is None and lengths is None and (past == 0 or T == 1) and not needs_window:
            return None
        q_pos = torch.arange(past, S, device=device)[:, None]
        if lengths is not None:
            q_pos = (lengths[:, None] + torch.arange(T, device=device))[:, None, :, None]  # (B, 1, T, 1)
        k_pos = torch.arange(S, device=device)[None, :]
        mask = k_pos <= q_pos
        if needs_window:
            mask = mask & (k_pos > q_pos - window)
        return mask if attn_mask is None else mask & attn_mask

    def hidden_states(self, input_ids, *, position_ids=None, attn_mask=None, cache: Optional[KVCache] = None):
        """Final-norm hidden states [B, T, C] (what the LM head reads; a fused loss can start here).

        position_ids [B, T] default to past + arange(T); attn_mask is a bool mask broadcastable to
        (B, 1, T, S) (True = attend) combined with the causal mask, e.g. for packed documents.
        """
        B, T = input_ids.shape
        lengths = cache.lengths if cache is not None else None  # per-row lengths (continuous batching)
        if lengths is not None:  # the batcher admits and evicts rows between steps: read up to the longest
            cache.pos = int(lengths.max())
        past = cache.pos if cache is not None else 0
        limit = self.config.max_position_embeddings
        if position_ids is None:
            if past + T > limit:  # plain ints: no device sync, no graph break under torch.compile
                raise ValueError(f"position {past + T - 1} exceeds max_position_embeddings={limit}")
            position_ids = torch.arange(past, past + T, device=input_ids.device)[None]
            if lengths is not None:  # (B, T): each row goes on from its own length
                position_ids = lengths[:, None] + torch.arange(T, device=input_ids.device)
            top = past + T - 1  # the largest position (per-row lengths: cache.pos is the longest row)
        else:
            top = int(position_ids.max())
            if top >= limit:
                raise ValueError(f"position {top} exceeds max_position_embeddings={limit}")
        seq_len = past + T
        if self._longrope:  # data-dependent choice of table, as transformers' dynamic longrope update
            seq_len = top + 1
        x = self.embed(input_ids)  # (B, T, C)
        if self.config.scale_embeddings:  # Gemma: the scale is rounded to the model dtype first
            x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed(position_ids)
        ropes = self._rope(position_ids, x.dtype, seq_len, top + 1)
        masks = {}  # one per distinct window (a plain loop: a comprehension is one more call per step)
        for w in self._windows:
            masks[w] = self._mask(T, past, attn_mask, input_ids.device, lengths, w)
        for block in self.layers:
            rope, mask = ropes[block.spec.rope], masks[block.spec.window]
            if self.gradient_checkpointing and self.training:
                x = checkpointed(block, x, rope, mask, cache)
            else:
                x = block(x, rope, mask, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def forward(self, input_ids, *, position_ids=None, attn_mask=None, cache: Optional[KVCache] = None):
        """Logits [B, T, V] in the model dtype (soft-capped where the config says: Gemma 2)."""
        logits = self.lm_head(self.hidden_states(input_ids, position_ids=position_ids, attn_mask=attn_mask, cache=cache))
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    @property
    def output_softcap(self) -> Optional[float]:
        """The final-logit soft cap the fused loss must apply (None: none)."""
        return self.config.final_softcap

    # ------------------------------------------------------------------ helpers
    def new_cache(self, batch_size: int, max_len: int, per_row: bool = False) -> KVCache:
        """An empty KV cache on the model's device and dtype, for up to `max_len` tokens per sequence
        (`per_row`: rows of different lengths, see KVCache)."""
        max_len = min(max_len, self.config.max_position_embeddings)
        w = self.embed.weight
        return KVCache(self.config, batch_size, max_len, dtype=w.dtype, device=w.device, per_row=per_row)

    @property
    def output_weight(self) -> torch.Tensor:
        """The LM head weight [V, C] (the embedding when tied), for fused linear-cross-entropy."""
        return self.lm_head.weight

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, dtype=None, device=None, quantize=None) -> "Transformer":
        """Load an HF checkpoint (local dir or hub id) straight into `dtype` (default fp32) on `device`;
        `quantize` ("nf4" | "int8") stores the block linears quantized, tensor by tensor (engine.quant)."""
        from engine.model.hf_format import load_pretrained

        return load_pretrained(cls, path_or_hub_id, dtype=dtype, device=device, quantize=quantize)

    def save_pretrained(self, directory, max_shard_size: int | str = "2GB") -> None:
        """Write config.json and safetensors (sharded with an index above `max_shard_size`) in HF layout."""
        from engine.model.hf_format import save_pretrained

        save_pretrained(self, directory, max_shard_size=max_shard_size)
