"""Hugging Face config.json <-> ModelConfig, and the HF <-> native weight-name tables, as data.

Everything a family changes is a row in a table below (see docs/families.md); transformer.py never asks
which family it is running.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Optional

from engine.config import ConfigError, ModelConfig, RopeScaling
from engine.model.hf_layers import (LAYER_TYPES, expressed_fields, layer_fields, layer_keys_to_hf, parse_rope,
                                    partial_rotary_factor, rope_to_hf)
from engine.model import dense_families, moe_families
from engine.model.moe_families import ExpertsStored
from engine.model.stored import Stored  # noqa: F401 (re-exported: hf_format and the tests import it from here)

logger = logging.getLogger(__name__)

# `architectures[0]` in config.json -> model_type. Anything else is rejected by name.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "GPT2LMHeadModel": "gpt2",
    **dense_families.ARCHITECTURES,
    **moe_families.ARCHITECTURES,
}

# What each family fixes whatever its config.json says (the rest is read from the file).
FAMILY_TRAITS = {
    "llama": {},
    "mistral": {},
    "qwen2": {"qkv_bias": True},
    "qwen3": {"qk_norm": True},
    "gemma": {"norm_weight_offset": 1.0, "scale_embeddings": True},
    "gpt2": {"norm": "layernorm", "gated_mlp": False, "mlp_bias": True, "qkv_bias": True, "o_bias": True,
             "position": "learned"},
    **dense_families.FAMILY_TRAITS,
    **moe_families.FAMILY_TRAITS,
}

# What each family's config.json can say per layer (issue 14). layer_types: the key that lists
# "sliding_attention" / "full_attention" per layer, windowed by `sliding_window` (SmolLM3 only while
# `use_sliding_window` is true); every_layer: `sliding_window` applies to all layers; rope_per_layer_type:
# `rope_parameters` holds one RoPE per layer type; no_rope_layers: SmolLM3's 1 = RoPE, 0 = none.
LAYER_KEYS = {
    "mistral": {"every_layer": True},
    "mixtral": {"every_layer": True},
    "qwen3_moe": {"every_layer": True},
    **dense_families.LAYER_KEYS,
}
# Scalars some families' config.json carry: ModelConfig field -> (key, transformers' default when absent).
SCALAR_KEYS = dense_families.SCALAR_KEYS

# ModelConfig field -> config.json key. GPT-2 predates the common naming.
LLAMA_KEYS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
    "intermediate_size": "intermediate_size", "max_position_embeddings": "max_position_embeddings",
    "norm_eps": "rms_norm_eps", "activation": "hidden_act",
}
GPT2_KEYS = {
    "vocab_size": "vocab_size", "hidden_size": "n_embd", "num_layers": "n_layer", "num_heads": "n_head",
    "intermediate_size": "n_inner", "max_position_embeddings": "n_positions", "norm_eps": "layer_norm_epsilon",
    "activation": "activation_function",
}
CONFIG_KEYS = {"gpt2": GPT2_KEYS,  # others: LLAMA_KEYS
               **{family: {**LLAMA_KEYS, **rows} for family, rows in dense_families.KEYS.items()}}

# HF activation name -> ours. Gemma's legacy "gelu" means the tanh approximation (transformers does the same).
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu": "gelu", "relu": "relu"}
FAMILY_ACTIVATIONS = {"gemma": {"gelu": "gelu_tanh"}, **dense_families.FAMILY_ACTIVATIONS}
ACTIVATION_NAMES = {"llama": {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "relu": "relu"},
                    "gpt2": {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}}


def _with_biases(table: dict) -> dict:
    """Add the `.bias` row beside every projection `.weight` row; a model without biases skips them."""
    out = dict(table)
    for native, hf in table.items():
        if native.endswith("_proj.weight"):
            out[native[: -len("weight")] + "bias"] = hf[: -len("weight")] + "bias"
    return out


LLAMA_WEIGHTS = _with_biases({
    "embed.weight": "model.embed_tokens.weight",
    "layers.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.attn.q_proj.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attn.k_proj.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attn.v_proj.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attn.o_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.attn.q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "layers.{}.attn.k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
    "layers.{}.mlp_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.mlp.gate_proj.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.mlp.up_proj.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.mlp.down_proj.weight": "model.layers.{}.mlp.down_proj.weight",
    # Post-norms: no Llama-layout family has them yet; these names (Gemma 2's post_feedforward_layernorm;
    # its post_attention_layernorm would clash with Llama's pre-MLP norm) let such a model save and reload.
    "layers.{}.post_attn_norm.weight": "model.layers.{}.post_attn_output_layernorm.weight",
    "layers.{}.post_mlp_norm.weight": "model.layers.{}.post_feedforward_layernorm.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
})

GPT2_WEIGHTS = {
    "embed.weight": "transformer.wte.weight",
    "pos_embed.weight": "transformer.wpe.weight",
    "layers.{}.attn_norm.weight": "transformer.h.{}.ln_1.weight",
    "layers.{}.attn_norm.bias": "transformer.h.{}.ln_1.bias",
    "layers.{}.attn.q_proj.weight": Stored("transformer.h.{}.attn.c_attn.weight", True, 0, 3),
    "layers.{}.attn.k_proj.weight": Stored("transformer.h.{}.attn.c_attn.weight", True, 1, 3),
    "layers.{}.attn.v_proj.weight": Stored("transformer.h.{}.attn.c_attn.weight", True, 2, 3),
    "layers.{}.attn.q_proj.bias": Stored("transformer.h.{}.attn.c_attn.bias", False, 0, 3),
    "layers.{}.attn.k_proj.bias": Stored("transformer.h.{}.attn.c_attn.bias", False, 1, 3),
    "layers.{}.attn.v_proj.bias": Stored("transformer.h.{}.attn.c_attn.bias", False, 2, 3),
    "layers.{}.attn.o_proj.weight": Stored("transformer.h.{}.attn.c_proj.weight", True),
    "layers.{}.attn.o_proj.bias": "transformer.h.{}.attn.c_proj.bias",
    "layers.{}.mlp_norm.weight": "transformer.h.{}.ln_2.weight",
    "layers.{}.mlp_norm.bias": "transformer.h.{}.ln_2.bias",
    "layers.{}.mlp.up_proj.weight": Stored("transformer.h.{}.mlp.c_fc.weight", True),
    "layers.{}.mlp.up_proj.bias": "transformer.h.{}.mlp.c_fc.bias",
    "layers.{}.mlp.down_proj.weight": Stored("transformer.h.{}.mlp.c_proj.weight", True),
    "layers.{}.mlp.down_proj.bias": "transformer.h.{}.mlp.c_proj.bias",
    "norm.weight": "transformer.ln_f.weight",
    "norm.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight",
}


@dataclass(frozen=True)
class WeightLayout:
    """A family's weight-name table plus the quirks of its files."""

    table: dict
    optional_prefix: str = ""  # old GPT-2 files omit "transformer."
    ignored_suffixes: tuple = ()  # buffers some files carry that are not weights


