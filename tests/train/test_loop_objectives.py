"""The loop trains any Objective: a pairwise one (DPO-shaped: chosen vs rejected sequences, units = pairs) runs
through the same train_step, with exact accumulation and its own metrics, without a change to the loop."""
import pytest
import torch
import torch.nn.functional as F

from engine import ModelConfig, Transformer
from engine.config import TrainConfig
from engine.train.loop import make_optimizer, train_step
from engine.train.objectives import Objective

TINY = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                   intermediate_size=64, max_position_embeddings=64)


class PreferChosen(Objective):
    """-log sigmoid(log p(chosen) - log p(rejected)) per pair; a batch is {"chosen": ids [B, T+1],
    "rejected": ids [B, T+1]}. (DPO subtracts a reference model's log-probs as well.)"""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def units(self, batch) -> int:
        return batch["chosen"].shape[0]

    def _logp(self, ids):  # (B,) summed log-prob of each sequence
        logits = self.model(ids[:, :-1])  # (B, T, V)
        return torch.gather(F.log_softmax(logits.float(), -1), 2, ids[:, 1:, None]).squeeze(2).sum(1)

    def forward(self, batch):
        margin = self._logp(batch["chosen"]) - self._logp(batch["rejected"])  # (B,)
        return -F.logsigmoid(margin).sum(), {"reward_acc": float((margin > 0).sum())}


def _pairs(n):
    torch.manual_seed(0)
    return {"chosen": torch.randint(0, 64, (n, 9)), "rejected": torch.randint(0, 64, (n, 9))}


def test_a_pairwise_objective_accumulates_exactly_and_reports_its_metrics():
    batch = _pairs(4)
    params = []
    for chunks in (1, 2):
        torch.manual_seed(1)
        model = Transformer(TINY)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        micro = [{k: v[i::chunks] for k, v in batch.items()} for i in range(chunks)]
        out = train_step(model, opt, micro, device=torch.device("cpu"), loss_module=PreferChosen(model))
        assert out["tokens"] == 4 and 0.0 <= out["reward_acc"] <= 1.0  # units: pairs; metrics: means per pair
        params.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_pairwise_objective_learns_to_prefer_the_chosen_sequences():
    torch.manual_seed(1)
    model = Transformer(TINY)
    opt = make_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.0))
    batch = _pairs(8)
    outs = [train_step(model, opt, [batch], device=torch.device("cpu"), loss_module=PreferChosen(model))
            for _ in range(15)]
    assert outs[-1]["loss"] < 0.2 * outs[0]["loss"] and outs[-1]["reward_acc"] == pytest.approx(1.0)
