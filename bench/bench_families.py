"""Issue 14's families: training tokens/s and peak RSS, engine vs transformers, side by side; and the
cost of soft-capped and sliding-window attention at long T.

    python bench/bench_families.py              # both tables (each training run in a fresh process)
    python bench/bench_families.py --attention  # the attention table only

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
import time
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


def attention_table(T: int = 2048, window: int = 512) -> None:
    """fwd+bwd seconds of one layer's attention (B=1, 4 heads / 1 kv head of 64, fp32): the chunked path
    vs materializing the [T, T] scores (soft cap) and vs the global-cost masked SDPA (sliding window)."""
    import torch

    from engine.model.attention import attend

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, T, 64, requires_grad=True) for h in (4, 1, 1))
    pos = torch.arange(T)
    causal = pos[None, :] <= pos[:, None]
    windowed = causal & (pos[None, :] > pos[:, None] - window)

    def eager_capped():  # transformers' eager attention: whole [T, T] scores, tanh, mask, softmax
        kk, vv = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
        s = torch.tanh(q @ kk.transpose(-1, -2) / 8 / 50.0) * 50.0
        return s.masked_fill(~causal, float("-inf")).softmax(-1) @ vv

    def sdpa_window():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=windowed, enable_gqa=True)

    cases = {"soft cap 50, causal: eager [T, T]": eager_capped,
             "soft cap 50, causal: chunked": lambda: attend(q, k, v, None, scale=0.125, softcap=50.0),
             f"window {window}: SDPA with a mask": sdpa_window,
             f"window {window}: chunked": lambda: attend(q, k, v, windowed, window=window)}
    times = {label: [] for label in cases}
    for _ in range(6):  # interleaved rounds, so machine noise hits every case alike; the first is warm-up
        for label, fn in cases.items():
            start = time.perf_counter()
            fn().sum().backward()
            times[label].append(time.perf_counter() - start)
    med = {label: statistics.median(t[1:]) for label, t in times.items()}
    print(f"\nattention fwd+bwd, T = {T}, 4 query heads / 1 kv head of 64, fp32, "
          f"{torch.get_num_threads()} threads, median of 5 interleaved rounds\n")
    print("| case | seconds | vs the first row of its pair |\n|---|---|---|")
    labels = list(cases)
    for i, label in enumerate(labels):
        base = med[labels[i - i % 2]]
        print(f"| {label} | {med[label]:.3f} | {base / med[label]:.2f}x |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--one", choices=["engine", "transformers"])
    p.add_argument("--model", default="gemma3-100m", choices=sorted(MODELS))
    p.add_argument("--trials", type=int, default=1)
    p.add_argument("--attention", action="store_true", help="only the attention table")
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.model)))
        return
    if not args.attention:
        print(f"bf16 autocast, batch {BATCH} x {SEQ}, {STEPS} timed steps after {WARMUP} warm-up, "
              f"median of {args.trials} trial(s)\n")
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
    attention_table()


if __name__ == "__main__":
    main()
