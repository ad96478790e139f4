"""Training checkpoints: written to a temp dir and renamed into place, so a crash never leaves a half one.

<out_dir>/checkpoints/step_000100/
    config.json, model*.safetensors   HF layout: loads with Transformer.from_pretrained and transformers
      (LoRA runs: adapter_config.json + adapter_model.safetensors instead, PEFT layout; the base is frozen)
    tokenizer.json, tokenizer_config.json
    optimizer.pt                      optimizer state (tensors only; read with weights_only=True)
    trainer.pt                        GradScaler state and RNG states (python, numpy, torch, cuda)
    trainer_state.json                step, tokens seen, sampler position, schedule, val/best loss
    run_config.json                   the resolved run config
"""
from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from engine.lora import is_lora, load_adapter_weights, save_adapter
from engine.weights import load_weights, weight_files

PREFIX = "step_"


def checkpoint_root(out_dir) -> Path:
    return Path(out_dir) / "checkpoints"


def rng_state() -> dict:
    """Every RNG the loop touches, as tensors and plain values (loadable with weights_only=True)."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [version, list(mt), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir, step: int, model, tokenizer, optimizer, scaler, trainer_state: dict,
                    run_config: dict) -> Path:
    """Write checkpoint `step` atomically (temp dir, then rename) and return its directory."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if is_lora(model):
            save_adapter(model, tmp)
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"scaler": scaler.state_dict() if scaler is not None else None, "rng": rng_state()},
                   tmp / "trainer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        (tmp / "run_config.json").write_text(json.dumps(run_config, indent=2))
        if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_checkpoints(out_dir) -> list[Path]:
    """Complete checkpoints, oldest first (temp dirs of interrupted saves are not listed)."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and (p / "trainer_state.json").is_file())


def find_resume(out_dir, resume: Optional[str]) -> Optional[Path]:
    """The checkpoint `resume` asks for: None, "auto" (the latest in out_dir, if any) or a path."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"resume: {path} is not a checkpoint directory (no trainer_state.json)")
    return path


def load_checkpoint(path, model, optimizer, scaler) -> dict:
    """Restore weights, optimizer, scaler and RNG states in place; return the trainer state dict."""
    path = Path(path)
    if is_lora(model):
        load_adapter_weights(model, path)
    else:
        load_weights(model, weight_files(path))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    extra = torch.load(path / "trainer.pt", weights_only=True)
    if scaler is not None and extra["scaler"] is not None:
        scaler.load_state_dict(extra["scaler"])
    set_rng_state(extra["rng"])
    return json.loads((path / "trainer_state.json").read_text())


def prune_checkpoints(out_dir, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints and the best one by val loss."""
    found = list_checkpoints(out_dir)
    states = {p: json.loads((p / "trainer_state.json").read_text()) for p in found}
    scored = [p for p in found if states[p].get("val_loss") is not None]
    best = min(scored, key=lambda p: states[p]["val_loss"]) if scored else None
    for p in found[:-keep_last]:
        if p != best:
            shutil.rmtree(p)
    for stale in checkpoint_root(out_dir).glob(".tmp-*"):  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)
