"""LoRA: PEFT-compatible adapters both ways, merging, frozen base, bf16 base, exact resume, clear errors."""
import dataclasses
import json
import re

import pytest
import torch

from engine import Transformer
from engine.config import ConfigError, LoraConfig, TrainConfig
from engine.adapters.lora import LoRALinear, adapter_state, apply_lora, lora_modules, merge_lora
from engine.adapters.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_with_adapter, save_adapter
from engine.train.memory_plan import lora_params
from engine.train.loop import make_optimizer, train, train_step
from engine.model.hf_format import WeightsError
from tests.finetune_fixtures import lora_run_config, pretrained_dir

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _randomize_adapters(model, seed=0):
    """B starts at zero (a no-op adapter), which would hide a wrong name or scale: make both factors random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


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


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "gpt2"])
def test_peft_loads_our_adapter_and_gives_the_same_logits(hf_checkpoint, tmp_path, family):
    import peft

    directory, hf = hf_checkpoint(family)
    ours = Transformer.from_pretrained(directory)
    apply_lora(ours, LoraConfig(rank=4, alpha=8, targets=ALL if family != "gemma" else ("q_proj", "down_proj")),
               str(directory))
    _randomize_adapters(ours)
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(directory)
    if family == "gpt2":  # its Conv1D modules, named from their block (attn.c_proj vs mlp.c_proj)
        assert config["target_modules"] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
        assert config["fan_in_fan_out"] is True
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


def test_merged_model_equals_base_plus_adapter(hf_checkpoint):
    directory, _ = hf_checkpoint("llama")
    model = Transformer.from_pretrained(directory)
    apply_lora(model, LoraConfig(rank=2, alpha=4, targets=ALL))
    _randomize_adapters(model)
    ids = torch.randint(0, 211, (1, 9))
    with torch.no_grad():
        expected = model(ids)
        merge_lora(model)
        assert not lora_modules(model) and not any(isinstance(m, LoRALinear) for m in model.modules())
        assert type(model.layers[0].attn.q_proj) is type(model.lm_head)  # the model's own Linear class again
        torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)


def test_only_adapters_train_and_the_base_stays_bitwise_unchanged(hf_checkpoint):
    directory, _ = hf_checkpoint("llama")
    model = Transformer.from_pretrained(directory).train()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=ALL))
    opt = make_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.0))
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for n, p in model.named_parameters() if ".lora_" in n}
    x = torch.randint(0, 211, (4, 16))
    losses = [train_step(model, opt, [(x, torch.roll(x, -1, 1))], device=torch.device("cpu"))["loss"]
              for _ in range(15)]
    assert losses[-1] < losses[0] - 0.5
    params = {n.replace(".base_layer.", "."): p for n, p in model.named_parameters()}  # wrapped: q_proj.base_layer.weight
    assert all(torch.equal(params[n], p) for n, p in base.items())


def test_bf16_base_with_fp32_adapters_trains(hf_checkpoint):
    directory, _ = hf_checkpoint("llama")
    model = Transformer.from_pretrained(directory, dtype=torch.bfloat16).train()
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=ALL, base_dtype="bf16"))
    assert {p.dtype for n, p in model.named_parameters() if ".lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for n, p in model.named_parameters() if ".lora_" in n} == {torch.float32}
    opt = make_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.0))
    x = torch.randint(0, 211, (4, 16))
    losses = [train_step(model, opt, [(x, torch.roll(x, -1, 1))], device=torch.device("cpu"), precision="bf16")["loss"]
              for _ in range(15)]
    assert losses[-1] < losses[0] - 0.5


def test_lora_checkpoint_holds_only_the_adapter_and_resume_is_bitwise_exact(tmp_path):
    model_dir = pretrained_dir(tmp_path / "base")
    straight = train(lora_run_config(tmp_path / "a", model_dir, max_steps=8, grad_accum=2,
                                     lora={"dropout": 0.1}), progress=False)
    ckpt = straight.out_dir / "checkpoints" / "step_000008"
    assert (ckpt / ADAPTER_WEIGHTS).is_file() and not (ckpt / "model.safetensors").exists()
    assert (straight.final_dir / ADAPTER_CONFIG).is_file() and (straight.final_dir / "tokenizer.json").is_file()
    cfg = lora_run_config(tmp_path / "b", model_dir, max_steps=8, grad_accum=2, lora={"dropout": 0.1})

    def interrupt(row):
        if row["step"] == 5:
            raise KeyboardInterrupt

    first = train(cfg, progress=False, on_step=interrupt)
    resumed = train(dataclasses.replace(cfg, resume="auto"), progress=False)
    assert straight.losses == first.losses + resumed.losses  # dropout RNG included
    a, b = (load_with_adapter(d) for d in (straight.final_dir, resumed.final_dir))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


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


def test_gpt2_lora_trains_its_shared_a_once_saves_loads_and_merges(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint("gpt2")
    model = Transformer.from_pretrained(directory).train()
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets="all-linear"), str(directory))
    opt = make_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.0))
    trained = [p for g in opt.param_groups for p in g["params"]]
    attn = model.layers[0].attn
    assert sum(p is attn.q_proj.lora_A.weight for p in trained) == 1 and len(trained) == len({id(p) for p in trained})
    assert lora_params(model.config, adapter_state(model).config) == sum(p.numel() for p in trained)  # the planner's count
    x = torch.randint(0, model.config.vocab_size, (4, 16))
    losses = [train_step(model, opt, [(x, torch.roll(x, -1, 1))], device=torch.device("cpu"))["loss"]
              for _ in range(15)]
    assert losses[-1] < losses[0] - 0.2
    save_adapter(model, tmp_path / "adapter")
    loaded = load_with_adapter(directory, tmp_path / "adapter")
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        expected = model.eval()(ids)
        torch.testing.assert_close(loaded(ids), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merge_lora(loaded)(ids), expected, rtol=1e-5, atol=1e-5)


def test_gpt2_fused_attention_is_adapted_whole_or_not_at_all(hf_checkpoint):
    directory, _ = hf_checkpoint("gpt2")
    with pytest.raises(ConfigError, match="GPT-2 stores q_proj, k_proj and v_proj in one module"):
        apply_lora(Transformer.from_pretrained(directory), LoraConfig(targets=("q_proj", "v_proj")))
    with pytest.raises(ConfigError, match="'gate_proj' is not in this model"):
        apply_lora(Transformer.from_pretrained(directory), LoraConfig(targets=("gate_proj",)))
    apply_lora(Transformer.from_pretrained(directory), LoraConfig(targets=("o_proj", "up_proj")))  # unfused: fine


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


def test_lora_config_errors_name_the_key():
    from engine.config import RunConfig, from_dict

    base = {"model": {"from_pretrained": "x"}, "data": {"train": "a"}}
    for lora, message in [({"rnak": 4}, "lora.rnak: unknown key (did you mean 'lora.rank'?)"),
                          ({"targets": ["q_prj"]}, "lora.targets: unknown module 'q_prj' (did you mean 'q_proj'?)"),
                          ({"rank": 0}, "lora.rank: expected an integer >= 1, got 0"),
                          ({"base_dtype": "int8"}, "lora.base_dtype: expected one of 'fp32', 'bf16'")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            from_dict(RunConfig, {**base, "lora": lora}, where="")
    with pytest.raises(ConfigError, match="lora: LoRA adapts a pretrained model"):
        from_dict(RunConfig, {"model": {"architecture": {}, "bpe_vocab_size": 300}, "data": {"train": "a"},
                              "lora": {}}, where="")


def test_training_continues_from_a_saved_adapter(tmp_path):
    model_dir = pretrained_dir(tmp_path / "base")
    first = train(lora_run_config(tmp_path / "a", model_dir, max_steps=6), progress=False)
    cfg = lora_run_config(tmp_path / "b", model_dir, max_steps=2, lora={"init_from": str(first.final_dir)})
    from engine.train.run_factory import build_model, build_tokenizer

    model = build_model(cfg, build_tokenizer(cfg, progress=False)[0])
    saved = load_with_adapter(first.final_dir)
    ours = {n: m for n, m in lora_modules(model).items()}
    for name, m in lora_modules(saved).items():
        assert torch.equal(ours[name].lora_A.weight, m.lora_A.weight)
        assert torch.equal(ours[name].lora_B.weight, m.lora_B.weight)
    more = train(cfg, progress=False)
    assert more.losses[0][1] < first.losses[0][1]  # it starts where the first run left off, not from scratch
    wrong = lora_run_config(tmp_path / "c", model_dir, lora={"rank": 8, "init_from": str(first.final_dir)})
    with pytest.raises(ConfigError, match=r"lora.rank: 8 differs from the adapter in lora.init_from"):
        build_model(wrong, build_tokenizer(wrong, progress=False)[0])


def test_cli_generate_applies_an_adapter(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    model_dir = pretrained_dir(tmp_path / "base")
    run = train(lora_run_config(tmp_path / "a", model_dir, max_steps=4), progress=False)
    out = subprocess.run([sys.executable, "-m", "cli.generate", "--model", str(model_dir), "--adapter",
                          str(run.final_dir), "--prompt", "the model", "--max-new-tokens", "5"],
                         cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("the model")
