"""PEFT's file layout both ways: PEFT loads what we save and we load what PEFT saves (same logits, GPT-2's
fused c_attn included); unsupported or mismatched adapters are clear errors; saves are atomic."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import Transformer
from engine.adapters.lora import apply_lora, lora_modules
from engine.adapters.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_with_adapter, save_adapter
from engine.config import LoraConfig
from engine.files import remove_stale_temps
from engine.model.hf_format import WeightsError
from tests.adapters.helpers import randomize_adapters

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROOT = Path(__file__).resolve().parents[2]


def _peft_saved_adapter(tmp_path, family: str, config):
    """A fresh transformers `family` model in tmp_path/base and PEFT's adapter (`config`, random B) in
    tmp_path/adapter, written by PEFT itself; returns the PEFT model."""
    import peft

    from tests.hf_models import make_hf_model

    hf = make_hf_model(family)
    hf.save_pretrained(tmp_path / "base")
    peft_model = peft.get_peft_model(hf, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    return peft_model


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "gpt2", "gemma2", "gemma3", "phi3", "olmo2", "smollm3"])
def test_peft_loads_our_adapter_and_gives_the_same_logits(hf_checkpoint, tmp_path, family):
    import peft

    directory, hf = hf_checkpoint(family)
    ours = Transformer.from_pretrained(directory)
    apply_lora(ours, LoraConfig(rank=4, alpha=8, targets=ALL if family != "gemma" else ("q_proj", "down_proj")),
               str(directory))
    randomize_adapters(ours)
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(directory)
    if family == "gpt2":  # its Conv1D modules, named from their block (attn.c_proj vs mlp.c_proj)
        assert config["target_modules"] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
        assert config["fan_in_fan_out"] is True
    if family == "phi3":  # PEFT adapts the fused modules, one A each
        assert config["target_modules"] == ["o_proj", "down_proj", "gate_up_proj", "qkv_proj"]
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids), peft_model(ids).logits, rtol=1e-4, atol=1e-4)
        peft_model.unload()  # restore the session-cached HF model for other tests


def test_we_load_a_peft_saved_adapter_and_give_the_same_logits(tmp_path):
    import peft

    peft_model = _peft_saved_adapter(tmp_path, "qwen2", peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True, task_type="CAUSAL_LM"))
    ours = load_with_adapter(tmp_path / "base", tmp_path / "adapter")
    assert sorted({n.rsplit(".", 1)[1] for n in lora_modules(ours)}) == ["down_proj", "q_proj", "v_proj"]
    ids = torch.randint(0, 211, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), peft_model.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def test_we_load_a_peft_saved_gpt2_adapter_on_its_fused_c_attn(tmp_path):
    """PEFT adapts GPT-2's c_attn (q, k, v in one Conv1D) with one A and one B [3 * out, r]."""
    import peft

    peft_model = _peft_saved_adapter(tmp_path, "gpt2", peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, task_type="CAUSAL_LM"))
    ours = load_with_adapter(tmp_path / "base", tmp_path / "adapter")
    assert sorted({n.rsplit(".", 1)[1] for n in lora_modules(ours)}) == ["down_proj", "k_proj", "o_proj", "q_proj",
                                                                        "v_proj"]
    attn = ours.layers[0].attn
    assert attn.q_proj.lora_A is attn.k_proj.lora_A is attn.v_proj.lora_A  # one A, as in c_attn
    ids = torch.randint(0, ours.config.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), peft_model.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def test_we_load_a_peft_saved_phi3_adapter_on_its_fused_modules(tmp_path):
    """PEFT adapts Phi-3's qkv_proj (q, k, v of unequal sizes under GQA) and gate_up_proj whole."""
    import peft

    peft_model = _peft_saved_adapter(tmp_path, "phi3", peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"], task_type="CAUSAL_LM"))
    ours = load_with_adapter(tmp_path / "base", tmp_path / "adapter")
    assert sorted({n.rsplit(".", 1)[1] for n in lora_modules(ours)}) == ["gate_proj", "k_proj", "q_proj", "up_proj",
                                                                        "v_proj"]
    ids = torch.randint(0, ours.config.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), peft_model.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def test_partial_targets_of_a_fused_phi3_module_are_rejected(hf_checkpoint):
    from engine.config import ConfigError

    ours = Transformer.from_pretrained(hf_checkpoint("phi3")[0])
    with pytest.raises(ConfigError, match=r"in one module \(qkv_proj\)"):
        apply_lora(ours, LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")))


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(use_dora=True), "use_dora=True is not supported"),
    (lambda c: c.update(peft_type="IA3"), "peft_type 'IA3' is not supported"),
    (lambda c: c.pop("r"), "cannot read the LoRA settings"),
])
def test_unsupported_adapter_configs_name_the_key(hf_checkpoint, tmp_path, edit, message):
    directory, _ = hf_checkpoint("llama")
    model = Transformer.from_pretrained(directory)
    apply_lora(model, LoraConfig(rank=2, alpha=2))
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    edit(config)
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=message):
        load_with_adapter(directory, tmp_path)


def test_adapter_of_another_shape_is_rejected(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint("llama")
    model = Transformer.from_pretrained(directory)
    apply_lora(model, LoraConfig(rank=2, alpha=2))
    save_adapter(model, tmp_path)
    other, _ = hf_checkpoint("llama", hidden_size=32, intermediate_size=48)
    with pytest.raises(WeightsError, match="has shape"):
        load_with_adapter(other, tmp_path)


SAVE = """
import sys
from engine import Transformer
from engine.adapters.lora import apply_lora
from engine.adapters.peft_format import save_adapter
from engine.config import LoraConfig
from engine.files import remove_stale_temps
model = Transformer.from_pretrained(sys.argv[1])
apply_lora(model, LoraConfig(rank=2, alpha=4), sys.argv[1])
save_adapter(model, sys.argv[2])
"""


def test_a_kill_between_the_adapter_files_leaves_no_adapter_dir(hf_checkpoint, tmp_path):
    """A new adapter dir is published whole: killed after the weights, before the config, nothing appears
    (before: a dir with weights and no config, or a config beside weights of another save)."""
    directory, _ = hf_checkpoint("llama")
    out = subprocess.run([sys.executable, "-c", SAVE, str(directory), str(tmp_path / "adapter")], cwd=ROOT,
                         env={**os.environ, "ENGINE_CRASH_AT": "save_adapter:weights"}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == -9, out.stderr  # killed at the crash point
    assert not (tmp_path / "adapter").exists()
    assert remove_stale_temps(tmp_path, "adapter")  # what the kill left is a temp dir, cleared before a run
    model = Transformer.from_pretrained(directory)
    apply_lora(model, LoraConfig(rank=2, alpha=4), str(directory))
    save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # a finished save leaves no temp dir
    load_with_adapter(directory, tmp_path / "adapter")


def test_saving_into_an_existing_dir_replaces_the_adapter_files_and_keeps_the_rest(hf_checkpoint, tmp_path):
    """A checkpoint or final/ dir holds the tokenizer too: the adapter files are replaced one by one, atomically."""
    directory, _ = hf_checkpoint("llama")
    (tmp_path / "tokenizer.json").write_text("{}")
    model = Transformer.from_pretrained(directory)
    apply_lora(model, LoraConfig(rank=2, alpha=4), str(directory))
    save_adapter(model, tmp_path)
    randomize_adapters(model)
    save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS, "tokenizer.json"]
    loaded = load_with_adapter(directory, tmp_path)
    assert all(torch.equal(m.lora_B.weight, lora_modules(model)[n].lora_B.weight)
               for n, m in lora_modules(loaded).items())
