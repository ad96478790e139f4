"""Read a GGUF file (llama.cpp, Ollama, LM Studio) as a Transformer: config from its metadata, weights
dequantized one tensor at a time into the target dtype, llama.cpp's conversions undone.

The `gguf` package (optional extra) parses the file; engine.model.gguf_names says what each architecture's
metadata keys and tensor names mean. The config is rebuilt as the config.json llama.cpp's converter read, then
goes through engine.model.families like any HF checkpoint, so every family check applies here too.
"""
from __future__ import annotations

import logging
import math
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from engine.config import ConfigError, ModelConfig
from engine.model.gguf_names import (ARCHS, FLATTENED, FLOAT_META, REQUIRED_META, ROPE_FREQS, ROPE_LONG,
                                     ROPE_SHORT, ROPE_TENSORS, Fused, GGUFArch, Split, gguf_name, is_norm)

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
    if "token_embd.weight" not in tensors:
        raise _weights_error()(f"{path}: missing tensor 'token_embd.weight'")
    shapes = {n: tuple(reversed(t.shape.tolist())) for n, t in tensors.items()}  # ggml shapes are [cols, rows]
    tied = "output.weight" not in tensors or (
        arch.writes_tied_output and _same(tensors["output.weight"], tensors["token_embd.weight"]))
    values = {n: dequantized(tensors[n], path) for n in ROPE_TENSORS if n in tensors}
    return hf_config_from(arch, metadata(reader), shapes, values, tied, path)


def hf_config_from(arch: GGUFArch, meta: dict, shapes: dict, rope_values: dict, tied: bool, path) -> dict:
    """hf_config's work on plain data: metadata key -> value, tensor name -> numpy shape, the RoPE tensors'
    values (gguf_write runs this on what it is about to write, to refuse what would read back differently)."""
    WeightsError = _weights_error()
    moe = f"{arch.arch}.expert_count" in meta and arch.moe_architecture is not None
    hf = {"architectures": [arch.moe_architecture if moe else arch.hf_architecture], **arch.hf_extra}
    for key, hf_key in arch.meta.items():
        if f"{arch.arch}.{key}" not in meta:
            if key in REQUIRED_META:
                raise WeightsError(f"{path}: missing metadata key '{arch.arch}.{key}'")
            continue
        value = meta[f"{arch.arch}.{key}"]
        hf[hf_key] = float(value) if key in FLOAT_META else value
    head_dim = next((meta[f"{arch.arch}.{k}"] for k in arch.head_dim_keys if f"{arch.arch}.{k}" in meta), None)
    if head_dim is not None:
        hf["head_dim"] = head_dim
    head_dim = hf.get("head_dim") or hf.get("hidden_size", 0) // max(1, hf.get("num_attention_heads", 1))
    if arch.attn_scalar_hidden_per_head_at is not None:  # llama.cpp's f_attention_scale
        hf["query_pre_attn_scalar"] = (hf["hidden_size"] // hf["num_attention_heads"]
                                       if hf["num_hidden_layers"] == arch.attn_scalar_hidden_per_head_at else head_dim)
    rotary = meta.get(f"{arch.arch}.rope.dimension_count")
    if arch.partial_rotary and rotary is not None and rotary != head_dim:
        hf["partial_rotary_factor"] = rotary / head_dim
    hf.update(_rope_keys(arch, meta, rope_values, hf, head_dim if rotary is None else rotary, path))
    hf["vocab_size"] = int(shapes["token_embd.weight"][0])
    hf["tie_word_embeddings"] = tied
    if "blk.0.attn_q.bias" in shapes and arch.arch not in ("qwen2", "qwen2moe", "gpt2"):  # biases fixed by family
        hf["attention_bias"] = True
    if "blk.0.ffn_up.bias" in shapes and arch.arch != "gpt2":
        hf["mlp_bias"] = True
    for key, hf_key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        hf[hf_key] = meta.get(f"tokenizer.ggml.{key}_token_id")
    return hf


def _rope_keys(arch: GGUFArch, meta: dict, rope_values: dict, hf: dict, rotary_dim: int, path) -> dict:
    """config.json's RoPE keys: rope.scaling.* metadata, Llama 3's rope_freqs, Phi-3's LongRoPE factors."""
    WeightsError = _weights_error()
    kind = meta.get(f"{arch.arch}.rope.scaling.type", "none")
    theta = hf.get("rope_theta", 10000.0)
    scaling = None
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": float(meta[f"{arch.arch}.rope.scaling.factor"])}
    elif kind != "none":
        raise WeightsError(f"{path}: {arch.arch}.rope.scaling.type '{kind}' is not supported for GGUF files "
                           "(supported: none, linear, and the rope_freqs / rope_factors tensors)")
    if ROPE_FREQS in rope_values:
        if not arch.rope_freqs:
            raise WeightsError(f"{path}: tensor '{ROPE_FREQS}' is not supported for arch '{arch.arch}'")
        scaling = llama3_scaling(rope_values[ROPE_FREQS], theta, rotary_dim, path)
    if ROPE_LONG in rope_values or ROPE_SHORT in rope_values:
        if not arch.longrope or not (ROPE_LONG in rope_values and ROPE_SHORT in rope_values):
            raise WeightsError(f"{path}: rope_factors_long/short: need both, on a Phi-3 file (arch '{arch.arch}')")
        original = meta.get(f"{arch.arch}.rope.scaling.original_context_length", hf.get("max_position_embeddings"))
        hf["original_max_position_embeddings"] = original
        scaling = {"rope_type": "longrope", "original_max_position_embeddings": original,
                   "long_factor": [float(x) for x in rope_values[ROPE_LONG].reshape(-1)],
                   "short_factor": [float(x) for x in rope_values[ROPE_SHORT].reshape(-1)]}
        if f"{arch.arch}.rope.scaling.attn_factor" in meta:
            scaling["attention_factor"] = float(meta[f"{arch.arch}.rope.scaling.attn_factor"])
    if arch.swa_rope_theta is not None:  # one RoPE per layer type (Gemma 3)
        full = {"rope_type": "default", **(scaling or {}), "rope_theta": theta}
        return {"rope_parameters": {"full_attention": full, "sliding_attention":
                                    {"rope_type": "default", "rope_theta": arch.swa_rope_theta}}}
    return {} if scaling is None else {"rope_scaling": {**scaling, "rope_theta": theta}}


