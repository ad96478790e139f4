"""Training throughput and peak memory: engine vs transformers' LlamaForCausalLM, side by side.

    python bench/bench_train.py                    # markdown table (each measurement in a fresh process)
    pytest bench/bench_train.py --benchmark-only   # the same, recorded by pytest-benchmark

Same ~35M Llama (bench/llama35m.py), same batch (8 x 256), same precision (bf16 autocast over fp32
weights), threads and AdamW settings (lr 3e-4, betas 0.9/0.95, wd 0.1, clip 1.0). transformers runs
its usual loop: `model(x, labels=y).loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW(fused=True)`.
The engine runs `engine.train.train_step`: fused linear-cross-entropy and kernels.AdamW with the clip
folded into its step. Each implementation runs in its own process, so peak RSS is its own.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BATCH, SEQ, WARMUP, STEPS = 8, 256, 2, 6


def time_steps(step, data, warmup: int, steps: int) -> float:
    """Run `step(data[i])` warmup times untimed, then `steps` times; return the timed seconds."""
    for i in range(warmup):
        step(data[i])
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(data[i])
    return time.perf_counter() - start


def run_one(impl: str, precision: str) -> dict:
    """Train WARMUP + STEPS steps in this process; return tokens/s over STEPS and peak RSS (MB)."""
    import torch

    from bench.llama35m import LLAMA_35M, write_llama35m

    directory = write_llama35m()
    torch.manual_seed(0)
    data = torch.randint(0, LLAMA_35M["vocab_size"], (WARMUP + STEPS, BATCH, SEQ + 1))
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)
    if impl == "engine":
        from engine import Transformer
        from engine.config import TrainConfig
        from engine.train.loop import make_optimizer, train_step

        model = Transformer.from_pretrained(directory).train()
        opt = make_optimizer(model, TrainConfig(lr=3e-4, beta1=0.9, beta2=0.95, weight_decay=0.1, grad_clip=1.0))

        def step(batch):
            train_step(model, opt, [(batch[:, :-1], batch[:, 1:])], device=torch.device("cpu"), precision=precision)
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).train()
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                lr=3e-4, betas=(0.9, 0.95), fused=True)

        def step(batch):
            with amp:
                loss = model(batch[:, :-1], labels=batch[:, :-1]).loss  # HF shifts labels internally
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    elapsed = time_steps(step, data, WARMUP, STEPS)
    return {"impl": impl, "precision": precision, "tokens_per_s": STEPS * BATCH * SEQ / elapsed,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads()}


def measure(impl: str, precision: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", impl, "--precision", precision], check=True,
                         capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_train_speed(benchmark):
    """pytest-benchmark entry: one interleaved pair per precision, ratios in extra_info."""
    for precision in ("bf16", "fp32"):
        hf, ours = measure("transformers", precision), measure("engine", precision)
        benchmark.extra_info[precision] = {"transformers": hf, "engine": ours,
                                           "speedup": ours["tokens_per_s"] / hf["tokens_per_s"]}
    benchmark.pedantic(lambda: None, rounds=1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--one", choices=["engine", "transformers"])
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--trials", type=int, default=2)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.precision)))
        return
    print(f"batch {BATCH} x {SEQ}, {STEPS} timed steps after {WARMUP} warm-up, median of {args.trials} trials\n")
    print("| precision | transformers tok/s | engine tok/s | speedup | transformers peak RSS | engine peak RSS |")
    print("|---|---|---|---|---|---|")
    for precision in ("bf16", "fp32"):
        runs = {"transformers": [], "engine": []}
        for _ in range(args.trials):  # interleaved, so machine noise hits both alike
            for impl in runs:
                runs[impl].append(measure(impl, precision))
        hf_tps, our_tps = (statistics.median(r["tokens_per_s"] for r in runs[i]) for i in ("transformers", "engine"))
        hf_mb, our_mb = (max(r["peak_rss_mb"] for r in runs[i]) for i in ("transformers", "engine"))
        print(f"| {precision} | {hf_tps:.0f} | {our_tps:.0f} | {our_tps / hf_tps:.2f}x | {hf_mb:.0f} MB | {our_mb:.0f} MB |",
              flush=True)


if __name__ == "__main__":
    main()
