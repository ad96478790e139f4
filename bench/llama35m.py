"""The ~35M-parameter Llama used by the engine-vs-transformers benches, written by transformers itself."""
from __future__ import annotations

import tempfile
from pathlib import Path

# 6 layers x (512 hidden, 8 heads / 4 kv heads, 1536 MLP) + a tied 32000 x 512 embedding = 35.3M params.
LLAMA_35M = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                 tie_word_embeddings=True)


def write_llama35m(directory: str | Path | None = None) -> Path:
    """Save a random-init LlamaForCausalLM of LLAMA_35M (fp32 safetensors) and return its directory."""
    import torch
    import transformers

    directory = Path(directory or Path(tempfile.gettempdir()) / "engine-bench-llama35m")
    if not (directory / "model.safetensors").exists():
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_35M)).save_pretrained(directory)
    return directory
