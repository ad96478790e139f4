"""Training checkpoints: written to a temp dir and renamed into place, so a crash never leaves a half one.

<out_dir>/checkpoints/step_000100/
    config.json, model*.safetensors   HF layout: loads with Transformer.from_pretrained and transformers
      (LoRA runs: adapter_config.json + adapter_model.safetensors instead, PEFT layout; the base is frozen)
    tokenizer.json, tokenizer_config.json
    optimizer.pt                      optimizer state (tensors only; read with weights_only=True)
    trainer.pt                        GradScaler state and RNG states (python, numpy, torch, cuda)
    trainer_state.json                step, tokens seen, sampler position, schedule, val/best loss
    run_config.json                   the resolved run config

Under torchrun (engine.train.distributed) a checkpoint holds the same files except the optimizer, plus:
    dcp/                              model + optimizer state via torch.distributed.checkpoint: sharded
                                      under FSDP, resumable on any number of ranks (it reshards)
    trainer_rank<R>.pt                each rank's GradScaler and RNG states (instead of trainer.pt)
The HF-format weights are still the full model (gathered to rank 0), so every checkpoint loads with
Transformer.from_pretrained and transformers whatever the run's strategy was.
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

from engine.train.distributed import SINGLE, Dist, full_params
from engine.adapters.lora import is_lora
from engine.adapters.peft_format import load_adapter_weights, save_adapter
from engine.model.hf_format import load_weights, save_pretrained, weight_files

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
                    run_config: dict, group: Dist = SINGLE, module=None) -> Path:
    """Write checkpoint `step` atomically (temp dir, then rename) and return its directory.

    Distributed (group.enabled): every rank calls this; `module` is the wrapped training module whose
    state (with the optimizer's) goes to dcp/, and rank 0 writes the files that exist once.
    """
    root = checkpoint_root(out_dir)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}" if group.is_main else None
    tmp = group.broadcast(tmp)  # one temp dir for all ranks
    try:
        if group.is_main:
            tmp.mkdir(parents=True)
        group.barrier()
        if group.enabled:
            _save_sharded(tmp, model, optimizer, module, group)
            torch.save(_trainer_extra(scaler), tmp / f"trainer_rank{group.rank}.pt")
        else:
            save_model(tmp, model)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(_trainer_extra(scaler), tmp / "trainer.pt")
        if group.is_main:
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
            (tmp / "run_config.json").write_text(json.dumps(run_config, indent=2))
        group.barrier()  # every rank's files are in tmp before it becomes the checkpoint
        if group.is_main:
            if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
                shutil.rmtree(final)
            os.rename(tmp, final)
        group.barrier()
    except BaseException:
        if group.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _trainer_extra(scaler) -> dict:
    return {"scaler": scaler.state_dict() if scaler is not None else None, "rng": rng_state()}


def save_model(directory: Path, model, params=None) -> None:
    """HF-layout weights (or the PEFT adapter of a LoRA model); `params` replace the model's own
    tensors (FSDP's gathered ones, see engine.distributed.full_params)."""
    if is_lora(model):
        save_adapter(model, directory, params)
    else:
        save_pretrained(model, directory, params=params)


def _state_dict_options(model):
    """A LoRA checkpoint holds the adapters only: frozen base weights are left out when saving, and are not
    expected when loading (they come from the base model). dcp.load still fails on any adapter tensor missing
    from the checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    lora = is_lora(model)
    return StateDictOptions(ignore_frozen_params=lora, strict=not lora)


def _save_sharded(directory: Path, model, optimizer, module, group: Dist) -> None:
    """dcp/ from every rank, and the full model in HF layout from rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(module, optimizer, options=_state_dict_options(model))
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=directory / "dcp")
    params = full_params(model, group)
    if group.is_main:
        save_model(directory, model, params)


def is_sharded(path) -> bool:
    """True for a checkpoint written under torchrun (state in dcp/)."""
    return (Path(path) / "dcp").is_dir()


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


def load_model_weights(path, model) -> None:
    """Weights of a one-process checkpoint (HF layout, or the adapter of a LoRA run) into `model`.

    Call before DDP/FSDP wraps the model; sharded checkpoints load their weights in load_training_state.
    """
    path = Path(path)
    if is_lora(model):
        load_adapter_weights(model, path)
    else:
        load_weights(model, weight_files(path))


def load_training_state(path, model, optimizer, scaler, group: Dist = SINGLE, module=None) -> dict:
    """Restore optimizer, scaler and RNG states (and, from a sharded checkpoint, the weights) in place;
    return the trainer state dict. A sharded checkpoint loads on any number of ranks, one process included.
    """
    path = Path(path)
    if is_sharded(path):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        module = module if module is not None else model
        model_state, optim_state = get_state_dict(module, optimizer, options=_state_dict_options(model))
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=path / "dcp", no_dist=not torch.distributed.is_initialized())
        set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=_state_dict_options(model))
    else:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
        _shard_optimizer_state(optimizer)
    own = [path / f"trainer_rank{group.rank}.pt", path / "trainer_rank0.pt", path / "trainer.pt"]
    extra = torch.load(next(p for p in own if p.is_file()), weights_only=True)
    if scaler is not None and extra["scaler"] is not None:
        scaler.load_state_dict(extra["scaler"])
    set_rng_state(extra["rng"])
    return json.loads((path / "trainer_state.json").read_text())


def _shard_optimizer_state(optimizer) -> None:
    """A one-process optimizer state loaded under FSDP holds full tensors: cut them like their params."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for p, state in optimizer.state.items():
        if not isinstance(p, DTensor):
            continue
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.shape == p.shape:
                state[key] = distribute_tensor(value, p.device_mesh, p.placements)


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
