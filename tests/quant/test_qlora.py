"""QLoRA: a base quantized on load (engine.quant) under LoRA adapters, trained by the real loop. Quantize on load
equals quantizing the dense model; the PEFT files keep their layout; resume is exact; merge dequantizes first;
dense-only operations on a quantized base are clear errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine import ConfigError, Transformer
from engine.adapters.lora import apply_lora, lora_modules, merge_lora
from engine.config import LoraConfig, RunConfig, from_dict
from engine.quant import QuantLinear, check_dense_trainable, quantize, quantized_layers
from engine.train.loop import train
from tests.adapters.helpers import randomize_adapters
from tests.finetune_fixtures import lora_run_dict, pretrained_dir

KINDS = ["nf4", "int8"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return pretrained_dir(tmp_path_factory.mktemp("base"))


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_on_load_equals_quantizing_the_loaded_model(base, kind):
    loaded = Transformer.from_pretrained(base, dtype=torch.bfloat16, quantize=kind)
    dense = Transformer.from_pretrained(base)  # fp32: the file's values, which the loader quantizes
    names = quantize(dense, kind)
    assert sorted(quantized_layers(loaded)) == sorted(names) and "lm_head" not in names
    ours, ref = dict(loaded.named_buffers()), dict(dense.named_buffers())
    for name in ref:
        assert torch.equal(ours[name], ref[name]), name
    assert loaded.embed.weight.dtype == torch.bfloat16 and loaded.lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("kind, margin", [("nf4", 0.15), ("int8", 0.02)])
def test_quantized_logits_stay_near_the_dense_model(base, kind, margin):
    """Relative RMS error of the logits of a random tiny model (its weights are Gaussian, the worst case
    for NF4's per-64 absmax after none): NF4 <= 15%, int8 <= 2%."""
    dense = Transformer.from_pretrained(base)
    q = Transformer.from_pretrained(base, quantize=kind)
    ids = torch.randint(0, dense.config.vocab_size, (2, 24))
    with torch.no_grad():
        a, b = dense(ids), q(ids)
    assert float((b - a).pow(2).mean().sqrt() / a.pow(2).mean().sqrt()) < margin


def _run(tmp_path, base, kind, **train_kw):
    cfg = from_dict(RunConfig, lora_run_dict(tmp_path, base, lora={"base_dtype": kind}, **train_kw), where="")
    return train(cfg, progress=False)


@pytest.mark.parametrize("kind", KINDS)
def test_qlora_trains_and_writes_the_same_peft_files_as_lora(base, kind, tmp_path):
    result = _run(tmp_path / kind, base, kind)
    ref = _run(tmp_path / "bf16", base, "bf16")
    losses = [loss for _, loss in result.losses]
    assert losses[-1] < losses[0] - 0.1
    # The quantization error is small next to what training changes: the curves track each other.
    torch.testing.assert_close(losses, [loss for _, loss in ref.losses], rtol=0.02, atol=0.0)
    ours, theirs = (load_file(tmp_path / d / "run" / "final" / "adapter_model.safetensors") for d in (kind, "bf16"))
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    cfg_ours, cfg_theirs = (json.loads((tmp_path / d / "run" / "final" / "adapter_config.json").read_text())
                            for d in (kind, "bf16"))
    assert cfg_ours == cfg_theirs


def test_qlora_resume_is_bitwise_exact(base, tmp_path):
    whole = _run(tmp_path / "whole", base, "nf4")
    d = lora_run_dict(tmp_path / "whole", base, lora={"base_dtype": "nf4"})
    resumed = train(from_dict(RunConfig, {**d, "out_dir": str(tmp_path / "resumed"), "resume": str(
        tmp_path / "whole" / "run" / "checkpoints" / "step_000004")}, where=""), progress=False)
    assert [loss for _, loss in resumed.losses] == [loss for _, loss in whole.losses][4:]


def test_peft_loads_a_qlora_adapter(base, tmp_path):
    """The adapter trained on an NF4 base is an ordinary PEFT LoRA adapter: peft loads it onto the dense
    transformers model and its logits match ours on the dense base with the same adapter."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    _run(tmp_path, base, "nf4", max_steps=2)
    final = tmp_path / "run" / "final"
    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), final).eval()
    from engine.adapters.peft_format import load_adapter
    ours = Transformer.from_pretrained(base)
    load_adapter(ours, final)
    ids = torch.randint(0, ours.config.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def _adapted(base, kind):
    model = Transformer.from_pretrained(base, quantize=kind)
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets="all-linear"))
    randomize_adapters(model)
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_merge_dequantizes_the_base_then_merges(base, kind):
    model = _adapted(base, kind)
    expected = {n: m.base_layer.dequantize(torch.float32) + m.scale * (m.lora_B.weight @ m.lora_A.weight)
                for n, m in lora_modules(model).items()}
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        before = model(ids)
    merge_lora(model, dtype=torch.float32)
    assert not quantized_layers(model)
    for name, w in expected.items():
        assert torch.equal(model.get_submodule(name).weight, w), name  # not re-quantized (peft#2321)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=1e-4, atol=1e-4)


def test_dense_only_operations_on_a_quantized_base_are_errors(base):
    model = _adapted(base, "nf4")
    with pytest.raises(ValueError, match=r"merge_lora: layers\.0\.attn\.q_proj has a nf4-quantized base; merging "
                                         r"into it in place would re-quantize"):
        merge_lora(model)
    bare = Transformer.from_pretrained(base, quantize="int8")
    with pytest.raises(ValueError, match=r"train: layers\.0\.attn\.q_proj is int8-quantized and cannot be fully "
                                         r"fine-tuned"):
        check_dense_trainable(bare)
    with pytest.raises(ValueError, match=r"quantize: unsupported quantization 'fp8'; expected one of \('nf4', 'int8'\)"):
        quantize(Transformer.from_pretrained(base), "fp8")
    with pytest.raises(ConfigError, match=r"lora\.base_dtype: expected one of \('fp32', 'bf16', 'nf4', 'int8'\), "
                                          r"got 'nf3'"):
        LoraConfig(base_dtype="nf3")
    assert isinstance(bare.layers[0].mlp.down_proj, QuantLinear) and not hasattr(bare.layers[0].mlp.down_proj, "weight")


def test_qlora_on_two_ddp_ranks_matches_one_process(base, tmp_path):
    """torchrun, 2 gloo ranks: each quantizes the same file identically (DDP does not broadcast the codes), and
    their steps equal one process's with grad_accum 2."""
    from tests.train.test_distributed import _losses, _torchrun

    one = lora_run_dict(tmp_path / "one", base, lora={"base_dtype": "nf4"}, max_steps=4, save_every=2,
                        eval_every=2, grad_accum=2)
    train(from_dict(RunConfig, one, where=""), progress=False)
    two = {**lora_run_dict(tmp_path / "two", base, lora={"base_dtype": "nf4"}, max_steps=4, save_every=2,
                           eval_every=2), "distributed": {"strategy": "ddp"}}
    result = _torchrun(two, tmp_path / "qlora.json")
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(_losses(tmp_path / "two" / "run"), _losses(tmp_path / "one" / "run"),
                               rtol=1e-5, atol=1e-6)
    assert (tmp_path / "two" / "run" / "final" / "adapter_model.safetensors").is_file()


def test_cli_train_on_a_quantized_base_restarts_once_with_huge_pages(base, tmp_path, monkeypatch):
    """`python -m cli.train` with base_dtype nf4 re-executes itself with THP_MEM_ALLOC_ENABLE=1
    (engine.quant.heap.huge_pages_env) and then trains: the restarted process sees the variable, or it would
    restart again; ENGINE_THP=0 skips the restart."""
    from engine.quant.heap import THP_ENV, huge_pages_env

    monkeypatch.delenv(THP_ENV, raising=False)  # the suite's own environment does not decide this test
    monkeypatch.delenv("ENGINE_THP", raising=False)
    expected = 0 if huge_pages_env() is None else 1  # none on a kernel without THP
    cfg = lora_run_dict(tmp_path, base, lora={"base_dtype": "nf4"}, max_steps=2, save_every=2, eval_every=2)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    for name, extra, restarts in (("run", {}, expected), ("skipped", {"ENGINE_THP": "0"}, 0)):
        out = subprocess.run([sys.executable, "-m", "cli.train", str(path), "--no-progress",
                              "--set", f"out_dir={tmp_path / name}"],
                             cwd=ROOT, env={**os.environ, **extra}, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert (out.stdout + out.stderr).count("restarting with THP_MEM_ALLOC_ENABLE=1") == restarts, out.stderr
        assert (tmp_path / name / "final" / "adapter_model.safetensors").exists()
