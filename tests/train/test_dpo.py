"""DPO runs through the one loop: invariants proved by training a tiny pretrained Llama (transformers-written).

ln 2 at step 1 (policy = reference, for each way of getting the reference); precomputed reference log-probs equal
on-the-fly ones; k micro-batches of b pairs equal one batch of k*b; resume is bitwise exact; torchrun 2 ranks equal
one process with accumulation; the per-step metrics reach metrics.jsonl; the frozen copy is never checkpointed.
Tolerances: fp32 runs compared with rtol 1e-5 / atol 1e-6 unless stated exact.
"""
import json
import math
from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, DPOConfig, RunConfig, from_dict
from engine.train.dpo import DPOLoss, frozen_reference, pairs_logps
from engine.train.loop import make_optimizer, train, train_step
from engine.train.run_factory import build_batch_sources, build_model, build_tokenizer
from tests.finetune_fixtures import pretrained_dir, write_jsonl

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def style_records(n: int, seed: int = 0) -> list[dict]:
    """Terse (chosen) vs rambling (rejected) answers: a preference a tiny model can learn in a few steps."""
    import random

    rng = random.Random(seed)
    words = ["cat", "dog", "sun", "tree", "fish", "bird", "rain", "moon"]
    out = []
    for _ in range(n):
        w = rng.choice(words)
        out.append({"prompt": f"name a {w}", "chosen": w, "rejected": f"well, I think maybe a {w} or so, perhaps"})
    return out


def dpo_run_dict(tmp_path: Path, model_dir: Path, lora: bool = True, dpo: dict | None = None, **train) -> dict:
    data = {"format": "preference", "train": str(write_jsonl(tmp_path / "pref" / "train.jsonl", style_records(32))),
            "val": str(write_jsonl(tmp_path / "pref" / "val.jsonl", style_records(8, seed=1))),
            "seq_len": 64, "processed_dir": str(tmp_path / "processed")}
    run = {"model": {"from_pretrained": str(model_dir)}, "data": data,
           "train": {"batch_size": 4, "max_steps": 6, "lr": 1e-2, "warmup_steps": 1, "eval_every": 3,
                     "eval_batches": 2, "save_every": 3, "seed": 0, "weight_decay": 0.0, "objective": "dpo", **train},
           "dpo": {"beta": 0.1, **(dpo or {})}, "out_dir": str(tmp_path / "run")}
    if lora:
        run["lora"] = {"rank": 4, "alpha": 8, "targets": "all-linear"}
    return run


def _run(d: dict):
    return train(from_dict(RunConfig, d, where=""), progress=False)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return pretrained_dir(tmp_path_factory.mktemp("dpo_base") / "base")


