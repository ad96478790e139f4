"""One out_dir, one run: a fresh run never mixes with an old one's files, and a resumed checkpoint must come
from the same model and data.

`claim_out_dir` runs on rank 0 before anything is written. A fresh run (resume: null) into a directory that
holds a previous run (checkpoints, metrics.jsonl or final/) stops with a ConfigError unless `overwrite: true`,
which removes that run's files first. A checkpoint to resume is compared with this config on the keys that
define the model and the data (`IDENTITY_KEYS`); hyperparameters (lr, max_steps, ...) may change freely.
"""
from __future__ import annotations

import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Optional

from engine.config import ConfigError, RunConfig
from engine.data.text import DataError, expand_paths
from engine.train.checkpoint import checkpoint_root, find_resume, list_checkpoints

logger = logging.getLogger("engine.train.run_dir")

RUN_FILES = ("checkpoints", "metrics.jsonl", "final")  # what makes a directory hold a run
OVERWRITTEN = RUN_FILES + ("loss.png", "tensorboard", "run_config.json")  # what overwrite: true removes
TRASH_PREFIX = ".trash-"  # renamed here first, then deleted: a kill mid-delete never leaves half a checkpoint
# A checkpoint belongs to this run when these agree (data.processed_dir is a cache location, not the data)
IDENTITY_KEYS = ("model", "data.train", "data.val", "data.val_fraction", "data.seq_len", "data.text_field",
                 "data.format", "data.sft", "lora.rank", "lora.targets", "lora.rslora")


def previous_run(out_dir: Path) -> list[str]:
    """The names of the run files in `out_dir` ([] when it holds no run)."""
    found = []
    for name in RUN_FILES:
        path = out_dir / name
        if name == "checkpoints":
            if path.is_dir() and any(p.name.startswith("step_") for p in path.iterdir()):
                found.append(f"{name}/ ({', '.join(p.name for p in list_checkpoints(out_dir)) or 'partial'})")
        elif path.exists():
            found.append(name + ("/" if path.is_dir() else ""))
    return found


def claim_out_dir(cfg: RunConfig) -> Optional[Path]:
    """Rank 0, before anything is written: the checkpoint to resume, or None to start fresh (having refused a
    directory that holds another run, or removed that run with overwrite: true)."""
    out_dir = Path(cfg.out_dir)
    _remove_trash(out_dir)
    if cfg.resume is None:
        found = previous_run(out_dir)
        if found and not cfg.overwrite:
            raise ConfigError(f"out_dir: {out_dir} already holds a run ({', '.join(found)}); continue it with "
                              f"--set resume=auto, replace it with --set overwrite=true, or choose another out_dir")
        if found:
            logger.warning("overwrite: removing the previous run in %s (%s)", out_dir, ", ".join(found))
            _remove(out_dir, OVERWRITTEN)
        return None
    resume_from = find_resume(out_dir, cfg.resume)
    if resume_from is None:
        logger.info("resume=auto: no checkpoint in %s; starting a fresh run", checkpoint_root(out_dir))
        return None
    check_belongs(cfg, resume_from)
    return resume_from


def check_belongs(cfg: RunConfig, checkpoint: Path) -> None:
    """ConfigError naming every IDENTITY_KEYS value in which `checkpoint`'s run_config.json differs from `cfg`."""
    saved_file = checkpoint / "run_config.json"
    if not saved_file.is_file():
        logger.warning("resume: %s has no run_config.json; cannot check that it is a checkpoint of this model "
                       "and data", checkpoint)
        return
    saved, ours = json.loads(saved_file.read_text()), json.loads(json.dumps(cfg.to_dict()))
    diffs = []
    for key in IDENTITY_KEYS:
        a, b = _get(saved, key), _get(ours, key)
        if key in ("data.train", "data.val") and _same_files(a, b, key):
            continue
        diffs += [f"{k}: {x!r} -> {y!r}" for k, x, y in _leaf_diffs(key, a, b)]
    if not diffs:
        return
    message = (f"resume: {checkpoint} is a checkpoint of a different run ({'; '.join(diffs[:6])}"
               f"{'; ...' if len(diffs) > 6 else ''}; checkpoint -> this config)")
    if not cfg.strict_resume:
        logger.warning("%s; resuming anyway (strict_resume: false)", message)
        return
    raise ConfigError(f"{message}. Restore those values to continue it, or --set strict_resume=false to resume "
                      f"it anyway, or start a new run from its weights with model.from_pretrained={checkpoint}")


def _get(tree: dict, key: str):
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _leaf_diffs(key: str, a, b) -> list[tuple[str, object, object]]:
    """(key path, a's value, b's value) for every leaf where the two parsed JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in dict.fromkeys([*a, *b]) for d in _leaf_diffs(f"{key}.{k}", a.get(k), b.get(k))]
    return [] if a == b else [(key, a, b)]


def _same_files(a, b, key: str) -> bool:
    """Data paths that name the same files (by name and size) count as the same data, wherever they are now:
    a copied or moved corpus is still the corpus the checkpoint was trained on."""
    if a == b:
        return True
    try:
        files = [sorted((p.name, p.stat().st_size) for p in expand_paths(paths, key)) for paths in (a, b)]
    except (DataError, OSError, TypeError):
        return False
    return files[0] == files[1]


def _remove(out_dir: Path, names) -> None:
    for name in names:
        path = out_dir / name
        if path.is_dir():
            trash = out_dir / f"{TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
            path.rename(trash)
            shutil.rmtree(trash)
        elif path.exists():
            path.unlink()


def _remove_trash(out_dir: Path) -> None:
    """What a kill during an overwrite left behind."""
    if out_dir.is_dir():
        for stale in out_dir.glob(f"{TRASH_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