def llama3_factors(theta: float, dim: int, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors: the rope_freqs divisor of each rotated pair."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, mid)).astype(np.float32)


def llama3_scaling(values: np.ndarray, theta: float, dim: int, path) -> dict:
    """The `llama3` rope_scaling whose factors are `values` (a file stores only the factors). llama.cpp's
    Llama 3.x files all use low 1, high 4 and 8192 positions; else the band is solved from two of its factors."""
    values = values.reshape(-1).astype(np.float64)
    if values.shape[0] != dim // 2:
        raise _weights_error()(f"{path}: tensor '{ROPE_FREQS}' has {values.shape[0]} values, expected {dim // 2}")
    factor = float(values.max())
    candidates = [(1.0, 4.0, 8192)]
    wavelen = 2 * math.pi * theta ** (np.arange(0, dim, 2) / dim)
    band = [(w, v) for w, v in zip(wavelen, values) if 1 + 1e-6 < v < factor * (1 - 1e-6)]
    if len(band) >= 2 and factor > 1:  # s = original / wavelen * a - b, with s from each factor
        (w1, v1), (w2, v2) = band[0], band[-1]
        s1, s2 = ((1 / v - 1 / factor) / (1 - 1 / factor) for v in (v1, v2))
        a = (s1 - s2) / (1 / w1 - 1 / w2)  # = original / (high - low)
        low = a / w1 - s1  # with high - low = 1 ... then scaled so low = 1
        if low > 0:
            candidates.append((1.0, 1.0 + 1.0 / low, a / low))
    for low, high, original in candidates:
        original = int(round(original))
        fit = llama3_factors(theta, dim, factor, low, high, original)
        if np.allclose(fit, values, rtol=1e-5, atol=0):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": original}
    raise _weights_error()(f"{path}: tensor '{ROPE_FREQS}' is not a Llama 3 rope scaling this engine can recover "
                           f"(factors {np.round(values[:6], 4).tolist()}...)")


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
    model = model.to(dtype).allocate(device or "cpu")
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
    splits = []  # (Split, param): one parameter made of several GGUF tensors
    for native, param in model.named_parameters():  # a tied head appears once, as embed.weight
        spec = gguf_name(arch, native)
        if spec is None:
            raise WeightsError(f"{path}: the engine's parameter '{native}' has no GGUF name for arch '{arch.arch}'")
        if isinstance(spec, Split):
            splits.append((spec, param))
            continue
        spec = spec if isinstance(spec, Fused) else Fused(spec, 0, 1)
        plan.setdefault(spec.name, []).append((spec.part, spec.parts, param))
    wanted = set(plan) | {n for spec, _ in splits for n in spec.names}
    missing = sorted(wanted - set(tensors))
    if missing:
        raise WeightsError(f"{path}: missing tensor(s) {', '.join(missing[:8])}")
    known = wanted | set(ROPE_TENSORS) | ({"output.weight"} if cfg.tie_word_embeddings else set())
    extra = sorted(set(tensors) - known)
    if extra:
        raise WeightsError(f"{path}: unexpected tensor(s) {', '.join(extra[:8])}")
    with torch.no_grad():
        for name, targets in plan.items():
            values = _values(arch, cfg, tensors[name], path)
            if name.split(".")[-2] in FLATTENED and len(targets) == 1 and values.size == targets[0][2].numel():
                values = values.reshape(tuple(targets[0][2].shape))
            total = sum(p.shape[0] for _, _, p in targets)
            if values.shape[0] != total or tuple(values.shape[1:]) != tuple(targets[0][2].shape[1:]):
                want = [total, *targets[0][2].shape[1:]]
                raise WeightsError(f"{path}: tensor '{name}' has shape {list(values.shape)}, expected {want}")
            offset = 0
            for _, _, param in sorted(targets, key=lambda t: t[0]):
                n = param.shape[0]
                param.copy_(torch.from_numpy(np.require(values[offset:offset + n], requirements=["C", "W"])))
                offset += n
        for spec, param in splits:
            share = list(param.shape)
            share[spec.dim] //= len(spec.names)
            pieces = [_values(arch, cfg, tensors[n], path) for n in spec.names]
            for n, piece in zip(spec.names, pieces):
                if list(piece.shape) != share:
                    raise WeightsError(f"{path}: tensor '{n}' has shape {list(piece.shape)}, expected {share}")
            param.copy_(torch.from_numpy(np.concatenate(pieces, axis=spec.dim)))


def _values(arch: GGUFArch, cfg, tensor, path) -> np.ndarray:
    """One GGUF tensor dequantized, with llama.cpp's value transforms undone (Q/K interleave, Gemma's 1 + w)."""
    values = dequantized(tensor, path)
    leaf = tensor.name.split(".")[-2]
    heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}  # weights and biases are both permuted
    if arch.permute_qk and tensor.name.startswith("blk.") and leaf in heads:
        values = unpermute_qk(values, heads[leaf])
    if arch.norm_plus_one and is_norm(tensor.name):
        values = values - 1.0
    return values
