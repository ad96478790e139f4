"""The mixture-of-experts families' rows (Mixtral, Qwen3-MoE, Qwen2-MoE), as data: config.json keys and
weight names. engine.model.families merges them into its tables; engine.model.moe is the module.

transformers 5 computes experts from fused 3D tensors (`mlp.experts.gate_up_proj` [E, 2F, C]) but reads and
writes checkpoints per expert (`mlp.experts.{e}.gate_proj.weight` [F, C], Mixtral's `w1`/`w3`/`w2`), as the
hub's files are; so do we: our stacked parameters are split per expert on save and stacked on load.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from engine.config import ConfigError, ModelConfig

ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
}
FAMILY_TRAITS = {
    "mixtral": {"mlp_class": "moe", "norm_topk_prob": True},  # Mixtral always renormalizes its top-2
    "qwen3_moe": {"mlp_class": "moe", "qk_norm": True},
    "qwen2_moe": {"mlp_class": "moe", "qkv_bias": True},
}


@dataclass(frozen=True)
class ExpertsStored:
    """A stacked [E, rows, in] parameter stored as one [rows / len(names), in] tensor per expert and name
    (`{e}` in each name is the expert, `{}` the layer); the names' tensors are the rows in order."""

    names: tuple[str, ...]

    def pieces(self, shape) -> list[tuple[str, tuple]]:
        """(stored name, index into the stacked parameter) for every expert and name."""
        E, rows = shape[0], shape[1] // len(self.names)
        return [(name.format(e=e), (e, slice(j * rows, (j + 1) * rows)))
                for e in range(E) for j, name in enumerate(self.names)]


_QWEN = "model.layers.{}.mlp."
QWEN_MOE_WEIGHTS = {
    "layers.{}.mlp.router.weight": _QWEN + "gate.weight",
    "layers.{}.mlp.experts.gate_up_proj": ExpertsStored((_QWEN + "experts.{e}.gate_proj.weight",
                                                         _QWEN + "experts.{e}.up_proj.weight")),
    "layers.{}.mlp.experts.down_proj": ExpertsStored((_QWEN + "experts.{e}.down_proj.weight",)),
    "layers.{}.mlp.shared_expert.gate_proj.weight": _QWEN + "shared_expert.gate_proj.weight",
    "layers.{}.mlp.shared_expert.up_proj.weight": _QWEN + "shared_expert.up_proj.weight",
    "layers.{}.mlp.shared_expert.down_proj.weight": _QWEN + "shared_expert.down_proj.weight",
    "layers.{}.mlp.shared_expert_gate.weight": _QWEN + "shared_expert_gate.weight",
}
_MIXTRAL = "model.layers.{}.block_sparse_moe."
MIXTRAL_WEIGHTS = {
    "layers.{}.mlp.router.weight": _MIXTRAL + "gate.weight",
    "layers.{}.mlp.experts.gate_up_proj": ExpertsStored((_MIXTRAL + "experts.{e}.w1.weight",
                                                         _MIXTRAL + "experts.{e}.w3.weight")),
    "layers.{}.mlp.experts.down_proj": ExpertsStored((_MIXTRAL + "experts.{e}.w2.weight",)),
}
WEIGHTS = {"mixtral": MIXTRAL_WEIGHTS, "qwen3_moe": QWEN_MOE_WEIGHTS, "qwen2_moe": QWEN_MOE_WEIGHTS}

# ModelConfig field -> config.json key(s), the first the one we write; transformers 5 writes Qwen3-MoE's
# expert count as num_local_experts (an alias of the hub's num_experts).
_QWEN_KEYS = {"num_experts": ("num_experts", "num_local_experts"), "num_experts_per_tok": ("num_experts_per_tok",),
              "moe_intermediate_size": ("moe_intermediate_size",), "norm_topk_prob": ("norm_topk_prob",),
              "router_aux_loss_coef": ("router_aux_loss_coef",), "decoder_sparse_step": ("decoder_sparse_step",),
              "mlp_only_layers": ("mlp_only_layers",)}