@pytest.fixture(scope="module")
def lora_run(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_dpo")
    result = _run(dpo_run_dict(tmp, model_dir))
    return tmp, result


def test_step_one_loss_is_ln2_and_the_metrics_are_logged(lora_run):
    tmp, result = lora_run
    rows = _rows(tmp / "run")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # adapters start at B = 0: policy = reference
    assert rows[0]["rewards/margins"] == 0.0 and all(set(METRICS) <= set(r) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["rewards/margins"] > 0
    assert "val_loss" in rows[-1] and rows[-1]["val_loss"] < math.log(2)


@pytest.mark.parametrize("dpo", [{"precompute_ref": True}, {"ref_dtype": "fp32"}, {"loss": "ipo"},
                                 {"loss": "hinge"}, {"label_smoothing": 0.1}])
def test_full_fine_tuning_starts_at_the_reference(dpo, model_dir, tmp_path):
    """Full FT: a frozen copy or precomputed log-probs; step 1 sees policy = reference (ln 2 for sigmoid,
    1 for hinge, 1/(2 beta)^2 for ipo)."""
    result = _run(dpo_run_dict(tmp_path, model_dir, lora=False, dpo=dpo, max_steps=1, lr=1e-4, eval_every=0))
    want = {"sigmoid": math.log(2), "hinge": 1.0, "ipo": (1 / (2 * 0.1)) ** 2}[dpo.get("loss", "sigmoid")]
    assert result.losses[0][1] == pytest.approx(want, rel=1e-6)


def test_precomputed_reference_equals_the_on_the_fly_one(lora_run, model_dir, tmp_path):
    tmp, result = lora_run
    pre = _run(dpo_run_dict(tmp_path, model_dir, dpo={"precompute_ref": True}))
    torch.testing.assert_close([loss for _, loss in pre.losses], [loss for _, loss in result.losses],
                               rtol=1e-5, atol=1e-6)
    assert any(p.name.startswith("pref-ref-") for p in (tmp_path / "processed").iterdir())  # cached
    # the cache holds what the adapters-disabled model computes batch by batch
    cfg = from_dict(RunConfig, dpo_run_dict(tmp_path, model_dir, dpo={"precompute_ref": True}), where="")
    tokenizer, tok_dir = build_tokenizer(cfg, progress=False)
    data = build_batch_sources(cfg, tokenizer, tok_dir, progress=False)
    model = build_model(cfg, tokenizer)
    objective = DPOLoss(model, DPOConfig(), reference="adapters")
    batch = data.train.batch(0, batch_size=4)
    torch.testing.assert_close(batch["ref_logps"], objective.reference_logps(batch), rtol=1e-5, atol=1e-5)


def test_k_micro_batches_of_b_pairs_equal_one_batch_of_k_times_b(model_dir, tmp_path):
    cfg = from_dict(RunConfig, dpo_run_dict(tmp_path, model_dir), where="")
    tokenizer, tok_dir = build_tokenizer(cfg, progress=False)
    pairs = build_batch_sources(cfg, tokenizer, tok_dir, progress=False).train
    results = []
    for k in (1, 4):
        torch.manual_seed(0)
        model = build_model(cfg, tokenizer)
        with torch.no_grad():  # adapters off zero, so the step is not the trivial first one
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        opt = make_optimizer(model, cfg.train)
        micro = [pairs._gather(range(8)[i::k]) for i in range(k)]
        out = train_step(model, opt, micro, device=torch.device("cpu"), loss_module=DPOLoss(model, cfg.dpo,
                                                                                            reference="adapters"))
        results.append((out, [p.detach().clone() for p in model.parameters() if p.requires_grad]))
    (one, p1), (many, pk) = results
    assert one["tokens"] == many["tokens"] == 8  # units: pairs
    for name in ("loss", *METRICS):
        assert many[name] == pytest.approx(one[name], rel=1e-5, abs=1e-6), name
    for a, b in zip(p1, pk):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_resume_is_bitwise_exact(lora_run, model_dir, tmp_path):
    tmp, result = lora_run
    resumed = _run({**dpo_run_dict(tmp, model_dir), "out_dir": str(tmp_path / "resumed"),
                    "resume": str(tmp / "run" / "checkpoints" / "step_000003")})
    assert resumed.losses == result.losses[3:]  # exact floats


def test_the_frozen_copy_is_not_checkpointed_and_bf16_works(model_dir, tmp_path):
    result = _run(dpo_run_dict(tmp_path, model_dir, lora=False, dpo={"ref_dtype": "bf16"}, max_steps=2,
                               save_every=1, eval_every=0))
    assert result.losses[0][1] == pytest.approx(math.log(2), abs=2e-2)  # a bf16 reference: ln 2 up to rounding
    from safetensors import safe_open

    ckpt = tmp_path / "run" / "checkpoints" / "step_000001"
    names = set()
    for f in ckpt.rglob("*.safetensors"):
        with safe_open(f, "pt") as s:
            names |= set(s.keys())
    ref = frozen_reference(str(model_dir), torch.float32, "cpu")
    assert len(names) <= len(ref.state_dict())  # the policy's weights only, not a second copy


def test_reference_free_losses_train(model_dir, tmp_path):
    for loss in ("simpo", "orpo"):
        result = _run(dpo_run_dict(tmp_path / loss, model_dir, dpo={"loss": loss, "beta": 0.5}, eval_every=0))
        assert result.losses[-1][1] < result.losses[0][1], loss


def test_held_out_pairs_score_the_policy_against_the_reference(lora_run, model_dir):
    tmp, _ = lora_run
    from engine.adapters.lora import adapters_disabled
    from engine.adapters.peft_format import load_adapter_weights
    from engine.train.dpo import preference_accuracy

    cfg = from_dict(RunConfig, dpo_run_dict(tmp, model_dir), where="")
    tokenizer, tok_dir = build_tokenizer(cfg, progress=False)
    val = build_batch_sources(cfg, tokenizer, tok_dir, progress=False).val
    model = build_model(cfg, tokenizer)
    load_adapter_weights(model, tmp / "run" / "final")
    policy = pairs_logps(model, val, 4, torch.device("cpu"))
    with adapters_disabled(model):
        reference = pairs_logps(model, val, 4, torch.device("cpu"))
    margin_gain = (policy[:, 0] - policy[:, 1]) - (reference[:, 0] - reference[:, 1])
    assert (margin_gain > 0).all() and preference_accuracy(policy) >= preference_accuracy(reference)


@pytest.mark.parametrize("change, message", [
    ({"train": {"objective": "sft"}}, 'dpo: DPO options need train.objective: "dpo"'),
    ({"data": {"format": "sft"}}, 'train.objective: "dpo" trains on data.format: "preference"'),
    ({"dpo": {"loss": "simpo", "precompute_ref": True}}, "dpo.precompute_ref: the 'simpo' loss"),
    ({"dpo": {"loss": "ipo", "label_smoothing": 0.1}}, "dpo.label_smoothing: applies to"),
    ({"dpo": {"beta": 0}}, "dpo.beta: expected a positive number"),
    ({"dpo": {"loss": "kto"}}, "dpo.loss: expected one of"),
])
def test_bad_dpo_configs_name_the_key(change, message, model_dir, tmp_path):
    d = dpo_run_dict(tmp_path, model_dir)
    for section, values in change.items():
        d[section] = {**d[section], **values}
    with pytest.raises(ConfigError, match=message):
        from_dict(RunConfig, d, where="")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process_with_accumulation(strategy, model_dir, tmp_path):
    """torchrun 2 ranks x batch 2 = one process x 2 micro-batches of 2: the loss is normalized by the pairs of
    every rank, so the losses, metrics, val losses and the final adapter weights agree."""
    from tests.train.test_distributed import _torchrun

    one = dpo_run_dict(tmp_path / "one", model_dir, batch_size=2, grad_accum=2, max_steps=4, save_every=0,
                       eval_every=2)
    _run(one)
    two = {**dpo_run_dict(tmp_path / "two", model_dir, batch_size=2, max_steps=4, save_every=0, eval_every=2),
           "distributed": {"strategy": strategy}}
    result = _torchrun(two, tmp_path / "two.json")
    assert result.returncode == 0, result.stderr[-3000:]
    ours, ref = _rows(tmp_path / "two" / "run"), _rows(tmp_path / "one" / "run")
    for name in ("loss", "val_loss", *METRICS):
        torch.testing.assert_close([r.get(name) for r in ours], [r.get(name) for r in ref], rtol=1e-5, atol=1e-6,
                                   msg=name)
    # and the same adapter weights after the 4 steps (atol 5e-5: see tests/train/test_grpo_ddp.py on Adam)
    from safetensors.torch import load_file

    mine, theirs = (load_file(tmp_path / side / "run" / "final" / "adapter_model.safetensors")
                    for side in ("two", "one"))
    assert mine.keys() == theirs.keys() and any(t.abs().max() > 0 for k, t in theirs.items() if "lora_B" in k)
    for name, w in theirs.items():
        torch.testing.assert_close(mine[name], w, rtol=1e-5, atol=5e-5, msg=name)
