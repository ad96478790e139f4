"""The planner with a quantized base: its weight bytes equal the QuantLinear buffers (plus the bf16 rest), and its
peak is within the planner's +-25% of the measured tensor peak of real QLoRA steps."""
import pytest
import torch

import kernels
from engine.adapters.lora import apply_lora
from engine.config import ModelConfig
from engine.model.transformer import Transformer
from engine.quant import quantize
from engine.train.loop import make_optimizer, train_step
from engine.train.memory_plan import estimate_memory, lora_params
from tests.peak_memory import measure_peaks
from tests.train.test_memory_plan import ARCH, TOLERANCE, run_config

LORA = {"rank": 8, "targets": "all-linear"}


def _qlora_model(mc, cfg):
    model = Transformer(mc).to(torch.bfloat16)
    quantize(model, cfg.lora.base_dtype)
    apply_lora(model, cfg.lora)
    return model


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_planned_weights_are_the_quantized_bytes(kind):
    mc = ModelConfig.from_dict(ARCH)
    cfg = run_config(train={"precision": "bf16"}, lora={**LORA, "base_dtype": kind})
    model = _qlora_model(mc, cfg)
    actual = sum(b.numel() * b.element_size() for b in model.buffers() if b.dtype in (torch.uint8, torch.int8)
                 or b.dim() <= 1 and b.dtype == torch.float32) + sum(
        p.numel() * p.element_size() for p in model.parameters())
    plan = estimate_memory(mc, cfg)
    assert plan.trainable_params == lora_params(mc, cfg.lora)
    assert abs(plan.weights - actual) / actual < 0.01
    bf16 = estimate_memory(mc, run_config(train={"precision": "bf16"}, lora={**LORA, "base_dtype": "bf16"}))
    assert plan.weights < bf16.weights and "dequantized weight tile" in plan.workspace


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_estimate_is_within_25_percent_of_measured_qlora_steps(kind):
    mc = ModelConfig.from_dict(ARCH)
    cfg = run_config(train={"precision": "bf16", "activation_checkpointing": True, "batch_size": 4},
                     lora={**LORA, "base_dtype": kind})

    def steps():
        model = _qlora_model(mc, cfg)
        model.gradient_checkpointing = True
        model.train()
        opt = make_optimizer(model, cfg.train)
        g = torch.Generator().manual_seed(0)
        shape = (cfg.train.batch_size, cfg.data.seq_len)
        for _ in range(2):
            batch = [(torch.randint(0, mc.vocab_size, shape, generator=g),
                      torch.randint(0, mc.vocab_size, shape, generator=g))]
            train_step(model, opt, batch, device=torch.device("cpu"), precision="bf16")

    kernels.release_workspace()  # the loss keeps its logits buffer across calls: an earlier test's must not count
    measured = measure_peaks(steps)["measured"]
    estimated = estimate_memory(mc, cfg).peak
    assert abs(estimated - measured) / measured <= TOLERANCE, (estimated / 2**20, measured / 2**20)
