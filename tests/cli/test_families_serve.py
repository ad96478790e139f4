"""cli.serve on issue 14's dense families: the app cli.serve builds (its argument parsing, loading and
limits) answers an HTTP chat completion on a tiny Gemma 3 (sliding layers of 8 tokens, sandwich norms) and
a tiny Phi-3 (fused qkv/gate_up, LongRoPE, window 12) greedily, token for token as engine.generate, with
prompt + completion longer than the sliding window; two concurrent requests decode in one batch alike."""
import logging
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from cli.serve import build_app, parse_args  # noqa: E402
from engine import Tokenizer, Transformer  # noqa: E402
from tests.hf_models import save_demo_model  # noqa: E402
from tests.infer.test_serve import reference, running  # noqa: E402

MAX_TOKENS = 16


@pytest.mark.parametrize("family, window", [("gemma3", 8), ("phi3", 12)])
def test_served_chat_completion_is_greedy_generate_past_the_window(family, window, tmp_path):
    d = tmp_path / family
    save_demo_model(d, family)
    model, tok = Transformer.from_pretrained(d).eval(), Tokenizer.from_pretrained(d)
    assert window in {b.attn.window for b in model.layers}
    contents = ["Hello there, how are you today?", "Say something"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True, tokenize=True)
               for c in contents]
    expected = [reference((d, model, tok), ids, MAX_TOKENS) for ids in prompts]
    assert all(len(ids) + n > window for ids, (_, n, _) in zip(prompts, expected))
    args = parse_args(["--model", str(d), "--api-key", "k", "--served-model-name", family, "--max-batch", "2",
                       "--max-model-len", "96"])
    app = build_app(args, logging.getLogger("engine.infer.serve"))
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=60)

        def ask(content):
            r = client.chat.completions.create(model=family, messages=[{"role": "user", "content": content}],
                                               max_tokens=MAX_TOKENS, temperature=0)
            return r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason

        alone = ask(contents[0])
        with ThreadPoolExecutor(2) as pool:  # rows of different lengths in one decoding batch
            together = list(pool.map(ask, contents))
    assert alone == expected[0]
    assert together == expected
