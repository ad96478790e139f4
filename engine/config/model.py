"""ModelConfig: every architectural choice of the Transformer, as plain fields.

Family differences (Llama vs Gemma vs GPT-2 ...) live here as settings, never as branches on a model
name inside model.py. `engine.model.families` translates a Hugging Face config.json into this dataclass and back.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Literal, NamedTuple, Optional

from engine.config.parsing import ConfigError


# Sizes past these are refused before anything is allocated: token ids beyond int32 (tokenizers count
# in u32; no released model comes near), and more positions than any released context (~10M) by far.
MAX_VOCAB, MAX_POSITIONS = 2**31, 2**24


@dataclass(frozen=True)
class RopeScaling:
    """Context-extension rescaling of RoPE frequencies (`rope_scaling` / `rope_parameters` in HF)."""

    kind: Literal["linear", "llama3", "yarn", "longrope"]
    factor: float
    # llama3 only: frequencies are rescaled by wavelength band relative to the original context.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192  # llama3, yarn, longrope: the pretraining context
    # yarn, longrope: cos and sin are multiplied by this (HF's attention_factor; resolved when parsed)
    attention_factor: float = 1.0
    # yarn: the band of rotations interpolated between extrapolated and interpolated frequencies
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    # longrope (Phi-3 "su"): per-pair divisors of the frequencies, short up to the original context and
    # long past it (chosen per forward from its longest position, as transformers does)
    short_factor: Optional[tuple[float, ...]] = None
    long_factor: Optional[tuple[float, ...]] = None

    def __post_init__(self):
        if self.kind not in ("linear", "llama3", "yarn", "longrope"):
            raise ConfigError(f"model.rope_scaling.kind: expected one of linear, llama3, yarn, longrope, got {self.kind!r}")
        for name in ("short_factor", "long_factor"):
            if isinstance(getattr(self, name), list):  # from JSON: tuples keep the object hashable
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.kind == "longrope" and (self.short_factor is None or self.long_factor is None):
            raise ConfigError("model.rope_scaling: longrope needs short_factor and long_factor")


class LayerRope(NamedTuple):
    """One layer's RoPE: base and optional rescaling (layers with equal ones share a cos/sin table)."""

    theta: float
    scaling: Optional[RopeScaling]


@dataclass(frozen=True)
class LayerSpec:
    """What may differ from one block to the next, computed from ModelConfig by `layer_specs()`."""

    index: int
    window: Optional[int]  # sliding window (a key is visible while q_pos - k_pos < window); None: global
    rope: Optional[LayerRope]  # None: no RoPE on this layer (learned positions, or SmolLM3's NoPE layers)
    pre_norm: bool  # norm the block's input before attention and before the MLP
    post_attn_norm: bool  # norm the attention output before the residual add (Gemma 2/3, OLMo 2)
    post_mlp_norm: bool  # ... and the MLP output
    mlp: str  # key of engine.model.transformer.MLPS: which MLP class the block builds


def _positive(v, kinds=(int,)) -> bool:
    return isinstance(v, kinds) and not isinstance(v, bool) and v > 0


# Per-layer fields (a tuple of num_layers entries overriding the global value on each layer) and what
# an entry other than null must be.
_PER_LAYER_ENTRY = {
    "layer_sliding_windows": (_positive, "a positive integer"),
    "layer_rope_thetas": (lambda v: _positive(v, (int, float)), "a positive number"),
    "layer_rope_scalings": (lambda v: isinstance(v, RopeScaling), "a rope scaling object"),
}
PER_LAYER = tuple(_PER_LAYER_ENTRY)


