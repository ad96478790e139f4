"""Tiny GGUF files for tests: a transformers-written model + a tiny tokenizer, exported by engine.model.gguf_write."""
from __future__ import annotations

from pathlib import Path

from engine.data.tokenizer import Tokenizer
from engine.model.gguf_write import write_gguf
from engine.model.transformer import Transformer
from tests.hf_models import save_hf_model
from tests.tokenizer_fixtures import write_tokenizer_dir

# name -> (tokenizer style, HF overrides[, tests.hf_models family when it differs from the name]). Rows are
# whole q8_0/q4_0 blocks (32), so every matrix quantizes. qwen3's head_dim and gpt2's n_positions are the
# transformers config defaults: its GGUF loader reads neither from the file (llama.cpp does), so only files with
# those values can be compared with it.
GGUF_FAMILIES = {
    "llama": ("llama", {"intermediate_size": 128}),
    "mistral": ("llama", {"intermediate_size": 128}),
    "qwen2": ("qwen", {"intermediate_size": 128}),
    "qwen3": ("qwen", {"intermediate_size": 128, "head_dim": 128}),
    "gemma": ("llama", {"intermediate_size": 128}),
    "gpt2": ("gpt2", {"n_positions": 1024}),
    # Issue 14's families, every feature llama.cpp's arch expresses: windows, soft caps, per-type RoPE, LongRoPE
    # with partial rotary, NoPE layers, experts. llama.cpp fixes what the overrides set: Gemma's
    # query_pre_attn_scalar = head_dim, no final soft cap on Gemma 3, SmolLM3's NoPE every 4th layer and no
    # window, Qwen3-MoE's experts on every layer.
    "gemma2": ("llama", {"intermediate_size": 128, "query_pre_attn_scalar": 16}),
    "gemma3": ("llama", {"intermediate_size": 128, "query_pre_attn_scalar": 16, "final_logit_softcapping": None}),
    "phi3": ("llama", {"intermediate_size": 128}),
    "olmo2": ("llama", {"intermediate_size": 128}),
    "smollm3": ("llama", {"intermediate_size": 128, "no_rope_layer_interval": 4, "use_sliding_window": False}),
    "qwen3_moe": ("qwen", {"intermediate_size": 128, "mlp_only_layers": [], "moe_intermediate_size": 64}),
    "mixtral": ("llama", {"intermediate_size": 64}),
    "qwen2_moe": ("qwen", {"intermediate_size": 128}),
    # Llama 3.2's RoPE (head_dim 64, theta 5e5, llama3 scaling x32 over 8192 positions): the rope_freqs tensor
    "llama3": ("llama", {"hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 128,
                         "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                          "rope_theta": 500000.0}}),
    # The same families as transformers' GGUF loader can read them: it takes query_pre_attn_scalar (256),
    # the soft caps (50, 30), Qwen3-MoE's moe_intermediate_size (768) and Phi-3's RoPE from its config
    # defaults, not from the file, so these files hold exactly those values.
    "gemma2-hf": ("llama", {"head_dim": 256, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
                            "final_logit_softcapping": 30.0, "intermediate_size": 128}, "gemma2"),
    "gemma3-hf": ("llama", {"head_dim": 256, "query_pre_attn_scalar": 256, "final_logit_softcapping": None,
                            "intermediate_size": 128, "rope_parameters": None}, "gemma3"),
    # (a padding token: else transformers takes Phi3Config's pad_token_id 32000, past this vocab)
    "phi3-hf": ("llama", {"_tokenizer": {"pad_token": "<unk>"}, "intermediate_size": 128,
                          "partial_rotary_factor": 1.0, "rope_scaling": None,
                          "sliding_window": None, "original_max_position_embeddings": 4096}, "phi3"),
    "qwen3_moe-hf": ("qwen", {"intermediate_size": 128, "mlp_only_layers": [], "moe_intermediate_size": 768},
                     "qwen3_moe"),
    "qwen2_moe-hf": ("qwen", {"intermediate_size": 128, "moe_intermediate_size": 1408,
                              "shared_expert_intermediate_size": 5632}, "qwen2_moe"),
}
TRANSFORMERS_READS = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gemma2-hf", "gemma3-hf", "phi3-hf",
                      "qwen3_moe-hf", "qwen2_moe-hf")
TEXTS = ["The quick brown fox jumps over the lazy dog.", "  two spaces,\ttabs\n\nand newlines",
         "Numbers: 0 1 42 1234567890!", "Café naïve — über 東京 😀", "def f(x):\n    return x ** 2\n", ""]


def write_family(directory: Path, family: str, gguf_type: str = "f32", seed: int = 0, **hf_overrides):
    """(hf_model, engine model, tokenizer, gguf path) of a tiny `family` model written to directory/model.gguf."""
    directory = Path(directory)
    style, overrides, *hf_family = GGUF_FAMILIES[family]
    overrides = dict(overrides)
    src = directory / "hf"
    write_tokenizer_dir(src, style, **overrides.pop("_tokenizer", {}))
    tokenizer = Tokenizer.from_pretrained(src)
    hf = save_hf_model(hf_family[0] if hf_family else family, src, seed=seed, vocab_size=len(tokenizer),
                       **{**overrides, **hf_overrides})
    model = Transformer.from_pretrained(src)
    path = write_gguf(model, tokenizer, directory / "gguf" / "model.gguf", gguf_type)
    return hf, model, tokenizer, path


def transformers_gguf(path: Path):
    """transformers' own GGUF loader on `path`: (model in eval mode, tokenizer)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer
