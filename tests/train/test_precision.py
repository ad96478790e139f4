"""Mixed precision: bf16 autocast, and fp16 autocast with a GradScaler, both over fp32 master weights."""
import pytest
import torch

from engine import ModelConfig, Transformer
from engine.config import TrainConfig
from engine.train.loop import make_optimizer, train_step

TINY = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                   intermediate_size=64, max_position_embeddings=64)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_overfits_one_batch_with_fp32_master_weights(precision):
    torch.manual_seed(0)
    model = Transformer(TINY)
    opt = make_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.0))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16) if precision == "fp16" else None
    x = torch.randint(0, 64, (4, 16))
    y = torch.roll(x, -1, dims=1)
    losses = [train_step(model, opt, [(x, y)], device=torch.device("cpu"), precision=precision,
                         scaler=scaler)["loss"] for _ in range(40)]
    assert losses[-1] < 0.3 * losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fp16_scaler_skips_a_step_with_inf_gradients():
    torch.manual_seed(0)
    model = Transformer(TINY)
    opt = make_optimizer(model, TrainConfig(lr=1e-2))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)  # overflows fp16 gradients on purpose
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randint(0, 64, (2, 8))
    train_step(model, opt, [(x, torch.roll(x, -1, 1))], device=torch.device("cpu"), precision="fp16", scaler=scaler)
    assert scaler.get_scale() < 2.0**60  # backed off
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the step was skipped