LAYOUTS = {
    "gpt2": WeightLayout(GPT2_WEIGHTS, optional_prefix="transformer.",
                         ignored_suffixes=(".attn.bias", ".attn.masked_bias")),
    **{family: WeightLayout({**LLAMA_WEIGHTS, **rows}, ignored_suffixes=(".rotary_emb.inv_freq",))
       for family, rows in {**dense_families.WEIGHTS, **moe_families.WEIGHTS}.items()},
}
# Qwen-MoE's expert names too, so an MoE model of a dense family (trained from scratch) saves and reloads.
DEFAULT_LAYOUT = WeightLayout({**LLAMA_WEIGHTS, **moe_families.QWEN_MOE_WEIGHTS}, ignored_suffixes=(".rotary_emb.inv_freq",))


def weight_layout(cfg: ModelConfig) -> WeightLayout:
    return LAYOUTS.get(cfg.hf_model_type, DEFAULT_LAYOUT)


def stored_as(layout: WeightLayout, native_name: str) -> Stored | ExpertsStored:
    """Map a native parameter name (`layers.3.attn.q_proj.weight`) to where HF stores it (a stacked
    expert parameter to its per-expert tensors)."""
    parts = native_name.split(".")
    layer = None
    if parts[0] == "layers":
        layer, parts[1] = parts[1], "{}"
    spec = layout.table.get(".".join(parts))
    if spec is None:
        raise KeyError(f"no Hugging Face name for parameter '{native_name}'")
    if isinstance(spec, ExpertsStored):
        return ExpertsStored(tuple(n.format(layer, e="{e}") for n in spec.names))
    spec = spec if isinstance(spec, Stored) else Stored(spec)
    return Stored(spec.name.format(layer), spec.transposed, spec.part, spec.parts) if layer else spec


