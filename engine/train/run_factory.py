"""Turn a RunConfig into the objects a run needs: device, tokenizer, model, batch sources and objective."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import torch

from engine.data.bpe import train_bpe
from engine.config import ConfigError, ModelConfig, RunConfig
from engine.data.hf_datasets import names_dataset
from engine.data.text import expand_paths, prepare
from engine.adapters.lora import apply_lora, check_lora_supported
from engine.adapters.peft_format import load_adapter_weights, read_adapter_config
from engine.model.transformer import Transformer
from engine.data.prompts import prepare_prompts
from engine.data.sft import prepare_sft
from engine.data.tokenizer import Tokenizer, with_default_chat_template
from engine.dtypes import DTYPES
from engine.quant import KINDS as QUANT_KINDS, check_dense_trainable, quantize
from engine.model.hf_format import read_config, resolve_model_dir
from engine.train.grpo import build_grpo
from engine.train.objectives import Objective, TokenLoss
from engine.data.preference import prepare_preference
from engine.train.dpo import DPOLoss, frozen_reference
from engine.train.dpo_reference import attach_precomputed_reference

logger = logging.getLogger("engine.train.run_factory")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: '{name}' requested but CUDA is not available")
    return torch.device(name)


def check_run_config(cfg: RunConfig) -> ModelConfig:
    """Checks that need the model's shape, done before anything is written: returns the model config.

    For from-scratch runs the vocab size is not known until the tokenizer exists; 1 stands in for it.
    """
    if cfg.model.from_pretrained is not None:
        model_cfg = read_config(resolve_model_dir(cfg.model.from_pretrained))
    else:
        model_cfg = ModelConfig.from_dict({"vocab_size": 1, **cfg.model.architecture}, where="model.architecture")
    if cfg.data.seq_len > model_cfg.max_position_embeddings:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} exceeds the model's max_position_embeddings "
                          f"{model_cfg.max_position_embeddings}")
    resolve_device(cfg.train.device)
    if cfg.model.bpe_vocab_size is not None and cfg.model.tokenizer is None and \
            any(map(names_dataset, cfg.data.train)):
        raise ConfigError("model.bpe_vocab_size: a BPE tokenizer is trained on text files, and data.train names a "
                          "dataset; set model.tokenizer (a tokenizer dir)")
    if cfg.grpo is not None and cfg.data.seq_len + cfg.grpo.max_completion_length > model_cfg.max_position_embeddings:
        raise ConfigError(f"grpo.max_completion_length: prompts of data.seq_len={cfg.data.seq_len} tokens plus "
                          f"{cfg.grpo.max_completion_length} generated exceed the model's max_position_embeddings "
                          f"{model_cfg.max_position_embeddings}")
    if cfg.lora is not None:
        check_lora_supported(model_cfg, cfg.lora)
    return model_cfg


def build_tokenizer(cfg: RunConfig, progress: bool = True) -> tuple[Tokenizer, Path]:
    """The run's tokenizer and its directory: given, the pretrained model's, or a BPE trained on data.train."""
    src = cfg.model
    if src.tokenizer is not None:
        directory = resolve_model_dir(src.tokenizer)
    elif src.from_pretrained is not None:
        directory = resolve_model_dir(src.from_pretrained)
    else:
        files = expand_paths(cfg.data.train)
        # Cached beside the tokenized data; train_bpe reuses it while the files and vocab size are unchanged.
        directory = Path(cfg.data.processed_dir) / "tokenizers" / f"bpe{src.bpe_vocab_size}"
        train_bpe([str(f) for f in files], src.bpe_vocab_size, directory, text_field=cfg.data.text_field,
                  progress=progress)
    tokenizer = Tokenizer.from_pretrained(directory)
    if cfg.data.format == "sft" and cfg.data.sft.template != "plain":  # an SFT model must chat: give it a template
        tokenizer = with_default_chat_template(tokenizer)
    if cfg.data.format == "preference" and cfg.data.preference.template != "plain":  # rendered as SFT renders
        tokenizer = with_default_chat_template(tokenizer)
    return tokenizer, directory


def build_model(cfg: RunConfig, tokenizer: Tokenizer) -> Transformer:
    """Load the pretrained model in fp32 (master weights), or build the configured architecture from scratch.

    With `lora`, the base is loaded in lora.base_dtype, frozen, and adapters (fp32) are added to its target layers.
    """
    quant = cfg.lora.base_dtype if cfg.lora is not None and cfg.lora.base_dtype in QUANT_KINDS else None
    if cfg.model.from_pretrained is not None:
        dtype = torch.bfloat16 if quant else DTYPES[cfg.lora.base_dtype] if cfg.lora is not None else torch.float32
        model = Transformer.from_pretrained(cfg.model.from_pretrained, dtype=dtype, quantize=quant)
        if len(tokenizer) > model.config.vocab_size:
            raise ConfigError(f"model.tokenizer: {len(tokenizer)} tokens do not fit the model's vocab_size "
                              f"{model.config.vocab_size}")
    else:
        arch = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                **cfg.model.architecture}
        if arch["vocab_size"] < len(tokenizer):
            raise ConfigError(f"model.architecture.vocab_size: {arch['vocab_size']} is smaller than the "
                              f"tokenizer's {len(tokenizer)} tokens")
        model = Transformer(ModelConfig.from_dict(arch, where="model.architecture"))
        if quant:  # a QLoRA base from scratch (tests, research): bf16, then its block linears quantized
            quantize(model.to(torch.bfloat16), quant)
    if cfg.lora is not None:
        apply_lora(model, cfg.lora, base_name=str(resolve_model_dir(cfg.model.from_pretrained).resolve()))
        if cfg.lora.init_from is not None:
            _load_initial_adapter(model, cfg.lora)
    check_dense_trainable(model, "train")
    model.gradient_checkpointing = cfg.train.activation_checkpointing
    return model


def _load_initial_adapter(model, lora) -> None:
    """Start from a saved adapter: its shape settings must be the run's (alpha and dropout may differ)."""
    saved, _ = read_adapter_config(lora.init_from)
    for key in ("rank", "targets", "rslora"):
        ours, theirs = getattr(lora, key), getattr(saved, key)
        if (set(ours) != set(theirs)) if key == "targets" else ours != theirs:
            raise ConfigError(f"lora.{key}: {ours!r} differs from the adapter in lora.init_from "
                              f"({lora.init_from}: {theirs!r})")
    load_adapter_weights(model, lora.init_from)


