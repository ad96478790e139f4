"""The training loop, tested by actually training tiny models."""
import dataclasses
import json

import pytest
import torch

import engine.train.checkpoint as checkpoint_module
from engine import ModelConfig, Transformer
from engine.train.checkpoint import find_resume, list_checkpoints
from engine.config import TrainConfig
from engine.train.loop import IGNORE_INDEX, lr_at, make_optimizer, param_groups, train, train_step
from tests.train_fixtures import tiny_run_config

TINY = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                   intermediate_size=64, max_position_embeddings=64)


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = Transformer(TINY)
    opt = make_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.0, grad_clip=1.0))
    x = torch.randint(0, 64, (4, 16))
    y = torch.roll(x, -1, dims=1)
    losses = [train_step(model, opt, [(x, y)], device=torch.device("cpu"))["loss"] for _ in range(60)]
    assert losses[0] > 3.5 and losses[-1] < 0.2


def test_k_micro_batches_of_b_equal_one_batch_of_k_times_b():
    torch.manual_seed(0)
    x = torch.randint(0, 64, (6, 12))
    y = torch.randint(0, 64, (6, 12))
    y[0, :9] = IGNORE_INDEX  # uneven target counts per micro-batch: normalization must use the whole window
    y[4, 3:] = IGNORE_INDEX
    results = []
    for chunks in (1, 3):
        torch.manual_seed(1)
        model = Transformer(TINY)
        # SGD: the update is linear in the gradient, so parameters compare as tightly as gradients do.
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        out = train_step(model, opt, list(zip(x.chunk(chunks), y.chunk(chunks))), device=torch.device("cpu"))
        results.append((out, [p.detach().clone() for p in model.parameters()]))
    (one, p1), (three, p3) = results
    assert one["tokens"] == three["tokens"] == int((y != IGNORE_INDEX).sum())
    assert one["loss"] == pytest.approx(three["loss"], rel=1e-6)
    for a, b in zip(p1, p3):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    norms = []
    for chunks in (1, 3):  # and the fused optimizer's clipping sees the same global norm
        torch.manual_seed(1)
        model = Transformer(TINY)
        opt = make_optimizer(model, TrainConfig(lr=1e-2, grad_clip=0.5))
        norms.append(train_step(model, opt, list(zip(x.chunk(chunks), y.chunk(chunks))),
                                device=torch.device("cpu"))["grad_norm"])
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)


def test_weight_decay_only_on_matrices():
    decay, no_decay = param_groups(Transformer(dataclasses.replace(TINY, qkv_bias=True)), 0.1)
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"]) and no_decay["params"]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedule_warms_up_then_decays_to_the_floor(schedule):
    cfg = TrainConfig(lr=1.0, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    if schedule == "constant":
        assert set(lrs[10:]) == {1.0}
    else:
        assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(0.1, abs=0.02)
        assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    if schedule == "linear":
        assert lrs[60] == pytest.approx(1.0 - 0.9 * 0.5)


def test_training_lowers_val_loss_and_writes_an_hf_model(tmp_path):
    import transformers

    result = train(tiny_run_config(tmp_path, max_steps=24, eval_every=8, save_every=8), progress=False)
    rows = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 25))
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 3 and val[-1] < val[0]
    assert {"loss", "lr", "tokens_per_s", "grad_norm"} <= set(rows[0])
    hf = transformers.AutoModelForCausalLM.from_pretrained(result.final_dir).eval()
    ours = Transformer.from_pretrained(result.final_dir)
    ids = torch.randint(0, ours.config.vocab_size, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=0, atol=1e-4)
    assert [p.name for p in list_checkpoints(result.out_dir)] == ["step_000016", "step_000024"]  # keep_last=2
    assert json.loads((result.out_dir / "run_config.json").read_text())["train"]["max_steps"] == 24


def test_resume_is_bitwise_exact(tmp_path):
    straight = train(tiny_run_config(tmp_path / "a", max_steps=10, save_every=4, grad_accum=2), progress=False)
    cfg = tiny_run_config(tmp_path / "b", max_steps=10, save_every=4, grad_accum=2)
    first = train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=10)), progress=False,
                  on_step=lambda row: _interrupt_at(row, 6))
    assert first.interrupted and first.step == 6
    resumed = train(dataclasses.replace(cfg, resume="auto"), progress=False)
    assert straight.losses == first.losses + resumed.losses  # exact float equality, step by step


def _interrupt_at(row, step):
    if row["step"] == step:
        raise KeyboardInterrupt


def test_ctrl_c_saves_a_checkpoint_and_resume_auto_continues(tmp_path):
    cfg = tiny_run_config(tmp_path, max_steps=8, save_every=0)
    result = train(cfg, progress=False, on_step=lambda row: _interrupt_at(row, 3))
    assert result.interrupted and find_resume(cfg.out_dir, "auto").name == "step_000003"
    rest = train(dataclasses.replace(cfg, resume="auto"), progress=False)
    assert [s for s, _ in rest.losses] == list(range(4, 9))
    rows = [json.loads(line) for line in (rest.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))


def test_crash_mid_save_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    cfg = tiny_run_config(tmp_path, max_steps=4, save_every=2)
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if "step_000004" in str(path):
            raise OSError("disk full (simulated)")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        train(cfg, progress=False)
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_000002"]  # no half-written step_000004
    assert find_resume(cfg.out_dir, "auto").name == "step_000002"
    Transformer.from_pretrained(root / "step_000002")
    resumed = train(dataclasses.replace(cfg, resume="auto"), progress=False)
    assert [s for s, _ in resumed.losses] == [3, 4]


def test_max_tokens_stops_the_run(tmp_path):
    result = train(tiny_run_config(tmp_path, max_steps=None, max_tokens=3 * 4 * 32, eval_every=0), progress=False)
    assert result.step == 3 and result.tokens_seen == 3 * 4 * 32


def test_best_checkpoint_by_val_loss_is_kept(tmp_path):
    cfg = tiny_run_config(tmp_path, max_steps=12, save_every=2, eval_every=2, keep_last=1, lr=3e-2)
    result = train(cfg, progress=False)
    kept = list_checkpoints(result.out_dir)
    states = [json.loads((p / "trainer_state.json").read_text()) for p in kept]
    assert kept[-1].name == "step_000012"
    assert min(s["val_loss"] for s in states) == states[0]["best_val_loss"] or len(kept) == 1