KEYS = {
    "mixtral": {"num_experts": ("num_local_experts",), "num_experts_per_tok": ("num_experts_per_tok",),
                "moe_intermediate_size": ("intermediate_size",),  # Mixtral's experts are its MLPs
                "router_aux_loss_coef": ("router_aux_loss_coef",)},
    "qwen3_moe": _QWEN_KEYS,
    "qwen2_moe": {**_QWEN_KEYS, "shared_expert_intermediate_size": ("shared_expert_intermediate_size",)},
}
# transformers' defaults where a file leaves a key out
DEFAULTS = {"num_experts_per_tok": 2, "norm_topk_prob": False, "router_aux_loss_coef": 0.001,
            "decoder_sparse_step": 1, "mlp_only_layers": ()}
# The MoE fields (with ModelConfig's defaults) that a dense family's config.json cannot carry: an MoE model
# trained from scratch as hf_model_type "llama" keeps them under families.ENGINE_KEY.
NO_HF_KEY = {"num_experts": 0, "num_experts_per_tok": 0, "moe_intermediate_size": 0, "norm_topk_prob": False,
             "router_aux_loss_coef": 0.0, "shared_expert_intermediate_size": 0, "decoder_sparse_step": 1,
             "mlp_only_layers": ()}
# keys of variants we do not implement: key -> the only value (or values) we accept
UNSUPPORTED = {"router_jitter_noise": (0, 0.0, None)}


def _check(field: str, key: str, value, source: str):
    """value of config.json `key`, type-checked for ModelConfig `field`."""
    if field == "norm_topk_prob":
        ok, expected = isinstance(value, bool), "true or false"
    elif field == "router_aux_loss_coef":
        ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0, "a number >= 0"
    elif field == "mlp_only_layers":
        ok, expected = isinstance(value, list) and all(isinstance(i, int) for i in value), "a list of layer indices"
        value = tuple(value) if ok else value
    else:
        ok, expected = isinstance(value, int) and not isinstance(value, bool) and value >= 0, "an integer >= 0"
    if not ok:
        raise ConfigError(f"{source}: '{key}': expected {expected}, got {json.dumps(value)}")
    return value


def fields_from_hf(model_type: str, hf: dict, values: dict, source: str) -> dict:
    """The MoE ModelConfig fields of a config.json (`values`: the fields read so far); {} for dense families."""
    if model_type not in KEYS:
        return {}
    for key, allowed in UNSUPPORTED.items():
        if hf.get(key) not in allowed:
            raise ConfigError(f"{source}: '{key}': {json.dumps(hf[key])} is not implemented (only {allowed[0]})")
    out = {}
    for field, keys in KEYS[model_type].items():
        key = next((k for k in keys if k in hf), None)
        if key is None:
            if field == "moe_intermediate_size" and "intermediate_size" in values:
                out[field] = values["intermediate_size"]
            elif field in DEFAULTS:
                out[field] = DEFAULTS[field]
            else:
                raise ConfigError(f"{source}: missing '{keys[0]}'")
            continue
        out[field] = _check(field, key, hf[key], source)
    if out["num_experts"] == 0:  # Qwen-MoE with no experts is a dense model
        return {"mlp_class": "dense"}
    return out


def fields_to_hf(cfg: ModelConfig) -> tuple[dict, tuple[str, ...]]:
    """(config.json keys for cfg's MoE fields, alias keys to drop); ({}, ()) for dense families."""
    if cfg.hf_model_type not in KEYS:
        return {}, ()
    out, aliases = {}, []
    for field, keys in KEYS[cfg.hf_model_type].items():
        value = getattr(cfg, field)
        out[keys[0]] = list(value) if isinstance(value, tuple) else value
        aliases += keys[1:]
    if cfg.hf_model_type == "mixtral":
        out["intermediate_size"] = cfg.moe_intermediate_size
    return out, tuple(aliases)
