"""`python -m cli.export`: merged LoRA models that transformers loads with base+adapter logits; clear errors."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cli.export import export
from engine import Transformer
from engine.config import LoraConfig
from engine.adapters.lora import apply_lora, lora_modules
from engine.adapters.peft_format import load_with_adapter, save_adapter
from tests.finetune_fixtures import pretrained_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    base = pretrained_dir(root / "base", family="qwen2")
    model = Transformer.from_pretrained(base)
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets="all-linear"), str(base))
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.1)
    save_adapter(model, root / "adapter")
    return base, root / "adapter"


def _run(*args):
    return subprocess.run([sys.executable, "-m", "cli.export", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_export_merges_the_adapter_and_transformers_gives_base_plus_adapter_logits(base_and_adapter, tmp_path):
    import transformers

    base, adapter = base_and_adapter
    result = _run("--checkpoint", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    expected = load_with_adapter(base, adapter)
    ids = torch.randint(0, expected.config.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, expected(ids), rtol=1e-4, atol=1e-4)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "merged").encode("hi") is not None


def test_an_adapter_dir_alone_finds_its_base_and_bf16_export_is_close(base_and_adapter, tmp_path):
    base, adapter = base_and_adapter
    export(adapter, tmp_path / "bf16", dtype=torch.bfloat16)  # base from adapter_config.json
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    merged = Transformer.from_pretrained(tmp_path / "bf16")
    expected = load_with_adapter(base, adapter)
    ids = torch.randint(0, expected.config.vocab_size, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).float(), expected(ids), rtol=0.05, atol=0.05)


def test_bad_inputs_exit_2_without_a_traceback(base_and_adapter, tmp_path):
    base, adapter = base_and_adapter
    for args, message in [
        (["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "not a model directory"),
        (["--checkpoint", str(base), "--adapter", str(tmp_path), "--out", str(tmp_path / "o")], "adapter_config.json: missing"),
        (["--checkpoint", str(base), "--out", str(base)], "must differ from the input"),
    ]:
        result = _run(*args)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_gpt2_lora_run_exports_a_merged_model_transformers_loads(tmp_path):
    """GPT-2 end to end: a LoRA run on its fused c_attn (PEFT layout), then the merged export."""
    import transformers

    from engine.train.loop import train
    from tests.finetune_fixtures import lora_run_config

    base = pretrained_dir(tmp_path / "base", family="gpt2")
    result = train(lora_run_config(tmp_path, base, max_steps=4), progress=False)
    assert result.losses[-1][1] < result.losses[0][1]
    export(result.final_dir, tmp_path / "merged")  # the adapter dir names its base
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    expected = load_with_adapter(result.final_dir)
    ids = torch.randint(0, expected.config.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, expected(ids), rtol=1e-4, atol=1e-4)
