"""PEFT's on-disk LoRA layout, both ways: what `peft.PeftModel.save_pretrained` writes, so PEFT loads ours
and we load PEFT's.

<adapter dir>/adapter_config.json         r, lora_alpha, target_modules, ... (adapter_config below)
<adapter dir>/adapter_model.safetensors   `base_model.model.<HF module>.lora_A.weight` [r, in], `...lora_B.weight`
                                          [out, r]; GPT-2's fused c_attn: one A, B = the q, k, v rows concatenated

Both files are written atomically and durably (engine.files); a new adapter dir appears whole or not at all.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from engine.adapters.lora import adapter_state, apply_lora, is_lora, lora_modules, peft_modules
from engine.config import LORA_TARGETS, ConfigError, LoraConfig
from engine.files import atomic_write, crash_point, write_dir
from engine.model.hf_format import WeightsError, read_json

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "GPT2_TARGETS", "adapter_state_dict", "adapter_config",
           "save_adapter", "read_adapter_config", "load_adapter_weights", "load_adapter", "load_with_adapter"]

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
GPT2_TARGETS = {"c_attn": ("q_proj", "k_proj", "v_proj"), "attn.c_attn": ("q_proj", "k_proj", "v_proj"),
                "c_proj": ("o_proj", "down_proj"), "attn.c_proj": ("o_proj",), "mlp.c_proj": ("down_proj",),
                "c_fc": ("up_proj",), "mlp.c_fc": ("up_proj",)}  # PEFT target_modules -> our module names
# Phi-3's fused modules (one A, B = the parts' rows, as PEFT adapts them)
FUSED_TARGETS = {**GPT2_TARGETS, "qkv_proj": ("q_proj", "k_proj", "v_proj"),
                 "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj"),
                 "mlp.gate_up_proj": ("gate_proj", "up_proj")}


def adapter_state_dict(model, params=None) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's saved names: `...q_proj.lora_A.weight` [r, in], `...lora_B.weight` [out, r]
    (a fused module's B: its parts' rows, concatenated). `params` (native name -> tensor) replace the
    model's own tensors: FSDP's gathered ones (engine.train.distributed.full_params)."""
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
        stored = {peft.rsplit(".", 1)[-1] for peft in peft_modules(model)}  # Phi-3: qkv_proj, gate_up_proj
        targets = [t for t in adapter_state(model).config.targets if t in stored]
        return targets + sorted(stored - set(targets)), False
    blocks = {peft.split(".h.", 1)[1].split(".", 1)[1] for peft in peft_modules(model)}  # "0.attn.c_attn" -> "attn.c_attn"
    return sorted(blocks), True


def adapter_config(model) -> dict:
    """adapter_config.json as PEFT writes it (the fields PEFT needs to rebuild the same adapter)."""
    state, (targets, fan_in_fan_out) = adapter_state(model), _peft_targets(model)
    lora = state.config
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": state.base_name or None,
            "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": targets,
            "use_rslora": lora.rslora, "bias": "none", "fan_in_fan_out": fan_in_fan_out, "use_dora": False,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
            "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True, "lora_bias": False}


def save_adapter(model, directory, params=None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (PEFT layout) into `directory` (`params`: see
    adapter_state_dict). A new directory is published whole (temp dir + rename); into an existing one (a
    checkpoint or final/ being filled) each file is replaced atomically, the weights before the config that
    marks the directory as an adapter."""
    if not is_lora(model):
        raise ValueError("save_adapter: the model has no LoRA adapters (apply_lora first)")
    directory = Path(directory)
    weights = safetensors_bytes(adapter_state_dict(model, params), metadata={"format": "pt"})
    text = json.dumps(adapter_config(model), indent=2, sort_keys=True) + "\n"

    def fill(d: Path) -> None:
        atomic_write(d / ADAPTER_WEIGHTS, weights)
        crash_point("save_adapter:weights")
        atomic_write(d / ADAPTER_CONFIG, text)

    if directory.is_dir():
        fill(directory)
    else:
        write_dir(directory, fill)
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
        targets = [n for t in targets or () for n in FUSED_TARGETS.get(t, (t.rsplit(".", 1)[-1],))]
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
