"""A training run's config (`RunConfig` and its sections), as read from one JSON file."""
from __future__ import annotations

import difflib
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

from engine.config.methods import DPOConfig, GRPOConfig
from engine.config.parsing import ConfigError, _check_int, load_config


# the fields data.sft.columns may map a dataset's columns to (engine/data/formats.py)
SFT_FIELDS = ("messages", "conversations", "system", "instruction", "input", "output", "prompt", "completion")


@dataclass(frozen=True)
class SFTConfig:
    """How instruction data (`data.format: "sft"`) becomes training rows (`data.sft.*`); see engine/data/sft.py."""

    loss_on: Literal["completion", "all"] = "completion"  # completion/assistant tokens only, or every token
    packing: bool = True  # several examples per row (per-document attention, positions reset); else one per row
    truncation: Literal["drop", "truncate"] = "drop"  # an example longer than seq_len + 1: skip it, or keep its head
    template: Literal["auto", "chat", "plain"] = "auto"  # chat template, or prompt + completion + EOS; auto: chat if any
    # the rows' shape (engine/data/formats.py); auto: detected per row from its fields
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion"] = "auto"
    columns: Optional[dict] = None  # {field of a format: column in the data}, e.g. {"prompt": "question"}
    roles: Optional[dict] = None  # ShareGPT speaker -> role, besides the usual ones, e.g. {"bot": "assistant"}

    def __post_init__(self):
        choices = {"loss_on": ("completion", "all"), "truncation": ("drop", "truncate"),
                   "template": ("auto", "chat", "plain"),
                   "format": ("auto", "messages", "sharegpt", "alpaca", "prompt_completion")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"data.sft.{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        for name, keys in (("columns", SFT_FIELDS), ("roles", None)):
            for k, v in (getattr(self, name) or {}).items():
                if keys is not None and k not in keys:
                    raise ConfigError(f"data.sft.{name}.{k}: unknown field; expected some of {', '.join(keys)}")
                if not isinstance(v, str) or not v:
                    raise ConfigError(f"data.sft.{name}.{k}: expected a non-empty string, got {v!r}")


@dataclass(frozen=True)
class DatasetConfig:
    """How Hugging Face datasets named in data.train / data.val are read (`data.dataset.*`); see
    engine/data/hf_datasets.py. A data file (.parquet/.arrow/.csv/.json) is one split, used whole."""

    split: str = "train"  # the split data.train reads from a Hub dataset or a saved DatasetDict
    val_split: str = "validation"  # the split data.val reads
    subset: Optional[str] = None  # the dataset's configuration (datasets' `name`), e.g. "wikitext-2-raw-v1"
    # rows are read as they come: no Arrow copy, bounded memory; false: datasets builds its Arrow cache first
    streaming: bool = True

    def __post_init__(self):
        for name in ("split", "val_split"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"data.dataset.{name}: expected a split name, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class PreferenceConfig:
    """How preference pairs (`data.format: "preference"`) become token rows (`data.preference.*`);
    see engine/data/preference.py. Rendering is SFT's (engine/data/sft.py)."""

    truncation: Literal["drop", "truncate"] = "drop"  # a side longer than seq_len + 1: skip the pair, or keep heads
    template: Literal["auto", "chat", "plain"] = "auto"  # as data.sft.template

    def __post_init__(self):
        for name, allowed in {"truncation": ("drop", "truncate"), "template": ("auto", "chat", "plain")}.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"data.preference.{name}: expected one of {allowed}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where the corpus is and how it is cut into training windows (`data.*` in a run config)."""

    train: tuple[str, ...]  # files, globs or directories: .txt / any text file, .jsonl with a text field, datasets
    val: tuple[str, ...] = ()  # held-out files; when empty, the last `val_fraction` of the tokens is held out
    val_fraction: float = 0.05
    seq_len: int = 512  # tokens per training window (targets are the window shifted by one)
    text_field: str = "text"  # the key read from each .jsonl line
    processed_dir: str = "data/processed"  # tokenized corpora are cached under <processed_dir>/<hash>/
    # "text": raw documents packed into windows; "sft": .jsonl of {"prompt", "completion"} or {"messages"};
    # "preference": .jsonl of {"prompt", "chosen", "rejected"} (strings or message lists), for train.objective "dpo";
    # "prompts": .jsonl of {"prompt"} or {"messages"} plus the fields rewards read (train.objective "grpo")
    format: Literal["text", "sft", "preference", "prompts"] = "text"
    sft: Optional[SFTConfig] = None  # SFT options (defaults when omitted); only with format "sft"
    # train/val entries may be datasets: data files (.parquet ...), save_to_disk dirs, "hf:owner/name" Hub ids
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    preference: Optional[PreferenceConfig] = None  # preference-pair options; only with format "preference"

    def __post_init__(self):
        if self.format not in ("text", "sft", "preference", "prompts"):
            raise ConfigError(f"data.format: expected one of ('text', 'sft', 'preference', 'prompts'), "
                              f"got {self.format!r}")
        if self.sft is not None and self.format != "sft":
            raise ConfigError('data.sft: SFT options need data.format: "sft"')
        if self.format == "sft" and self.sft is None:
            object.__setattr__(self, "sft", SFTConfig())
        if self.preference is not None and self.format != "preference":
            raise ConfigError('data.preference: preference options need data.format: "preference"')
        if self.format == "preference" and self.preference is None:
            object.__setattr__(self, "preference", PreferenceConfig())
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
    # lm-evaluation-harness task names also run at each eval step (engine/train/eval_tasks.py; the eval extra)
    eval_tasks: tuple[str, ...] = ()
    eval_tasks_limit: Optional[int] = None  # examples per task (None: all)
    eval_tasks_include_path: Optional[str] = None  # a dir of extra lm-eval task YAML files
    save_every: int = 500  # 0: save only at the end
    keep_last: int = 2  # checkpoints kept besides the best by val loss
    log_every: int = 1  # metrics.jsonl/trackers rows (and, without the progress bar, log lines) every N steps
    # NaN/inf loss or grad norm: the step's update is skipped; more than this many in a row stop the run
    max_nonfinite_steps: int = 0
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False
    device: str = "auto"  # "auto": cuda when available, else cpu
    sample_prompt: str = ""  # printed continuation at the end ("" = skip)
    sample_tokens: int = 64
    # what is optimized: "sft" next-token cross-entropy (text and SFT data); "dpo" a preference loss (the `dpo`
    # section); "grpo" reinforcement learning with rewards (the `grpo` section)
    objective: Literal["sft", "dpo", "grpo"] = "sft"

    def __post_init__(self):
        if self.objective not in ("sft", "dpo", "grpo"):
            raise ConfigError(f"train.objective: expected one of ('sft', 'dpo', 'grpo'), got {self.objective!r}")
        positive = ("batch_size", "grad_accum", "eval_batches", "log_every", "keep_last")
        for name in positive:
            _check_int(f"train.{name}", getattr(self, name), minimum=1)
        for name in ("warmup_steps", "eval_every", "save_every", "sample_tokens", "seed", "max_nonfinite_steps"):
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
        if self.eval_tasks_limit is not None:
            _check_int("train.eval_tasks_limit", self.eval_tasks_limit, minimum=1)
        if isinstance(self.eval_tasks, str):
            object.__setattr__(self, "eval_tasks", tuple(n.strip() for n in self.eval_tasks.split(",") if n.strip()))
        if self.eval_tasks and not self.eval_every:
            raise ConfigError("train.eval_tasks: runs at eval steps, and train.eval_every is 0 (no eval steps)")


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on frozen base weights (`lora.*`): W x + (alpha / r) * B A x, PEFT-compatible on disk."""

    rank: int = 8
    alpha: float = 16.0  # scale = alpha / r (PEFT's lora_alpha)
    dropout: float = 0.0  # on the adapter's input only
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # module names; "all-linear" = every one
    # frozen base weights; bf16 halves their memory; nf4 / int8 (QLoRA) quantize the block linears on load
    # (engine.quant), the embedding, norms and head then stay bf16
    base_dtype: Literal["fp32", "bf16", "nf4", "int8"] = "fp32"
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
        if self.base_dtype not in ("fp32", "bf16", "nf4", "int8"):
            raise ConfigError("lora.base_dtype: expected one of ('fp32', 'bf16', 'nf4', 'int8'), "
                              f"got {self.base_dtype!r}")

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
    # A collective (gradient all-reduce, barrier) waiting longer than this for another rank fails the run:
    # a frozen rank stops the job instead of stalling it for the backend's default (~30 minutes)
    timeout_s: float = 300.0

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ConfigError(f"distributed.timeout_s: expected a positive number of seconds, got {self.timeout_s}")
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
class ShowcaseConfig:
    """Before/after report of a fine-tuning run (`showcase.*`, read by cli.train; cli/showcase.py): exact-match
    accuracy on held-out examples and a chat sample, base vs tuned; then the merged model and a GGUF in out_dir."""

    test: str  # held-out .jsonl ({"prompt", "completion"} lines), scored by exact match of the greedy completion
    n: int = 50  # examples scored
    chat_prompt: str = ""  # one user message answered by the base and the tuned model
    max_new_tokens: int = 48
    gguf_type: Optional[Literal["f32", "f16", "bf16", "q8_0", "q4_0"]] = "q8_0"  # null: no GGUF file

    def __post_init__(self):
        _check_int("showcase.n", self.n, minimum=1)
        _check_int("showcase.max_new_tokens", self.max_new_tokens, minimum=1)
        if not Path(self.test).is_file():
            raise ConfigError(f"showcase.test: {self.test} is not a file")
        if self.gguf_type not in (None, "f32", "f16", "bf16", "q8_0", "q4_0"):
            raise ConfigError(f"showcase.gguf_type: expected one of f32, f16, bf16, q8_0, q4_0 or null, "
                              f"got {self.gguf_type!r}")


@dataclass(frozen=True)
class RunConfig:
    """A whole training run, as read from one JSON file."""

    model: ModelSource
    data: DataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = "runs/default"
    resume: Optional[str] = None  # null: start fresh; "auto": latest checkpoint in out_dir; or a checkpoint dir
    # A fresh run (resume: null) into an out_dir that holds a run (checkpoints, metrics.jsonl, final/) is
    # refused unless this is true: then that run's files are removed first (engine/train/run_dir.py)
    overwrite: bool = False
    # Resuming a checkpoint of another model or data (its run_config.json) is refused; false: only warn
    strict_resume: bool = True
    lora: Optional[LoraConfig] = None  # null: full fine-tuning; else train adapters only (needs from_pretrained)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dpo: Optional[DPOConfig] = None  # preference-optimization options (defaults when omitted); train.objective "dpo"
    grpo: Optional[GRPOConfig] = None  # GRPO options (defaults when omitted); only with train.objective "grpo"
    showcase: Optional[ShowcaseConfig] = None  # null: no before/after report (cli.train)

    def __post_init__(self):
        self._check_dpo()
        self._check_objective()
        if self.showcase is not None and self.lora is None:
            raise ConfigError("showcase: the before/after report compares a base with its LoRA adapter; set lora")
        if self.lora is not None and self.model.from_pretrained is None:
            raise ConfigError("lora: LoRA adapts a pretrained model; set model.from_pretrained")
        if self.resume not in (None, "auto") and not Path(self.resume).exists():
            if difflib.get_close_matches(self.resume, ["auto"], n=1, cutoff=0.6):
                raise ConfigError(f"resume: {self.resume!r} is neither 'auto' nor an existing checkpoint "
                                  f"directory (did you mean 'auto'?)")
        if self.overwrite and self.resume is not None:
            raise ConfigError(f"overwrite: true starts the run over, which contradicts resume={self.resume!r}; "
                              f"set one of them")

    def _check_dpo(self) -> None:
        """train.objective "dpo" <-> data.format "preference" <-> the dpo section; a reference needs a base model."""
        dpo_run = self.train.objective == "dpo"
        if self.dpo is not None and not dpo_run:
            raise ConfigError('dpo: DPO options need train.objective: "dpo"')
        if dpo_run != (self.data.format == "preference"):
            raise ConfigError('train.objective: "dpo" trains on data.format: "preference" (and preference data '
                              f'needs train.objective "dpo"); got objective {self.train.objective!r} with data.format '
                              f'{self.data.format!r}')
        if dpo_run and self.dpo is None:
            object.__setattr__(self, "dpo", DPOConfig())
        if dpo_run and self.dpo.needs_reference and self.model.from_pretrained is None:
            raise ConfigError(f"dpo.loss: {self.dpo.loss!r} compares against a reference model, which is "
                              "model.from_pretrained; set it (or use a reference-free loss: simpo, orpo)")

    def _check_objective(self) -> None:
        """train.objective, data.format and the method's section must agree."""
        grpo = self.train.objective == "grpo"
        if grpo != (self.data.format == "prompts"):
            raise ConfigError('train.objective: "grpo" trains on prompts: set data.format "prompts" with it '
                              f'(got train.objective {self.train.objective!r}, data.format {self.data.format!r})')
        if self.grpo is not None and not grpo:
            raise ConfigError('grpo: GRPO options need train.objective: "grpo"')
        if grpo and self.grpo is None:
            object.__setattr__(self, "grpo", GRPOConfig())
        if grpo and self.distributed.strategy == "fsdp":
            raise ConfigError('distributed.strategy: GRPO samples with whole weights; use "ddp" (FSDP shards them)')

    def to_dict(self) -> dict:
        return asdict(self)


def load_run_config(path, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read a run config JSON file, apply `--set key.path=value` overrides, validate, and build it."""
    return load_config(RunConfig, path, overrides)