def build_data(cfg: RunConfig, tokenizer: Tokenizer, tokenizer_dir: Path, progress: bool = True):
    """PreparedData (token windows) for data.format "text"; SFTData (packed examples) for "sft"."""
    if cfg.data.format == "sft":
        return prepare_sft(cfg.data, tokenizer, seed=cfg.train.seed, tokenizer_dir=tokenizer_dir)
    if cfg.data.format == "preference":
        return prepare_preference(cfg.data, tokenizer, seed=cfg.train.seed, tokenizer_dir=tokenizer_dir)
    if cfg.data.format == "prompts":
        return prepare_prompts(cfg.data, tokenizer, seed=cfg.train.seed, repeat=cfg.grpo.num_iterations)
    return prepare(cfg.data, tokenizer, tokenizer_dir, progress=progress)


class BatchSource(Protocol):
    """What the loop reads batches from: deterministic in its arguments, so a resumed run replays exactly.
    engine.data's TokenWindows (text) and PackedExamples (SFT) are the two implementations."""

    def batch(self, step: int, micro: int = 0, *, batch_size: int, accum: int = 1, rank: int = 0,
              world_size: int = 1):
        """Micro-batch `micro` of optimizer step `step` on `rank`: a batch the run's Objective takes."""

    def eval_batches(self, batch_size: int, max_batches: Optional[int] = None, rank: int = 0, world_size: int = 1):
        """Yield the held-out batches in order; rank takes every world_size-th one."""


@dataclass(frozen=True)
class RunData:
    """A run's batch sources, whatever the data format: `train`, and `val` (None when there is none)."""

    train: BatchSource
    val: Optional[BatchSource]
    prepared: object  # what build_data returned (PreparedData or SFTData): the cache dir, stats


def build_batch_sources(cfg: RunConfig, tokenizer: Tokenizer, tokenizer_dir: Path, progress: bool = True) -> RunData:
    """The train/val batch sources of data.format: packed SFT rows, or seq_len windows of the token stream
    (no val windows when the held-out tokens do not fill one)."""
    data = build_data(cfg, tokenizer, tokenizer_dir, progress)
    if cfg.data.format == "sft":
        return RunData(data.train, data.val, data)
    if cfg.data.format == "preference":
        if cfg.dpo.precompute_ref:  # one pass of the reference now; no reference model while training
            attach_precomputed_reference(cfg, data, resolve_device(cfg.train.device))
        return RunData(data.train, data.val, data)
    if cfg.data.format == "prompts":  # held-out prompts are scored by reward (cli.train), not by a val loss
        return RunData(data.train, None, data)
    seq_len = cfg.data.seq_len
    val = data.windows("val", seq_len) if data.meta["val_tokens"] > seq_len else None
    return RunData(data.windows("train", seq_len, seed=cfg.train.seed), val, data)


def build_objective(cfg: RunConfig, model: Transformer, hidden_fn=None, tokenizer=None) -> Objective:
    """What the run optimizes: next-token cross-entropy for text and SFT data (engine.train.objectives), a
    preference loss for train.objective "dpo" (engine.train.dpo), or GRPO (engine.train.grpo)."""
    if cfg.train.objective == "dpo":
        return build_dpo_objective(cfg, model, hidden_fn)
    if cfg.train.objective == "grpo":
        return build_grpo(cfg, model, tokenizer, hidden_fn)
    return TokenLoss(model, cfg.train.precision, hidden_fn)


def build_dpo_objective(cfg: RunConfig, model: Transformer, hidden_fn=None) -> Objective:
    """DPOLoss with the run's reference: none (simpo/orpo), precomputed, the LoRA base, or a frozen copy."""
    dpo, ref_model = cfg.dpo, None
    if not dpo.needs_reference:
        reference = None
    elif dpo.precompute_ref:
        reference = "batch"
    elif cfg.lora is not None:
        reference = "adapters"
    else:  # loaded again from its files: a resumed run's weights are not the reference
        reference = "copy"
        ref_model = frozen_reference(cfg.model.from_pretrained, DTYPES[dpo.ref_dtype], model.output_weight.device)
    logger.info("dpo: %s loss, beta %g, reference: %s", dpo.loss, dpo.beta,
                {None: "none", "batch": "precomputed log-probs", "adapters": "the base model (adapters disabled)",
                 "copy": f"a frozen {dpo.ref_dtype} copy"}[reference])
    return DPOLoss(model, dpo, cfg.train.precision, hidden_fn, reference, ref_model)
