"""Write a Transformer (+ its tokenizer) as one GGUF file that llama.cpp, Ollama and LM Studio load.

The metadata keys, tensor names and value transforms are the ones llama.cpp's convert_hf_to_gguf.py writes
(engine.model.gguf_names); tensors are quantized by the `gguf` package's own Python code (gguf.quants), so the
types written are those it can quantize: f32, f16, bf16, q8_0, q4_0. As llama.cpp does, 1-D tensors and norms
stay F32, and a matrix whose rows are not a whole number of quantization blocks falls back to F16.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from engine.config import ConfigError
from engine.files import atomic_write_with
from engine.model.gguf_names import ARCHS, FAMILY_ARCH, FLOAT_META, Fused, gguf_name, is_norm
from engine.model.gguf_read import import_gguf

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
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind != "linear":
        raise ConfigError(f"GGUF export: rope scaling '{cfg.rope_scaling.kind}' is not supported (supported: none, "
                          "linear)")
    if any(getattr(cfg, f) is not None for f in ("layer_sliding_windows", "layer_rope_thetas", "layer_rope_scalings")):
        raise ConfigError("GGUF export: per-layer windows or RoPE settings are not supported for this family")
    if cfg.sliding_window is not None:
        logger.warning("GGUF export: llama.cpp's '%s' arch has no sliding window; the %d-token window is dropped",
                       FAMILY_ARCH[cfg.hf_model_type], cfg.sliding_window)
    return ARCHS[FAMILY_ARCH[cfg.hf_model_type]]


def model_metadata(cfg, name: str) -> list[tuple[str, object, str]]:
    """(key, value, kind) of every model metadata entry; kind is uint32, float32, string or bool."""
    from engine.model.families import config_to_hf

    arch = arch_for(cfg)
    hf = config_to_hf(cfg)
    out = [("general.name", name, "string")]
    for key, hf_key in arch.meta.items():
        out.append((f"{arch.arch}.{key}", hf[hf_key], "float32" if key in FLOAT_META else "uint32"))
    out.append((f"{arch.arch}.vocab_size", cfg.vocab_size, "uint32"))
    if arch.head_dim_keys:  # RoPE archs: the rotated width and the head sizes, as llama.cpp writes them
        out += [(f"{arch.arch}.rope.dimension_count", cfg.head_dim, "uint32"),
                (f"{arch.arch}.attention.key_length", cfg.head_dim, "uint32"),
                (f"{arch.arch}.attention.value_length", cfg.head_dim, "uint32")]
    if cfg.rope_scaling is not None:
        out += [(f"{arch.arch}.rope.scaling.type", "linear", "string"),
                (f"{arch.arch}.rope.scaling.factor", cfg.rope_scaling.factor, "float32")]
    return out


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 array in llama.cpp's layout and values (fused, permuted, Gemma's 1 + w)."""
    cfg = model.config
    arch = arch_for(cfg)
    grouped: dict[str, dict[int, np.ndarray]] = {}
    for native, param in model.named_parameters():
        spec = gguf_name(arch, native)
        if spec is None:
            raise ConfigError(f"GGUF export: parameter '{native}' has no tensor name in llama.cpp's '{arch.arch}'")
        spec = spec if isinstance(spec, Fused) else Fused(spec, 0, 1)
        grouped.setdefault(spec.name, {})[spec.part] = param.detach().float().cpu().numpy()
    heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}
    out = {}
    for name, parts in grouped.items():
        values = np.concatenate([parts[i] for i in sorted(parts)]) if len(parts) > 1 else parts[0]
        leaf = name.split(".")[-2]
        if arch.permute_qk and leaf in heads and name.startswith("blk."):
            values = permute_qk(values, heads[leaf])
        if arch.norm_plus_one and is_norm(name):
            values = values + 1.0
        out[name] = np.ascontiguousarray(values, dtype=np.float32)
    if cfg.tie_word_embeddings and arch.writes_tied_output:
        out["output.weight"] = out["token_embd.weight"]
    return out


def _encoded(gguf, name: str, values: np.ndarray, qtype):
    """(data, raw type) of one tensor: norms and 1-D tensors F32, rows not whole blocks F16, else `qtype`."""
    Q = gguf.GGMLQuantizationType
    if values.ndim <= 1 or is_norm(name) or qtype == Q.F32:
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
    tensors = {n: _encoded(gguf, n, v, qtype) for n, v in gguf_tensors(model).items()}

    def fill(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch.arch)
        for key, value, kind in entries:
            _add(gguf, writer, key, value, kind)
        for tensor_name, (data, raw) in tensors.items():
            writer.add_tensor(tensor_name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_with(out, fill)


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

