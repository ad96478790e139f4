"""A LoRA adapter as a GGUF LoRA file (llama.cpp `--lora FILE`), in the layout llama.cpp's
convert_lora_to_gguf.py writes: `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and for
each adapted weight `<gguf name>.lora_a` [r, in] and `.lora_b` [out, r] (numpy layout), in F32.

llama.cpp applies W x + (alpha / r) * B A x, in the base GGUF's own row order: so B of q/k is row-permuted as the
base weights are (`llama` arch), and alpha is written as scale * r, which also covers rsLoRA's alpha / sqrt(r).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.adapters.lora import lora_modules
from engine.config import ConfigError
from engine.files import atomic_write_with
from engine.model.gguf_names import gguf_name
from engine.model.gguf_read import import_gguf
from engine.model.gguf_write import quiet_gguf_writer, arch_for, permute_qk


def gguf_lora_tensors(model) -> tuple[dict[str, np.ndarray], float]:
    """({`blk.0.attn_q.weight.lora_a`: [r, in], `....lora_b`: [out, r], ...}, alpha) of the model's adapters."""
    cfg = model.config
    arch = arch_for(cfg)
    modules = lora_modules(model)
    if not modules:
        raise ConfigError("GGUF LoRA export: the model has no LoRA adapter (pass a run's adapter dir or --adapter)")
    heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}
    out, alphas = {}, set()
    for name, m in modules.items():
        spec = gguf_name(arch, f"{name}.weight")
        if not isinstance(spec, str):  # None, a Fused slice or a Split (MoE experts are no LoRALinear)
            raise ConfigError(f"GGUF LoRA export: '{name}' is stored fused (or not at all) in llama.cpp's "
                              f"'{arch.arch}' arch; export the merged model with --format gguf instead")
        a = m.lora_A.weight.detach().float().cpu().numpy()
        b = m.lora_B.weight.detach().float().cpu().numpy()
        leaf = spec.split(".")[-2]
        if arch.permute_qk and leaf in heads:
            b = permute_qk(b, heads[leaf])  # the base rows are permuted; B's output rows follow them
        out[f"{spec}.lora_a"], out[f"{spec}.lora_b"] = np.ascontiguousarray(a), np.ascontiguousarray(b)
        alphas.add(round(m.scale * a.shape[0], 6))
    if len(alphas) != 1:
        raise ConfigError(f"GGUF LoRA export: one alpha / r for every module is needed, got {sorted(alphas)}")
    return out, alphas.pop()


def write_gguf_lora(model, out) -> Path:
    """Write the LoRA adapters of `model` (a base with adapters loaded) as the GGUF LoRA file `out`."""
    gguf = import_gguf()
    tensors, alpha = gguf_lora_tensors(model)
    arch = arch_for(model.config)
    out = Path(out)

    def fill(tmp: Path) -> None:
        with quiet_gguf_writer(gguf):
            _fill(gguf, tmp, arch, out, alpha, tensors)

    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_with(out, fill)


def _fill(gguf, tmp: Path, arch, out: Path, alpha: float, tensors: dict) -> None:
    """Header, adapter metadata and the F32 lora_a / lora_b tensors, written to `tmp`."""
    w = gguf.GGUFWriter(str(tmp), arch.arch)
    w.add_string("general.type", "adapter")
    w.add_string("general.name", out.stem)
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(alpha))
    w.add_uint32("general.file_type", int(gguf.LlamaFileType.ALL_F32))
    w.add_uint32("general.quantization_version", gguf.GGML_QUANT_VERSION)
    for name, values in tensors.items():
        w.add_tensor(name, values, raw_dtype=gguf.GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
