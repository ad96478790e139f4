"""QLoRA memory and speed: LoRA on a bf16 base vs on an NF4 / int8 base (engine.quant), each run in a fresh
process (peak RSS is its own), side by side in one invocation.

    python bench/bench_qlora.py                 # 0.5B: bf16-base LoRA, QLoRA-NF4, QLoRA-int8; 3B: QLoRA-NF4
    python bench/bench_qlora.py --runs 0.5b-lora-bf16 0.5b-qlora-nf4 --trials 3   # speed: interleaved, median
    python bench/bench_qlora.py --one NAME      # one row, as JSON
    python bench/bench_qlora.py --quality       # real SmolLM2-135M: held-out loss and LoRA vs QLoRA fine-tune
    python bench/bench_qlora.py --load          # peak RSS of loading SmolLM2 dense vs quantized on load

Models are random-init (no network), shaped like Qwen2.5-0.5B (bench/bench_finetune.py's QWEN05B) and
Qwen2.5-3B (hidden 2048, 36 layers, 16 / 2 heads, head_dim 128, MLP 11008, vocab 151936, tied). They are built on
the meta device and materialized in bf16; a quantized base is quantized layer by layer (0.5B: each block linear
gets N(0, 0.02) weights quantized by QuantLinear.load_dense; 3B: random codes and absmaxes written straight into
the buffers, the same bytes and compute at a fraction of the set-up time), so no dense copy of the block linears
exists. Every run: engine.train.train_step (fused linear-CE, kernels.AdamW), bf16 autocast, activation
checkpointing, LoRA r 16 / alpha 32 on all seven linears, random tokens, one untimed step then one timed (RUNS).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import smollm2  # noqa: E402
from bench.bench_finetune import QWEN05B  # noqa: E402
from bench.bench_train import time_steps  # noqa: E402
from bench.qlora_memory import PhaseSampler, expected_parts, rss  # noqa: E402

QWEN3B = dict(vocab_size=151936, hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=2, head_dim=128,
              intermediate_size=11008, max_position_embeddings=32768, qkv_bias=True, tie_word_embeddings=True,
              rope_theta=1000000.0, hf_model_type="qwen2")
# name: (shape, base dtype, batch, seq_len, warm-up steps, timed steps)
# One untimed step first, for every row alike: AdamW allocates its state (fp32 m and v: 67 MB at 0.5B, 228 MB at
# 3B) at the end of the first step, so only the later steps' peaks hold everything a long run holds (a first-step
# peak understated the 0.5B QLoRA row by ~70 MB), and the first step also pays one-time set-up costs.
RUNS = {
    "0.5b-lora-bf16": ("0.5b", "bf16", 2, 512, 1, 1),
    "0.5b-qlora-nf4": ("0.5b", "nf4", 2, 512, 1, 1),
    "0.5b-qlora-int8": ("0.5b", "int8", 2, 512, 1, 1),
    "0.5b-peft-bnb-nf4": ("0.5b", "peft-nf4", 2, 512, 1, 1),  # transformers + PEFT + bitsandbytes (qlora_peft.py)
    "3b-qlora-nf4": ("3b", "nf4", 2, 512, 1, 1),
}
MB = 1024  # ru_maxrss is in KiB on Linux


def build(shape: str, base: str):
    """A random bf16 model of `shape`; with base nf4/int8 its block linears are quantized one at a time."""
    import torch

    from engine import ModelConfig, Transformer
    from engine.quant import quantize, quantized_layers

    with torch.device("meta"):
        model = Transformer(ModelConfig(**(QWEN05B if shape == "0.5b" else QWEN3B)))
    model = model.to(torch.bfloat16)
    if base != "bf16":
        quantize(model, base)  # meta linears -> empty quantized layers: the dense block weights never exist
    model = model.allocate("cpu")  # as the loaders do: to_empty would import sympy (~33 MB resident)
    torch.manual_seed(0)
    model.reset_parameters()  # embeddings, norms, biases (and the dense linears of a bf16 base)
    g = torch.Generator().manual_seed(0)
    for layer in quantized_layers(model).values():
        if shape == "0.5b":
            layer.load_dense(torch.randn(layer.out_features, layer.in_features, generator=g) * 0.02)
        else:
            for buf in layer.buffers():
                if buf.dtype in (torch.uint8, torch.int8):
                    buf.copy_(torch.randint(-127 if buf.dtype == torch.int8 else 0, 128 if buf.dtype == torch.int8
                                            else 256, buf.shape, generator=g, dtype=torch.int16).to(buf.dtype))
            if layer.kind == "nf4":
                layer.absmax2.fill_(0.01), layer.offset.fill_(0.05)
            else:
                layer.scale.fill_(0.02 * 2 / 127)
    return model


def run_peft(name: str) -> dict:
    """The transformers + PEFT + bitsandbytes row (bench/qlora_peft.py), measured like run_one's rows."""
    import torch

    from bench.qlora_peft import build_peft_nf4, peft_step_fn

    shape, base, batch, seq, warmup, steps = RUNS[name]
    model = build_peft_nf4(QWEN05B if shape == "0.5b" else QWEN3B)
    step, losses = peft_step_fn(model)
    torch.manual_seed(0)
    data = torch.randint(0, model.config.vocab_size, (warmup + steps, batch, seq + 1))
    elapsed = time_steps(step, data, warmup, steps)
    return {"run": name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "base_mb": float("nan"),
            "tokens_per_s": steps * batch * seq / elapsed,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MB,
            "batch": batch, "seq": seq, "base_dtype": "bnb nf4", "threads": torch.get_num_threads(), "loss": losses[-1]}


def run_one(name: str) -> dict:
    import torch

    if RUNS[name][1] == "peft-nf4":
        return run_peft(name)

    from engine.adapters.lora import apply_lora
    from engine.config import LoraConfig, TrainConfig
    from engine.train.loop import make_optimizer, train_step

    shape, base, batch, seq, warmup, steps = RUNS[name]
    torch.zeros(1) @ torch.zeros(1)  # the runtime's own start-up (BLAS, thread pool) counts as the baseline
    at = {"runtime": rss()}
    model = build(shape, base)
    at["model"] = rss()
    built_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MB
    apply_lora(model, LoraConfig(rank=16, alpha=32, targets="all-linear", base_dtype=base))
    model.gradient_checkpointing = True
    model.train()
    opt = make_optimizer(model, TrainConfig(lr=1e-4, weight_decay=0.0, grad_clip=1.0))
    at["adapters"] = rss()
    sampler = PhaseSampler(model, opt)
    torch.manual_seed(0)
    data = torch.randint(0, model.config.vocab_size, (warmup + steps, batch, seq + 1))
    losses = []

    def step(tokens):
        out = train_step(model, opt, [(tokens[:, :-1], tokens[:, 1:])], device=torch.device("cpu"), precision="bf16")
        losses.append(out["loss"])

    with sampler:
        elapsed = time_steps(step, data, warmup, steps)
    at["after steps"] = rss()
    import kernels

    cache = kernels.release_cpu_blocks()  # its counters (a quantized base turned it on: engine/quant/heap.py)
    base_bytes = sum(b.numel() * b.element_size() for b in model.buffers()) + sum(
        p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return {"run": name, "params_m": model.config.num_params / 1e6, "base_mb": base_bytes / 2**20,
            "tokens_per_s": steps * batch * seq / elapsed, "built_rss_mb": built_mb,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MB, "batch": batch, "seq": seq,
            "base_dtype": base, "threads": torch.get_num_threads(), "loss": losses[-1],
            "rss_at_mb": {k: v / 2**20 for k, v in at.items()},
            "phase_peak_mb": {k: v / 2**20 for k, v in sampler.peaks.items()},
            "expected_mb": expected_parts(model, batch, seq),
            "block_cache": {k: cache[k] for k in ("hits", "misses")} if cache.get("installed") else None}


def plan_mb(name: str) -> float:
    """The planner's peak (engine.train.memory_plan) for the same run, in MB."""
    from engine.config import ModelConfig, RunConfig, from_dict
    from engine.train.memory_plan import estimate_memory

    shape, base, batch, seq, _, _ = RUNS[name]
    cfg = from_dict(RunConfig, {"model": {"from_pretrained": "unused"}, "data": {"train": "x.txt", "seq_len": seq},
                                "train": {"batch_size": batch, "activation_checkpointing": True, "precision": "bf16"},
                                "lora": {"rank": 16, "alpha": 32, "targets": "all-linear", "base_dtype": base}}, where="")
    return estimate_memory(ModelConfig(**(QWEN05B if shape == "0.5b" else QWEN3B)), cfg).peak / 2**20


def planned(name: str) -> str:
    return "-" if RUNS[name][1] == "peft-nf4" else f"{plan_mb(name):.0f} MB"


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def measure(name: str) -> dict:
    """One row in a fresh process. A quantized row runs with huge pages for torch's large tensors, as cli.train
    restarts itself for a quantized base (engine.quant.heap.huge_pages_env); the others as they start."""
    from engine.quant import KINDS
    from engine.quant.heap import huge_pages_env

    env = huge_pages_env() if RUNS[name][1] in KINDS else None
    out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode != 0:
        return {"run": name, "error": (out.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--one", choices=sorted(RUNS))
    p.add_argument("--runs", nargs="*", default=list(RUNS), choices=sorted(RUNS))
    p.add_argument("--trials", type=int, default=1,
                   help="rounds over the rows, interleaved (tokens/s: the median; peak RSS: the largest)")
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    print(f"CPU: {cpu_model()}; bf16 autocast, activation checkpointing, LoRA r=16 all-linear; one process per "
          "row; on quantized rows glibc's mmap threshold fixed at 64 KiB and the CPU block cache on "
          "(engine/quant/heap.py)\n")
    print("| run | base weights | batch x seq | tokens/s | peak RSS | planner peak |")
    print("|---|---|---|---|---|---|")
    trials = {name: [] for name in args.runs}
    for _ in range(args.trials):  # interleaved, so the shared machine's load hits every row alike
        for name in args.runs:
            trials[name].append(measure(name))
    results = {name: combine(runs) for name, runs in trials.items()}
    for name in args.runs:
        r = results[name]
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | | |", flush=True)
            continue
        print(f"| {name} | {r['base_dtype']} ({r['base_mb']:.0f} MB) | {r['batch']} x {r['seq']} | "
              f"{r['tokens_per_s']:.1f} | {r['peak_rss_mb']:.0f} MB | {planned(name)} |", flush=True)
    for name in args.runs:
        if "rss_at_mb" in results[name]:
            print_breakdown(results[name])
    ref = results.get("0.5b-lora-bf16", {})
    for name in ("0.5b-qlora-nf4", "0.5b-qlora-int8"):
        if "tokens_per_s" in ref and "tokens_per_s" in results.get(name, {}):
            print(f"{name}: {results[name]['tokens_per_s'] / ref['tokens_per_s']:.2f}x the tokens/s of bf16-base LoRA "
                  "(goal >= 0.8x)")
    peer, ours = results.get("0.5b-peft-bnb-nf4", {}), results.get("0.5b-qlora-nf4", {})
    if "tokens_per_s" in peer and "tokens_per_s" in ours:
        print(f"0.5b-qlora-nf4: {ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x the tokens/s of transformers + "
              "PEFT + "
              f"bitsandbytes NF4 (goal >= 2x); peak RSS {ours['peak_rss_mb']:.0f} vs {peer['peak_rss_mb']:.0f} MB")


def combine(runs: list[dict]) -> dict:
    """One row from its trials: the median tokens/s, the largest peak RSS, the rest from the trial with that peak."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[0]
    out = dict(max(good, key=lambda r: r["peak_rss_mb"]))
    out["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in good)
    return out


def print_breakdown(r: dict) -> None:
    """Peak RSS of one row, part by part: RSS measured after each stage and at each phase's peak, minus the
    stage before, next to what the parts should take by arithmetic (bench/qlora_memory.py)."""
    at, peaks = r["rss_at_mb"], r["phase_peak_mb"]
    cache = r.get("block_cache")
    used = f"; CPU block cache: {cache['hits']} hits, {cache['misses']} misses" if cache else ""
    print(f"\n{r['run']}: where the {r['peak_rss_mb']:.0f} MB peak RSS goes (MB){used}")
    print("| stage | RSS then | growth |")
    print("|---|---|---|")
    prev = 0.0
    for stage, mb in [("runtime: python + torch + engine + BLAS", at["runtime"]), ("model built", at["model"]),
                      ("LoRA applied, optimizer made", at["adapters"]),
                      *[(f"peak during {ph}", peaks[ph]) for ph in ("forward", "loss", "backward", "optimizer")
                        if ph in peaks], ("after the steps", at["after steps"])]:
        print(f"| {stage} | {mb:.0f} | {mb - prev:+.0f} |")
        prev = mb
    print("By arithmetic: " + "; ".join(f"{k} {v:.0f}" for k, v in r["expected_mb"].items()))


# ---- quality on the real SmolLM2-135M-Instruct ----------------------------------------------------------------
QUALITY_STEPS = 20


def heldout_loss(kind) -> float:
    """Mean next-token loss of SmolLM2 (bf16 base, or its block linears quantized from the fp32 file) over this
    repository's README and docs/ (text the model never saw in this form), in 256-token windows."""
    import torch
    import torch.nn.functional as F

    from engine import Tokenizer, Transformer

    text = "\n\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    ids = torch.tensor(Tokenizer.from_pretrained(smollm2.hf_dir()).encode(text))
    windows = ids[: len(ids) // 257 * 257].view(-1, 257)[:8]
    model = Transformer.from_pretrained(smollm2.hf_dir(), dtype=torch.bfloat16, quantize=kind)
    with torch.inference_mode():
        losses = [F.cross_entropy(model(w[None, :-1]).float()[0], w[1:]) for w in windows]
    return float(torch.stack(losses).mean())


def finetune_loss(tmp: Path, base: str) -> float:
    """Final validation loss of a LoRA SFT run (arithmetic prompt -> completion) on SmolLM2 with base `base`."""
    from engine.config import RunConfig, from_dict
    from engine.train.loop import train
    from tests.finetune_fixtures import lora_run_dict

    d = lora_run_dict(tmp / base, smollm2.hf_dir(), sft=True, lora={"base_dtype": base, "rank": 8, "alpha": 16},
                      max_steps=QUALITY_STEPS, eval_every=QUALITY_STEPS, save_every=QUALITY_STEPS, lr=2e-3,
                      precision="bf16", eval_batches=4)
    train(from_dict(RunConfig, d, where=""), progress=False)
    rows = [json.loads(line) for line in (tmp / base / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r][-1]


def quality() -> None:
    import tempfile

    print("\nSmolLM2-135M-Instruct, held-out loss (README + docs/, 8 x 256 tokens):")
    ref = heldout_loss(None)
    print(f"- bf16 base: {ref:.4f}")
    for kind in ("nf4", "int8"):
        loss = heldout_loss(kind)
        print(f"- {kind} base: {loss:.4f} ({(loss - ref) / ref:+.1%})", flush=True)
    print(f"\nLoRA SFT ({QUALITY_STEPS} steps, r 8, arithmetic prompt -> completion), final validation loss:")
    with tempfile.TemporaryDirectory() as tmp:
        final = {}
        for base in ("bf16", "nf4"):
            final[base] = finetune_loss(Path(tmp), base)
            print(f"- {base} base: {final[base]:.4f}", flush=True)
    print(f"QLoRA-NF4 final validation loss vs bf16-base LoRA: {final['nf4'] - final['bf16']:+.4f} "
          f"({(final['nf4'] - final['bf16']) / final['bf16']:+.1%})")


def load_one(kind: str) -> dict:
    """Peak RSS growth of loading SmolLM2 (fp32 file) as bf16, quantizing on load when kind is nf4/int8."""
    import torch

    from engine import Transformer
    from tests.peak_memory import rss

    torch.zeros(1)  # the runtime's own start-up memory is not the model's
    before = rss()
    model = Transformer.from_pretrained(smollm2.hf_dir(), dtype=torch.bfloat16, quantize=None if kind == "bf16" else kind)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return {"kind": kind, "peak_growth_mb": grown / 2**20, "model_mb": held / 2**20}


def load_memory() -> None:
    """Each load in its own process; the largest tensor of the file, for the "model + one tensor" bound."""
    from safetensors import safe_open

    with safe_open(str(smollm2.hf_dir() / "model.safetensors"), "pt") as f:
        largest = max((f.get_slice(n).get_shape() for n in f.keys()), key=lambda s: s[0] * s[1] if len(s) > 1 else s[0])
    print(f"\nLoading SmolLM2-135M (fp32 file; largest tensor {largest}, {largest[0] * largest[1] * 4 / 2**20:.0f} MB "
          "in fp32), peak RSS growth per process:")
    for kind in ("bf16", "nf4", "int8"):
        out = subprocess.run([sys.executable, __file__, "--load-one", kind], capture_output=True, text=True, cwd=ROOT)
        r = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-300:]}
        print(f"- {kind}: {r}", flush=True)


if __name__ == "__main__":
    if "--load-one" in sys.argv:
        print(json.dumps(load_one(sys.argv[sys.argv.index("--load-one") + 1])))
    elif "--load" in sys.argv:
        load_memory()
    else:
        quality() if "--quality" in sys.argv else main()