# ---------------------------------------------------------------------------- config.json


def _model_type(hf: dict, source: str) -> str:
    archs = hf.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"{source}: 'architectures': expected a list of class names, got {json.dumps(archs)}")
    if "model_type" in hf and not isinstance(hf["model_type"], str):
        raise ConfigError(f"{source}: 'model_type': expected a string, got {json.dumps(hf['model_type'])}")
    if archs:
        if archs[0] not in ARCHITECTURES:
            raise ConfigError(f"{source}: architecture '{archs[0]}' is not supported; "
                              f"supported: {', '.join(ARCHITECTURES)}")
        return ARCHITECTURES[archs[0]]
    model_type = hf.get("model_type")
    if model_type not in FAMILY_TRAITS:
        raise ConfigError(f"{source}: no 'architectures' and model_type {model_type!r} is not one of "
                          f"{', '.join(FAMILY_TRAITS)}")
    return model_type


def _rope(hf: dict, source: str, rotary_dim: int) -> tuple[float, Optional[RopeScaling]]:
    """Read RoPE settings from either `rope_theta` + `rope_scaling` (transformers 4) or `rope_parameters` (5)."""
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = hf.get(key) or {}
    if isinstance(params, dict) and set(params) and set(params) <= set(LAYER_TYPES):
        params = {}  # one RoPE per layer type (Gemma 3): read by hf_layers.layer_fields
    return parse_rope(params, hf, source, key, rotary_dim)


def _scalar_fields(model_type: str, hf: dict, source: str) -> dict:
    """SCALAR_KEYS of the family: a missing key takes transformers' default, null means none."""
    out = {}
    for field, (key, default) in SCALAR_KEYS.get(model_type, {}).items():
        value = hf.get(key, default)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            raise ConfigError(f"{source}: '{key}': expected a positive number or null, got {json.dumps(value)}")
        out[field] = value  # kept as written: transformers checks query_pre_attn_scalar is an int
    if model_type == "gemma3_text" and hf.get("attn_logit_softcapping") is not None:
        logger.warning("%s: attn_logit_softcapping=%s is ignored, as transformers' Gemma 3 ignores it",
                       source, hf["attn_logit_softcapping"])
    if hf.get("use_bidirectional_attention"):
        raise ConfigError(f"{source}: use_bidirectional_attention=true is not implemented (only causal attention)")
    return out


TIED_BY_DEFAULT = ("gemma", "gpt2", *dense_families.TIED_BY_DEFAULT)  # transformers' config defaults

# config.json keys whose null means "derive it" (GPT-2's n_inner: 4 * n_embd; head_dim: hidden / heads);
# any other key given as null is an error, not silently the default.
NULL_MEANS_DEFAULT = ("num_kv_heads", "head_dim", "intermediate_size")


