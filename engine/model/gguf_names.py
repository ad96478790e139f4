"""GGUF (llama.cpp) <-> engine tables, as data: one GGUFArch row per llama.cpp architecture.

Each row says what llama.cpp's own converter (convert_hf_to_gguf.py) writes for a Hugging Face family:
the `general.architecture` name, which metadata key holds which config.json key, the tensor names, and the
two value transforms it applies (the Q/K row interleave of `llama`-arch files, Gemma's `1 + w` norms).
A family the engine gains becomes a row here; gguf_read.py and gguf_write.py never ask which family it is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Fused:
    """This native tensor is slice `part` of `parts` equal slices (in order) of one GGUF tensor along dim 0."""

    name: str
    part: int
    parts: int


@dataclass(frozen=True)
class Split:
    """This native tensor is the GGUF tensors `names` concatenated along `dim`, each an equal share (the MoE
    experts' gate|up: our [E, 2F, C] parameter is llama.cpp's ffn_gate_exps and ffn_up_exps, [E, F, C] each)."""

    names: tuple
    dim: int


# native parameter name -> GGUF tensor name; `{}` is the layer index. Biases are listed; a model without
# them simply has no such parameters.
DECODER_TENSORS = {
    "embed.weight": "token_embd.weight",
    "layers.{}.attn_norm.weight": "blk.{}.attn_norm.weight",
    "layers.{}.attn.q_proj.weight": "blk.{}.attn_q.weight",
    "layers.{}.attn.k_proj.weight": "blk.{}.attn_k.weight",
    "layers.{}.attn.v_proj.weight": "blk.{}.attn_v.weight",
    "layers.{}.attn.o_proj.weight": "blk.{}.attn_output.weight",
    "layers.{}.attn.q_proj.bias": "blk.{}.attn_q.bias",
    "layers.{}.attn.k_proj.bias": "blk.{}.attn_k.bias",
    "layers.{}.attn.v_proj.bias": "blk.{}.attn_v.bias",
    "layers.{}.attn.o_proj.bias": "blk.{}.attn_output.bias",
    "layers.{}.attn.q_norm.weight": "blk.{}.attn_q_norm.weight",
    "layers.{}.attn.k_norm.weight": "blk.{}.attn_k_norm.weight",
    "layers.{}.mlp_norm.weight": "blk.{}.ffn_norm.weight",
    "layers.{}.mlp.gate_proj.weight": "blk.{}.ffn_gate.weight",
    "layers.{}.mlp.up_proj.weight": "blk.{}.ffn_up.weight",
    "layers.{}.mlp.down_proj.weight": "blk.{}.ffn_down.weight",
    "layers.{}.mlp.gate_proj.bias": "blk.{}.ffn_gate.bias",
    "layers.{}.mlp.up_proj.bias": "blk.{}.ffn_up.bias",
    "layers.{}.mlp.down_proj.bias": "blk.{}.ffn_down.bias",
    "layers.{}.post_attn_norm.weight": "blk.{}.post_attention_norm.weight",
    "layers.{}.post_mlp_norm.weight": "blk.{}.post_ffw_norm.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    # mixture of experts (convert_hf_to_gguf.py stacks the per-expert tensors: Mixtral's w1/w3/w2 and
    # Qwen-MoE's gate/up/down_proj into ffn_{gate,up,down}_exps; the router is ffn_gate_inp)
    "layers.{}.mlp.router.weight": "blk.{}.ffn_gate_inp.weight",
    "layers.{}.mlp.experts.gate_up_proj": Split(("blk.{}.ffn_gate_exps.weight", "blk.{}.ffn_up_exps.weight"), 1),
    "layers.{}.mlp.experts.down_proj": "blk.{}.ffn_down_exps.weight",
    # Qwen2-MoE's shared expert and its sigmoid gate (our [1, C], stored 1-D: FLATTENED)
    "layers.{}.mlp.shared_expert.gate_proj.weight": "blk.{}.ffn_gate_shexp.weight",
    "layers.{}.mlp.shared_expert.up_proj.weight": "blk.{}.ffn_up_shexp.weight",
    "layers.{}.mlp.shared_expert.down_proj.weight": "blk.{}.ffn_down_shexp.weight",
    "layers.{}.mlp.shared_expert_gate.weight": "blk.{}.ffn_gate_inp_shexp.weight",
}

# Phi-3: llama.cpp keeps HF's fusions: q|k|v in attn_qkv (k, v shorter under GQA) and gate|up in ffn_up.
PHI3_TENSORS = {
    **DECODER_TENSORS,
    "layers.{}.attn.q_proj.weight": Fused("blk.{}.attn_qkv.weight", 0, 3),
    "layers.{}.attn.k_proj.weight": Fused("blk.{}.attn_qkv.weight", 1, 3),
    "layers.{}.attn.v_proj.weight": Fused("blk.{}.attn_qkv.weight", 2, 3),
    "layers.{}.mlp.gate_proj.weight": Fused("blk.{}.ffn_up.weight", 0, 2),
    "layers.{}.mlp.up_proj.weight": Fused("blk.{}.ffn_up.weight", 1, 2),
}
# Tensors that are not parameters: RoPE frequency divisors, one value per rotated pair. `rope_freqs` is
# Llama 3's rope scaling (LlamaModel.generate_extra_tensors), the two others Phi-3's LongRoPE factors.
ROPE_FREQS, ROPE_LONG, ROPE_SHORT = "rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"
ROPE_TENSORS = (ROPE_FREQS, ROPE_LONG, ROPE_SHORT)

# GPT-2: llama.cpp fuses q|k|v into attn_qkv and stores every Conv1D weight transposed to [out, in].
GPT2_TENSORS = {
    "embed.weight": "token_embd.weight",
    "pos_embed.weight": "position_embd.weight",
    "layers.{}.attn_norm.weight": "blk.{}.attn_norm.weight",
    "layers.{}.attn_norm.bias": "blk.{}.attn_norm.bias",
    "layers.{}.attn.q_proj.weight": Fused("blk.{}.attn_qkv.weight", 0, 3),
    "layers.{}.attn.k_proj.weight": Fused("blk.{}.attn_qkv.weight", 1, 3),
    "layers.{}.attn.v_proj.weight": Fused("blk.{}.attn_qkv.weight", 2, 3),
    "layers.{}.attn.q_proj.bias": Fused("blk.{}.attn_qkv.bias", 0, 3),
    "layers.{}.attn.k_proj.bias": Fused("blk.{}.attn_qkv.bias", 1, 3),
    "layers.{}.attn.v_proj.bias": Fused("blk.{}.attn_qkv.bias", 2, 3),
    "layers.{}.attn.o_proj.weight": "blk.{}.attn_output.weight",
    "layers.{}.attn.o_proj.bias": "blk.{}.attn_output.bias",
    "layers.{}.mlp_norm.weight": "blk.{}.ffn_norm.weight",
    "layers.{}.mlp_norm.bias": "blk.{}.ffn_norm.bias",
    "layers.{}.mlp.up_proj.weight": "blk.{}.ffn_up.weight",
    "layers.{}.mlp.up_proj.bias": "blk.{}.ffn_up.bias",
    "layers.{}.mlp.down_proj.weight": "blk.{}.ffn_down.weight",
    "layers.{}.mlp.down_proj.bias": "blk.{}.ffn_down.bias",
    "norm.weight": "output_norm.weight",
    "norm.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
}

# `{arch}.` metadata key -> config.json key (Llama naming; GPT-2 has its own).
DECODER_META = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "expert_count": "num_experts",  # absent from a dense model's config: not written
    "expert_used_count": "num_experts_per_tok",
    "expert_feed_forward_length": "moe_intermediate_size",
}
# Mixtral is llama.cpp's `llama` with experts; its config.json names the expert count num_local_experts and
# has no moe_intermediate_size (its experts are the MLPs: feed_forward_length).
LLAMA_META = {**{k: v for k, v in DECODER_META.items() if k != "expert_feed_forward_length"},
              "expert_count": "num_local_experts"}
SLIDING = {"attention.sliding_window": "sliding_window"}
GEMMA2_META = {**DECODER_META, **SLIDING, "attn_logit_softcapping": "attn_logit_softcapping",
               "final_logit_softcapping": "final_logit_softcapping"}
GPT2_META = {
    "context_length": "n_positions",
    "embedding_length": "n_embd",
    "block_count": "n_layer",
    "feed_forward_length": "n_inner",
    "attention.head_count": "n_head",
    "attention.layer_norm_epsilon": "layer_norm_epsilon",
}
# Keys a file must have (the rest default as config.json's do).
REQUIRED_META = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count")
FLOAT_META = ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon", "rope.freq_base",
              "attn_logit_softcapping", "final_logit_softcapping", "rope.scaling.factor", "rope.scaling.attn_factor")


@dataclass(frozen=True)
class GGUFArch:
    """What llama.cpp's converter writes for one Hugging Face family."""

    arch: str  # general.architecture
    hf_architecture: str  # config.json `architectures[0]` a file of this arch is read as
    # config.json keys the arch fixes: the activation, which GGUF files never name
    hf_extra: dict
    tensors: dict = field(default_factory=lambda: DECODER_TENSORS)
    meta: dict = field(default_factory=lambda: DECODER_META)
    permute_qk: bool = False  # llama.cpp's `llama` rope rotates interleaved pairs: q/k rows are reordered
    norm_plus_one: bool = False  # Gemma's norms are stored as 1 + w (HF keeps w, computing x * (1 + w))
    head_dim_keys: tuple = ("attention.key_length",)  # where head_dim is written (first present wins)
    writes_tied_output: bool = False  # GPT-2: output.weight is written even though it equals token_embd
    moe_architecture: Optional[str] = None  # `architectures[0]` of a file of this arch with expert tensors
    # Gemma 2/3: llama.cpp scales scores by 1/sqrt(head_dim) (HF's query_pre_attn_scalar = head_dim), except
    # at this layer count (27B) where it uses hidden / heads (llama-model.cpp, f_attention_scale)
    attn_scalar_hidden_per_head_at: Optional[int] = None
    # Gemma 3: one RoPE per layer type; the sliding layers' base is llama.cpp's fixed rope_freq_base_train_swa
    swa_rope_theta: Optional[float] = None
    partial_rotary: bool = False  # Phi-3: rope.dimension_count is the rotated width; head_dim is hidden / heads
    rope_freqs: bool = False  # Llama 3 rope scaling is written as the rope_freqs tensor
    longrope: bool = False  # Phi-3 LongRoPE is written as rope_factors_long/short + rope.scaling.attn_factor


