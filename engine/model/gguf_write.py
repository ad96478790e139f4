"""Write a Transformer (+ its tokenizer) as one GGUF file that llama.cpp, Ollama and LM Studio load.

The metadata keys, tensor names and value transforms are the ones llama.cpp's convert_hf_to_gguf.py writes
(engine.model.gguf_names); tensors are quantized by the `gguf` package's own Python code (gguf.quants), so the
types written are those it can quantize: f32, f16, bf16, q8_0, q4_0. As llama.cpp does, 1-D tensors, norms,
MoE routers and position embeddings stay F32, and a matrix whose rows are not a whole number of quantization
blocks falls back to F16. A model llama.cpp's arch cannot express (check_expressible) is refused, by feature.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import astuple, fields, is_dataclass
from pathlib import Path

import numpy as np

from engine.config import ConfigError
from engine.files import atomic_write_with
from engine.model.gguf_names import (ARCHS, DROPPED, FAMILY_ARCH, FLATTENED, FLOAT_META, IGNORED_BY_LLAMA_CPP,
                                     ROPE_FREQS, ROPE_LONG, ROPE_SHORT, ROPE_TENSORS, Fused, Split, gguf_name,
                                     is_norm, keeps_f32)
from engine.model.gguf_read import hf_config_from, import_gguf, llama3_factors

logger = logging.getLogger(__name__)
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")  # what gguf.quants quantizes in Python


def _qtypes(gguf):
    Q, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {"f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
            "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0)}


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: HF's rotate-half rows [n_head, 2, hd/2] -> interleaved [n_head, hd/2, 2]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def arch_for(cfg):
    """The GGUFArch row of a model config, or a ConfigError naming the families llama.cpp has an arch for."""
    if cfg.hf_model_type not in FAMILY_ARCH:
        raise ConfigError(f"GGUF export: family '{cfg.hf_model_type}' has no llama.cpp architecture here "
                          f"(supported: {', '.join(FAMILY_ARCH)})")
    if DROPPED.get(cfg.hf_model_type) == "sliding_window" and cfg.sliding_window is not None:
        logger.warning("GGUF export: llama.cpp's '%s' arch has no sliding window; the %d-token window is dropped",
                       FAMILY_ARCH[cfg.hf_model_type], cfg.sliding_window)
    if IGNORED_BY_LLAMA_CPP.get(cfg.hf_model_type) == "sliding_window" and cfg.sliding_window is not None:
        logger.warning("GGUF export: the file keeps the %d-token sliding window, but llama.cpp disables it for "
                       "'%s' (this engine and transformers apply it): its outputs differ past the window",
                       cfg.sliding_window, cfg.hf_model_type)
    return ARCHS[FAMILY_ARCH[cfg.hf_model_type]]


def global_rope(cfg):
    """The LayerRope llama.cpp's `rope.*` keys describe: that of the global-attention layers (Gemma 3's
    sliding layers have their own, fixed in llama.cpp), or None without RoPE."""
    ropes = [(s.window is not None, s.rope) for s in cfg.layer_specs() if s.rope is not None]
    return min(ropes, key=lambda r: r[0])[1] if ropes else None


def model_metadata(cfg, name: str) -> list[tuple[str, object, str]]:
    """(key, value, kind) of every model metadata entry; kind is uint32, float32, string or bool."""
    from engine.model.families import config_to_hf

    arch = arch_for(cfg)
    hf = config_to_hf(cfg)
    rope = global_rope(cfg) if cfg.position == "rope" else None
    out = [("general.name", name, "string")]
    for key, hf_key in arch.meta.items():
        value = rope.theta if key == "rope.freq_base" and rope is not None else hf.get(hf_key)
        if value is not None:  # keys the family's config.json lacks (a dense model's expert_count) are not written
            out.append((f"{arch.arch}.{key}", value, "float32" if key in FLOAT_META else "uint32"))
    out.append((f"{arch.arch}.vocab_size", cfg.vocab_size, "uint32"))
    if arch.head_dim_keys:  # RoPE archs: the rotated width and the head sizes, as llama.cpp writes them
        out += [(f"{arch.arch}.rope.dimension_count", cfg.rotary_dim, "uint32"),
                (f"{arch.arch}.attention.key_length", cfg.head_dim, "uint32"),
                (f"{arch.arch}.attention.value_length", cfg.head_dim, "uint32")]
    elif arch.partial_rotary:  # Phi3MiniModel: rope.dimension_count alone, the rotated width
        out.append((f"{arch.arch}.rope.dimension_count", cfg.rotary_dim, "uint32"))
    scaling = rope.scaling if rope is not None else None
    if scaling is None or (scaling.kind == "llama3" and arch.rope_freqs):  # llama3: the rope_freqs tensor
        return out
    if scaling.kind == "linear":
        return out + [(f"{arch.arch}.rope.scaling.type", "linear", "string"),
                      (f"{arch.arch}.rope.scaling.factor", scaling.factor, "float32")]
    if scaling.kind == "longrope" and arch.longrope:  # Phi3MiniModel.generate_extra_tensors
        return out + [(f"{arch.arch}.rope.scaling.attn_factor", scaling.attention_factor, "float32"),
                      (f"{arch.arch}.rope.scaling.original_context_length",
                       scaling.original_max_position_embeddings, "uint32")]
    forms = ["linear"] + ["llama3"] * arch.rope_freqs + ["longrope"] * arch.longrope
    raise ConfigError(f"GGUF export: family '{cfg.hf_model_type}': rope scaling '{scaling.kind}' has no form in "
                      f"llama.cpp's '{arch.arch}' arch (it has: none, {', '.join(forms)})")


def rope_tensors(cfg) -> dict[str, np.ndarray]:
    """Llama 3's rope_freqs or Phi-3's rope_factors_long/short: float32, one value per rotated pair."""
    rope = global_rope(cfg) if cfg.position == "rope" else None
    s = rope.scaling if rope is not None else None
    if s is not None and s.kind == "llama3":
        return {ROPE_FREQS: llama3_factors(rope.theta, cfg.rotary_dim, s.factor, s.low_freq_factor,
                                           s.high_freq_factor, s.original_max_position_embeddings)}
    if s is not None and s.kind == "longrope":
        return {ROPE_LONG: np.asarray(s.long_factor, np.float32), ROPE_SHORT: np.asarray(s.short_factor, np.float32)}
    return {}


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 array in llama.cpp's layout and values (fused, permuted, Gemma's 1 + w)."""
    cfg = model.config
    arch = arch_for(cfg)
    grouped: dict[str, dict[int, np.ndarray]] = {}
    for native, param in model.named_parameters():
        spec = gguf_name(arch, native)
        if spec is None:
            raise ConfigError(f"GGUF export: parameter '{native}' has no tensor name in llama.cpp's '{arch.arch}'")
        values = param.detach().float().cpu().numpy()
        if isinstance(spec, Split):  # one parameter, several GGUF tensors (the experts' gate | up)
            for name, piece in zip(spec.names, np.split(values, len(spec.names), axis=spec.dim)):
                grouped[name] = {0: piece}
            continue
        spec = spec if isinstance(spec, Fused) else Fused(spec, 0, 1)
        grouped.setdefault(spec.name, {})[spec.part] = values
    heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}
    out = {}
    for name, parts in grouped.items():
        values = np.concatenate([parts[i] for i in sorted(parts)]) if len(parts) > 1 else parts[0]
        leaf = name.split(".")[-2]
        if arch.permute_qk and leaf in heads and name.startswith("blk."):
            values = permute_qk(values, heads[leaf])
        if arch.norm_plus_one and is_norm(name):
            values = values + 1.0
        if leaf in FLATTENED:
            values = values.reshape(-1)
        out[name] = np.ascontiguousarray(values, dtype=np.float32)
    if cfg.tie_word_embeddings and arch.writes_tied_output:
        out["output.weight"] = out["token_embd.weight"]
    out.update(rope_tensors(cfg))
    return out


