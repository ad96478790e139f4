"""ModelConfig: every architectural choice of the Transformer, as plain fields.

Family differences (Llama vs Gemma vs GPT-2 ...) live here as settings, never as branches on a model
name inside model.py. `engine.hf` translates a Hugging Face config.json into this dataclass and back.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal, Optional


class ConfigError(ValueError):
    """A config value is missing, of the wrong type or impossible; the message names the key."""


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


@dataclass(frozen=True)
class SFTConfig:
    """How instruction data (`data.format: "sft"`) becomes training rows (`data.sft.*`); see engine/sft.py."""

    loss_on: Literal["completion", "all"] = "completion"  # completion/assistant tokens only, or every token
    packing: bool = True  # several examples per row (per-document attention, positions reset); else one per row
    truncation: Literal["drop", "truncate"] = "drop"  # an example longer than seq_len + 1: skip it, or keep its head
    template: Literal["auto", "chat", "plain"] = "auto"  # chat template, or prompt + completion + EOS; auto: chat if any

    def __post_init__(self):
        choices = {"loss_on": ("completion", "all"), "truncation": ("drop", "truncate"),
                   "template": ("auto", "chat", "plain")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"data.sft.{name}: expected one of {allowed}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where the corpus is and how it is cut into training windows (`data.*` in a run config)."""

    train: tuple[str, ...]  # files, globs or directories: .txt / any text file, or .jsonl with a text field
    val: tuple[str, ...] = ()  # held-out files; when empty, the last `val_fraction` of the tokens is held out
    val_fraction: float = 0.05
    seq_len: int = 512  # tokens per training window (targets are the window shifted by one)
    text_field: str = "text"  # the key read from each .jsonl line
    processed_dir: str = "data/processed"  # tokenized corpora are cached under <processed_dir>/<hash>/
    # "text": raw documents packed into windows; "sft": .jsonl of {"prompt", "completion"} or {"messages"}
    format: Literal["text", "sft"] = "text"
    sft: Optional[SFTConfig] = None  # SFT options (defaults when omitted); only with format "sft"

    def __post_init__(self):
        if self.format not in ("text", "sft"):
            raise ConfigError(f"data.format: expected one of ('text', 'sft'), got {self.format!r}")
        if self.sft is not None and self.format != "sft":
            raise ConfigError('data.sft: SFT options need data.format: "sft"')
        if self.format == "sft" and self.sft is None:
            object.__setattr__(self, "sft", SFTConfig())
        for name in ("train", "val"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
            if not all(isinstance(v, str) and v for v in getattr(self, name)):
                raise ConfigError(f"data.{name}: expected a path/glob or a list of them, got {value!r}")
        if not self.train:
            raise ConfigError("data.train: expected at least one path or glob")
        if not isinstance(self.seq_len, int) or isinstance(self.seq_len, bool) or self.seq_len <= 0:
            raise ConfigError(f"data.seq_len: expected a positive integer, got {self.seq_len!r}")
        if not isinstance(self.val_fraction, (int, float)) or not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction: expected a number in [0, 1), got {self.val_fraction!r}")


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from (`model.*`): an HF dir / hub id to fine-tune, or an architecture to train."""

    from_pretrained: Optional[str] = None  # HF directory or hub id
    architecture: Optional[dict] = None  # ModelConfig fields, for training from scratch (vocab_size may be omitted)
    tokenizer: Optional[str] = None  # tokenizer dir; default: the from_pretrained dir
    bpe_vocab_size: Optional[int] = None  # no tokenizer given: train a byte-level BPE of this size on data.train

    def __post_init__(self):
        if (self.from_pretrained is None) == (self.architecture is None):
            raise ConfigError("model: set exactly one of model.from_pretrained (fine-tune) or "
                              "model.architecture (train from scratch)")
        if self.architecture is not None and self.tokenizer is None and self.bpe_vocab_size is None:
            raise ConfigError("model.tokenizer: a from-scratch model needs model.tokenizer (a tokenizer dir) "
                              "or model.bpe_vocab_size (train one on data.train)")
        if self.bpe_vocab_size is not None and self.bpe_vocab_size < 258:
            raise ConfigError(f"model.bpe_vocab_size: expected at least 258 (256 bytes + specials), "
                              f"got {self.bpe_vocab_size}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimization and bookkeeping (`train.*`). Steps count optimizer steps, not micro-batches."""

    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: Optional[int] = 1000
    max_tokens: Optional[int] = None  # stop once this many training tokens were seen (whichever comes first)
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the decay ends at lr * min_lr_ratio
    warmup_steps: int = 100
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1  # applied to >= 2-D parameters only (not norms, biases)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16: autocast over fp32 master weights
    seed: int = 1337
    eval_every: int = 100  # 0 disables evaluation
    eval_batches: int = 20
    save_every: int = 500  # 0: save only at the end
    keep_last: int = 2  # checkpoints kept besides the best by val loss
    log_every: int = 1
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False
    device: str = "auto"  # "auto": cuda when available, else cpu
    sample_prompt: str = ""  # printed continuation at the end ("" = skip)
    sample_tokens: int = 64

    def __post_init__(self):
        positive = ("batch_size", "grad_accum", "eval_batches", "log_every", "keep_last")
        for name in positive:
            _check_int(f"train.{name}", getattr(self, name), minimum=1)
        for name in ("warmup_steps", "eval_every", "save_every", "sample_tokens", "seed"):
            _check_int(f"train.{name}", getattr(self, name), minimum=0)
        for name in ("max_steps", "max_tokens"):
            if getattr(self, name) is not None:
                _check_int(f"train.{name}", getattr(self, name), minimum=1)
        if self.max_steps is None and self.max_tokens is None:
            raise ConfigError("train.max_steps: set train.max_steps or train.max_tokens (or both)")
        if not self.lr > 0:
            raise ConfigError(f"train.lr: expected a positive number, got {self.lr}")
        checks = {"min_lr_ratio": (0.0, 1.0), "beta1": (0.0, 1.0), "beta2": (0.0, 1.0)}
        for name, (lo, hi) in checks.items():
            if not lo <= getattr(self, name) <= hi:
                raise ConfigError(f"train.{name}: expected a number in [{lo}, {hi}], got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: expected a number >= 0, got {getattr(self, name)}")
        if not self.eps > 0:
            raise ConfigError(f"train.eps: expected a positive number, got {self.eps}")


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on frozen base weights (`lora.*`): W x + (alpha / r) * B A x, PEFT-compatible on disk."""

    rank: int = 8
    alpha: float = 16.0  # scale = alpha / r (PEFT's lora_alpha)
    dropout: float = 0.0  # on the adapter's input only
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # module names; "all-linear" = every one
    base_dtype: Literal["fp32", "bf16"] = "fp32"  # frozen base weights; bf16 halves their memory
    rslora: bool = False  # scale = alpha / sqrt(r) (PEFT's use_rslora)
    init_from: Optional[str] = None  # a PEFT LoRA adapter dir (ours or peft's) to keep training; same rank/targets

    def __post_init__(self):
        _check_int("lora.rank", self.rank, minimum=1)
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha: expected a positive number, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: expected a number in [0, 1), got {self.dropout}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if targets == ("all-linear",):
            targets = LORA_TARGETS
        for t in targets:
            if t not in LORA_TARGETS:
                hint = difflib.get_close_matches(str(t), LORA_TARGETS, n=1)
                raise ConfigError(f"lora.targets: unknown module {t!r}" + (f" (did you mean '{hint[0]}'?)" if hint
                                  else f"; expected 'all-linear' or some of {', '.join(LORA_TARGETS)}"))
        if not targets:
            raise ConfigError("lora.targets: expected at least one module name")
        object.__setattr__(self, "targets", tuple(dict.fromkeys(targets)))
        if self.base_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"lora.base_dtype: expected one of ('fp32', 'bf16'), got {self.base_dtype!r}")

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)


@dataclass(frozen=True)
class DistributedConfig:
    """How `torchrun --nproc_per_node=N -m cli.train` splits the work (`distributed.*`); ignored in one process.

    Each rank trains on its own disjoint shard of every step's batch, so N ranks with train.grad_accum=k
    take the same optimizer steps as one process with grad_accum=N*k.
    """

    strategy: Literal["ddp", "fsdp"] = "ddp"  # DistributedDataParallel, or FSDP2 (fully_shard: sharded params/grads/state)
    backend: Optional[str] = None  # None: nccl on CUDA, gloo on CPU

    def __post_init__(self):
        if self.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"distributed.strategy: expected one of ('ddp', 'fsdp'), got {self.strategy!r}")
        if self.backend is not None and self.backend not in ("gloo", "nccl"):
            raise ConfigError(f"distributed.backend: expected 'gloo', 'nccl' or null, got {self.backend!r}")


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases run tracking (`logging.wandb.*`); the optional `wandb` package must be installed."""

    project: str = "engine"
    mode: Literal["offline", "online"] = "offline"  # offline writes <out_dir>/wandb/ and needs no network
    name: Optional[str] = None  # run name; default: the out_dir's name
    entity: Optional[str] = None

    def __post_init__(self):
        if self.mode not in ("offline", "online"):
            raise ConfigError(f"logging.wandb.mode: expected 'offline' or 'online', got {self.mode!r}")


@dataclass(frozen=True)
class LoggingConfig:
    """Experiment trackers besides the always-on metrics.jsonl (`logging.*`)."""

    tensorboard: bool = False  # event files in <out_dir>/tensorboard/ (needs the optional tensorboard package)
    wandb: Optional[WandbConfig] = None


@dataclass(frozen=True)
class RunConfig:
    """A whole training run, as read from one JSON file."""

    model: ModelSource
    data: DataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = "runs/default"
    resume: Optional[str] = None  # null: start fresh; "auto": latest checkpoint in out_dir; or a checkpoint dir
    lora: Optional[LoraConfig] = None  # null: full fine-tuning; else train adapters only (needs from_pretrained)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        if self.lora is not None and self.model.from_pretrained is None:
            raise ConfigError("lora: LoRA adapts a pretrained model; set model.from_pretrained")

    def to_dict(self) -> dict:
        return asdict(self)


def _check_int(where: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{where}: expected an integer >= {minimum}, got {value!r}")


# ---------------------------------------------------------------------------- JSON -> dataclasses


def from_dict(cls, data, where: str):
    """Build dataclass `cls` from parsed JSON, checking every key and type; errors name the key path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls) if f.init and f.name != "extra_hf"]
    def path(key): return f"{where}.{key}" if where else key
    for key in data:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(f"{path(key)}: unknown key" + (f" (did you mean '{path(hint[0])}'?)" if hint else
                                                             f"; valid keys: {', '.join(known)}"))
    for f in fields(cls):
        if f.name in known and f.name not in data and f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{path(f.name)}: required key is missing")
    return cls(**{k: _coerce(hints[k], v, path(k)) for k, v in data.items()})


def _coerce(tp, value, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if len(options := [a for a in args if a is not type(None)]) == 1:  # Optional[X]: X's error, key path intact
            return _coerce(options[0], value, where)
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e).split(": ", 1)[1])
        raise ConfigError(f"{where}: " + " or ".join(dict.fromkeys(errors)))
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is tuple:
        if isinstance(value, str):  # a single path where a list is allowed
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    expected = {float: (int, float), int: (int,), bool: (bool,), str: (str,), dict: (dict,)}.get(origin or tp)
    if expected is None:
        return value
    if not isinstance(value, expected) or (tp is not bool and isinstance(value, bool)):
        names = {float: "a number", int: "an integer", bool: "true or false", str: "a string", dict: "an object"}
        raise ConfigError(f"{where}: expected {names[origin or tp]}, got {json.dumps(value)}")
    return float(value) if tp is float else value


def _parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key.path=value, e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # bare strings need no quotes: --set out_dir=runs/x
    return key.strip().split("."), value


def load_run_config(path, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read a run config JSON file, apply `--set key.path=value` overrides, validate, and build it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    for override in overrides:
        keys, value = _parse_override(override)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {override}: '{k}' is not a section")
        node[keys[-1]] = value
    try:
        return from_dict(RunConfig, raw, where="")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