_GEMMA = {"hidden_activation": "gelu_pytorch_tanh"}
# Row sources (convert_hf_to_gguf.py / llama.cpp src/llama-model.cpp): Gemma2Model, Gemma3Model,
# Phi3MiniModel, Olmo2Model, SmolLM3Model(LlamaModel), Qwen3MoeModel(Qwen2MoeModel), LlamaModel (Mixtral).
ARCHS = {
    "llama": GGUFArch("llama", "LlamaForCausalLM", {"hidden_act": "silu"}, meta=LLAMA_META, permute_qk=True,
                      head_dim_keys=("attention.key_length", "rope.dimension_count"),
                      moe_architecture="MixtralForCausalLM", rope_freqs=True),
    "qwen2": GGUFArch("qwen2", "Qwen2ForCausalLM", {"hidden_act": "silu"}),
    "qwen3": GGUFArch("qwen3", "Qwen3ForCausalLM", {"hidden_act": "silu"}),
    "gemma": GGUFArch("gemma", "GemmaForCausalLM", {"hidden_act": "gelu_pytorch_tanh"}, norm_plus_one=True),
    "gpt2": GGUFArch("gpt2", "GPT2LMHeadModel", {"activation_function": "gelu_new"}, tensors=GPT2_TENSORS,
                     meta=GPT2_META, head_dim_keys=(), writes_tied_output=True),
    "gemma2": GGUFArch("gemma2", "Gemma2ForCausalLM", _GEMMA, meta=GEMMA2_META, norm_plus_one=True,
                       attn_scalar_hidden_per_head_at=46),
    # llama.cpp's Gemma 3 applies no final soft cap
    "gemma3": GGUFArch("gemma3", "Gemma3ForCausalLM", {**_GEMMA, "final_logit_softcapping": None},
                       meta={**DECODER_META, **SLIDING}, norm_plus_one=True, attn_scalar_hidden_per_head_at=62,
                       swa_rope_theta=10000.0),
    "phi3": GGUFArch("phi3", "Phi3ForCausalLM", {"hidden_act": "silu"}, tensors=PHI3_TENSORS,
                     meta={**DECODER_META, **SLIDING}, head_dim_keys=(), partial_rotary=True, longrope=True),
    "olmo2": GGUFArch("olmo2", "Olmo2ForCausalLM", {"hidden_act": "silu"}),
    # llama.cpp's SmolLM3 skips RoPE on every 4th layer (n_no_rope_layer_step = 4) and has no sliding window
    "smollm3": GGUFArch("smollm3", "SmolLM3ForCausalLM", {"hidden_act": "silu", "no_rope_layer_interval": 4,
                                                          "use_sliding_window": False},
                        permute_qk=True, head_dim_keys=("attention.key_length", "rope.dimension_count"),
                        rope_freqs=True),
    # llama.cpp's Qwen2-MoE does not renormalize the top-k weights (Qwen3-MoE does); experts on every layer
    "qwen2moe": GGUFArch("qwen2moe", "Qwen2MoeForCausalLM", {"hidden_act": "silu", "norm_topk_prob": False,
                                                            "decoder_sparse_step": 1, "mlp_only_layers": []},
                         meta={**DECODER_META, "expert_shared_feed_forward_length": "shared_expert_intermediate_size"},
                         writes_tied_output=True),  # llama.cpp's qwen2moe requires output.weight
    # llama.cpp's Qwen3-MoE renormalizes the top-k weights and has experts on every layer
    "qwen3moe": GGUFArch("qwen3moe", "Qwen3MoeForCausalLM", {"hidden_act": "silu", "norm_topk_prob": True,
                                                            "decoder_sparse_step": 1, "mlp_only_layers": []}),
}

