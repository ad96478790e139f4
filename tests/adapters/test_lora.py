"""LoRA layers: they wrap and call the base layer, switch off to the exact base model, hold their state in one
object; merging, frozen base, bf16 base, exact resume, clear errors."""
import dataclasses
import re

import pytest
import torch

import kernels
from engine import Transformer
from engine.config import ConfigError, LoraConfig, TrainConfig
from engine.adapters.lora import (LoRALinear, LoraState, adapter_state, adapters_disabled, apply_lora, is_lora,
                                  lora_modules, merge_lora)
from engine.adapters.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_with_adapter, save_adapter
from engine.train.memory_plan import lora_params
from engine.train.loop import make_optimizer, train, train_step
from tests.adapters.helpers import randomize_adapters
from tests.finetune_fixtures import lora_run_config, pretrained_dir

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_merged_model_equals_base_plus_adapter(hf_checkpoint):
    directory, _ = hf_checkpoint("llama")
    model = Transformer.from_pretrained(directory)
    apply_lora(model, LoraConfig(rank=2, alpha=4, targets=ALL))
    randomize_adapters(model)
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


def test_lora_config_errors_name_the_key():
    from engine.config import RunConfig, from_dict

    base = {"model": {"from_pretrained": "x"}, "data": {"train": "a"}}
    for lora, message in [({"rnak": 4}, "lora.rnak: unknown key (did you mean 'lora.rank'?)"),
                          ({"targets": ["q_prj"]}, "lora.targets: unknown module 'q_prj' (did you mean 'q_proj'?)"),
                          ({"rank": 0}, "lora.rank: expected an integer >= 1, got 0"),
                          ({"base_dtype": "fp8"}, "lora.base_dtype: expected one of 'fp32', 'bf16'")]:
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



def test_lora_linear_wraps_and_calls_the_models_own_linear(hf_checkpoint, monkeypatch):
    """The base matmul is the base layer's own forward (kernels.linear, as without LoRA), so the base
    could be any layer, e.g. a quantized one."""
    directory, _ = hf_checkpoint("llama")
    model = Transformer.from_pretrained(directory)
    plain = model.layers[0].attn.q_proj
    apply_lora(model, LoraConfig(rank=2, alpha=4, targets=ALL))
    q = model.layers[0].attn.q_proj
    assert isinstance(q, LoRALinear) and q.base_layer is plain and type(plain) is type(model.lm_head)
    assert not any(p.requires_grad for p in q.base_layer.parameters())
    calls = []
    real = kernels.linear
    monkeypatch.setattr(kernels, "linear", lambda x, w, b=None: calls.append(w) or real(x, w, b))
    with torch.no_grad():
        model(torch.randint(0, 211, (1, 5)))
    bases = [m.base_layer.weight for m in lora_modules(model).values()]
    assert len(calls) == len(bases) + 1 and all(any(w is c for c in calls) for w in bases)  # + the LM head

    class Doubled(torch.nn.Module):  # a stand-in for a layer that holds its weight in another form
        in_features, out_features = plain.in_features, plain.out_features

        def forward(self, x):
            return 2 * plain(x)

    q.base_layer = Doubled()
    x = torch.randn(3, plain.in_features)
    with torch.no_grad(), adapters_disabled(model):
        assert torch.equal(q(x), 2 * plain(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_disabled_adapters_give_the_base_models_logits_bitwise(hf_checkpoint, dtype):
    directory, _ = hf_checkpoint("llama")
    base = Transformer.from_pretrained(directory, dtype=dtype).eval()
    model = Transformer.from_pretrained(directory, dtype=dtype).eval()
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=ALL))
    randomize_adapters(model)
    ids = torch.randint(0, 211, (2, 11))
    with torch.no_grad():
        expected, adapted = base(ids), model(ids)
        assert not torch.allclose(adapted, expected, atol=1e-3)  # the adapter changes the logits
        with adapters_disabled(model):
            assert torch.equal(model(ids), expected)
        assert torch.equal(model(ids), adapted)  # re-enabled: the adapted logits again, bit for bit
    adapted = model(ids)  # with autograd on, as in training (the kernels may take another path than no_grad's)
    with adapters_disabled(model):  # a reference pass next to a trained one
        reference = model(ids)
    assert torch.equal(reference, expected) and not reference.requires_grad
    again = model(ids)
    assert again.requires_grad and torch.equal(again, adapted)


def test_a_reference_pass_with_disabled_adapters_inside_a_training_step(hf_checkpoint):
    """DPO's pattern: policy logits with gradients, reference logits from the same weights with adapters off."""
    directory, _ = hf_checkpoint("llama")
    base = Transformer.from_pretrained(directory).eval()
    model = Transformer.from_pretrained(directory).train()
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=ALL, dropout=0.1))
    randomize_adapters(model)
    ids = torch.randint(0, 211, (2, 9))
    policy = model(ids)
    with adapters_disabled(model):
        reference = model(ids)  # dropout sits on the adapter path only: train mode changes nothing here
    with torch.no_grad():
        assert torch.equal(reference, base(ids))
    (policy - reference).pow(2).mean().backward()
    grads = [m.lora_B.weight.grad for m in lora_modules(model).values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_disabled_blocks_nest_and_restore_after_an_error(hf_checkpoint):
    directory, _ = hf_checkpoint("llama")
    model = Transformer.from_pretrained(directory)
    apply_lora(model, LoraConfig(rank=2, alpha=4))
    layers = lora_modules(model).values()
    state = adapter_state(model)
    with state.disabled():
        with adapters_disabled(model):
            pass
        assert all(m.disabled for m in layers)  # the outer block still holds
    assert not any(m.disabled for m in layers)
    with pytest.raises(RuntimeError, match="boom"):
        with state.disabled():
            raise RuntimeError("boom")
    assert not any(m.disabled for m in layers)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        adapters_disabled(Transformer.from_pretrained(directory))


def test_adapter_state_is_one_object_the_model_holds(hf_checkpoint):
    directory, _ = hf_checkpoint("gpt2")
    model = Transformer.from_pretrained(directory, dtype=torch.bfloat16)
    before = set(vars(model))
    lora = LoraConfig(rank=2, alpha=4, targets="all-linear", base_dtype="bf16")
    wrapped = apply_lora(model, lora, str(directory))
    assert set(vars(model)) - before == {"lora_state"}  # one attribute, nothing else sprinkled on the model
    state = adapter_state(model)
    assert isinstance(state, LoraState) and state.config is lora and state.base_name == str(directory)
    assert state.base_dtype == torch.bfloat16 and list(state.modules) == wrapped == list(lora_modules(model))
    assert all(state.modules[n] is model.get_submodule(n) for n in wrapped)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, lora)
    merge_lora(model)
    assert adapter_state(model) is None and not is_lora(model) and set(vars(model)) == before
