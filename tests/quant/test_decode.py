"""Quantized decoding: `engine.quantize(model, kind)` and `--quantize int8|nf4` of cli.generate / cli.serve run the
KV-cache decoder on the quantized GEMV, token for token what the quantized model's full forward predicts."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine
from cli.common import load_for_inference
from engine import Tokenizer, Transformer, generate
from engine.quant import quantize_lm_head, quantized_layers
from tests.hf_models import save_demo_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("demo")
    save_demo_model(d)
    return d


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_decoding_equals_the_quantized_forward(demo, kind, dtype):
    """Greedy KV-cache decoding (batch 1: the GEMV) picks the argmax of the quantized model's own full forward
    (the tiled GEMM) at every step, where the top two logits are not a near tie."""
    model = Transformer.from_pretrained(demo, dtype=dtype)
    engine.quantize(model, kind)
    prompt = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        out = generate(model, prompt, 10)
        logits = model(out[:, :-1]).float()
    top2 = logits[0, prompt.shape[1] - 1:].topk(2, dim=-1)
    clear = (top2.values[:, 0] - top2.values[:, 1]) > (0.05 if dtype == torch.bfloat16 else 1e-3)
    picked = out[0, prompt.shape[1]:]
    assert bool((picked[clear] == top2.indices[clear, 0]).all())


def test_load_for_inference_quantizes_and_merges_an_adapter_first(demo, tmp_path):
    from engine.adapters.lora import apply_lora
    from engine.adapters.peft_format import save_adapter
    from engine.config import LoraConfig
    from tests.adapters.helpers import randomize_adapters

    model = Transformer.from_pretrained(demo)
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets="all-linear"), base_name=str(demo))
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    net, _ = load_for_inference(demo, tmp_path / "adapter", merge=True, quantize="int8")
    dense, _ = load_for_inference(demo, tmp_path / "adapter", merge=True)
    assert len(quantized_layers(net)) == 7 * dense.config.num_layers + 1  # the block linears and the int8 LM head
    assert net.lm_head.kind == "int8"
    ids = torch.randint(0, dense.config.vocab_size, (1, 16))
    with torch.no_grad():
        a, b = dense(ids), net(ids)
    assert float((b - a).pow(2).mean().sqrt() / a.pow(2).mean().sqrt()) < 0.02  # int8 of the merged weights


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_cli_generate_quantize_matches_engine_generate(demo, kind):
    result = subprocess.run([sys.executable, "-m", "cli.generate", "--model", str(demo), "--prompt", "Hello world",
                             "--max-new-tokens", "8", "--quantize", kind], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    tok = Tokenizer.from_pretrained(demo)
    model = Transformer.from_pretrained(demo, quantize=kind)
    quantize_lm_head(model, "int8")  # what --quantize loads: the block linears of `kind`, the LM head int8
    ids = generate(model, torch.tensor([tok.encode("Hello world")]), 8, eos_token_id=tok.eos_token_id)
    expected = tok.decode(ids[0, len(tok.encode("Hello world")):].tolist(), skip_special_tokens=True)
    def printable(text): return "".join(c for c in text if c.isprintable() and c != "\ufffd")
    assert printable(result.stdout) == printable("Hello world" + expected)


def test_cli_rejects_an_unknown_quantization_with_exit_2(demo):
    for verb in ("cli.generate", "cli.serve"):
        extra = ["--prompt", "x"] if verb == "cli.generate" else []
        result = subprocess.run([sys.executable, "-m", verb, "--model", str(demo), *extra, "--quantize", "fp8"],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and "invalid choice: 'fp8'" in result.stderr and "Traceback" not in result.stderr
