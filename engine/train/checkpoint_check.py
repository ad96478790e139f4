"""Checking a training checkpoint before anything in it is used: every problem is one CheckpointError line
naming the file (and the tensor or key), so a bad checkpoint never surfaces as a raw traceback or, worse,
as an optimizer stepping with moments of the wrong shape.

A checkpoint is complete when its COMPLETE marker exists: save_checkpoint writes it last, inside the temp
dir, listing every file and its size. Checkpoints written before the marker existed count as complete when
all the files a save writes are there (the old save renamed a finished temp dir, so a partial one could only
come from a kill while it deleted an older copy of the same step).
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import torch

from engine.model.hf_format import INDEX_FILE, SINGLE_FILE, WeightsError

MARKER = "COMPLETE"
ADAPTER_FILE = "adapter_model.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq", "master_param")  # per-parameter tensors shaped like the parameter


class CheckpointError(WeightsError):
    """A checkpoint is incomplete, truncated, corrupt or does not fit the run; the message names the file."""


def file_sizes(directory: Path) -> dict[str, int]:
    """Every file under `directory` (relative POSIX path -> bytes): what the COMPLETE marker records."""
    out = {}
    for here, _, names in os.walk(directory):
        for name in names:
            p = Path(here) / name
            out[p.relative_to(directory).as_posix()] = p.stat().st_size
    return dict(sorted(out.items()))


def marker_text(directory: Path, step: int) -> str:
    return json.dumps({"step": step, "files": file_sizes(directory)}, indent=2)


def is_complete(path: Path) -> bool:
    """True if the save of `path` finished (COMPLETE marker, or every file of a pre-marker checkpoint)."""
    if (path / MARKER).is_file():
        return True
    has_weights = any((path / f).is_file() for f in (SINGLE_FILE, INDEX_FILE, ADAPTER_FILE))
    has_optim = (path / "optimizer.pt").is_file() or (path / "dcp" / ".metadata").is_file()
    has_trainer = (path / "trainer.pt").is_file() or (path / "trainer_rank0.pt").is_file()
    return (path / "trainer_state.json").is_file() and has_weights and has_optim and has_trainer


def check_files(path: Path) -> None:
    """Every file the COMPLETE marker lists is there with its recorded size (catches truncation and loss)."""
    marker = path / MARKER
    if not marker.is_file():
        return  # a pre-marker checkpoint: is_complete checked its files exist
    try:
        files = json.loads(marker.read_text())["files"]
        assert isinstance(files, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise CheckpointError(f"{marker}: not a valid COMPLETE marker (expected JSON with a 'files' object)") from None
    for name, size in files.items():
        p = path / name
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (the checkpoint was saved with it; {size} bytes)")
        if p.stat().st_size != size:
            raise CheckpointError(f"{p}: {p.stat().st_size} bytes, but it was saved with {size}: the file is "
                                  "truncated or was changed; resume from another checkpoint (resume=<dir>)")


def read_trainer_state(path: Path) -> dict:
    """trainer_state.json of checkpoint `path`, checked: a JSON object with a non-negative integer step."""
    file = path / "trainer_state.json"
    try:
        state = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing (not a checkpoint directory)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(state).__name__}")
    for key in ("step", "tokens_seen"):
        value = state.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"{file}: '{key}' must be a non-negative integer, got {value!r}")
    return state


def load_pt(file: Path) -> dict:
    """torch.load(weights_only=True) of a checkpoint's .pt file, its failures as one CheckpointError line."""
    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing") from None
    except pickle.UnpicklingError:  # weights_only refused an object: torch's hint (weights_only=False) is unsafe
        raise CheckpointError(f"{file}: not a checkpoint file this engine wrote (it holds Python objects beyond "
                              "tensors and plain values; refusing to unpickle it)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{file}: truncated or corrupt ({reason})") from None