# Fields a GGUF file does not carry as model architecture (token ids travel with the tokenizer) or that are
# compared through layer_specs() (windows and RoPE per layer, however a config spells them).
NOT_COMPARED = {"hf_model_type", "bos_token_id", "eos_token_id", "pad_token_id", "extra_hf", "sliding_window",
                "layer_sliding_windows", "layer_rope_thetas", "layer_rope_scalings", "rope_theta", "rope_scaling"}


def check_expressible(cfg, entries, tensors: dict) -> None:
    """Refuse, naming the family and each feature, a model whose GGUF file would read back (by gguf_read, as
    llama.cpp's arch defines it) as a different model: e.g. Gemma 2 with query_pre_attn_scalar != head_dim."""
    from engine.model.families import config_from_hf

    arch = arch_for(cfg)
    meta = {k: float(np.float32(v)) if kind == "float32" else v for k, v, kind in entries}
    shapes = {n: v.shape for n, v in tensors.items()}
    rope = {n: tensors[n] for n in ROPE_TENSORS if n in tensors}
    tied = "output.weight" not in tensors or arch.writes_tied_output and cfg.tie_word_embeddings
    where = f"GGUF export of '{cfg.hf_model_type}'"
    try:
        back = config_from_hf(hf_config_from(arch, meta, shapes, rope, tied, where), source=where)
    except (ConfigError, ValueError) as e:
        raise ConfigError(f"GGUF export: family '{cfg.hf_model_type}' cannot be written as llama.cpp's "
                          f"'{arch.arch}': {e}") from None
    diffs = [f"{f.name}={getattr(cfg, f.name)!r} (it would read {getattr(back, f.name)!r})" for f in fields(cfg)
             if f.name not in NOT_COMPARED and not _same(getattr(cfg, f.name), getattr(back, f.name))]
    keep_windows = DROPPED.get(cfg.hf_model_type) != "sliding_window"
    for ours, theirs in zip(cfg.layer_specs(), back.layer_specs()):
        if keep_windows and ours.window != theirs.window:
            diffs.append(f"layer {ours.index} sliding window {ours.window} (it would read {theirs.window})")
        if not _same(ours.rope, theirs.rope):
            diffs.append(f"layer {ours.index} RoPE {ours.rope} (it would read {theirs.rope})")
    if diffs:
        raise ConfigError(f"GGUF export: family '{cfg.hf_model_type}': llama.cpp's '{arch.arch}' arch cannot "
                          f"express {'; '.join(diffs[:4])}")


