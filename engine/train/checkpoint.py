"""Training checkpoints: written to a temp dir, fsynced and renamed into place (engine.files), so neither a
kill nor a power loss leaves a half one; every file is checked on resume (engine.train.checkpoint_check).

<out_dir>/checkpoints/step_000100/
    config.json, model*.safetensors   HF layout: loads with Transformer.from_pretrained and transformers
      (LoRA runs: adapter_config.json + adapter_model.safetensors instead, PEFT layout; the base is frozen)
    tokenizer.json, tokenizer_config.json
    optimizer.pt                      optimizer state (tensors only; read with weights_only=True)
    trainer.pt                        GradScaler state and RNG states (python, numpy, torch, cuda)
    trainer_state.json                step, tokens seen, sampler position, schedule, val/best loss
    run_config.json                   the resolved run config
    COMPLETE                          written last: every file and its size (resume=auto skips a dir without it)

Under torchrun (engine.train.distributed) a checkpoint holds the same files except the optimizer, plus:
    dcp/                              model + optimizer state via torch.distributed.checkpoint: sharded
                                      under FSDP, resumable on any number of ranks (it reshards)
    trainer_rank<R>.pt                each rank's GradScaler and RNG states (instead of trainer.pt)
The HF-format weights are still the full model (gathered to rank 0), so every checkpoint loads with
Transformer.from_pretrained and transformers whatever the run's strategy was.
"""
from __future__ import annotations

import errno
import json
import logging
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from engine.train.distributed import SINGLE, Dist, full_params
from engine.adapters.lora import is_lora
from engine.adapters.peft_format import load_adapter_weights, save_adapter
from engine.files import TEMP_PREFIX, atomic_write, crash_point, publish_dir, remove_stale_temps, temp_dir_beside, write_dir
from engine.model.hf_format import load_weights, save_pretrained, weight_files
from engine.train.checkpoint_check import (MARKER, CheckpointError, check_dcp_state, check_files, check_optimizer_state,
                                           check_trainer_extra, is_complete, load_pt, marker_text, read_trainer_state)

logger = logging.getLogger("engine.train.checkpoint")
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
    """Write checkpoint `step` atomically and durably (temp dir, COMPLETE marker last, fsync, rename) and
    return its directory. Re-saving an existing step swaps the new copy in by rename-aside-then-rename, so
    a kill at any instant leaves a complete copy (recovered by recover_interrupted_save).

    Distributed (group.enabled): every rank calls this; `module` is the wrapped training module whose
    state (with the optimizer's) goes to dcp/, and rank 0 writes the files that exist once.
    """
    root = checkpoint_root(out_dir)
    final = root / f"{PREFIX}{step:06d}"
    tmp = temp_dir_beside(final) if group.is_main else None
    tmp = group.broadcast(tmp)  # one temp dir for all ranks
    try:
        group.barrier()
        with disk_full_as_error(final, model, optimizer):
            _write_files(tmp, model, tokenizer, optimizer, scaler, trainer_state, run_config, group, module)
            group.barrier()  # every rank's files are in tmp before it becomes the checkpoint
            if group.is_main:
                atomic_write(tmp / MARKER, marker_text(tmp, step))  # last: its presence means "complete"
                crash_point(f"checkpoint:written:{final.name}")  # fault tests aim kills at one save
                publish_dir(tmp, final, replace=True)  # fsyncs every file and dir, then the rename
                crash_point(f"checkpoint:published:{final.name}")
        group.barrier()
    except BaseException:
        if group.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_files(tmp: Path, model, tokenizer, optimizer, scaler, trainer_state, run_config, group, module):
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


@contextmanager
def disk_full_as_error(final: Path, model, optimizer=None):
    """A full disk while saving `final` becomes one CheckpointError line with the bytes needed."""
    try:
        yield
    except Exception as e:
        need = _bytes_to_save(model, optimizer)
        free = shutil.disk_usage(final.parent).free if final.parent.is_dir() else 0
        if not _is_disk_full(e, need, free):
            raise
        where = getattr(e, "filename", None) or final
        kept = "; what was there before is intact" if final.parent.is_dir() else ""
        raise CheckpointError(f"{final}: disk full while writing {where} (it needs about {need / 1e6:.1f} MB, "
                              f"{free / 1e6:.1f} MB free){kept}") from None


def _is_disk_full(e: Exception, need: int, free: int) -> bool:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    text = str(e)
    if "No space left on device" in text or "os error 28" in text:  # the tokenizers library (Rust) says so
        return True
    # torch.save's C++ writer loses the errno ("PytorchStreamWriter failed writing file ..."): judge by space
    return isinstance(e, RuntimeError) and "write" in text.lower() and free < need


