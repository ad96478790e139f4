"""The dense families added in issue 14 (Gemma 2, Gemma 3, Phi-3 / Phi-4-mini, OLMo 2, SmolLM3), as data:
config.json keys and weight names. engine.model.families merges these rows into its tables (as it does
engine.model.moe_families'); what each row means is documented there and in docs/families.md.
"""
from __future__ import annotations

from engine.model.stored import Stored

# `architectures[0]` in config.json -> model_type.
ARCHITECTURES = {
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "Phi3ForCausalLM": "phi3",
    "Olmo2ForCausalLM": "olmo2",
    "SmolLM3ForCausalLM": "smollm3",
}

# What each family fixes whatever its config.json says.
FAMILY_TRAITS = {
    "gemma2": {"norm_weight_offset": 1.0, "scale_embeddings": True, "post_attn_norm": True, "post_mlp_norm": True},
    "gemma3_text": {"norm_weight_offset": 1.0, "scale_embeddings": True, "post_attn_norm": True,
                    "post_mlp_norm": True, "qk_norm": True},
    "phi3": {},
    "olmo2": {"pre_norm": False, "post_attn_norm": True, "post_mlp_norm": True, "qk_norm": True,
              "qk_norm_scope": "projection"},
    "smollm3": {},
}

# Per-layer keys (families.LAYER_KEYS explains each flag).
LAYER_KEYS = {
    "phi3": {"every_layer": True},
    "gemma2": {"layer_types": True},
    "gemma3_text": {"layer_types": True, "rope_per_layer_type": True},
    "smollm3": {"layer_types": True, "window_switch": "use_sliding_window", "no_rope_layers": True},
}

# Scalars: ModelConfig field -> (key, transformers' default when absent).
SCALAR_KEYS = {
    "gemma2": {"query_pre_attn_scalar": ("query_pre_attn_scalar", 256), "attn_softcap": ("attn_logit_softcapping", 50.0),
               "final_softcap": ("final_logit_softcapping", 30.0)},
    # transformers' Gemma 3 reads attn_logit_softcapping but never applies it: neither do we (a warning says so)
    "gemma3_text": {"query_pre_attn_scalar": ("query_pre_attn_scalar", 256),
                    "final_softcap": ("final_logit_softcapping", None)},
}

# ModelConfig field -> config.json key, where a family differs from Llama's naming.
KEYS = {"gemma2": {"activation": "hidden_activation"}, "gemma3_text": {"activation": "hidden_activation"}}

# Gemma's legacy "gelu" means the tanh approximation (transformers does the same).
FAMILY_ACTIVATIONS = {"gemma2": {"gelu": "gelu_tanh"}, "gemma3_text": {"gelu": "gelu_tanh"}}

TIED_BY_DEFAULT = ("gemma2", "gemma3_text", "smollm3")  # transformers' config defaults

# Weight rows that differ from Llama's table.
# Gemma 2/3 and OLMo 2: post_attention_layernorm norms the attention *output* (Llama's pre-MLP norm is
# Gemma's pre_feedforward_layernorm). OLMo 2 has no pre-norms, so its rows for them are never used.
SANDWICH_WEIGHTS = {"layers.{}.post_attn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
                    "layers.{}.mlp_norm.weight": "model.layers.{}.pre_feedforward_layernorm.weight"}

# Phi-3: q, k, v fused along the output dim in one qkv_proj (k and v shorter under GQA), gate and up in
# gate_up_proj; split on load and re-fused on save by hf_format. Phi-3 has no biases.
PHI3_WEIGHTS = {"layers.{}.attn.q_proj.weight": Stored("model.layers.{}.self_attn.qkv_proj.weight", False, 0, 3),
                "layers.{}.attn.k_proj.weight": Stored("model.layers.{}.self_attn.qkv_proj.weight", False, 1, 3),
                "layers.{}.attn.v_proj.weight": Stored("model.layers.{}.self_attn.qkv_proj.weight", False, 2, 3),
                "layers.{}.mlp.gate_proj.weight": Stored("model.layers.{}.mlp.gate_up_proj.weight", False, 0, 2),
                "layers.{}.mlp.up_proj.weight": Stored("model.layers.{}.mlp.gate_up_proj.weight", False, 1, 2)}

WEIGHTS = {"gemma2": SANDWICH_WEIGHTS, "gemma3_text": SANDWICH_WEIGHTS, "olmo2": SANDWICH_WEIGHTS,
           "phi3": PHI3_WEIGHTS}
