"""Optional: llama.cpp itself (llama-cpp-python) loads our f16 GGUF and its greedy tokens equal ours.

Not in the default run's reach unless llama_cpp is importable: llama-cpp-python compiles llama.cpp on install
(15+ minutes on 2 cores), so it is not installed here. Run with `pytest -m llama_cpp` where it is.
"""
from __future__ import annotations

import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it compiles llama.cpp)")
pytestmark = pytest.mark.llama_cpp


# every family the writer has a llama.cpp arch for (tests/gguf_fixtures.py: the richest file of each)
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gpt2", "gemma2", "gemma3", "phi3", "olmo2", "smollm3",
            "qwen3_moe", "qwen2_moe", "mixtral", "llama3"]
# llama.cpp picks Phi-3's long or short LongRoPE factors once, from n_ctx (long when n_ctx > the original
# context); transformers and the engine per forward, from its longest position. "phi3": the original context at
# n_ctx (64), so both take the short factors throughout; "phi3-long": a prompt past the original 16 positions,
# so both take the long ones throughout. llama.cpp also disables Phi-3's sliding window (llama-model.cpp; the
# export warns): none in either.
PROMPT = "The quick brown fox"
CASES = {"phi3": ("phi3", {"original_max_position_embeddings": 64, "sliding_window": None}, PROMPT),
         "phi3-long": ("phi3", {"sliding_window": None}, "The quick brown fox jumps over the lazy dog. " * 4)}


@pytest.mark.parametrize("case", FAMILIES + ["phi3-long"])
def test_llama_cpp_greedy_tokens_equal_ours_on_our_f16_file(tmp_path, case):
    from engine.infer.generate import generate
    from tests.gguf_fixtures import write_family

    family, overrides, text = CASES.get(case, (case, {}, PROMPT))
    _, _, tokenizer, path = write_family(tmp_path, family, "f16", **overrides)
    ours = __import__("engine").Transformer.from_pretrained(path)
    prompt = tokenizer.encode(text)
    assert case != "phi3-long" or len(prompt) > 16
    expected = generate(ours, torch.tensor([prompt]), 12)[0, len(prompt):].tolist()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=False, verbose=False, seed=0)
    got = []
    llm.reset()
    for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
        got.append(token)
        if len(got) == len(expected):
            break
    assert got == expected
