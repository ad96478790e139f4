"""The memory planner on DPO and GRPO runs: its estimate against the measured peak of real steps (tests/peak_memory.py,
as tests/train/test_memory_plan.py measures SFT), within the planner's SFT tolerance (+-25%), and its method terms.

DPO is measured with LoRA (the reference: the base with adapters disabled, no weights) and full fine-tuning (a
frozen fp32 copy); prompts are T/8 of each side's T tokens, so the shared-prefix rows hold 15T/8 tokens where the
planner counts its worst case 2T. GRPO's terms (rollout KV cache, B*G rows) are checked against their formula.
"""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import DPOConfig, ModelConfig, RunConfig, from_dict
from engine.train.memory_plan import estimate_memory
from tests.train.test_memory_plan import ARCH, MiB, TOLERANCE

ROOT = Path(__file__).resolve().parents[2]
B, T = 4, 256  # pairs per micro-batch, tokens per side


def dpo_run_dict(lora: dict | None, dpo: dict | None = None) -> dict:
    out = {"model": {"from_pretrained": "unused-by-the-planner"},
           "data": {"train": "unused.jsonl", "format": "preference", "seq_len": T},
           "train": {"batch_size": B, "max_steps": 10, "objective": "dpo"}, "dpo": dpo or {}}
    if lora is not None:
        out["lora"] = lora
    return out


def _dpo_steps(cfg: RunConfig, mc: ModelConfig, n: int, pairs: int = B, side: int = T) -> None:
    import torch

    from engine.adapters.lora import apply_lora
    from engine.data.sampler import IGNORE_INDEX
    from engine.model.transformer import Transformer
    from engine.train.dpo import DPOLoss
    from engine.train.loop import make_optimizer, train_step

    model = Transformer(mc)
    ref = None
    if cfg.lora is not None:
        apply_lora(model, cfg.lora)
    else:
        ref = copy.deepcopy(model).requires_grad_(False).eval()
    model.train()
    objective = DPOLoss(model, cfg.dpo or DPOConfig(), reference="adapters" if ref is None else "copy", ref_model=ref)
    optimizer = make_optimizer(model, cfg.train)
    g = torch.Generator().manual_seed(0)
    prompt = side // 8
    for _ in range(n):
        ids = torch.randint(0, mc.vocab_size, (2 * pairs, side + 1), generator=g)
        ids[pairs:, :prompt] = ids[:pairs, :prompt]  # both sides of a pair share the prompt
        targets = ids[:, 1:].clone()
        targets[:, :prompt - 1] = IGNORE_INDEX
        batch = {"input_ids": ids[:, :-1].contiguous(), "targets": targets}
        train_step(model, optimizer, [batch], device=torch.device("cpu"), loss_module=objective)


def measure(spec: dict) -> dict:
    import gc

    from tests.peak_memory import measure_peaks

    cfg, mc = from_dict(RunConfig, spec["run"], where=""), ModelConfig.from_dict(spec["arch"])
    _dpo_steps(cfg, ModelConfig.from_dict({**spec["arch"], "vocab_size": 64, "hidden_size": 32, "num_heads": 2,
                                           "num_kv_heads": 1, "head_dim": 16, "intermediate_size": 64,
                                           "num_layers": 1}), 2, pairs=1, side=16)  # warm-up
    gc.collect()
    return {**measure_peaks(lambda: _dpo_steps(cfg, mc, 2)), "estimated": estimate_memory(mc, cfg, 1, "cpu").peak}


CASES = {"DPO LoRA (adapters-disabled reference)": {"rank": 8, "targets": "all-linear"},
         "DPO full fine-tuning (frozen fp32 copy)": None}


@pytest.fixture(scope="module")
def measured():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen([sys.executable, "-m", "tests.train.test_memory_plan_methods",
                                     json.dumps({"run": dpo_run_dict(lora), "arch": ARCH})], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, lora in CASES.items()}
    out = {}
    for name, proc in procs.items():
        stdout, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: {err[-3000:]}"
        out[name] = json.loads(stdout.strip().splitlines()[-1])
    return out


@pytest.mark.skipif(sys.platform != "linux", reason="reads RSS from /proc")
@pytest.mark.parametrize("name", list(CASES))
def test_dpo_estimate_is_within_25_percent_of_measured_peak(measured, name):
    m = measured[name]
    ratio = m["estimated"] / m["measured"]
    print(f"{name}: measured {m['measured'] / MiB:.1f} MiB, estimated {m['estimated'] / MiB:.1f} MiB ({ratio:.2f}x)")
    assert abs(ratio - 1) <= TOLERANCE, f"{name}: {ratio:.2f}x"


def _plan(run: dict):
    return estimate_memory(ModelConfig.from_dict(ARCH), from_dict(RunConfig, run, where=""), 1, "cpu")


def test_dpo_reference_terms():
    lora = {"rank": 8, "targets": "all-linear"}
    adapters, full = _plan(dpo_run_dict(lora)), _plan(dpo_run_dict(None))
    precomputed = _plan(dpo_run_dict(None, {"precompute_ref": True}))
    bf16_copy = _plan(dpo_run_dict(None, {"ref_dtype": "bf16"}))
    P = full.total_params
    assert full.weights - precomputed.weights == 4 * P and full.weights - bf16_copy.weights == 2 * P
    assert "reference forward (no grad)" in adapters.workspace and "reference forward (no grad)" not in precomputed.workspace
    assert _plan(dpo_run_dict(None, {"loss": "simpo"})).weights == precomputed.weights  # reference-free
    sft = estimate_memory(ModelConfig.from_dict(ARCH), from_dict(RunConfig, {
        "model": {"from_pretrained": "x"}, "data": {"train": "u.jsonl", "format": "sft", "seq_len": T},
        "train": {"batch_size": B, "max_steps": 10}, "lora": lora}, where=""), 1, "cpu")
    assert adapters.activations > 1.5 * sft.activations  # chosen + rejected: up to 2T tokens a pair


def test_grpo_counts_the_rollout_kv_cache_and_g_rows():
    mc = ModelConfig.from_dict(ARCH)
    run = {"model": {"from_pretrained": "x"}, "data": {"train": "p.jsonl", "format": "prompts", "seq_len": 64},
           "train": {"batch_size": 2, "max_steps": 10, "objective": "grpo"},
           "grpo": {"num_generations": 8, "max_completion_length": 192}, "lora": {"rank": 8, "targets": "all-linear"}}
    plan = _plan(run)
    rows, total = 2 * 8, 64 + 192
    kv = 2 * mc.num_layers * rows * total * mc.num_kv_heads * mc.head_dim * 4
    assert plan.workspace["GRPO sampling (KV cache + logits)"] == kv + rows * mc.vocab_size * 4
    with_kl = _plan({**run, "lora": None, "grpo": {**run["grpo"], "beta": 0.04}})
    assert with_kl.weights == 2 * 4 * with_kl.total_params  # the policy and its frozen fp32 reference


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
