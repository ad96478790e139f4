"""Tiny random Hugging Face models, written by `transformers` itself: the reference for parity tests.

Also runnable: `python -m tests.hf_models DIR [family]` writes one model (plus a tokenizer) to DIR.
"""
from __future__ import annotations

import sys

import torch

# Small enough to run in milliseconds, shaped to exercise every family difference:
# GQA (kv heads < heads), an explicit head_dim that differs from hidden/heads, tied and untied heads.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=211, max_position_embeddings=128, tie_word_embeddings=False)),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, vocab_size=211, max_position_embeddings=256, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16, "rope_theta": 500000.0})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=211, max_position_embeddings=128, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=211, max_position_embeddings=128, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, vocab_size=211, max_position_embeddings=128,
        tie_word_embeddings=False)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(
        hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, vocab_size=211, max_position_embeddings=128)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        n_embd=64, n_layer=2, n_head=4, vocab_size=211, n_positions=128, bos_token_id=0, eos_token_id=0)),
    # mixture of experts: more experts than top-k so routing matters; Qwen3-MoE with a dense layer
    # (mlp_only_layers) and renormalized top-k, Qwen2-MoE with its sigmoid-gated shared expert.
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        hidden_size=64, intermediate_size=112, moe_intermediate_size=48, num_experts=6, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=[1], num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, vocab_size=211, max_position_embeddings=128,
        tie_word_embeddings=False)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        hidden_size=64, intermediate_size=48, num_local_experts=5, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=211, max_position_embeddings=128,
        sliding_window=None)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        hidden_size=64, intermediate_size=112, moe_intermediate_size=32, shared_expert_intermediate_size=80,
        num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=211, max_position_embeddings=128, tie_word_embeddings=True)),
}

# Issue 14's dense families: windows shorter than the 37-token parity inputs, so sliding layers matter.
import random as _random

_phi3_factors = _random.Random(0)
FAMILIES.update({
    # alternate local/global layers; soft caps small enough that tanh bends the tiny model's scores
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=211, max_position_embeddings=128, sliding_window=8,
        query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    # five local layers then one global; local theta 10k, global 1M with linear scaling; per-head q/k norm
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        hidden_size=64, intermediate_size=112, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, vocab_size=211, max_position_embeddings=128, sliding_window=8,
        query_pre_attn_scalar=16, final_logit_softcapping=5.0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0}})),
    # Phi-4-mini-like: fused qkv under GQA, partial rotary 0.75, LongRoPE past 16 positions, a window
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=211, max_position_embeddings=128, original_max_position_embeddings=16,
        partial_rotary_factor=0.75, sliding_window=12, tie_word_embeddings=False, pad_token_id=0,
        rope_scaling={"rope_type": "longrope", "short_factor": [1 + _phi3_factors.random() for _ in range(6)],
                      "long_factor": [1 + 4 * _phi3_factors.random() for _ in range(6)]})),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(
        hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=211, max_position_embeddings=128, pad_token_id=0)),
    # a NoPE layer every 2nd layer; those layers windowed
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(
        hidden_size=64, intermediate_size=112, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=211, max_position_embeddings=128, no_rope_layer_interval=2,
        use_sliding_window=True, sliding_window=8, pad_token_id=0)),
})


def make_hf_model(family: str, seed: int = 0, **overrides):
    """A random transformers model of `family`, in eval mode, with non-trivial norm weights and biases."""
    import transformers

    config_cls, model_cls, kwargs = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # HF initializes norms to 1 and biases to 0, which would hide mapping mistakes
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hf_model(family: str, directory, sharded: bool = False, seed: int = 0, **overrides):
    """Write a tiny random model of `family` to `directory` with transformers; return the HF model."""
    model = make_hf_model(family, seed=seed, **overrides)
    model.save_pretrained(directory, max_shard_size="40KB" if sharded else "2GB")
    return model


def save_demo_model(directory, family: str = "llama") -> None:
    """A tiny random model plus a matching tokenizer: enough for `cli.generate` to run end to end."""
    from engine import Tokenizer
    from tests.tokenizer_fixtures import write_tokenizer_dir

    style = {"gpt2": "gpt2", "qwen2": "qwen", "qwen3": "qwen"}.get(family, "llama")
    tokenizer = Tokenizer.from_pretrained(write_tokenizer_dir(directory, style=style))
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    save_hf_model(family, directory, vocab_size=len(tokenizer), **{k: v for k, v in ids.items() if v is not None})


if __name__ == "__main__":
    out, family = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "llama")
    save_demo_model(out, family)
    print(f"wrote a tiny random {family} model and its tokenizer to {out}")
