"""Read and write Hugging Face checkpoints (config.json + safetensors, single file or sharded).

Loading builds the model on the meta device, allocates it once in the target dtype, then copies the
tensors in one at a time through `safe_open`, so peak memory is the model plus one tensor.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from engine.config import ConfigError
from engine.files import atomic_write
from engine.model.families import Stored, config_from_hf, config_to_hf, stored_as, weight_layout

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


class WeightsError(ValueError):
    """A checkpoint file or tensor is missing, corrupt or of the wrong shape; the message names it."""


def resolve_model_dir(path_or_hub_id: str | os.PathLike) -> Path:
    """A local directory as is; anything else is a hub id fetched (or found in the offline cache)."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(path_or_hub_id).startswith((".", "/", "~")) or str(path_or_hub_id).count("/") > 1:
        raise WeightsError(f"{path}: not a model directory")
    from huggingface_hub import snapshot_download

    # huggingface_hub reads these once at import; read them per call so a script can set them late.
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    try:
        return Path(snapshot_download(str(path_or_hub_id), allow_patterns=["*.json", "*.safetensors", "*.jinja"],
                                      cache_dir=os.environ.get("HF_HUB_CACHE"), local_files_only=offline))
    except Exception as e:  # network, auth, not-found and offline-cache misses all end here
        raise WeightsError(f"'{path_or_hub_id}' is not a local directory and could not be fetched from the "
                           f"Hugging Face hub ({type(e).__name__}: {e})") from None


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise WeightsError(f"{path}: missing ({what})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None


def read_config(directory: Path):
    """The ModelConfig of an HF model directory."""
    path = directory / "config.json"
    try:
        return config_from_hf(read_json(path, "expected the model's config.json"), source=str(path))
    except (TypeError, ValueError) as e:
        if isinstance(e, (WeightsError, ConfigError)):
            raise
        raise ConfigError(f"{path}: {e}") from None


def weight_files(directory: Path) -> dict[str, Path]:
    """Map every stored tensor name to the safetensors file holding it (sharded or not)."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{index}: expected a 'weight_map' object of tensor name -> shard file")
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).is_file():
                raise WeightsError(f"{directory / shard}: shard listed in {index.name} is missing")
        return {name: directory / shard for name, shard in weight_map.items()}
    single = directory / SINGLE_FILE
    if not single.is_file():
        raise WeightsError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} found")
    with _open(single) as f:
        return {name: single for name in f.keys()}


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a valid safetensors file, truncated or corrupt ({e})") from None


def _read(f, path: Path, name: str, spec: Stored, shape: torch.Size) -> torch.Tensor:
    """Read one native tensor: the right slice of the stored tensor, transposed back if needed."""
    sl = f.get_slice(name)
    stored = list(shape[::-1] if spec.transposed else shape)
    split_dim = len(stored) - 1 if spec.transposed else 0
    stored[split_dim] *= spec.parts
    if list(sl.get_shape()) != stored:
        raise WeightsError(f"{path}: tensor '{name}' has shape {list(sl.get_shape())}, expected {stored}")
    size = stored[split_dim] // spec.parts
    index = [slice(None)] * len(stored)
    index[split_dim] = slice(spec.part * size, (spec.part + 1) * size)
    try:
        t = sl[tuple(index)] if spec.parts > 1 else f.get_tensor(name)
    except (SafetensorError, RuntimeError, ValueError) as e:
        raise WeightsError(f"{path}: cannot read tensor '{name}', file truncated or corrupt ({e})") from None
    return t.t() if spec.transposed else t


def load_pretrained(cls, path_or_hub_id, dtype=None, device=None):
    """Build `cls(config)` from an HF directory or hub id and fill it with the stored weights."""
    directory = resolve_model_dir(path_or_hub_id)
    cfg = read_config(directory)
    files = weight_files(directory)
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to(dtype or torch.float32).to_empty(device=device or "cpu")
    model.tie_weights()  # to_empty allocates each module's parameters separately
    load_weights(model, files)
    model._rope_cache = {}
    return model.eval()


def load_weights(model, files: dict[str, Path]) -> None:
    """Copy every parameter of `model` from `files` (tensor name -> safetensors path), strictly."""
    layout = weight_layout(model.config)
    present = set(files)
    prefix = layout.optional_prefix
    if prefix and not any(n.startswith(prefix) for n in present):  # old GPT-2 files without "transformer."
        def in_file(name): return name.removeprefix(prefix)
    else:
        def in_file(name): return name
    plan = {}  # name in the file -> [(spec, param)]; several params when a fused tensor is split
    params = dict(model.named_parameters())  # tied weights appear once, under the embedding name
    for native, param in params.items():
        spec = stored_as(layout, native)
        plan.setdefault(in_file(spec.name), []).append((spec, param))
    missing = sorted(set(plan) - present)
    if missing:
        raise WeightsError(f"{_where(files)}: missing tensor(s) {', '.join(missing[:8])}"
                           + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    head = in_file(stored_as(layout, "lm_head.weight").name)
    unexpected = sorted(n for n in present - set(plan) if not n.endswith(layout.ignored_suffixes) and n != head)
    if unexpected:
        raise WeightsError(f"{_where(files)}: unexpected tensor(s) {', '.join(unexpected[:8])}"
                           + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""))
    by_file: dict[Path, list] = {}
    for name in plan:
        by_file.setdefault(files[name], []).append(name)
    with torch.no_grad():
        for path, names in by_file.items():
            with _open(path) as f:
                for name in names:
                    for spec, param in plan[name]:
                        param.copy_(_read(f, path, name, spec, param.shape))
        if model.config.tie_word_embeddings and head in present and head not in plan:
            _check_tied_head(files[head], head, model.embed.weight)


def _check_tied_head(path: Path, name: str, embedding: torch.Tensor) -> None:
    """A tied model may still store lm_head.weight; it must then equal the embedding."""
    with _open(path) as f:
        stored = f.get_tensor(name)
    if stored.shape != embedding.shape or not torch.equal(stored.to(embedding.dtype), embedding):
        raise WeightsError(f"{path}: '{name}' differs from the embedding but config.json sets "
                           "tie_word_embeddings=true; set it to false to use an untied head")


def _where(files: dict) -> str:
    paths = sorted({str(p) for p in files.values()})
    return paths[0] if len(paths) == 1 else str(Path(paths[0]).parent)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    for unit, scale in sorted(units.items(), key=lambda u: -len(u[0])):
        if size.upper().endswith(unit):
            return int(float(size[: -len(unit)]) * scale)
    return int(size)


def hf_state_dict(model, params: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under HF names and layouts (fused and transposed where the family stores them so).

    `params` (our name -> tensor) replaces the model's own parameters, e.g. the gathered full tensors of
    an FSDP-sharded model; names it has beyond model.named_parameters() (a tied head) are ignored.
    """
    layout = weight_layout(model.config)
    grouped: dict[str, dict[int, tuple[Stored, torch.Tensor]]] = {}
    named = dict(model.named_parameters())  # tied head skipped: named_parameters dedups it
    if params is not None:
        named = {name: params[name] for name in named}
    for native, param in named.items():
        spec = stored_as(layout, native)
        grouped.setdefault(spec.name, {})[spec.part] = (spec, param.detach())
    out = {}
    for name, parts in grouped.items():
        spec = parts[0][0]
        tensors = [parts[i][1] for i in range(spec.parts)]
        t = torch.cat(tensors, dim=0) if spec.parts > 1 else tensors[0]
        out[name] = (t.t() if spec.transposed else t).contiguous()
    return out


def save_pretrained(model, directory, max_shard_size: int | str = "2GB",
                    params: dict[str, torch.Tensor] | None = None) -> None:
    """Write config.json and safetensors in HF layout; above `max_shard_size`, shards plus an index.
    `params`: tensors to write instead of the model's own (see hf_state_dict)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model, params)
    limit = _parse_size(max_shard_size)
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    hf_config = config_to_hf(model.config)
    hf_config["torch_dtype"] = str(model.embed.weight.dtype).removeprefix("torch.")
    stale = [directory / SINGLE_FILE, directory / INDEX_FILE, *directory.glob("model-*-of-*.safetensors")]
    for p in stale:  # a previous save with another sharding must not leave files that confuse loaders
        p.unlink(missing_ok=True)
    if len(shards) == 1:
        _atomic_save(shards[0], directory / SINGLE_FILE)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save(shard, directory / fname)
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        atomic_write(directory / INDEX_FILE,
                     json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    atomic_write(directory / "config.json", json.dumps(hf_config, indent=2, sort_keys=True))


def _atomic_save(tensors: dict, path: Path) -> None:
    # serialized in memory (one shard, at most max_shard_size) so engine.files writes it atomically and durably
    atomic_write(path, save(tensors, metadata={"format": "pt"}))