def check_trainer_extra(file: Path, extra) -> dict:
    if not isinstance(extra, dict) or "rng" not in extra or "scaler" not in extra:
        raise CheckpointError(f"{file}: expected the trainer state (keys 'scaler' and 'rng'), got "
                              f"{sorted(extra) if isinstance(extra, dict) else type(extra).__name__}")
    return extra


def param_names(model, optimizer) -> list[str]:
    """The name of each optimizer parameter, in state_dict index order (index i is the i-th param)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names.get(id(p), f"#{i}") for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])]


def _allowed_dtypes(p: torch.Tensor) -> set:
    # kernels.AdamW keeps fp32 moments (and an fp32 master copy) for bf16/fp16 params; torch's AdamW uses p.dtype
    return {p.dtype, torch.float64 if p.dtype == torch.float64 else torch.float32}


def check_optimizer_state(file: Path, state_dict, model, optimizer) -> None:
    """The optimizer state in `file` fits `optimizer` over `model`: groups, parameter counts, and every
    per-parameter tensor's shape and dtype. Raises CheckpointError naming the file and the parameter."""
    if not (isinstance(state_dict, dict) and isinstance(state_dict.get("state"), dict)
            and isinstance(state_dict.get("param_groups"), list)):
        raise CheckpointError(f"{file}: expected an optimizer state dict (keys 'state' and 'param_groups')")
    saved_groups, groups = state_dict["param_groups"], optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise CheckpointError(f"{file}: {len(saved_groups)} parameter groups, this run's optimizer has {len(groups)}")
    for i, (saved, group) in enumerate(zip(saved_groups, groups)):
        n = len(saved.get("params", [])) if isinstance(saved, dict) else -1
        if n != len(group["params"]):
            raise CheckpointError(f"{file}: parameter group {i} holds {n} parameters, this model has "
                                  f"{len(group['params'])} there (a checkpoint of another model or LoRA setup?)")
    names = param_names(model, optimizer)
    params = [p for g in groups for p in g["params"]]
    index = {idx: k for k, idx in enumerate(i for g in saved_groups for i in g["params"])}
    for idx, entry in state_dict["state"].items():
        if idx not in index or not isinstance(entry, dict):
            raise CheckpointError(f"{file}: state for parameter index {idx!r}, which no parameter group lists")
        p, name = params[index[idx]], names[index[idx]]
        for key, t in entry.items():
            if key not in MOMENTS:
                continue
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(p.shape):
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise CheckpointError(f"{file}: '{key}' of parameter '{name}' has shape {got}, the parameter "
                                      f"has {list(p.shape)}")
            if t.dtype not in _allowed_dtypes(p):
                raise CheckpointError(f"{file}: '{key}' of parameter '{name}' is {t.dtype}, expected one of "
                                      f"{sorted(str(d) for d in _allowed_dtypes(p))} for a {p.dtype} parameter")


def check_dcp_state(directory: Path, state: dict) -> None:
    """The tensors a sharded checkpoint (dcp/) stores have the shapes `state` expects (dcp.load casts dtypes):
    {"model": {fqn: tensor}, "optim": {"state": {fqn: {key: tensor}}}}. Missing entries are left to dcp.load."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        stored = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    except Exception as e:  # a missing, truncated or foreign .metadata: torch raises several kinds
        raise CheckpointError(f"{directory / '.metadata'}: unreadable, truncated or corrupt "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    expected = {f"model.{k}": (k, None, v) for k, v in state["model"].items()}
    for fqn, entry in state["optim"].get("state", {}).items():
        expected.update({f"optim.state.{fqn}.{k}": (fqn, k, v) for k, v in entry.items() if k in MOMENTS})
    for key, (fqn, moment, t) in expected.items():
        md = stored.get(key)
        if not isinstance(md, TensorStorageMetadata) or not isinstance(t, torch.Tensor):
            continue
        what = f"'{moment}' of parameter '{fqn}'" if moment else f"parameter '{fqn}'"
        if tuple(md.size) != tuple(t.shape):
            raise CheckpointError(f"{directory}: {what} has shape {list(md.size)}, the parameter has {list(t.shape)}")