def _same(a, b) -> bool:
    """Equal, floats to float32 storage precision (relative 1e-6), recursing into tuples and dataclasses."""
    if is_dataclass(a) and is_dataclass(b):
        return type(a) is type(b) and _same(astuple(a), astuple(b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(b, (int, float)) and isinstance(a, (int, float)) and math.isclose(a, b, rel_tol=1e-6)
    return a == b


def _encoded(gguf, name: str, values: np.ndarray, qtype):
    """(data, raw type) of one tensor: norms and 1-D tensors F32, rows not whole blocks F16, else `qtype`."""
    Q = gguf.GGMLQuantizationType
    if values.ndim <= 1 or keeps_f32(name) or qtype == Q.F32:
        return values, Q.F32
    if qtype == Q.F16:
        return values.astype(np.float16), Q.F16
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if values.shape[-1] % block:
        logger.info("GGUF export: %s rows of %d are not whole %s blocks of %d: written as F16", name,
                    values.shape[-1], qtype.name, block)
        return values.astype(np.float16), Q.F16
    return gguf.quants.quantize(values, qtype), qtype


def write_gguf(model, tokenizer, out, gguf_type: str = "f16", name: str | None = None) -> Path:
    """Write `model` (any dtype; LoRA merged first by the caller) and `tokenizer` to the GGUF file `out`."""
    from engine.data.gguf_tokenizer import gguf_tokenizer_metadata

    gguf = import_gguf()
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"--gguf-type: expected one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    qtype, file_type = _qtypes(gguf)[gguf_type]
    out = Path(out)
    arch = arch_for(model.config)
    entries = model_metadata(model.config, name or out.stem)
    entries += [("general.file_type", int(file_type), "uint32"),
                ("general.quantization_version", gguf.GGML_QUANT_VERSION, "uint32")]
    if tokenizer is not None:
        entries += [(k, v, _kind(v)) for k, v in gguf_tokenizer_metadata(tokenizer).items()]
    values = gguf_tensors(model)
    check_expressible(model.config, entries, values)
    tensors = {n: _encoded(gguf, n, v, qtype) for n, v in values.items()}

    def fill(tmp: Path) -> None:
        with quiet_gguf_writer(gguf):
            _fill(gguf, tmp, arch, entries, tensors)

    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_with(out, fill)


@contextmanager
def quiet_gguf_writer(gguf):
    """The gguf package logs its plan ("This GGUF file is for Little Endian only", shard sizes) at INFO, which a
    CLI's INFO logging would show on every export: hold its writer's logger at WARNING (warnings still pass)."""
    log = logging.getLogger(gguf.gguf_writer.__name__)
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        log.setLevel(level)


def _fill(gguf, tmp: Path, arch, entries, tensors) -> None:
    """Write header, metadata and tensors to `tmp` (the atomic writer publishes it)."""
    writer = gguf.GGUFWriter(str(tmp), arch.arch)
    for key, value, kind in entries:
        _add(gguf, writer, key, value, kind)
    for tensor_name, (data, raw) in tensors.items():
        writer.add_tensor(tensor_name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        first = value[0] if value else ""
        return "array:" + ("string" if isinstance(first, str) else "float32" if isinstance(first, float) else "int32")
    return "uint32"


def _add(gguf, writer, key: str, value, kind: str) -> None:
    T = gguf.GGUFValueType
    types = {"uint32": T.UINT32, "int32": T.INT32, "float32": T.FLOAT32, "string": T.STRING, "bool": T.BOOL}
    if kind.startswith("array:"):
        writer.add_key_value(key, list(value), T.ARRAY, sub_type=types[kind[len("array:"):]])
    else:
        writer.add_key_value(key, value, types[kind])