# engine family (ModelConfig.hf_model_type) -> the llama.cpp architecture its converter writes.
# Mistral is written as `llama` by llama.cpp (it has no sliding window there).
FAMILY_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
               "gpt2": "gpt2", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3", "olmo2": "olmo2",
               "smollm3": "smollm3", "qwen3_moe": "qwen3moe", "mixtral": "llama", "qwen2_moe": "qwen2moe"}
# What llama.cpp's arch drops from a family, with a warning (not an error: the model is the same within it).
DROPPED = {"mistral": "sliding_window"}
# What the file keeps but llama.cpp's runtime ignores (warned on export): llama-model.cpp loads Phi-3's
# attention.sliding_window and then disables it ("Phi SWA is currently disabled", llama.cpp PR 13676).
IGNORED_BY_LLAMA_CPP = {"phi3": "sliding_window"}


def gguf_name(arch: GGUFArch, native_name: str) -> Optional[str | Fused | Split]:
    """The GGUF tensor (name, a Fused slice, or a Split of several) holding native parameter `native_name`."""
    parts = native_name.split(".")
    layer = None
    if parts[0] == "layers":
        layer, parts[1] = parts[1], "{}"
    spec = arch.tensors.get(".".join(parts))
    if spec is None or layer is None:
        return spec
    if isinstance(spec, Fused):
        return Fused(spec.name.format(layer), spec.part, spec.parts)
    if isinstance(spec, Split):
        return Split(tuple(n.format(layer) for n in spec.names), spec.dim)
    return spec.format(layer)


