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
}

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
}
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
FLOAT_META = ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon", "rope.freq_base")


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


ARCHS = {
    "llama": GGUFArch("llama", "LlamaForCausalLM", {"hidden_act": "silu"}, permute_qk=True,
                      head_dim_keys=("attention.key_length", "rope.dimension_count")),
    "qwen2": GGUFArch("qwen2", "Qwen2ForCausalLM", {"hidden_act": "silu"}),
    "qwen3": GGUFArch("qwen3", "Qwen3ForCausalLM", {"hidden_act": "silu"}),
    "gemma": GGUFArch("gemma", "GemmaForCausalLM", {"hidden_act": "gelu_pytorch_tanh"}, norm_plus_one=True),
    "gpt2": GGUFArch("gpt2", "GPT2LMHeadModel", {"activation_function": "gelu_new"}, tensors=GPT2_TENSORS,
                     meta=GPT2_META, head_dim_keys=(), writes_tied_output=True),
}

# engine family (ModelConfig.hf_model_type) -> the llama.cpp architecture its converter writes.
# Mistral is written as `llama` by llama.cpp (it has no sliding window there).
FAMILY_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
               "gpt2": "gpt2"}


def gguf_name(arch: GGUFArch, native_name: str) -> Optional[str | Fused]:
    """The GGUF tensor (name, or a Fused slice) holding native parameter `native_name`, or None."""
    parts = native_name.split(".")
    layer = None
    if parts[0] == "layers":
        layer, parts[1] = parts[1], "{}"
    spec = arch.tensors.get(".".join(parts))
    if spec is None or layer is None:
        return spec
    if isinstance(spec, Fused):
        return Fused(spec.name.format(layer), spec.part, spec.parts)
    return spec.format(layer)


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
    "gpt2": ("gpt2",),  # "gpt2" alone: the `tokenizers` ByteLevel regex, which is GPT-2's
    "smollm": ("digits", "gpt2"),  # StarCoder-style: every digit alone, then GPT-2's regex
    "starcoder": ("digits", "gpt2"),
    "llama-bpe": (LLAMA3_SPLIT,),
    "qwen2": (QWEN2_SPLIT,),
}
