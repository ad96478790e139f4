"""ModelConfig: every architectural choice of the Transformer, as plain fields.

Family differences (Llama vs Gemma vs GPT-2 ...) live here as settings, never as branches on a model
name inside model.py. `engine.model.families` translates a Hugging Face config.json into this dataclass and back.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Literal, Optional

from engine.config.parsing import ConfigError


@dataclass(frozen=True)
class RopeScaling:
    """Context-extension rescaling of RoPE frequencies (`rope_scaling` / `rope_parameters` in HF)."""

    kind: Literal["linear", "llama3"]
    factor: float
    # llama3 only: frequencies are rescaled by wavelength band relative to the original context.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


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
    sliding_window: Optional[int] = None  # Mistral v0.1: a key is visible while q_pos - k_pos < window
    # positions
    position: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
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
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_heads ({self.num_heads}) must be a multiple of "
                              f"model.num_kv_heads ({self.num_kv_heads})")
        choices = {"norm": ("rmsnorm", "layernorm"), "activation": ("silu", "gelu_tanh", "gelu", "relu"),
                   "position": ("rope", "learned")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"model.head_dim: RoPE needs an even head_dim, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"model.sliding_window: expected a positive integer or null, got {self.sliding_window}")
        if isinstance(self.rope_scaling, dict):  # from_dict / JSON round trip
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @property
    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once), computed from the shapes alone."""
        C, H = self.hidden_size, self.head_dim
        attn = C * H * (self.num_heads * 2 + self.num_kv_heads * 2)
        attn += (H * (self.num_heads + 2 * self.num_kv_heads) if self.qkv_bias else 0) + (C if self.o_bias else 0)
        attn += 2 * H if self.qk_norm else 0
        mlp = C * self.intermediate_size * (3 if self.gated_mlp else 2)
        mlp += (self.intermediate_size * (2 if self.gated_mlp else 1) + C) if self.mlp_bias else 0
        norm = C * (2 if self.norm == "layernorm" else 1)
        total = self.num_layers * (attn + mlp + 2 * norm) + norm + self.vocab_size * C
        total += 0 if self.tie_word_embeddings else self.vocab_size * C
        total += self.max_position_embeddings * C if self.position == "learned" else 0
        return total

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
