"""config.json's RoPE and per-layer keys <-> ModelConfig fields (issue 14's families), as data plus two
small translators. engine.model.families calls these; the tables saying which family has which key live
there (LAYER_KEYS, SCALAR_KEYS).

RoPE: `rope_parameters` (transformers 5; one object, or one per layer type for Gemma 3) or
`rope_theta` + `rope_scaling` (transformers 4). Per layer: `layer_types` ("sliding_attention" /
"full_attention" per layer) with one `sliding_window`, and SmolLM3's `no_rope_layers` (1 = RoPE).
"""
from __future__ import annotations

import json
import math
from typing import Optional

from engine.config import ConfigError, ModelConfig, RopeScaling

REQUIRED_ROPE_KEYS = {"linear": ("factor",), "yarn": ("factor",), "longrope": ("short_factor", "long_factor"),
                      "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
ROPE_KINDS = ("default", *REQUIRED_ROPE_KEYS)
ROPE_ALIASES = {"su": "longrope"}  # Phi-3's first configs
LAYER_TYPES = ("sliding_attention", "full_attention")


def parse_rope(params: dict, hf: dict, source: str, key: str, rotary_dim: int) -> tuple[float, Optional[RopeScaling]]:
    """(theta, scaling) of one RoPE object `params` (found under config key `key`); errors name key and value."""
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: '{key}': expected an object, got {json.dumps(params)}")
    kind = params.get("rope_type", params.get("type", "default"))
    kind = ROPE_ALIASES.get(kind, kind)
    if kind not in ROPE_KINDS:
        raise ConfigError(f"{source}: '{key}': rope scaling type '{kind}' is not implemented "
                          f"(supported: {', '.join(ROPE_KINDS)})")
    missing = [k for k in REQUIRED_ROPE_KEYS.get(kind, ()) if k not in params]
    if missing:
        raise ConfigError(f"{source}: '{key}': rope scaling '{kind}' is missing {', '.join(map(repr, missing))}")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", float(params["factor"]))
    if kind == "llama3":
        return theta, RopeScaling("llama3", float(params["factor"]), float(params["low_freq_factor"]),
                                  float(params["high_freq_factor"]), int(params["original_max_position_embeddings"]))
    max_pos = hf.get("max_position_embeddings", 2048)
    original = int(params.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
                   or max_pos)
    if kind == "yarn":
        factor = float(params["factor"])
        attention = params.get("attention_factor")
        if attention is None:  # transformers' default: 0.1 * mscale * ln(factor) + 1, as a ratio if both given
            def mscale(m=1.0): return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
            m, m_all = params.get("mscale"), params.get("mscale_all_dim")
            attention = mscale(m) / mscale(m_all) if m and m_all else mscale()
        return theta, RopeScaling("yarn", factor, original_max_position_embeddings=original,
                                  attention_factor=float(attention), beta_fast=float(params.get("beta_fast") or 32),
                                  beta_slow=float(params.get("beta_slow") or 1),
                                  truncate=bool(params.get("truncate", True)))
    # longrope: divisors per frequency pair, short within the original context and long past it
    for name in ("short_factor", "long_factor"):
        v = params[name]
        if not (isinstance(v, list) and len(v) == rotary_dim // 2 and all(isinstance(x, (int, float)) for x in v)):
            raise ConfigError(f"{source}: '{key}.{name}': expected a list of {rotary_dim // 2} numbers "
                              f"(one per rotated pair), got {json.dumps(v)[:80]}")
    factor = float(params.get("factor") or max_pos / original)
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return theta, RopeScaling("longrope", factor, original_max_position_embeddings=original,
                              attention_factor=float(attention), short_factor=tuple(map(float, params["short_factor"])),
                              long_factor=tuple(map(float, params["long_factor"])))


def partial_rotary_factor(hf: dict, source: str) -> float:
    """Phi-4-mini's partial_rotary_factor, top level (transformers 4) or inside rope_parameters (5)."""
    params = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
    value = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1):
        raise ConfigError(f"{source}: 'partial_rotary_factor': expected a number in (0, 1], got {json.dumps(value)}")
    return float(value)


def rope_to_hf(theta: float, s: Optional[RopeScaling], partial_rotary_factor: float = 1.0) -> dict:
    """One `rope_parameters` object for (theta, scaling): parse_rope's inverse."""
    out = {"rope_type": "default" if s is None else s.kind, "rope_theta": theta}
    if partial_rotary_factor != 1.0:
        out["partial_rotary_factor"] = partial_rotary_factor
    if s is None:
        return out
    out["factor"] = s.factor
    if s.kind == "llama3":
        out.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                   original_max_position_embeddings=s.original_max_position_embeddings)
    elif s.kind in ("yarn", "longrope"):
        out.update(original_max_position_embeddings=s.original_max_position_embeddings,
                   attention_factor=s.attention_factor)
        if s.kind == "yarn":
            out.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate)
        else:
            out.update(short_factor=list(s.short_factor), long_factor=list(s.long_factor))
    return out


def _default_layer_types(model_type: str, hf: dict, n: int, has_rope: list) -> list:
    """layer_types where an older config.json omits them, as transformers derives them."""
    if model_type == "gemma2":  # alternate, local first
        return [LAYER_TYPES[(i + 1) % 2 == 0] for i in range(n)]
    if model_type == "gemma3_text":  # five local, then one global
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        return [LAYER_TYPES[(i + 1) % pattern == 0] for i in range(n)]
    return [LAYER_TYPES[bool(r)] for r in has_rope]  # SmolLM3: the NoPE layers are the windowed ones