# convert_hf_to_gguf.py keeps these in F32 whatever the file type (its `extra_f32` tensors): the MoE routers
# and learned position embeddings.
KEEP_F32 = ("ffn_gate_inp", "ffn_gate_inp_shexp", "position_embd")
# Stored 1-D though the parameter is [1, C]: Qwen2-MoE's shared-expert gate (llama.cpp expects {n_embd})
FLATTENED = ("ffn_gate_inp_shexp",)


def keeps_f32(gguf_tensor: str) -> bool:
    """Written in F32 at any --gguf-type: norms, routers and position embeddings, as llama.cpp's converter does."""
    return is_norm(gguf_tensor) or gguf_tensor.split(".")[-2] in KEEP_F32


def is_norm(gguf_tensor: str) -> bool:
    """Norm weights: Gemma's `+1` applies to these, and the writer keeps them in F32 as llama.cpp does."""
    return gguf_tensor.endswith("norm.weight")


# ------------------------------------------------------------------------------------------------ tokenizer

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes of llama.cpp's llama-vocab.cpp, by `tokenizer.ggml.pre`: each list is applied in
# order (every regex splits the pieces of the previous one, keeping the matches and what lies between).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "gpt-2": ("gpt2",),  # "gpt2" alone: the `tokenizers` ByteLevel regex, which is GPT-2's (llama.cpp's name)
    "gpt2": ("gpt2",),  # what this engine wrote before it used llama.cpp's spelling: still read
    "smollm": ("digits", "gpt2"),  # StarCoder-style: every digit alone, then GPT-2's regex
    "starcoder": ("digits", "gpt2"),
    "llama-bpe": (LLAMA3_SPLIT,),
    "qwen2": (QWEN2_SPLIT,),
}
