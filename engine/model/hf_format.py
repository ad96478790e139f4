"""Read and write Hugging Face checkpoints (config.json + safetensors, single file or sharded).

Loading builds the model on the meta device, allocates it once in the target dtype, then copies the
tensors in one at a time through `safe_open`, so peak memory is the model plus one tensor.
"""
from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from engine.config import ConfigError
from engine.files import atomic_write
from engine.model.families import ExpertsStored, Stored, config_from_hf, config_to_hf, stored_as, weight_layout
from engine.model.gguf_read import gguf_file, load_gguf, read_gguf_config
from engine.model.model_package import PKG_PREFIX, resolve_package_ref

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
logger = logging.getLogger(__name__)


class WeightsError(ValueError):
    """A checkpoint file or tensor is missing, corrupt or of the wrong shape; the message names it."""


MODEL_FILES = ("*.json", "*.safetensors", "*.jinja")  # what from_pretrained reads (config, weights, tokenizer)
CONFIG_FILES = ("config.json",)  # what the memory planner reads
TOKENIZER_FILES = ("*.json", "*.jinja")
CONNECT_TIMEOUT_S = 5.0  # one connection attempt to the hub before anything else: fail fast, never retry


def looks_local(path_or_hub_id: str | os.PathLike) -> bool:
    """True for what can only be a local path: it exists, starts with '.', '/' or '~', has more than one
    '/' or a '\\', or its first part exists here (`runs/nope` when ./runs exists). Else it is a hub id."""
    text = str(path_or_hub_id)
    path = Path(text).expanduser()
    return (path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
            or Path(text.split("/", 1)[0]).exists())


def resolve_model_dir(path_or_hub_id: str | os.PathLike, allow_patterns=MODEL_FILES) -> Path:
    """The one resolver of every CLI: a local directory as is (a local-looking path that is not one is an
    error), else a hub id fetched (files matching `allow_patterns`) or found in the cache. A .gguf file, or
    `pkg:<package>/<file>` (a model file inside an installed package), is returned as the file's path."""
    if str(path_or_hub_id).startswith(PKG_PREFIX):
        return resolve_package_ref(str(path_or_hub_id))
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        if gguf_file(path) is not None:
            return path
        raise WeightsError(f"{path}: not a model directory (a file)")
    if looks_local(path_or_hub_id):
        raise WeightsError(f"{path}: not found, so not a model directory (a path like this is local, never a "
                           "Hugging Face hub id)")
    return _from_hub(str(path_or_hub_id), list(allow_patterns))


