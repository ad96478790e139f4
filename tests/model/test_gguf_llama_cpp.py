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


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_greedy_tokens_equal_ours_on_our_f16_file(tmp_path, family):
    from engine.infer.generate import generate
    from tests.gguf_fixtures import write_family

    _, _, tokenizer, path = write_family(tmp_path, family, "f16")
    ours = __import__("engine").Transformer.from_pretrained(path)
    prompt = tokenizer.encode("The quick brown fox")
    expected = generate(ours, torch.tensor([prompt]), 12)[0, len(prompt):].tolist()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=False, verbose=False, seed=0)
    got = []
    llm.reset()
    for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
        got.append(token)
        if len(got) == len(expected):
            break
    assert got == expected