def _bytes_to_save(model, optimizer) -> int:
    """About what a checkpoint of `model` takes: the weights it writes plus the optimizer's tensors."""
    params = [p for p in model.parameters() if p.requires_grad] if is_lora(model) else list(model.parameters())
    states = optimizer.state.values() if optimizer is not None else []
    tensors = params + [t for s in states for t in s.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def save_final(directory: Path, model, tokenizer, params=None) -> Path:
    """The trained model (or a LoRA run's adapter) and its tokenizer as one directory, published atomically
    and durably: an existing copy is replaced only once the new one is complete."""
    def fill(tmp: Path) -> None:
        save_model(tmp, model, params)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    with disk_full_as_error(Path(directory), model):
        write_dir(Path(directory), fill)
    return Path(directory)


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
    """Complete checkpoints, oldest first (temp dirs of interrupted saves and incomplete dirs are not listed)."""
    return [p for p in _step_dirs(out_dir) if is_complete(p)]


def _step_dirs(out_dir) -> list[Path]:
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def recover_interrupted_save(out_dir) -> list[Path]:
    """Undo what a kill during save_checkpoint left: a `.old-step_N-*` copy set aside with no step_N is
    renamed back, then leftover temp dirs are deleted. Returns what was removed. Only the main process
    may call it, before the run starts (no other process writes there then)."""
    removed = remove_stale_temps(checkpoint_root(out_dir))
    if removed:
        logger.info("checkpoints: removed %s left by an interrupted save", ", ".join(p.name for p in removed))
    return removed


def find_resume(out_dir, resume: Optional[str], group: Dist = SINGLE) -> Optional[Path]:
    """The checkpoint `resume` asks for: None, "auto" (the latest complete one in out_dir, if any) or a path.

    "auto" first recovers an interrupted save (on the main process; the others wait), then skips, with a
    warning naming it, any checkpoint whose save did not finish. The chosen one's files are checked.
    """
    if resume is None:
        return None
    if resume == "auto":
        if group.is_main:
            recover_interrupted_save(out_dir)
        group.barrier()
        for p in _step_dirs(out_dir):
            if not is_complete(p):
                logger.warning("resume=auto: skipping %s: its save did not finish (no %s marker)", p, MARKER)
        found = list_checkpoints(out_dir)
        path = found[-1] if found else None
    else:
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"resume: {path} is not a checkpoint directory (no trainer_state.json)")
        if not is_complete(path):
            raise CheckpointError(f"resume: {path} is incomplete: its save did not finish (no {MARKER} marker)")
    if path is not None:
        check_files(path)
        read_trainer_state(path)
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
        _load_sharded(path, model, optimizer, module if module is not None else model)
    else:
        file = path / "optimizer.pt"
        saved = load_pt(file)
        check_optimizer_state(file, saved, model, optimizer)  # before the optimizer can step with it
        optimizer.load_state_dict(saved)
        _shard_optimizer_state(optimizer)
    own = [path / f"trainer_rank{group.rank}.pt", path / "trainer_rank0.pt", path / "trainer.pt"]
    file = next((p for p in own if p.is_file()), own[-1])
    extra = check_trainer_extra(file, load_pt(file))
    if scaler is not None and extra["scaler"] is not None:
        scaler.load_state_dict(extra["scaler"])
    set_rng_state(extra["rng"])
    return read_trainer_state(path)


def _load_sharded(path: Path, model, optimizer, module) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(module, optimizer, options=_state_dict_options(model))
    state = {"model": model_state, "optim": optim_state}
    check_dcp_state(path / "dcp", state)
    try:
        dcp.load(state, checkpoint_id=path / "dcp", no_dist=not torch.distributed.is_initialized())
    except (CheckpointException, RuntimeError, ValueError, KeyError, OSError, EOFError) as e:
        # CheckpointException (a BaseException) carries each rank's traceback: its last line is the reason
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path / 'dcp'}: cannot load the sharded state ({reason[:300]})") from None
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_state_dict_options(model))


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
    scores = {p: _val_loss(p) for p in found}
    scored = [p for p in found if scores[p] is not None]
    best = min(scored, key=lambda p: scores[p]) if scored else None
    for p in found[:-keep_last]:
        if p != best:
            shutil.rmtree(p)
    for stale in checkpoint_root(out_dir).glob(f"{TEMP_PREFIX}*"):  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)


def _val_loss(path: Path) -> Optional[float]:
    try:
        value = read_trainer_state(path).get("val_loss")
    except CheckpointError:  # a damaged checkpoint is never "the best" one
        return None
    return value if isinstance(value, (int, float)) else None