@dataclass(frozen=True)
class ModelConfig:
    """Shape and architecture of a decoder-only Transformer (B = batch, T = time, C = hidden_size)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # < num_heads is GQA, 1 is MQA
    head_dim: int  # may differ from hidden_size // num_heads (Qwen3, Gemma)
    intermediate_size: int
    max_position_embeddings: int
    # normalization
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-6
    norm_weight_offset: float = 0.0  # Gemma stores w - 1 and computes x * (1 + w) in fp32
    # MLP
    activation: Literal["silu", "gelu_tanh", "gelu", "relu"] = "silu"
    gated_mlp: bool = True  # down(act(gate(x)) * up(x)); False is GPT-2's up -> act -> down
    mlp_bias: bool = False
    # attention
    qkv_bias: bool = False  # Qwen2, GPT-2
    o_bias: bool = False  # GPT-2 (and Llama with attention_bias=true)
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k, before RoPE
    qk_norm_scope: Literal["head", "projection"] = "head"  # "projection": OLMo 2 norms all of q (and k) at once
    # Gemma 2: scores are scaled by query_pre_attn_scalar**-0.5 instead of head_dim**-0.5 (None: head_dim)
    query_pre_attn_scalar: Optional[float] = None
    attn_softcap: Optional[float] = None  # Gemma 2: scores -> cap * tanh(scores / cap) before the mask
    final_softcap: Optional[float] = None  # Gemma 2 (optional on Gemma 3): the same on the output logits
    sliding_window: Optional[int] = None  # Mistral v0.1: a key is visible while q_pos - k_pos < window
    # positions
    position: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    partial_rotary_factor: float = 1.0  # Phi-4-mini: RoPE turns only the first int(hd * factor) dims of a head
    # per layer (None: every layer takes the global value above; else one entry per layer)
    layer_sliding_windows: Optional[tuple[Optional[int], ...]] = None  # an entry None: global attention there
    layer_rope_thetas: Optional[tuple[Optional[float], ...]] = None  # an entry None: no RoPE on that layer
    layer_rope_scalings: Optional[tuple[Optional[RopeScaling], ...]] = None  # given: explicit (None = unscaled)
    # block layout
    pre_norm: bool = True  # False: OLMo 2 norms only the outputs of attention and MLP
    post_attn_norm: bool = False  # Gemma 2/3, OLMo 2: norm the attention output before the residual add
    post_mlp_norm: bool = False  # ... and the MLP output
    mlp_class: Literal["dense", "moe"] = "dense"  # engine.model.transformer.MLPS: "moe" is engine.model.moe.MoE
    # mixture of experts (mlp_class="moe"; engine.model.moe). Each token's MLP is the weighted sum of the
    # num_experts_per_tok experts its router ranks highest, each a gated MLP of moe_intermediate_size.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalize the top-k softmax weights to sum to 1 (Mixtral, Qwen3-MoE)
    router_aux_loss_coef: float = 0.0  # training adds coef * load-balancing loss (Switch Transformer eq. 4-6)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: one dense expert every token takes, sigmoid-gated; 0: none
    decoder_sparse_step: int = 1  # layer i is MoE when (i + 1) % step == 0 and i is not in mlp_only_layers
    mlp_only_layers: tuple[int, ...] = ()  # ... these layers keep the dense MLP (intermediate_size)
    # embeddings and head
    scale_embeddings: bool = False  # Gemma multiplies token embeddings by sqrt(hidden_size)
    tie_word_embeddings: bool = False
    # Hugging Face identity, kept so save_pretrained writes a config transformers can load back.
    hf_model_type: str = "llama"
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int | tuple[int, ...]] = None
    pad_token_id: Optional[int] = None
    extra_hf: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "intermediate_size", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name}: expected a positive integer, got {value!r}")
        for name, limit in (("vocab_size", MAX_VOCAB), ("max_position_embeddings", MAX_POSITIONS)):
            if getattr(self, name) > limit:
                raise ConfigError(f"model.{name}: {getattr(self, name)} is more than the supported {limit}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_heads ({self.num_heads}) must be a multiple of "
                              f"model.num_kv_heads ({self.num_kv_heads})")
        choices = {"norm": ("rmsnorm", "layernorm"), "activation": ("silu", "gelu_tanh", "gelu", "relu"),
                   "position": ("rope", "learned"), "mlp_class": ("dense", "moe"), "qk_norm_scope": ("head", "projection")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"model.head_dim: RoPE needs an even head_dim, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"model.sliding_window: expected a positive integer or null, got {self.sliding_window}")
        if isinstance(self.rope_scaling, dict):  # from_dict / JSON round trip
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        for name in ("query_pre_attn_scalar", "attn_softcap", "final_softcap"):
            value = getattr(self, name)
            if value is not None and not _positive(value, (int, float)):
                raise ConfigError(f"model.{name}: expected a positive number or null, got {value!r}")
        if not (isinstance(self.partial_rotary_factor, (int, float)) and 0 < self.partial_rotary_factor <= 1):
            raise ConfigError(f"model.partial_rotary_factor: expected a number in (0, 1], got {self.partial_rotary_factor!r}")
        if self.position == "rope" and self.rotary_dim % 2:
            raise ConfigError(f"model.partial_rotary_factor: head_dim * {self.partial_rotary_factor} = "
                              f"{self.rotary_dim} rotated dims, must be even")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self._check_per_layer()
        self._check_moe()

    def _check_moe(self) -> None:
        """MoE fields: set (and consistent) exactly when mlp_class is "moe"."""
        if isinstance(self.mlp_only_layers, list):  # from JSON
            object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        if self.mlp_class != "moe":
            return
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name}: expected a positive integer for mlp_class='moe', got {value!r}")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(f"model.num_experts_per_tok: {self.num_experts_per_tok} is more than "
                              f"model.num_experts ({self.num_experts})")
        if not (isinstance(self.router_aux_loss_coef, (int, float)) and self.router_aux_loss_coef >= 0):
            raise ConfigError(f"model.router_aux_loss_coef: expected a number >= 0, got {self.router_aux_loss_coef!r}")
        bad = [i for i in self.mlp_only_layers if not isinstance(i, int) or not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"model.mlp_only_layers: expected layer indices in [0, {self.num_layers}), got {bad[0]!r}")

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i builds the mixture-of-experts MLP (Qwen-MoE's decoder_sparse_step / mlp_only_layers)."""
        return (self.mlp_class == "moe" and (i + 1) % self.decoder_sparse_step == 0
                and i not in self.mlp_only_layers)

    def _check_per_layer(self) -> None:
        """Per-layer tuples: num_layers entries of the right kind (lists and dicts from JSON are converted)."""
        for name in PER_LAYER:
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (list, tuple)) or len(value) != self.num_layers:
                raise ConfigError(f"model.{name}: expected a list of {self.num_layers} entries (one per layer), "
                                  f"got {value!r}")
            if name == "layer_rope_scalings":
                value = tuple(RopeScaling(**v) if isinstance(v, dict) else v for v in value)
            object.__setattr__(self, name, tuple(value))
            check, expected = _PER_LAYER_ENTRY[name]
            for i, v in enumerate(getattr(self, name)):
                if v is not None and not check(v):
                    raise ConfigError(f"model.{name}[{i}]: expected {expected} or null, got {v!r}")
            if name != "layer_sliding_windows" and self.position != "rope":
                raise ConfigError(f"model.{name}: only for position='rope', got position={self.position!r}")

    def layer_specs(self) -> tuple[LayerSpec, ...]:
        """Each block's LayerSpec: the per-layer fields where given, else the global ones."""
        specs = []
        for i in range(self.num_layers):
            window = self.sliding_window if self.layer_sliding_windows is None else self.layer_sliding_windows[i]
            rope = None
            if self.position == "rope":
                theta = self.rope_theta if self.layer_rope_thetas is None else self.layer_rope_thetas[i]
                scaling = self.rope_scaling if self.layer_rope_scalings is None else self.layer_rope_scalings[i]
                rope = None if theta is None else LayerRope(float(theta), scaling)
            specs.append(LayerSpec(i, window, rope, self.pre_norm, self.post_attn_norm, self.post_mlp_norm,
                                   "dense" if self.mlp_class == "moe" and not self.is_moe_layer(i)
                                   else self.mlp_class))
        return tuple(specs)

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that RoPE rotates (the rest pass through): HF's int(hd * factor)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once), computed from the shapes alone."""
        C, H = self.hidden_size, self.head_dim
        attn = C * H * (self.num_heads * 2 + self.num_kv_heads * 2)
        attn += (H * (self.num_heads + 2 * self.num_kv_heads) if self.qkv_bias else 0) + (C if self.o_bias else 0)
        if self.qk_norm:
            attn += 2 * H if self.qk_norm_scope == "head" else H * (self.num_heads + self.num_kv_heads)
        mlp = C * self.intermediate_size * (3 if self.gated_mlp else 2)
        mlp += (self.intermediate_size * (2 if self.gated_mlp else 1) + C) if self.mlp_bias else 0
        norm = C * (2 if self.norm == "layernorm" else 1)
        norms = 2 * self.pre_norm + self.post_attn_norm + self.post_mlp_norm
        total = self.num_layers * (attn + norms * norm) + norm + self.vocab_size * C
        moe_layers = sum(map(self.is_moe_layer, range(self.num_layers)))
        total += (self.num_layers - moe_layers) * mlp + moe_layers * self.moe_layer_params
        total += 0 if self.tie_word_embeddings else self.vocab_size * C
        total += self.max_position_embeddings * C if self.position == "learned" else 0
        return total

    @property
    def moe_layer_params(self) -> int:
        """Parameters of one mixture-of-experts MLP: router [E, C], experts [E, 3 * F, C], shared expert."""
        C, E, Fs = self.hidden_size, self.num_experts, self.shared_expert_intermediate_size
        return E * C + E * 3 * C * self.moe_intermediate_size + (3 * C * Fs + C if Fs else 0)

    def to_dict(self) -> dict:
        """A JSON-ready dict; `ModelConfig.from_dict` inverts it."""
        d = asdict(self)
        d.pop("extra_hf")
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "model") -> "ModelConfig":
        """Build from a dict of field values, naming the bad key (e.g. `model.hidden_sise`) on error."""
        known = {f.name for f in fields(cls)} - {"extra_hf"}
        unknown = sorted(set(d) - known)
        if unknown:
            hint = difflib.get_close_matches(unknown[0], known, n=1)
            raise ConfigError(f"{where}.{unknown[0]}: unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
        missing = [f.name for f in fields(cls) if f.name not in d and f.default is MISSING
                   and f.default_factory is MISSING]
        if missing:
            raise ConfigError(f"{where}.{missing[0]}: required key is missing")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
