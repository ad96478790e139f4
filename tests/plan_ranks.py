"""Run by tests/train/test_memory_plan.py under torchrun: one rank's peak training memory under DDP or FSDP, and the plan's.

    torchrun --nproc_per_node=2 -m tests.plan_ranks {ddp,fsdp} {fp32,bf16} OUT_DIR [LORA_BASE_DTYPE]

With LORA_BASE_DTYPE (fp32 or bf16) the model trains LoRA adapters (all-linear, r=8) on a frozen base of that dtype.

Writes OUT_DIR/rank<R>.json per rank (files, not stdout: the ranks' prints can interleave). Measured like
tests/train/test_memory_plan.py's one-process case: the tensor peak of two steps (tests/peak_memory.py) after a warm-up that
sets up the process group and runs a wrapped tiny model's steps, with RSS growth beside it.
"""
import dataclasses
import gc
import json
import os
import sys
from pathlib import Path

import torch

from engine.train import distributed
from engine.config import ModelConfig, RunConfig, from_dict
from engine.adapters.lora import apply_lora
from engine.model.transformer import Transformer
from engine.train.memory_plan import estimate_memory
from engine.train.loop import AMP_DTYPES, TokenLoss, make_optimizer, train_step
from tests.peak_memory import measure_peaks
from tests.train.test_memory_plan import ARCH, run_dict


def steps(cfg: RunConfig, mc: ModelConfig, group, batch_size: int, n: int) -> None:
    precision = cfg.train.precision
    torch.manual_seed(0)
    model = Transformer(mc)
    if cfg.lora is not None:  # built as engine.build.build_model does
        apply_lora(model.to(torch.bfloat16) if cfg.lora.base_dtype == "bf16" else model, cfg.lora)
    model.train()
    module = distributed.wrap(TokenLoss(model, precision), model.layers, group, torch.device("cpu"),
                              AMP_DTYPES.get(precision))
    optimizer = make_optimizer(model, cfg.train)
    g = torch.Generator().manual_seed(group.rank)
    for _ in range(n):
        x = torch.randint(0, mc.vocab_size, (batch_size, cfg.data.seq_len), generator=g)
        train_step(model, optimizer, [(x, x)], device=torch.device("cpu"), precision=precision, loss_module=module,
                   group=group)


def main(strategy: str, precision: str, out_dir: str, lora_base: str | None = None) -> None:
    lora = {"rank": 8, "targets": "all-linear", "base_dtype": lora_base} if lora_base else None
    cfg = from_dict(RunConfig, {**run_dict({"precision": precision}, lora), "distributed": {"strategy": strategy}},
                    where="")
    mc = ModelConfig.from_dict(ARCH)
    group, _ = distributed.init_distributed(cfg, torch.device("cpu"))
    tiny = dataclasses.replace(mc, vocab_size=64, hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16,
                               intermediate_size=64, num_layers=1)
    steps(cfg, tiny, group, 1, 2)  # warm-up: the runtime, gloo buffers, the wrappers' first allocations
    gc.collect()
    peaks = measure_peaks(lambda: steps(cfg, mc, group, cfg.train.batch_size, 2))
    (Path(out_dir) / f"rank{group.rank}.json").write_text(json.dumps(
        {"rank": group.rank, **peaks, "estimated": estimate_memory(mc, cfg, group.world_size, "cpu").peak}))
    distributed.shutdown(group)


if __name__ == "__main__":
    main(*sys.argv[1:5])
    sys.stdout.flush()
    os._exit(0)  # skip the C++ teardown under live gloo threads: see cli.train.exit_without_teardown
