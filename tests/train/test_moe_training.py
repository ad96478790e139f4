"""Training a mixture-of-experts model: the loop reports the router's aux loss and learns; under torchrun
(2 real processes over gloo) DDP and FSDP2 (experts sharded with their block) take the same steps as one
process with grad_accum 2."""
import json

import pytest
import torch

from engine import Transformer
from engine.config import RunConfig, from_dict
from engine.train.loop import train
from tests.train.test_distributed import _losses, _torchrun
from tests.train_fixtures import tiny_run_dict

MOE = {"mlp_class": "moe", "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
       "norm_topk_prob": True, "router_aux_loss_coef": 0.01, "shared_expert_intermediate_size": 16,
       "mlp_only_layers": [1]}
STEPS = 6


def _moe_run_dict(tmp_path, **train_keys) -> dict:
    d = tiny_run_dict(tmp_path, max_steps=STEPS, save_every=3, eval_every=3, **train_keys)
    d["model"]["architecture"].update(MOE)
    return d


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe_one")
    train(from_dict(RunConfig, _moe_run_dict(tmp, grad_accum=2), where=""), progress=False)
    return tmp / "run"


def test_an_moe_run_learns_and_logs_the_aux_loss(one_process):
    rows = _rows(one_process)
    assert len(rows) == STEPS and all(r["aux_loss"] > 0 for r in rows)
    # 4 experts, top-2: a perfectly balanced router scores top_k = 2; a collapsed one up to E * top_k / 2 = 4
    assert all(1.5 < r["aux_loss"] < 4.0 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    model = Transformer.from_pretrained(one_process / "final")  # an MoE "llama" keeps its MoE fields
    assert model.config.mlp_class == "moe" and model.config.num_experts == 4
    assert [type(b.mlp).__name__ for b in model.layers] == ["MoE", "MLP"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_train_an_moe_model_like_one_process_with_accumulation(strategy, one_process, tmp_path):
    result = _torchrun({**_moe_run_dict(tmp_path), "distributed": {"strategy": strategy}}, tmp_path / "run.json")
    assert result.returncode == 0, result.stderr[-3000:]
    losses, val = _losses(tmp_path / "run")
    ref_losses, ref_val = _losses(one_process)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(val, ref_val, rtol=1e-5, atol=1e-6)
    aux = [r["aux_loss"] for r in _rows(tmp_path / "run")]
    torch.testing.assert_close(aux, [r["aux_loss"] for r in _rows(one_process)], rtol=1e-5, atol=1e-6)
    ours, ref = Transformer.from_pretrained(tmp_path / "run" / "final"), Transformer.from_pretrained(one_process / "final")
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
