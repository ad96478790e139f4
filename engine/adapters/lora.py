"""LoRA: low-rank adapters on frozen linear layers, saved and loaded in PEFT's on-disk layout.

y = W x + b + scale * B (A dropout(x)),   A [r, in] (kaiming-uniform), B [out, r] (zeros), scale = alpha / r.

Adapters are added from the outside: `apply_lora` swaps the targeted `nn.Linear` children of a Transformer
for `LoRALinear`, which keeps the base `weight`/`bias` Parameters under their old names (so native <-> HF
name tables still apply) and adds `lora_A`/`lora_B`. Every other parameter is frozen.

On disk an adapter is what `peft.PeftModel.save_pretrained` writes: adapter_config.json + adapter_model.safetensors
with names `base_model.model.<HF module>.lora_A.weight`, so PEFT loads ours and we load PEFT's.

GPT-2 keeps q, k and v in one Conv1D (`c_attn`), and PEFT adapts that module as a whole: one A [r, in] and one
B [3 * out, r]. Here q_proj, k_proj and v_proj share one lora_A module and each holds its rows of B, which is
the same function and the same gradients; on disk B is their concatenation. (With dropout > 0 the three draw
separate dropout masks where PEFT draws one: the same in expectation, not bit for bit.)
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
from engine.model.families import stored_as, weight_layout
from engine.model.hf_format import WeightsError, read_json

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
GPT2_TARGETS = {"c_attn": ("q_proj", "k_proj", "v_proj"), "attn.c_attn": ("q_proj", "k_proj", "v_proj"),
                "c_proj": ("o_proj", "down_proj"), "attn.c_proj": ("o_proj",), "mlp.c_proj": ("down_proj",),
                "c_fc": ("up_proj",), "mlp.c_fc": ("up_proj",)}  # PEFT target_modules -> our module names


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
    """Targets the model can adapt: GPT-2's fused c_attn (q, k, v) is adapted whole or not at all."""
    fused = {"q_proj", "k_proj", "v_proj"}
    if model_cfg.hf_model_type == "gpt2" and 0 < len(fused & set(lora.targets)) < 3:
        raise ConfigError("lora.targets: GPT-2 stores q_proj, k_proj and v_proj in one module (c_attn), which an "
                          "adapter covers whole: target all three or none")
    if "gate_proj" in lora.targets and not model_cfg.gated_mlp and tuple(lora.targets) != LORA_TARGETS:
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
    modules = lora_modules(model)
    for names in peft_modules(model).values():  # a fused HF module (GPT-2's c_attn): one A for all its parts
        for name in names[1:]:
            modules[name].lora_A = modules[names[0]].lora_A
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


def peft_modules(model) -> dict[str, list[str]]:
    """PEFT module name -> the native LoRA modules stored in it, in storage order: one each, except a fused
    module (`base_model.model.transformer.h.0.attn.c_attn` -> layers.0.attn.{q,k,v}_proj)."""
    layout, groups = weight_layout(model.config), {}
    for name in lora_modules(model):
        stored = stored_as(layout, name + ".weight")
        groups.setdefault(PEFT_PREFIX + stored.name.removesuffix(".weight"), []).append((stored.part, name))
    return {peft: [name for _, name in sorted(parts)] for peft, parts in groups.items()}


