"""Mixture-of-experts training throughput and peak memory: engine vs transformers' Qwen3MoeForCausalLM.

    python bench/bench_moe.py                    # markdown table (each measurement in a fresh process)
    pytest bench/bench_moe.py --benchmark-only   # the same, recorded by pytest-benchmark

A Qwen3-MoE-shaped model of ~100M total parameters (16 experts, top-2, renormalized, q/k norm; random
weights written by transformers), the same batch (4 x 256), bf16 autocast over fp32 weights, the same
threads and AdamW settings (lr 3e-4, betas 0.9/0.95, wd 0.1, clip 1.0), and the router's aux loss on
both sides (transformers: `output_router_logits=True`). transformers runs its usual loop and its default
experts implementation; the engine runs `engine.train.train_step` (grouped experts, fused
linear-cross-entropy, kernels.AdamW). Each implementation runs in its own process, so peak RSS is its own.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench_train import time_steps  # noqa: E402

BATCH, SEQ, WARMUP, STEPS = 4, 256, 1, 4
QWEN3_MOE_100M = dict(vocab_size=32768, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=64, intermediate_size=1536, moe_intermediate_size=288,
                      num_experts=16, num_experts_per_tok=2, norm_topk_prob=True, router_aux_loss_coef=0.001,
                      max_position_embeddings=1024, tie_word_embeddings=False)


def write_model() -> Path:
    """The benchmark model, written once by transformers to a cache directory (fp32 safetensors)."""
    directory = Path(os.environ.get("BENCH_CACHE", tempfile.gettempdir())) / "bench_qwen3_moe_100m"
    if not (directory / "config.json").is_file():
        import torch
        import transformers

        torch.manual_seed(0)
        transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**QWEN3_MOE_100M)).save_pretrained(directory)
    return directory


def _rss_mb() -> float:
    """The current resident set (MB), from /proc (Linux)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


class SavedBytes:
    """Counts the bytes autograd keeps for backward (parameters excluded, each storage once), split into
    tensors saved inside an MoE layer (router, grouped experts) and everything else."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.depth, self.seen, self.mb = 0, set(), {"moe": 0.0, "other": 0.0}
        moe_types = ("MoE", "Qwen3MoeSparseMoeBlock", "MixtralSparseMoeBlock")
        for m in model.modules():
            if type(m).__name__ in moe_types:
                m.register_forward_pre_hook(lambda *_: setattr(self, "depth", self.depth + 1))
                m.register_forward_hook(lambda *_: setattr(self, "depth", self.depth - 1))

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.params and ptr not in self.seen:
            self.seen.add(ptr)
            self.mb["moe" if self.depth else "other"] += t.untyped_storage().nbytes() / 2**20
        return t

    def hooks(self):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def run_one(impl: str) -> dict:
    """Train WARMUP + STEPS steps in this process; return tokens/s over STEPS and peak RSS (MB)."""
    import torch

    directory = write_model()
    torch.manual_seed(0)
    data = torch.randint(0, QWEN3_MOE_100M["vocab_size"], (WARMUP + STEPS, BATCH, SEQ + 1))
    rss_import = _rss_mb()
    if impl == "engine":
        from engine import Transformer
        from engine.config import TrainConfig
        from engine.train.loop import make_optimizer, train_step

        model = Transformer.from_pretrained(directory).train()
        params = sum(p.numel() for p in model.parameters())
        opt = make_optimizer(model, TrainConfig(lr=3e-4, beta1=0.9, beta2=0.95, weight_decay=0.1, grad_clip=1.0))

        def step(batch):
            train_step(model, opt, [(batch[:, :-1], batch[:, 1:])], device=torch.device("cpu"), precision="bf16")
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).train()
        params = sum(p.numel() for p in model.parameters())
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                lr=3e-4, betas=(0.9, 0.95), fused=True)

        def step(batch):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(batch[:, :-1], labels=batch[:, :-1], output_router_logits=True).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    rss_loaded = _rss_mb()
    saved = SavedBytes(model)
    with saved.hooks():  # the warm-up step: what backward keeps, measured once
        step(data[0])
    elapsed = time_steps(step, data[1:], WARMUP - 1, STEPS)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    adam = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if torch.is_tensor(v) and v.dim() > 0) / 2**20
    breakdown = {"import_rss": rss_import, "loaded_rss": rss_loaded, "weights": weights, "grads": weights,
                 "adamw_state": adam, "saved_moe": saved.mb["moe"], "saved_other": saved.mb["other"]}
    return {"breakdown_mb": breakdown, "impl": impl, "params_m": params / 1e6, "tokens_per_s": STEPS * BATCH * SEQ / elapsed,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads()}


def measure(impl: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", impl], check=True, capture_output=True, text=True,
                         cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_moe_train_speed(benchmark):
    """pytest-benchmark entry: one interleaved pair, ratios in extra_info."""
    hf, ours = measure("transformers"), measure("engine")
    benchmark.extra_info.update(transformers=hf, engine=ours, speedup=ours["tokens_per_s"] / hf["tokens_per_s"],
                                memory_ratio=ours["peak_rss_mb"] / hf["peak_rss_mb"])
    benchmark.pedantic(lambda: None, rounds=1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--one", choices=["engine", "transformers"])
    p.add_argument("--trials", type=int, default=2)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    write_model()
    runs = {"transformers": [], "engine": []}
    for _ in range(args.trials):  # interleaved, so machine noise hits both alike
        for impl in runs:
            runs[impl].append(measure(impl))
    hf_tps, our_tps = (statistics.median(r["tokens_per_s"] for r in runs[i]) for i in runs)
    hf_mb, our_mb = (max(r["peak_rss_mb"] for r in runs[i]) for i in runs)
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if line.startswith("Model name")), "unknown CPU")
    print(f"{cpu}; Qwen3-MoE-shaped, {runs['engine'][0]['params_m']:.0f}M total params, bf16 autocast, batch {BATCH} x {SEQ}, "
          f"{STEPS} timed steps after {WARMUP} warm-up, median of {args.trials} trials, "
          f"{runs['engine'][0]['threads']} threads\n")
    print("| transformers tok/s | engine tok/s | speedup | transformers peak RSS | engine peak RSS | memory ratio |")
    print("|---|---|---|---|---|---|")
    print(f"| {hf_tps:.0f} | {our_tps:.0f} | {our_tps / hf_tps:.2f}x | {hf_mb:.0f} MB | {our_mb:.0f} MB | "
          f"{our_mb / hf_mb:.2f}x |")
    rows = {"import_rss": "RSS after import", "loaded_rss": "RSS after loading the model",
            "weights": "weights (fp32)", "grads": "gradients (fp32)", "adamw_state": "AdamW state",
            "saved_moe": "kept for backward inside MoE layers (router, grouped experts)",
            "saved_other": "kept for backward elsewhere (attention, norms, residuals, loss)"}
    print("\nMemory breakdown (MB; saved-for-backward: autograd's saved tensors in one step, parameters excluded)\n")
    print("| | transformers | engine |\n|---|---|---|")
    for key, label in rows.items():
        print(f"| {label} | {runs['transformers'][0]['breakdown_mb'][key]:.0f} | "
              f"{runs['engine'][0]['breakdown_mb'][key]:.0f} |")
    print(f"| peak RSS | {hf_mb:.0f} | {our_mb:.0f} |")


if __name__ == "__main__":
    main()
