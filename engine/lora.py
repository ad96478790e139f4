"""LoRA: low-rank adapters on frozen linear layers, saved and loaded in PEFT's on-disk layout.

y = W x + b + scale * B (A dropout(x)),   A [r, in] (kaiming-uniform), B [out, r] (zeros), scale = alpha / r.

Adapters are added from the outside: `apply_lora` swaps the targeted `nn.Linear` children of a Transformer
for `LoRALinear`, which keeps the base `weight`/`bias` Parameters under their old names (so native <-> HF
name tables still apply) and adds `lora_A`/`lora_B`. Every other parameter is frozen.

On disk an adapter is what `peft.PeftModel.save_pretrained` writes: adapter_config.json + adapter_model.safetensors
with names `base_model.model.<HF module>.lora_A.weight`, so PEFT loads ours and we load PEFT's.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engine.config import LORA_TARGETS, ConfigError, LoraConfig
from engine.hf import stored_as, weight_layout
from engine.weights import WeightsError, read_json

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class LoRALinear(nn.Linear):
    """An nn.Linear whose frozen weight is adapted by scale * B @ A; `weight`/`bias` are the base's own Parameters."""

    def __init__(self, base: nn.Linear, r: int, scale: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # no fresh weight: the base's Parameters are adopted below
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.base_cls = type(base)  # the model's own Linear (e.g. one with a fused decode path), kept for merging
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.scale = scale
        # Adapters are fp32 master weights whatever the base dtype; initialized as PEFT does (B = 0: a no-op at start).
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=base.weight.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        y = self.base_cls.forward(self, x)  # the base layer's own forward, on the adopted weight and bias
        a = self.lora_A.weight
        if not torch.is_autocast_enabled(x.device.type):  # a bf16 base without autocast: adapters run in fp32
            return y + (self.lora_B(self.lora_A(self.dropout(x.to(a.dtype)))) * self.scale).to(y.dtype)
        return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    def merged_weight(self) -> torch.Tensor:
        """W + scale * B @ A in fp32 [out, in]."""
        return self.weight.float() + self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, r={self.lora_A.out_features}, scale={self.scale:g}"


def lora_modules(model) -> dict[str, LoRALinear]:
    """Native module name (`layers.0.attn.q_proj`) -> LoRALinear, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_lora(model) -> bool:
    return getattr(model, "lora_config", None) is not None


def check_lora_supported(model_cfg, lora: LoraConfig) -> None:
    """GPT-2 stores q/k/v fused in one transposed Conv1D (`c_attn`); a PEFT adapter on it cannot be split per head."""
    if model_cfg.hf_model_type == "gpt2":
        raise ConfigError("lora.targets: GPT-2's fused c_attn/c_fc (Conv1D) layout is not supported for LoRA; "
                          "use a Llama-style family (llama, mistral, qwen2, qwen3, gemma)")
    if "gate_proj" in lora.targets and not model_cfg.gated_mlp:
        raise ConfigError("lora.targets: 'gate_proj' is not in this model (its MLP is not gated)")


def apply_lora(model, lora: LoraConfig, base_name: str = "") -> list[str]:
    """Freeze `model` and wrap its target linears with LoRALinear, in place; return the wrapped module names.

    The base may be in any dtype (`lora.base_dtype`); adapters are fp32. `base_name` goes to adapter_config.json.
    """
    check_lora_supported(model.config, lora)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in lora.targets and isinstance(child, nn.Linear) and not isinstance(child, LoRALinear):
                setattr(module, child_name, LoRALinear(child, lora.rank, lora.scale, lora.dropout))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ConfigError(f"lora.targets: none of {list(lora.targets)} is a linear layer of this model")
    model.lora_config, model.lora_base = lora, str(base_name)
    return wrapped


def merge_lora(model):
    """Fold every adapter into its base weight (in the base dtype) and restore plain nn.Linear layers; returns model."""
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            parent, child = _split(model, name)
            plain = m.base_cls(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            plain.weight = nn.Parameter(m.merged_weight().to(m.weight.dtype), requires_grad=False)
            plain.bias = m.bias
            setattr(parent, child, plain)
    model.lora_config = None
    return model


def _split(model, name: str):
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def _peft_module_name(model, native_module: str) -> str:
    """`layers.0.attn.q_proj` -> `base_model.model.model.layers.0.self_attn.q_proj` (PEFT's saved prefix)."""
    hf = stored_as(weight_layout(model.config), native_module + ".weight").name
    return PEFT_PREFIX + hf.removesuffix(".weight")


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's saved names: `...q_proj.lora_A.weight` [r, in], `...lora_B.weight` [out, r]."""
    out = {}
    for name, m in lora_modules(model).items():
        peft = _peft_module_name(model, name)
        out[f"{peft}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
        out[f"{peft}.lora_B.weight"] = m.lora_B.weight.detach().contiguous()
    return out


def adapter_config(lora: LoraConfig, base_name: str) -> dict:
    """adapter_config.json as PEFT writes it (the fields PEFT needs to rebuild the same adapter)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name or None,
            "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": list(lora.targets),
            "use_rslora": lora.rslora, "bias": "none", "fan_in_fan_out": False, "use_dora": False,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
            "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True, "lora_bias": False}


def save_adapter(model, directory) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (PEFT layout) into `directory`."""
    if not is_lora(model):
        raise ValueError("save_adapter: the model has no LoRA adapters (apply_lora first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (ADAPTER_WEIGHTS + ".tmp")
    save_file(adapter_state_dict(model), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / ADAPTER_WEIGHTS)
    text = json.dumps(adapter_config(model.lora_config, model.lora_base), indent=2, sort_keys=True)
    (directory / ADAPTER_CONFIG).write_text(text + "\n")
    return directory


def read_adapter_config(directory) -> tuple[LoraConfig, str | None]:
    """The LoraConfig and base model path of a PEFT adapter dir; unsupported PEFT options are errors naming the key."""
    path = Path(directory) / ADAPTER_CONFIG
    raw = read_json(path, "expected a PEFT LoRA adapter directory")
    if raw.get("peft_type") != "LORA":
        raise WeightsError(f"{path}: peft_type {raw.get('peft_type')!r} is not supported (only 'LORA')")
    unsupported = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
                   "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False,
                   "target_parameters": None, "layer_replication": None, "trainable_token_indices": None}
    for key, ok in unsupported.items():
        if raw.get(key) not in (ok, None, {}, []):
            raise WeightsError(f"{path}: {key}={raw[key]!r} is not supported (only {ok!r})")
    targets = raw.get("target_modules")
    if isinstance(targets, str):  # PEFT also accepts a regex over full names, or "all-linear"
        targets = LORA_TARGETS if targets == "all-linear" else [t for t in LORA_TARGETS if t in targets]
    try:
        lora = LoraConfig(rank=raw["r"], alpha=float(raw["lora_alpha"]), dropout=float(raw.get("lora_dropout", 0.0)),
                          targets=tuple(targets or ()), rslora=bool(raw.get("use_rslora", False)))
    except (KeyError, TypeError, ConfigError) as e:
        raise WeightsError(f"{path}: cannot read the LoRA settings ({type(e).__name__}: {e})") from None
    return lora, raw.get("base_model_name_or_path")


def load_adapter_weights(model, directory) -> None:
    """Copy adapter_model.safetensors into the model's LoRALinear layers, strictly (names and shapes checked)."""
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise WeightsError(f"{path}: missing (expected the adapter weights beside {ADAPTER_CONFIG})")
    want = {}
    for name, m in lora_modules(model).items():
        peft = _peft_module_name(model, name)
        want[f"{peft}.lora_A.weight"], want[f"{peft}.lora_B.weight"] = m.lora_A.weight, m.lora_B.weight
    try:
        f = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path}: not a valid safetensors file, truncated or corrupt ({e})") from None
    with f:
        # PEFT versions differ in keeping the adapter name (`lora_A.default.weight`); accept both.
        present = {k.replace(".default.weight", ".weight"): k for k in f.keys()}
        missing, unexpected = sorted(set(want) - set(present)), sorted(set(present) - set(want))
        if missing or unexpected:
            what = (f"missing {', '.join(missing[:4])}" if missing else f"unexpected {', '.join(unexpected[:4])}")
            raise WeightsError(f"{path}: adapter tensors do not match the model's LoRA layers ({what})")
        with torch.no_grad():
            for name, param in want.items():
                t = f.get_tensor(present[name])
                if t.shape != param.shape:
                    raise WeightsError(f"{path}: tensor '{name}' has shape {list(t.shape)}, expected {list(param.shape)}")
                param.copy_(t)


def load_adapter(model, directory) -> LoraConfig:
    """Apply the adapter saved in `directory` (ours or PEFT's) to `model` and load its weights; returns its config."""
    lora, base = read_adapter_config(directory)
    apply_lora(model, lora, base or "")
    load_adapter_weights(model, directory)
    return lora


def load_with_adapter(base_dir, adapter_dir=None, dtype=torch.float32):
    """A Transformer from an HF dir, or base + adapter when `adapter_dir` (or base_dir itself) holds an adapter."""
    from engine.model import Transformer

    base_dir = Path(base_dir)
    if adapter_dir is None and (base_dir / ADAPTER_CONFIG).is_file():  # a LoRA run's final/ or checkpoint dir
        adapter_dir, base = base_dir, read_adapter_config(base_dir)[1]
        if not base:
            raise WeightsError(f"{base_dir / ADAPTER_CONFIG}: no base_model_name_or_path; pass the base model too")
        base_dir = Path(base)
    model = Transformer.from_pretrained(base_dir, dtype=dtype)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
        model.eval()
    return model


def trainable_summary(model) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable / 1e6:.2f}M trainable of {total / 1e6:.2f}M params ({100 * trainable / total:.2f}%)"
