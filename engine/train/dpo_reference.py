"""DPO's `precompute_ref: true`: the reference's log-probs of every pair, computed in one pass before training.

The reference (model.from_pretrained, as loaded for training: fp32, or lora.base_dtype for a LoRA run) is loaded,
run over the train and val pairs in eval mode under train.precision, and freed; its [N, 2] log-probs are cached in
<processed_dir>/pref-ref-<hash>/, keyed by the tokenized pairs' key (inputs, tokenizer, seq_len, options), the
model files' paths/sizes/mtimes, the precision and the dtype. Batches then carry "ref_logps" and no reference model
is held during training. Under torchrun rank 0 builds the cache first and the other ranks read it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from engine.config import RunConfig
from engine.data.cache import clear_stale, digest, fingerprint, publish_cache
from engine.data.documents import DataError
from engine.dtypes import DTYPES
from engine.model.hf_format import resolve_model_dir
from engine.train.dpo import frozen_reference, pairs_logps

logger = logging.getLogger("engine.train.dpo_reference")
REF_CACHE_VERSION = 1
MODEL_SUFFIXES = (".json", ".safetensors", ".bin", ".gguf")


def _model_files(source: str) -> list[Path]:
    path = resolve_model_dir(source)
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in MODEL_SUFFIXES)


def attach_precomputed_reference(cfg: RunConfig, data, device: torch.device) -> Path:
    """Set data.train.ref_logps (and data.val's) from the cache, computing it first if missing; the cache dir."""
    dtype = cfg.lora.base_dtype if cfg.lora is not None else "fp32"
    key = {"format": f"pref-ref-{REF_CACHE_VERSION}", "pairs": data.key,
           "model": fingerprint(_model_files(cfg.model.from_pretrained)), "precision": cfg.train.precision,
           "dtype": dtype}
    cache = Path(cfg.data.processed_dir) / f"pref-ref-{digest(key)}"
    clear_stale(cache)
    splits = {"train": data.train, "val": data.val}
    if (cache / "meta.json").is_file():
        logger.info("dpo: reusing reference log-probs %s", cache)
    else:
        logger.info("dpo: computing the reference log-probs of %s pairs (one pass, precompute_ref)",
                    sum(len(p) for p in splits.values() if p is not None))
        ref = frozen_reference(cfg.model.from_pretrained, DTYPES[dtype], device)
        values = {s: pairs_logps(ref, p, cfg.train.batch_size, device, cfg.train.precision).numpy()
                  for s, p in splits.items() if p is not None}
        del ref
        for split, v in values.items():
            bad = np.flatnonzero(~np.isfinite(v).all(1))
            if len(bad):
                raise DataError(f"dpo.precompute_ref: the reference log-probs of {split} pair {int(bad[0])} (of "
                                f"{len(bad)}) are not finite; check model.from_pretrained and the data")

        def fill(tmp: Path) -> None:
            np.savez(tmp / "ref_logps.npz", **values)
            (tmp / "meta.json").write_text(json.dumps({"key": key}, indent=2) + "\n")

        publish_cache(cache, fill)
    with np.load(cache / "ref_logps.npz") as f:
        for split, pairs in splits.items():
            if pairs is not None:
                pairs.ref_logps = f[split].astype(np.float32)
    return cache
