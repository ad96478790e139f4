"""NaN/inf: a non-finite loss or gradient norm never reaches the weights or AdamW's moments; the run stops at
the first one (train.max_nonfinite_steps tolerates some), keeps its finite checkpoints, and metrics.jsonl stays JSON."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import ModelConfig, Transformer
from engine.config import TrainConfig
from engine.train.checkpoint import list_checkpoints
from engine.train.loop import make_optimizer, train, train_step
from engine.train.run_state import NonFiniteLoss
from tests.train_fixtures import tiny_run_config, tiny_run_dict, write_config_file

ROOT = Path(__file__).resolve().parents[2]
TINY = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                   intermediate_size=64, max_position_embeddings=64)


class _InfGrad(torch.autograd.Function):
    """Identity forward, inf gradient backward: a finite loss whose gradient overflows."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def _state(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            {k: v.clone() for s in opt.state.values() for k, v in s.items()})


@pytest.mark.parametrize("poison", ["nan_loss", "inf_grad"])
def test_a_non_finite_step_is_skipped_and_leaves_weights_and_adamw_state_untouched(poison):
    torch.manual_seed(0)
    x = torch.randint(0, 64, (4, 16))
    batch = [(x, torch.roll(x, -1, 1))]
    runs = []
    for with_poison in (False, True):
        torch.manual_seed(1)
        model = Transformer(TINY)
        opt = make_optimizer(model, TrainConfig(lr=1e-2, grad_clip=1.0))
        train_step(model, opt, batch, device=torch.device("cpu"))  # AdamW has moments now
        if with_poison:
            before = _state(model, opt)
            if poison == "nan_loss":
                bad = lambda ids, **kw: model.hidden_states(ids, **kw) * math.nan  # noqa: E731
            else:
                bad = lambda ids, **kw: _InfGrad.apply(model.hidden_states(ids, **kw))  # noqa: E731
            out = train_step(model, opt, batch, device=torch.device("cpu"), hidden_fn=bad)
            assert out["skipped"]
            assert (not math.isfinite(out["loss"])) == (poison == "nan_loss")
            after = _state(model, opt)
            assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
            assert before[1].keys() == after[1].keys()
            assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])
            assert all(p.grad is None for p in model.parameters())
        out = train_step(model, opt, batch, device=torch.device("cpu"))
        assert not out["skipped"]
        runs.append((out["loss"], [p.detach().clone() for p in model.parameters()]))
    (loss_a, params_a), (loss_b, params_b) = runs
    assert loss_a == loss_b  # the skipped step changed nothing: the next step is bitwise the same
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))


def _strict_rows(path):
    def no_nan(token):
        raise ValueError(f"not JSON: {token}")
    return [json.loads(line, parse_constant=no_nan) for line in path.read_text().splitlines()]


def test_a_diverging_run_stops_at_the_first_nan_and_keeps_its_finite_checkpoints(tmp_path):
    """The issue's run: lr=1e3 on the tiny model gave NaN from step 8 and exit 0 with a NaN final model."""
    cfg = tiny_run_config(tmp_path, max_steps=40, save_every=2, eval_every=0, lr=1e3, warmup_steps=0)
    with pytest.raises(NonFiniteLoss, match=r"^non-finite (loss|gradient norm) at step (\d+) \(1 in a row, "
                                            r"more than train.max_nonfinite_steps=0\)") as info:
        train(cfg, progress=False)
    step = int(str(info.value).split("at step ")[1].split()[0])
    rows = _strict_rows(tmp_path / "run" / "metrics.jsonl")  # valid JSON: null where the value was NaN
    assert [r["step"] for r in rows] == list(range(1, step + 1))
    assert rows[-1]["skipped"] is True and all("skipped" not in r for r in rows[:-1])
    assert not (tmp_path / "run" / "final").exists()
    saved = list_checkpoints(tmp_path / "run")
    assert saved and int(saved[-1].name.split("_")[1]) < step
    latest = Transformer.from_pretrained(saved[-1])
    assert all(torch.isfinite(p).all() for p in latest.parameters())
    assert str(saved[-1]) in str(info.value)


def test_the_cli_exits_non_zero_with_one_line_on_a_nan_loss(tmp_path):
    config = tiny_run_dict(tmp_path, max_steps=40, save_every=0, eval_every=0, lr=1e3, warmup_steps=0)
    proc = subprocess.run([sys.executable, "-m", "cli.train", str(write_config_file(tmp_path / "c.json", config)),
                           "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("cli.train: error: non-finite "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
