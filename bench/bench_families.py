"""Issue 14's families: training tokens/s and peak RSS, engine vs transformers, side by side (the cost
of soft-capped and sliding-window attention at long T: bench/bench_attention.py).

    python bench/bench_families.py              # the training table (each run in a fresh process)
    python bench/bench_families.py --attention  # bench/bench_attention.py's table instead

Training: a Gemma 3-shaped model of ~100M parameters (Gemma 3 270M's layer shape: 640 hidden, 4 heads /
1 kv head of 256, 2048 MLP, five sliding layers (window 512) then one global, q/k norms, sandwich norms;
14 layers and a 32768 vocab to land near 100M), bf16 autocast over fp32 weights, same batch, same AdamW
settings as bench/bench_train.py (transformers: its usual labels loss + clip_grad_norm_ + fused AdamW).
Each implementation runs in its own process, so peak RSS is its own. bench/bench_moe.py adds the MoE row.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench_train import time_steps  # noqa: E402

BATCH, SEQ, WARMUP, STEPS = 4, 256, 1, 3
MODELS = {  # name -> (transformers config class, kwargs)
    "gemma3-100m": ("Gemma3TextConfig", dict(
        vocab_size=32768, hidden_size=640, intermediate_size=2048, num_hidden_layers=14, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, max_position_embeddings=2048, sliding_window=512,
        query_pre_attn_scalar=256, tie_word_embeddings=True)),
}


def write_model(name: str) -> Path:
    import torch
    import transformers

    directory = Path(tempfile.gettempdir()) / f"engine-bench-{name}"
    if not (directory / "config.json").exists():
        cls, kwargs = MODELS[name]
        config = getattr(transformers, cls)(**kwargs)
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def run_one(impl: str, name: str) -> dict:
    """Train WARMUP + STEPS bf16 steps in this process; tokens/s over STEPS and peak RSS (MB)."""
    import torch

    directory = write_model(name)
    vocab = MODELS[name][1]["vocab_size"]
    torch.manual_seed(0)
    data = torch.randint(0, vocab, (WARMUP + STEPS, BATCH, SEQ + 1))
    if impl == "engine":
        from engine import Transformer
        from engine.config import TrainConfig
        from engine.train.loop import make_optimizer, train_step

        model = Transformer.from_pretrained(directory).train()
        opt = make_optimizer(model, TrainConfig(lr=3e-4, beta1=0.9, beta2=0.95, weight_decay=0.1, grad_clip=1.0))

        def step(batch):
            train_step(model, opt, [(batch[:, :-1], batch[:, 1:])], device=torch.device("cpu"), precision="bf16")
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).train()
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                lr=3e-4, betas=(0.9, 0.95), fused=True)

        def step(batch):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(batch[:, :-1], labels=batch[:, :-1]).loss  # HF shifts labels internally
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    elapsed = time_steps(step, data, WARMUP, STEPS)
    return {"impl": impl, "model": name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "tokens_per_s": STEPS * BATCH * SEQ / elapsed,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(impl: str, name: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", impl, "--model", name], check=True,
                         capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--one", choices=["engine", "transformers"])
    p.add_argument("--model", default="gemma3-100m", choices=sorted(MODELS))
    p.add_argument("--trials", type=int, default=1)
    p.add_argument("--attention", action="store_true", help="run bench/bench_attention.py instead")
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.model)))
        return
    if not args.attention:
        from bench.bench_attention import cpu_model

        print(f"bf16 autocast, batch {BATCH} x {SEQ}, {STEPS} timed steps after {WARMUP} warm-up, "
              f"median of {args.trials} trial(s), {cpu_model()}\n")
        print("| model | params | transformers tok/s | engine tok/s | speedup | transformers peak RSS | "
              "engine peak RSS | RSS ratio |")
        print("|---|---|---|---|---|---|---|---|")
        runs = {"transformers": [], "engine": []}
        for _ in range(args.trials):  # interleaved, so machine noise hits both alike
            for impl in runs:
                runs[impl].append(measure(impl, args.model))
        hf_tps, our_tps = (statistics.median(r["tokens_per_s"] for r in runs[i]) for i in runs)
        hf_mb, our_mb = (max(r["peak_rss_mb"] for r in runs[i]) for i in runs)
        print(f"| {args.model} | {runs['engine'][0]['params_m']:.0f}M | {hf_tps:.0f} | {our_tps:.0f} | "
              f"{our_tps / hf_tps:.2f}x | {hf_mb:.0f} MB | {our_mb:.0f} MB | {our_mb / hf_mb:.2f} |", flush=True)
    else:  # the attention table lives in bench/bench_attention.py now; --attention runs it
        subprocess.run([sys.executable, str(ROOT / "bench" / "bench_attention.py")], check=True, cwd=ROOT)


if __name__ == "__main__":
    main()