def _hub_unreachable(endpoint: str) -> Optional[str]:
    """Why the hub endpoint cannot be reached (one TCP connection, CONNECT_TIMEOUT_S), or None. Skipped
    behind a proxy, which only the HTTP client knows how to use."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return None
    url = urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


def _from_hub(hub_id: str, allow_patterns: list) -> Path:
    from huggingface_hub import snapshot_download

    # huggingface_hub reads these once at import; read them per call so a script can set them late.
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    kwargs = dict(allow_patterns=allow_patterns, cache_dir=os.environ.get("HF_HUB_CACHE"), endpoint=endpoint)
    download = f"download it first while online (`hf download {hub_id}`), or pass a local directory"
    why = None if offline else _hub_unreachable(endpoint)
    if offline or why:  # the cache only: huggingface_hub would retry an unreachable hub with backoff
        try:
            found = Path(snapshot_download(hub_id, local_files_only=True, **kwargs))
        except Exception:  # not cached (or cached incompletely)
            reason = "HF_HUB_OFFLINE=1 is set" if offline else f"the hub at {endpoint} is unreachable ({why})"
            raise WeightsError(f"'{hub_id}' is not a local directory and could not be fetched from the Hugging Face "
                               f"hub: {reason} and it is not in the local cache; {download}") from None
        if why:
            logger.warning("the Hugging Face hub at %s is unreachable (%s): using the cached '%s'", endpoint, why,
                           hub_id)
        return found
    try:
        return Path(snapshot_download(hub_id, **kwargs))
    except Exception as e:  # auth, not-found, network errors after the first connection
        raise WeightsError(f"'{hub_id}' is not a local directory and could not be fetched from the Hugging Face hub "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); set HF_HUB_OFFLINE=1 "
                           f"to use the local cache, or pass a local directory") from None


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise WeightsError(f"{path}: missing ({what})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None


def read_config(directory: Path):
    """The ModelConfig of an HF model directory (or of a GGUF file / a directory holding one)."""
    if gguf_file(directory) is not None:
        return read_gguf_config(gguf_file(directory))
    path = directory / "config.json"
    try:
        return config_from_hf(read_json(path, "expected the model's config.json"), source=str(path))
    except (WeightsError, ConfigError):
        raise
    except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError) as e:  # a value of a wrong kind
        raise ConfigError(f"{path}: {type(e).__name__}: {e}") from None


def check_fits(cfg, dtype: torch.dtype, device, source) -> None:
    """Refuse, before allocating, a model whose parameters alone exceed all the memory of `device`
    (total RAM for the CPU, total VRAM for a GPU; a model that fits that may still fail to load)."""
    need = cfg.num_params * torch.empty((), dtype=dtype).element_size()
    device = torch.device(device)
    if device.type == "cpu":
        have, what = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "RAM"
    elif device.type == "cuda" and torch.cuda.is_available():
        have, what = torch.cuda.get_device_properties(device).total_memory, f"memory on {device}"
    else:
        return
    if need > have:
        raise WeightsError(f"{source}: {cfg.num_params:,} parameters need {need / 2**30:,.1f} GiB in {dtype}, more "
                           f"than this machine's {have / 2**30:,.1f} GiB of {what}")


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


def _read(f, path: Path, name: str, spec: Stored, shape: torch.Size, offset: int, total: int) -> torch.Tensor:
    """Read one native tensor of `shape`: output rows [offset, offset + shape[0]) of a stored tensor that
    fuses `total` rows (the parts' sizes summed; `total == shape[0]` when unfused), transposed back if needed."""
    sl = f.get_slice(name)
    native = [total, *shape[1:]]
    stored = native[::-1] if spec.transposed else native
    if list(sl.get_shape()) != stored:
        raise WeightsError(f"{path}: tensor '{name}' has shape {list(sl.get_shape())}, expected {stored}")
    split_dim = len(stored) - 1 if spec.transposed else 0
    index = [slice(None)] * len(stored)
    index[split_dim] = slice(offset, offset + shape[0])
    try:
        t = sl[tuple(index)] if spec.parts > 1 else f.get_tensor(name)
    except (SafetensorError, RuntimeError, ValueError) as e:
        raise WeightsError(f"{path}: cannot read tensor '{name}', file truncated or corrupt ({e})") from None
    return t.t() if spec.transposed else t


def load_pretrained(cls, path_or_hub_id, dtype=None, device=None, quantize=None):
    """Build `cls(config)` from an HF directory or hub id and fill it with the stored weights; `quantize`
    ("nf4" | "int8", engine.quant) stores the block linears quantized, each as it is read."""
    directory = resolve_model_dir(path_or_hub_id)
    if gguf_file(directory) is not None:  # dequantized tensor by tensor; a quantized base is re-quantized after
        model = load_gguf(cls, gguf_file(directory), dtype, device)
        if quantize is not None:
            from engine.quant import quantize as quantize_layers
            quantize_layers(model, quantize)
        return model
    cfg = read_config(directory)
    check_fits(cfg, dtype or torch.float32, device or "cpu", directory / "config.json")
    files = weight_files(directory)
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to(dtype or torch.float32)
    if quantize is not None:  # swapped while on meta: the dense block weights are never allocated
        from engine.quant import quantize as quantize_layers
        quantize_layers(model, quantize)
    model = model.allocate(device or "cpu")  # also re-ties: each parameter got its own storage
    load_weights(model, files)
    if quantize is not None:  # quantized on arrival: give its temporaries' heap back (engine.quant.heap)
        from engine.quant.heap import trim_heap
        trim_heap()
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
    # Quantized layers (engine.quant) take their dense weight through a slot that quantizes it on copy_.
    params.update({f"{n}.weight": m.weight_slot() for n, m in model.named_modules() if hasattr(m, "weight_slot")})
    for native, param in params.items():
        spec = stored_as(layout, native)
        if isinstance(spec, ExpertsStored):  # a stacked [E, ...] parameter: each expert's tensor fills a view of it
            for name, index in spec.pieces(param.shape):
                plan.setdefault(in_file(name), []).append((Stored(name), param.detach()[index]))
            continue
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
                    parts = sorted(plan[name], key=lambda sp: sp[0].part)  # fused: [part 0 | part 1 | ...]
                    total, offset = sum(p.shape[0] for _, p in parts), 0
                    for spec, param in parts:
                        param.copy_(_read(f, path, name, spec, param.shape, offset, total))
                        offset += param.shape[0]
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
        if isinstance(spec, ExpertsStored):  # written per expert, as transformers writes them
            for name, index in spec.pieces(param.shape):
                grouped[name] = {0: (Stored(name), param.detach()[index])}
            continue
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