def _checked_values(hf: dict, keys: dict, source: str) -> dict:
    """ModelConfig field -> value of each present key, type-checked: errors name the file and the key."""
    values = {}
    for field, key in keys.items():
        if key not in hf or (hf[key] is None and field in NULL_MEANS_DEFAULT):
            continue
        value = hf[key]
        if field == "activation":
            ok, expected = isinstance(value, str), "a string"
        elif field == "norm_eps":
            ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, \
                "a positive number"
        else:
            ok, expected = isinstance(value, int) and not isinstance(value, bool) and value > 0, "a positive integer"
        if not ok:
            raise ConfigError(f"{source}: '{key}': expected {expected}, got {json.dumps(value)}")
        values[field] = value
    return values


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Translate a Hugging Face config.json dict into a ModelConfig; `source` names the file in errors."""
    if not isinstance(hf, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    model_type = _model_type(hf, source)
    keys = CONFIG_KEYS.get(model_type, LLAMA_KEYS)
    values = _checked_values(hf, keys, source)
    for required in ("vocab_size", "hidden_size", "num_layers", "num_heads"):
        if required not in values:
            raise ConfigError(f"{source}: missing '{keys[required]}'")
    values.setdefault("num_kv_heads", values["num_heads"])
    values.setdefault("head_dim", values["hidden_size"] // values["num_heads"])
    values.setdefault("intermediate_size", 4 * values["hidden_size"])  # GPT-2's n_inner: null
    values.setdefault("max_position_embeddings", 2048)
    act = values.get("activation", "silu")
    act = FAMILY_ACTIVATIONS.get(model_type, {}).get(act) or ACTIVATIONS.get(act)
    if act is None:
        raise ConfigError(f"{source}: activation '{values['activation']}' is not supported "
                          f"(supported: {', '.join(ACTIVATIONS)})")
    values["activation"] = act
    values.update(FAMILY_TRAITS[model_type])
    if model_type == "gpt2":
        for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("reorder_and_upcast_attn", False)):
            if hf.get(key, ok) != ok:
                raise ConfigError(f"{source}: {key}={hf[key]} is not implemented (only {ok})")
    else:
        values["partial_rotary_factor"] = partial_rotary_factor(hf, source)
        head_dim = values["head_dim"]
        rotary_dim = int(head_dim * values["partial_rotary_factor"])
        values["rope_theta"], values["rope_scaling"] = _rope(hf, source, rotary_dim)
        if hf.get("attention_bias"):  # Llama-style attention_bias puts biases on q, k, v and o
            values["qkv_bias"] = values["o_bias"] = True
        values["mlp_bias"] = bool(hf.get("mlp_bias", False))
    layers = LAYER_KEYS.get(model_type, {})
    if hf.get("use_sliding_window") and layers.get("window_switch") != "use_sliding_window":
        raise ConfigError(f"{source}: use_sliding_window=true (per-layer sliding windows) is not implemented")
    if layers:
        values.update(layer_fields(model_type, layers, hf, source, values["num_layers"], rotary_dim,
                                   values["rope_theta"], values["rope_scaling"]))
    values.update(_scalar_fields(model_type, hf, source))
    values["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", model_type in TIED_BY_DEFAULT))
    for tok in ("bos_token_id", "eos_token_id", "pad_token_id"):
        values[tok] = hf.get(tok)
    values.update(moe_families.fields_from_hf(model_type, hf, values, source))
    values.update(_engine_fields(hf, source))
    try:
        return ModelConfig(hf_model_type=model_type, extra_hf=dict(hf), **values)
    except ConfigError as e:  # name the file's keys, not our fields
        message = str(e)
        for field, key in keys.items():
            message = message.replace(f"model.{field}:", f"'{key}':").replace(f"model.{field} ", f"'{key}' ")
        raise ConfigError(f"{source}: {message}") from None


# ModelConfig fields (with their defaults) that no supported family's config.json can express yet. A
# config that sets them (a model trained from scratch) keeps them under ENGINE_KEY so this engine reloads
# the same model; transformers ignores that key. A family that gains such a layer maps its own keys instead.
NO_HF_KEY = {"layer_sliding_windows": None, "layer_rope_thetas": None, "layer_rope_scalings": None,
             "pre_norm": True, "post_attn_norm": False, "post_mlp_norm": False, "mlp_class": "dense",
             **moe_families.NO_HF_KEY}
ENGINE_KEY = "engine_layers"


def _engine_fields(hf: dict, source: str) -> dict:
    """The NO_HF_KEY fields a config.json carries under ENGINE_KEY (written by config_to_hf)."""
    extra = hf.get(ENGINE_KEY)
    if extra is None:
        return {}
    if not isinstance(extra, dict) or set(extra) - set(NO_HF_KEY):
        raise ConfigError(f"{source}: '{ENGINE_KEY}': expected an object with keys from {', '.join(NO_HF_KEY)}, "
                          f"got {extra!r}")
    return dict(extra)


def config_to_hf(cfg: ModelConfig) -> dict:
    """The config.json for `cfg`: the original file's keys kept, ours written over them."""
    hf = dict(cfg.extra_hf)
    hf.pop(ENGINE_KEY, None)
    layers = LAYER_KEYS.get(cfg.hf_model_type, {})
    fixed = FAMILY_TRAITS[cfg.hf_model_type]  # the family's own layout says these
    own = moe_families.KEYS.get(cfg.hf_model_type, {})  # fields the family's config.json has keys for
    custom = {f: getattr(cfg, f) for f, default in NO_HF_KEY.items() if getattr(cfg, f) != default
              and f not in expressed_fields(layers) and fixed.get(f, default) != getattr(cfg, f)
              and f not in own}
    if custom:
        logger.warning("config.json: %s kept under '%s'; transformers will load a '%s' model without them",
                       ", ".join(custom), ENGINE_KEY, cfg.hf_model_type)
        as_json = {f: v for f, v in cfg.to_dict().items() if f in custom}  # tuples/RopeScaling -> lists/objects
        hf[ENGINE_KEY] = json.loads(json.dumps(as_json))
    for key in ("rope_parameters", "rope_scaling", "rope_theta", "torch_dtype", "dtype", "transformers_version"):
        hf.pop(key, None)
    arch = {v: k for k, v in ARCHITECTURES.items()}[cfg.hf_model_type]
    hf.update(architectures=[arch], model_type=cfg.hf_model_type)
    keys = CONFIG_KEYS.get(cfg.hf_model_type, LLAMA_KEYS)
    names = ACTIVATION_NAMES["gpt2" if cfg.hf_model_type == "gpt2" else "llama"]
    for field, key in keys.items():
        hf[key] = names[cfg.activation] if field == "activation" else getattr(cfg, field)
    if cfg.hf_model_type == "gpt2":
        hf["n_inner"] = cfg.intermediate_size
    else:
        rope = rope_to_hf(cfg.rope_theta, cfg.rope_scaling, cfg.partial_rotary_factor)
        if cfg.partial_rotary_factor != 1.0:
            hf["partial_rotary_factor"] = cfg.partial_rotary_factor
        # Both spellings, so transformers 4.x (rope_theta + rope_scaling) and 5.x (rope_parameters) read it.
        hf.update(rope_theta=cfg.rope_theta, rope_parameters=rope)
        if cfg.rope_scaling is not None:
            hf["rope_scaling"] = rope
        if cfg.hf_model_type in ("llama", "mistral"):
            hf["attention_bias"] = cfg.qkv_bias
            hf["mlp_bias"] = cfg.mlp_bias
        hf.update(layer_keys_to_hf(cfg, layers))  # layer_types, sliding_window, per-type rope_parameters ...
        for field, (key, _) in SCALAR_KEYS.get(cfg.hf_model_type, {}).items():
            hf[key] = getattr(cfg, field)
        moe, aliases = moe_families.fields_to_hf(cfg)
        for key in aliases:
            hf.pop(key, None)
        hf.update(moe)
    hf["tie_word_embeddings"] = cfg.tie_word_embeddings
    hf.update(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    return hf
