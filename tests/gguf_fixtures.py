"""Tiny GGUF files for tests: a transformers-written model + a tiny tokenizer, exported by engine.model.gguf_write."""
from __future__ import annotations

from pathlib import Path

from engine.data.tokenizer import Tokenizer
from engine.model.gguf_write import write_gguf
from engine.model.transformer import Transformer
from tests.hf_models import save_hf_model
from tests.tokenizer_fixtures import write_tokenizer_dir

# family -> (tokenizer style, HF overrides). Rows are whole q8_0/q4_0 blocks (32), so every matrix quantizes.
# qwen3's head_dim and gpt2's n_positions are the transformers config defaults: its GGUF loader reads neither
# from the file (llama.cpp does), so only files with those values can be compared with it.
GGUF_FAMILIES = {
    "llama": ("llama", {"intermediate_size": 128}),
    "mistral": ("llama", {"intermediate_size": 128}),
    "qwen2": ("qwen", {"intermediate_size": 128}),
    "qwen3": ("qwen", {"intermediate_size": 128, "head_dim": 128}),
    "gemma": ("llama", {"intermediate_size": 128}),
    "gpt2": ("gpt2", {"n_positions": 1024}),
}
TEXTS = ["The quick brown fox jumps over the lazy dog.", "  two spaces,\ttabs\n\nand newlines",
         "Numbers: 0 1 42 1234567890!", "Café naïve — über 東京 😀", "def f(x):\n    return x ** 2\n", ""]


def write_family(directory: Path, family: str, gguf_type: str = "f32", seed: int = 0, **hf_overrides):
    """(hf_model, engine model, tokenizer, gguf path) of a tiny `family` model written to directory/model.gguf."""
    directory = Path(directory)
    style, overrides = GGUF_FAMILIES[family]
    src = directory / "hf"
    write_tokenizer_dir(src, style)
    tokenizer = Tokenizer.from_pretrained(src)
    hf = save_hf_model(family, src, seed=seed, vocab_size=len(tokenizer), **{**overrides, **hf_overrides})
    model = Transformer.from_pretrained(src)
    path = write_gguf(model, tokenizer, directory / "gguf" / "model.gguf", gguf_type)
    return hf, model, tokenizer, path


def transformers_gguf(path: Path):
    """transformers' own GGUF loader on `path`: (model in eval mode, tokenizer)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer
