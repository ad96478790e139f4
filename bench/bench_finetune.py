"""Fine-tuning memory and speed: full fine-tuning vs LoRA, each run in a fresh process (peak RSS is its own).

    python bench/bench_finetune.py                  # markdown table: 35M Llama (full vs LoRA) + 0.5B Qwen2.5 LoRA
    python bench/bench_finetune.py --full-0.5b      # also full fine-tuning of the 0.5B model (slow, ~8+ GB)
    pytest bench/bench_finetune.py --benchmark-only

Models are random-init (no network): bench/llama35m.py, and a Qwen2.5-0.5B-shaped model (hidden 896, 24 layers,
14 heads / 2 kv heads, MLP 4864, vocab 151936, tied embeddings, q/k/v biases: 494M params) built on the meta
device and materialized straight in the base dtype. Every run: engine.train.train_step (fused linear-CE,
kernels.AdamW, lr 1e-4, clip 1.0), bf16 autocast, random tokens, WARMUP untimed steps then STEPS timed ones.
LoRA: r 16, alpha 32, on all seven linear layers. Peak RSS is resource.getrusage's ru_maxrss of the process
(model build, warm-up and timed steps included).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench_train import time_steps  # noqa: E402

WARMUP, STEPS = 1, 3
QWEN05B = dict(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
               intermediate_size=4864, max_position_embeddings=32768, qkv_bias=True, tie_word_embeddings=True,
               rope_theta=1000000.0, hf_model_type="qwen2")
# name: (model, method, base dtype, batch, seq_len, activation checkpointing)
RUNS = {
    "35m-full": ("llama35m", "full", "fp32", 8, 256, False),
    "35m-lora": ("llama35m", "lora", "fp32", 8, 256, False),
    "35m-lora-bf16": ("llama35m", "lora", "bf16", 8, 256, False),
    "0.5b-lora-bf16": ("qwen0.5b", "lora", "bf16", 2, 512, True),
    "0.5b-lora-fp32": ("qwen0.5b", "lora", "fp32", 2, 512, True),
    "0.5b-full": ("qwen0.5b", "full", "fp32", 2, 512, True),
}
MB = 1024  # ru_maxrss is in KiB on Linux


def build(model_name: str, dtype):
    import torch

    from engine import ModelConfig, Transformer

    if model_name == "llama35m":
        from bench.llama35m import write_llama35m

        return Transformer.from_pretrained(write_llama35m(), dtype=dtype)
    with torch.device("meta"):
        model = Transformer(ModelConfig(**QWEN05B))
    model = model.to(dtype).allocate("cpu")  # never a full fp32 copy when the base is bf16; no sympy import
    torch.manual_seed(0)
    model.reset_parameters()
    return model


def run_one(name: str) -> dict:
    import torch

    from engine.config import LoraConfig, TrainConfig
    from engine.adapters.lora import apply_lora
    from engine.train.loop import make_optimizer, train_step

    model_name, method, base_dtype, batch, seq, ckpt = RUNS[name]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[base_dtype]
    model = build(model_name, dtype)
    if method == "lora":
        apply_lora(model, LoraConfig(rank=16, alpha=32, targets="all-linear", base_dtype=base_dtype))
    model.gradient_checkpointing = ckpt
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = make_optimizer(model, TrainConfig(lr=1e-4, weight_decay=0.0, grad_clip=1.0))
    torch.manual_seed(0)
    data = torch.randint(0, model.config.vocab_size, (WARMUP + STEPS, batch, seq + 1))
    losses = []

    def step(tokens):
        out = train_step(model, opt, [(tokens[:, :-1], tokens[:, 1:])], device=torch.device("cpu"), precision="bf16")
        losses.append(out["loss"])

    elapsed = time_steps(step, data, WARMUP, STEPS)
    return {"run": name, "params_m": model.config.num_params / 1e6, "trainable_m": trainable / 1e6,
            "tokens_per_s": STEPS * batch * seq / elapsed, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MB,
            "batch": batch, "seq": seq, "base_dtype": base_dtype, "activation_checkpointing": ckpt,
            "threads": torch.get_num_threads(), "loss": losses[-1]}


def measure(name: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        return {"run": name, "error": (out.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(r: dict) -> str:
    if "error" in r:
        return f"| {r['run']} | failed: {r['error']} | | | | |"
    return (f"| {r['run']} | {r['params_m']:.0f}M / {r['trainable_m']:.2f}M | {r['base_dtype']} | {r['batch']} x {r['seq']}"
            f"{' + act. ckpt' if r['activation_checkpointing'] else ''} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} MB |")


def test_finetune_memory(benchmark):
    """pytest-benchmark entry: LoRA on the 0.5B model stays under 8 GB peak RSS; the 35M pair side by side."""
    results = {name: measure(name) for name in ("35m-full", "35m-lora", "0.5b-lora-bf16")}
    benchmark.extra_info.update(results)
    assert results["0.5b-lora-bf16"]["peak_rss_mb"] < 8 * 1024
    benchmark.pedantic(lambda: None, rounds=1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--one", choices=sorted(RUNS))
    p.add_argument("--full-0.5b", dest="full_05b", action="store_true", help="also full fine-tuning of the 0.5B model")
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    names = ["35m-full", "35m-lora", "35m-lora-bf16", "0.5b-lora-bf16", "0.5b-lora-fp32"]
    names += ["0.5b-full"] if args.full_05b else []
    print(f"bf16 autocast, {STEPS} timed steps after {WARMUP} warm-up, LoRA r=16 all-linear; one process per row\n")
    print("| run | params / trainable | base weights | batch x seq | tokens/s | peak RSS |")
    print("|---|---|---|---|---|---|")
    for name in names:
        print(row(measure(name)), flush=True)


if __name__ == "__main__":
    main()
