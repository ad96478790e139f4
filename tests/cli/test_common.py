"""cli/common.py: every CLI finds --model through the one resolver (hub id or local dir) and fails in one line."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli.common import load_for_inference
from engine.adapters.lora import apply_lora, is_lora, lora_modules
from engine.adapters.peft_format import save_adapter
from engine.config import ConfigError, LoraConfig
from engine.data.tokenizer import TokenizerError
from engine.model.hf_format import WeightsError
from engine.model.transformer import Transformer
from tests.hf_models import save_demo_model

ROOT = Path(__file__).resolve().parents[2]
HUB_ID = "HuggingFaceTB/SmolLM2-135M"
# Each CLI's arguments around its model flag (the model comes last).
CLIS = {
    "cli.generate": ["--prompt", "x", "--model"],
    "cli.serve": ["--model"],
    "cli.export": ["--out", "OUT", "--checkpoint"],
    "cli.eval_sft": ["eval", "--data", "DATA", "--base"],
}


def _run(tmp_path, module, model):
    args = [str(tmp_path / a) if a in ("OUT", "DATA") else a for a in CLIS[module]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub-cache")}  # an empty cache
    return subprocess.run([sys.executable, "-m", module, *args, model], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.parametrize("module", list(CLIS))
def test_a_hub_id_goes_to_the_hub_and_offline_fails_in_one_line(tmp_path, module):
    (tmp_path / "DATA").write_text('{"prompt": "a", "completion": "b"}\n')
    result = _run(tmp_path, module, HUB_ID)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{module}: error: "), result.stderr
    assert HUB_ID in lines[0] and "hub" in lines[0].lower()  # the resolver's message, not a tokenizer-dir miss
    assert not (tmp_path / "OUT").exists()


@pytest.mark.parametrize("module", list(CLIS))
def test_a_local_path_that_does_not_exist_fails_in_one_line(tmp_path, module):
    (tmp_path / "DATA").write_text('{"prompt": "a", "completion": "b"}\n')
    missing = tmp_path / "runs" / "nope"
    result = _run(tmp_path, module, str(missing))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{module}: error: {missing}"), result.stderr


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    base = root / "base"
    save_demo_model(base)
    model = Transformer.from_pretrained(base)
    apply_lora(model, LoraConfig(rank=4, alpha=8.0), base_name=str(base))
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.5)  # a no-op adapter would prove nothing
    save_adapter(model, root / "adapter")  # adapter_config.json names `base`; no tokenizer beside it
    return base, root / "adapter"


def test_an_adapter_dir_alone_loads_its_base_and_the_base_tokenizer(base_and_adapter):
    base, adapter = base_and_adapter
    x = torch.tensor([[1, 2, 3, 4]])
    alone, tok = load_for_inference(adapter)
    explicit, _ = load_for_inference(base, adapter)
    merged, _ = load_for_inference(base, adapter, merge=True)
    plain, _ = load_for_inference(base)
    assert is_lora(alone) and not is_lora(merged) and not alone.training
    assert tok.source == str(base)  # the adapter dir has no tokenizer.json: the base's
    with torch.no_grad():
        assert torch.equal(alone(x), explicit(x))
        torch.testing.assert_close(merged(x), alone(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(plain(x), alone(x))


def test_bf16_and_a_bad_dtype_name(base_and_adapter):
    base, _ = base_and_adapter
    model, _ = load_for_inference(base, dtype="bfloat16")
    assert model.embed.weight.dtype is torch.bfloat16
    with pytest.raises(ConfigError, match="--dtype: expected one of fp32"):
        load_for_inference(base, dtype="fp8")


def test_a_model_without_a_tokenizer_is_named(tmp_path, base_and_adapter):
    base, _ = base_and_adapter
    Transformer.from_pretrained(base).save_pretrained(tmp_path / "weights-only")
    with pytest.raises(TokenizerError, match="no tokenizer.json in .*weights-only"):
        load_for_inference(tmp_path / "weights-only")
    model, tok = load_for_inference(tmp_path / "weights-only", require_tokenizer=False)
    assert tok is None and model is not None


def test_an_adapter_without_a_base_name_says_what_to_pass(tmp_path, base_and_adapter):
    _, adapter = base_and_adapter
    shutil.copytree(adapter, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="no base_model_name_or_path; pass the base model with --model"):
        load_for_inference(tmp_path / "a")