def layer_fields(model_type: str, spec: dict, hf: dict, source: str, n: int, rotary_dim: int,
                 theta: float, scaling: Optional[RopeScaling]) -> dict:
    """ModelConfig per-layer fields from the config.json keys `spec` (a LAYER_KEYS row) names."""
    out = {}
    window = hf.get("sliding_window")
    if window is not None and not (isinstance(window, int) and not isinstance(window, bool) and window > 0):
        raise ConfigError(f"{source}: 'sliding_window': expected a positive integer or null, got {json.dumps(window)}")
    if spec.get("every_layer") and window is not None:
        out["sliding_window"] = window
    has_rope = [1] * n
    if spec.get("no_rope_layers"):
        interval = hf.get("no_rope_layer_interval", 4)
        has_rope = hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n)]
        if not (isinstance(has_rope, list) and len(has_rope) == n and all(v in (0, 1) for v in has_rope)):
            raise ConfigError(f"{source}: 'no_rope_layers': expected {n} entries of 0 or 1, got {json.dumps(has_rope)}")
        if not all(has_rope):
            out["layer_rope_thetas"] = tuple(theta if r else None for r in has_rope)
    types = None
    if spec.get("layer_types"):
        types = hf.get("layer_types") or _default_layer_types(model_type, hf, n, has_rope)
        if not (isinstance(types, list) and len(types) == n):
            raise ConfigError(f"{source}: 'layer_types': expected a list of {n} entries, got {json.dumps(types)}")
        for i, t in enumerate(types):
            if t not in LAYER_TYPES:
                raise ConfigError(f"{source}: 'layer_types[{i}]': '{t}' is not supported (supported: {', '.join(LAYER_TYPES)})")
        switch = spec.get("window_switch")
        windowed = window is not None and (switch is None or bool(hf.get(switch)))
        if windowed and "sliding_attention" in types:
            out["layer_sliding_windows"] = tuple(window if t == "sliding_attention" else None for t in types)
        elif spec.get("window_switch") is None and "sliding_attention" in types:
            raise ConfigError(f"{source}: 'sliding_window': layer_types has sliding layers but sliding_window is null")
    if spec.get("rope_per_layer_type"):
        params = hf.get("rope_parameters")
        if not (isinstance(params, dict) and set(params) <= set(LAYER_TYPES) and params):
            # transformers 4: rope_theta (global) + rope_scaling (global only) + rope_local_base_freq
            params = {"full_attention": {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 1e6)},
                      "sliding_attention": {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", 1e4)}}
        ropes = {t: parse_rope(p, hf, source, f"rope_parameters.{t}", rotary_dim) for t, p in params.items()}
        missing = sorted(set(types) - set(ropes))
        if missing:
            raise ConfigError(f"{source}: 'rope_parameters': no entry for layer type '{missing[0]}'")
        out["layer_rope_thetas"] = tuple(ropes[t][0] for t in types)
        out["layer_rope_scalings"] = tuple(ropes[t][1] for t in types)
    return out


def layer_keys_to_hf(cfg: ModelConfig, spec: dict) -> dict:
    """The config.json keys `spec` names, for `cfg` (layer_fields' inverse); a per-layer setting the
    family's keys cannot say is an error naming the field."""
    out, specs = {}, cfg.layer_specs()
    if spec.get("every_layer"):
        out["sliding_window"] = cfg.sliding_window
    if spec.get("no_rope_layers"):
        out["no_rope_layers"] = [int(s.rope is not None) for s in specs]
        thetas = {s.rope for s in specs if s.rope is not None}
        if len(thetas) > 1:
            raise ConfigError(f"model.layer_rope_thetas: {cfg.hf_model_type} has one RoPE for every RoPE layer, "
                              f"got {sorted(map(str, thetas))}")
    if spec.get("layer_types"):
        types = [LAYER_TYPES[s.window is None] for s in specs]
        windows = {s.window for s in specs if s.window is not None}
        if len(windows) > 1:
            raise ConfigError(f"model.layer_sliding_windows: {cfg.hf_model_type} has one sliding_window, got {sorted(windows)}")
        out["layer_types"] = types
        if spec.get("window_switch"):
            out[spec["window_switch"]] = bool(windows)
        if windows:
            out["sliding_window"] = windows.pop()
    if spec.get("rope_per_layer_type"):
        ropes = {}
        for s, t in zip(specs, out["layer_types"]):
            if s.rope is None or ropes.setdefault(t, s.rope) != s.rope:
                raise ConfigError(f"model.layer_rope_thetas: {cfg.hf_model_type} has one RoPE per layer type "
                                  f"(sliding/full), layer {s.index} differs")
        out["rope_parameters"] = {t: rope_to_hf(r.theta, r.scaling, cfg.partial_rotary_factor) for t, r in ropes.items()}
    return out


def expressed_fields(spec: dict) -> set:
    """The per-layer ModelConfig fields a family with LAYER_KEYS row `spec` writes into its own keys."""
    out = set()
    if spec.get("no_rope_layers"):
        out.add("layer_rope_thetas")
    if spec.get("layer_types"):
        out.add("layer_sliding_windows")
    if spec.get("rope_per_layer_type"):
        out |= {"layer_rope_thetas", "layer_rope_scalings"}
    return out