def adapter_state_dict(model, params=None) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's saved names: `...q_proj.lora_A.weight` [r, in], `...lora_B.weight` [out, r]
    (a fused module's B: its parts' rows, concatenated). `params` (native name -> tensor) replace the
    model's own tensors: FSDP's gathered ones (engine.distributed.full_params)."""
    if params is None:
        params = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False) if ".lora_" in n}
    out = {}
    for peft, names in peft_modules(model).items():
        out[f"{peft}.lora_A.weight"] = params[f"{names[0]}.lora_A.weight"].contiguous()
        out[f"{peft}.lora_B.weight"] = torch.cat([params[f"{n}.lora_B.weight"] for n in names]).contiguous()
    return out


def _peft_targets(model) -> tuple[list[str], bool]:
    """adapter_config.json's target_modules and fan_in_fan_out for the adapted model. Llama-style families
    name the module (`q_proj`); GPT-2 names it from its block (`attn.c_proj` vs `mlp.c_proj`), and its
    Conv1D weights are stored [in, out], which PEFT records as fan_in_fan_out."""
    if model.config.hf_model_type != "gpt2":
        return [t for t in model.lora_config.targets if any(n.endswith("." + t) for n in lora_modules(model))], False
    blocks = {peft.split(".h.", 1)[1].split(".", 1)[1] for peft in peft_modules(model)}  # "0.attn.c_attn" -> "attn.c_attn"
    return sorted(blocks), True


def adapter_config(model) -> dict:
    """adapter_config.json as PEFT writes it (the fields PEFT needs to rebuild the same adapter)."""
    lora, (targets, fan_in_fan_out) = model.lora_config, _peft_targets(model)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": model.lora_base or None,
            "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": targets,
            "use_rslora": lora.rslora, "bias": "none", "fan_in_fan_out": fan_in_fan_out, "use_dora": False,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
            "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True, "lora_bias": False}


def save_adapter(model, directory, params=None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (PEFT layout) into `directory` (`params`: see
    adapter_state_dict)."""
    if not is_lora(model):
        raise ValueError("save_adapter: the model has no LoRA adapters (apply_lora first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (ADAPTER_WEIGHTS + ".tmp")
    save_file(adapter_state_dict(model, params), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / ADAPTER_WEIGHTS)
    text = json.dumps(adapter_config(model), indent=2, sort_keys=True)
    (directory / ADAPTER_CONFIG).write_text(text + "\n")
    return directory


def read_adapter_config(directory) -> tuple[LoraConfig, str | None]:
    """The LoraConfig and base model path of a PEFT adapter dir; unsupported PEFT options are errors naming the key."""
    path = Path(directory) / ADAPTER_CONFIG
    raw = read_json(path, "expected a PEFT LoRA adapter directory")
    if raw.get("peft_type") != "LORA":
        raise WeightsError(f"{path}: peft_type {raw.get('peft_type')!r} is not supported (only 'LORA')")
    # fan_in_fan_out only says how the base stores its weights (PEFT sets it for GPT-2's Conv1D itself)
    unsupported = {"use_dora": False, "bias": "none", "modules_to_save": None,
                   "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False,
                   "target_parameters": None, "layer_replication": None, "trainable_token_indices": None}
    for key, ok in unsupported.items():
        if raw.get(key) not in (ok, None, {}, []):
            raise WeightsError(f"{path}: {key}={raw[key]!r} is not supported (only {ok!r})")
    targets = raw.get("target_modules")
    if isinstance(targets, str):  # PEFT also accepts a regex over full names, or "all-linear"
        targets = LORA_TARGETS if targets == "all-linear" else [t for t in LORA_TARGETS if t in targets]
    else:  # PEFT matches name suffixes: "self_attn.q_proj" is q_proj; GPT-2's modules have their own names
        targets = [n for t in targets or () for n in GPT2_TARGETS.get(t, (t.rsplit(".", 1)[-1],))]
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
    modules, want = lora_modules(model), {}  # PEFT tensor name -> the parameters it fills, split by rows
    for peft, names in peft_modules(model).items():
        want[f"{peft}.lora_A.weight"] = [modules[names[0]].lora_A.weight]
        want[f"{peft}.lora_B.weight"] = [modules[n].lora_B.weight for n in names]
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
            for name, params in want.items():
                t = f.get_tensor(present[name])
                shape = [sum(p.shape[0] for p in params), *params[0].shape[1:]]
                if list(t.shape) != shape:
                    raise WeightsError(f"{path}: tensor '{name}' has shape {list(t.shape)}, expected {shape}")
                for param, rows in zip(params, t.split([p.shape[0] for p in params])):
                    param.copy_(rows)


def load_adapter(model, directory) -> LoraConfig:
    """Apply the adapter saved in `directory` (ours or PEFT's) to `model` and load its weights; returns its config."""
    lora, base = read_adapter_config(directory)
    apply_lora(model, lora, base or "")
    load_adapter_weights(model, directory)
    return lora


def load_with_adapter(base_dir, adapter_dir=None, dtype=torch.float32):
    """A Transformer from an HF dir, or base + adapter when `adapter_dir` (or base_dir itself) holds an adapter."""
    from engine.model.transformer import Transformer

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
