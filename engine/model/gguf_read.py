"""Read a GGUF file (llama.cpp, Ollama, LM Studio) as a Transformer: config from its metadata, weights
dequantized one tensor at a time into the target dtype, llama.cpp's conversions undone.

The `gguf` package (optional extra) parses the file; engine.model.gguf_names says what each architecture's
metadata keys and tensor names mean. The config is rebuilt as the config.json llama.cpp's converter read, then
goes through engine.model.families like any HF checkpoint, so every family check applies here too.
"""
from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from engine.config import ConfigError, ModelConfig
from engine.model.gguf_names import ARCHS, FLOAT_META, REQUIRED_META, Fused, GGUFArch, gguf_name, is_norm

logger = logging.getLogger(__name__)
GGUF_SUFFIX = ".gguf"
INSTALL_HINT = 'pip install -e ".[gguf]"'


def _weights_error():
    from engine.model.hf_format import WeightsError  # hf_format imports this module: import late

    return WeightsError


def import_gguf():
    """The `gguf` package, or a clear error naming the extra to install."""
    try:
        import gguf
    except ImportError:
        raise ConfigError(f"reading or writing GGUF files needs the `gguf` package: {INSTALL_HINT}") from None
    return gguf


def gguf_file(path) -> Optional[Path]:
    """The GGUF file `path` names: itself if it is a .gguf file, the only .gguf of a directory without a
    config.json, else None (an HF directory)."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix.lower() == GGUF_SUFFIX else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(path.glob(f"*{GGUF_SUFFIX}"))
    if len(found) > 1:
        raise _weights_error()(f"{path}: holds {len(found)} .gguf files ({', '.join(f.name for f in found[:4])}); "
                               "pass the one to load")
    return found[0] if found else None


@lru_cache(maxsize=2)
def _reader(path: str, mtime_ns: int, size: int):
    gguf = import_gguf()
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError, KeyError) as e:  # bad magic, truncated, unknown type code
        raise _weights_error()(f"{path}: not a valid GGUF file, truncated or corrupt ({e})") from None


def open_gguf(path):
    """A GGUFReader over `path` (memory-mapped; the last two files opened are kept open)."""
    path = Path(path).resolve()
    st = path.stat()
    return _reader(str(path), st.st_mtime_ns, st.st_size)


def metadata(reader, keys=None) -> dict:
    """Metadata key -> python value (strings, numbers, bools, lists), for `keys` or all of them."""
    names = reader.fields if keys is None else [k for k in keys if k in reader.fields]
    return {k: reader.fields[k].contents() for k in names}


def arch_of(reader, path) -> GGUFArch:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise _weights_error()(f"{path}: missing metadata key 'general.architecture'")
    name = field.contents()
    if name not in ARCHS:
        raise _weights_error()(f"{path}: general.architecture '{name}' is not supported; supported: "
                               f"{', '.join(ARCHS)}")
    return ARCHS[name]


def hf_config(reader, path) -> dict:
    """The config.json this file's metadata and tensors describe (what llama.cpp's converter read)."""
    arch = arch_of(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    hf = {"architectures": [arch.hf_architecture], **arch.hf_extra}
    for key, hf_key in arch.meta.items():
        field = reader.fields.get(f"{arch.arch}.{key}")
        if field is None:
            if key in REQUIRED_META:
                raise _weights_error()(f"{path}: missing metadata key '{arch.arch}.{key}'")
            continue
        value = field.contents()
        hf[hf_key] = float(value) if key in FLOAT_META else value
    head_dim = next((reader.fields[f"{arch.arch}.{k}"].contents() for k in arch.head_dim_keys
                     if f"{arch.arch}.{k}" in reader.fields), None)
    if head_dim is not None:
        hf["head_dim"] = head_dim
    scaling = metadata(reader, [f"{arch.arch}.rope.scaling.type", f"{arch.arch}.rope.scaling.factor"])
    kind = scaling.get(f"{arch.arch}.rope.scaling.type", "none")
    if kind == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(scaling[f"{arch.arch}.rope.scaling.factor"])}
    elif kind != "none" or "rope_freqs.weight" in tensors:
        raise _weights_error()(f"{path}: rope scaling '{kind if kind != 'none' else 'rope_freqs (llama3)'}' is not "
                               "supported for GGUF files (supported: none, linear)")
    if "token_embd.weight" not in tensors:
        raise _weights_error()(f"{path}: missing tensor 'token_embd.weight'")
    hf["vocab_size"] = int(tensors["token_embd.weight"].shape[1])  # ggml shapes are [cols, rows]
    hf["tie_word_embeddings"] = "output.weight" not in tensors or (
        arch.writes_tied_output and _same(tensors["output.weight"], tensors["token_embd.weight"]))
    if "blk.0.attn_q.bias" in tensors and arch.arch not in ("qwen2", "gpt2"):
        hf["attention_bias"] = True
    if "blk.0.ffn_up.bias" in tensors and arch.arch != "gpt2":
        hf["mlp_bias"] = True
    ids = metadata(reader, [f"tokenizer.ggml.{k}_token_id" for k in ("bos", "eos", "padding")])
    for key, hf_key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        hf[hf_key] = ids.get(f"tokenizer.ggml.{key}_token_id")
    return hf


def _same(a, b) -> bool:
    return a.tensor_type == b.tensor_type and a.data.shape == b.data.shape and np.array_equal(a.data, b.data)


def read_gguf_config(path) -> ModelConfig:
    """The ModelConfig of a GGUF file."""
    from engine.model.families import config_from_hf

    reader = open_gguf(path)
    return config_from_hf(hf_config(reader, path), source=str(path))


def dequantized(tensor, path) -> np.ndarray:
    """One tensor as float32 in numpy (PyTorch) layout, e.g. [out, in] for a weight; any type gguf decodes."""
    gguf = import_gguf()
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise _weights_error()(f"{path}: tensor '{tensor.name}' has type {tensor.tensor_type.name}, which the gguf "
                               "package cannot dequantize") from None
    return np.asarray(values, dtype=np.float32).reshape(tuple(reversed(tensor.shape.tolist())))


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `LlamaModel.permute` of q/k rows: [n_head, 2, hd/2, ...] -> [n_head, hd/2, 2, ...]
    back to HF's rotate-half order [n_head, 2, hd/2] (w: [n_head * hd, ...])."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(cls, path, dtype=None, device=None):
    """Build `cls(config)` from a GGUF file and fill it, tensor by tensor, in `dtype` (default fp32)."""
    from engine.model.hf_format import check_fits

    path = Path(path)
    cfg = read_gguf_config(path)
    dtype = dtype or torch.float32
    check_fits(cfg, dtype, device or "cpu", path)
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to(dtype).to_empty(device=device or "cpu")
    model.tie_weights()
    load_gguf_weights(model, path)
    model._rope_cache = {}
    return model.eval()


def load_gguf_weights(model, path) -> None:
    """Copy every parameter of `model` from the GGUF file at `path`, strictly (missing/unexpected named)."""
    WeightsError = _weights_error()
    reader = open_gguf(path)
    arch, cfg = arch_of(reader, path), model.config
    tensors = {t.name: t for t in reader.tensors}
    plan: dict[str, list] = {}  # GGUF tensor -> [(part, parts, param)]
    for native, param in model.named_parameters():  # a tied head appears once, as embed.weight
        spec = gguf_name(arch, native)
        if spec is None:
            raise WeightsError(f"{path}: the engine's parameter '{native}' has no GGUF name for arch '{arch.arch}'")
        spec = spec if isinstance(spec, Fused) else Fused(spec, 0, 1)
        plan.setdefault(spec.name, []).append((spec.part, spec.parts, param))
    missing = sorted(set(plan) - set(tensors))
    if missing:
        raise WeightsError(f"{path}: missing tensor(s) {', '.join(missing[:8])}")
    extra = sorted(set(tensors) - set(plan) - ({"output.weight"} if cfg.tie_word_embeddings else set()))
    if extra:
        raise WeightsError(f"{path}: unexpected tensor(s) {', '.join(extra[:8])}")
    heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}  # weights and biases are both permuted
    with torch.no_grad():
        for name, targets in plan.items():
            values = dequantized(tensors[name], path)
            leaf = name.split(".")[-2]
            if arch.permute_qk and name.startswith("blk.") and leaf in heads:
                values = unpermute_qk(values, heads[leaf])
            if arch.norm_plus_one and is_norm(name):
                values = values - 1.0
            total = sum(p.shape[0] for _, _, p in targets)
            if values.shape[0] != total or tuple(values.shape[1:]) != tuple(targets[0][2].shape[1:]):
                want = [total, *targets[0][2].shape[1:]]
                raise WeightsError(f"{path}: tensor '{name}' has shape {list(values.shape)}, expected {want}")
            offset = 0
            for _, _, param in sorted(targets, key=lambda t: t[0]):
                n = param.shape[0]
                param.copy_(torch.from_numpy(np.require(values[offset:offset + n], requirements=["C", "W"])))
                offset += n
