"""The user-facing paths on a mixture-of-experts model: cli.export merges a LoRA adapter into a model that
transformers loads with base+adapter logits; the OpenAI-compatible server (continuous batching over a
per-row KV cache) answers concurrent greedy requests exactly as engine.generate does."""
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from cli.export import export
from engine import Tokenizer, Transformer
from engine.adapters.lora import apply_lora, lora_modules
from engine.adapters.peft_format import load_with_adapter, save_adapter
from engine.config import LoraConfig
from tests.finetune_fixtures import pretrained_dir


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return pretrained_dir(tmp_path_factory.mktemp("moe") / "base", family="qwen2_moe")


def test_export_merges_a_lora_adapter_of_an_moe_model_for_transformers(moe_dir, tmp_path):
    import transformers

    model = Transformer.from_pretrained(moe_dir)
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets="all-linear"), str(moe_dir))
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.1)
    save_adapter(model, tmp_path / "adapter")
    export(moe_dir, tmp_path / "merged", adapter=tmp_path / "adapter")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    expected = load_with_adapter(moe_dir, tmp_path / "adapter")
    ids = torch.randint(0, expected.config.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, expected(ids), rtol=1e-4, atol=1e-4)


def test_the_server_answers_concurrent_greedy_requests_like_generate(moe_dir):
    openai = pytest.importorskip("openai")
    from engine.infer.serve.app import create_app
    from engine.infer.serve.batcher import Batcher
    from tests.infer.test_serve import KEY, LIMITS, reference, running

    model, tok = Transformer.from_pretrained(moe_dir).eval(), Tokenizer.from_pretrained(moe_dir)
    prompts = ["The quick brown fox", "Hello", "A mixture of experts routes every token", "one two three four"]
    expected = [reference((moe_dir, model, tok), tok.encode(p), 12) for p in prompts]  # engine.generate's
    batcher = Batcher(model, max_batch=4, max_len=96)
    with running(create_app(batcher, tok, "moe", api_key=KEY, limits=LIMITS)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)

        def ask(prompt):
            r = client.completions.create(model="moe", prompt=prompt, max_tokens=12, temperature=0)
            return r.choices[0].text, r.usage.completion_tokens, r.choices[0].finish_reason

        with ThreadPoolExecutor(4) as pool:  # rows of different lengths decode together
            answers = list(pool.map(ask, prompts))
    assert answers == expected
