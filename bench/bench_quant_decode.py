"""Weight-only quantized decoding: batch-1 KV-cache decode tokens/s with a bf16, int8 and NF4 base, and greedy
agreement of the quantized models with bf16 on the real SmolLM2-135M-Instruct.

    python bench/bench_quant_decode.py                 # both parts, markdown
    python bench/bench_quant_decode.py --trials 3 --no-agreement   # speed only, median of 3 rounds
    python bench/bench_quant_decode.py --one bf16      # one speed row (JSON), in this process

Speed: a random Qwen2.5-0.5B-shaped model (bench/bench_finetune.py's QWEN05B) in bf16, its block linears then
quantized with engine.quantize (int8 / nf4) and its LM head given an int8 copy (engine.quant.quantize_lm_head), as
cli.generate / cli.serve --quantize load it; the embedding stays bf16 (one row is read per token). Each variant
decodes in its own process, interleaved over TRIALS rounds; the median counts. Decode: DECODE_TOKENS new tokens
after an 8-token prompt, greedy, no EOS, minus the time of the prompt's step. Each row also shows the weight bytes
it reads per token and its share of the limit (bytes per token / the read bandwidth bench_bandwidth measures over
a buffer of that size, probed between trials).
Agreement: for each prompt, the chat template, 48 greedy tokens in bf16; each other variant (fp32 as the yardstick
of plain rounding, int8, nf4 as --quantize loads them) is scored by its top-1 token at every position of bf16's
completion (teacher-forced), its own greedy completion's tokens equal up to the first difference, and prompts whose
completions are identical.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import smollm2  # noqa: E402
from bench.bench_bandwidth import cpu_name, read_bandwidth  # noqa: E402
from bench.bench_finetune import QWEN05B  # noqa: E402

VARIANTS = ("bf16", "int8", "nf4")
DECODE_TOKENS, TRIALS = 32, 1  # one trial on the shared machine (raise it where the CPU is yours)
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a GPU is in one sentence.",
           "List three prime numbers.", "How do I boil an egg?", "What is 12 times 7?"]


def build(variant: str):
    import torch

    from engine import ModelConfig, Transformer, quantize
    from engine.quant import quantize_lm_head

    with torch.device("meta"):
        model = Transformer(ModelConfig(**QWEN05B))
    model = model.to(torch.bfloat16).allocate("cpu")  # as the loaders do (to_empty would import sympy)
    torch.manual_seed(0)
    model.reset_parameters()
    if variant != "bf16":
        quantize(model, variant)
        quantize_lm_head(model, "int8")
    return model.eval()


def bytes_per_token(model) -> int:
    """Weight bytes batch-1 decoding reads per token: every parameter and buffer once, except the embedding when
    the LM head does not share it (then one row of it is gathered)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    if getattr(model.lm_head, "weight", None) is not model.embed.weight:
        total -= model.embed.weight.numel() * model.embed.weight.element_size()
    return total


def speed_one(variant: str) -> dict:
    import torch

    from engine import generate

    model = build(variant)
    prompt = torch.randint(0, 32000, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        generate(model, prompt, 4, eos_token_id=[])  # warm-up
        t0 = time.perf_counter()
        generate(model, prompt, 1, eos_token_id=[])
        t1 = time.perf_counter()
        generate(model, prompt, DECODE_TOKENS + 1, eos_token_id=[])
        t2 = time.perf_counter()
    return {"variant": variant, "tokens_per_s": DECODE_TOKENS / ((t2 - t1) - (t1 - t0)),
            "threads": torch.get_num_threads(), "bytes_per_token": bytes_per_token(model)}


def measure(variant: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", variant], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        return {"variant": variant, "error": (out.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_real(variant: str):
    """SmolLM2-135M-Instruct as cli.generate loads it: bf16, fp32, or bf16 with --quantize int8|nf4."""
    import torch

    from engine import Transformer
    from engine.quant import quantize_lm_head

    if variant == "fp32":
        return Transformer.from_pretrained(smollm2.hf_dir(), dtype=torch.float32).eval()
    model = Transformer.from_pretrained(smollm2.hf_dir(), dtype=torch.bfloat16,
                                        quantize=None if variant == "bf16" else variant)
    if variant != "bf16":
        quantize_lm_head(model, "int8")
    return model.eval()


def agreement() -> dict:
    """Each variant against bf16 on the real model: greedy tokens equal up to the first difference (one rounding
    flip derails the rest, so this is noisy), and teacher-forced top-1 agreement (the variant's argmax at every
    position of bf16's own completion). fp32 is the yardstick: how far plain rounding moves bf16's choices."""
    import torch

    from engine import Tokenizer, generate

    tok = Tokenizer.from_pretrained(smollm2.hf_dir())
    prompts = [torch.tensor([tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                     tokenize=True)]) for p in PROMPTS]
    model = load_real("bf16")
    with torch.inference_mode():
        ref = [generate(model, p, 48, eos_token_id=[])[0, p.shape[1]:] for p in prompts]
    result = {}
    for variant in ("fp32", "int8", "nf4"):
        model = load_real(variant)
        prefix, forced = [], []
        with torch.inference_mode():
            for p, r in zip(prompts, ref):
                own = generate(model, p, 48, eos_token_id=[])[0, p.shape[1]:]
                prefix.append(next((i for i, (a, b) in enumerate(zip(r.tolist(), own.tolist())) if a != b), len(r)))
                logits = model(torch.cat([p[0], r[:-1]])[None])[0, p.shape[1] - 1:]  # the position before each token
                forced.append(float((logits.argmax(-1) == r).float().mean()))
        result[variant] = {"prefix_tokens": prefix, "identical": sum(n == 48 for n in prefix), "prompts": len(prefix),
                           "agree_fraction": sum(prefix) / (48 * len(prefix)), "forced_top1": sum(forced) / len(forced)}
        del model
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--one", choices=VARIANTS)
    p.add_argument("--no-agreement", action="store_true")
    p.add_argument("--trials", type=int, default=TRIALS, help="interleaved rounds (median counts)")
    args = p.parse_args()
    if args.one:
        print(json.dumps(speed_one(args.one)))
        return
    rows, nbytes, bandwidth = {v: [] for v in VARIANTS}, {}, {v: [] for v in VARIANTS}
    for _ in range(args.trials):
        for v in VARIANTS:
            r = measure(v)
            if "error" in r:
                print(f"{v}: failed: {r['error']}")
                continue
            rows[v].append(r["tokens_per_s"])
            nbytes[v] = r["bytes_per_token"]
            bandwidth[v].append(read_bandwidth(nbytes[v], min_seconds=0.2))
    print(f"0.5B-shaped model, batch-1 decode of {DECODE_TOKENS} tokens, median of {args.trials} interleaved trials, "
          f"{cpu_name()}\n")
    print("| base | MB read/token | read GB/s (probe) | decode tokens/s | vs bf16 | % of limit |")
    print("|---|---:|---:|---:|---:|---:|")
    ref = statistics.median(rows["bf16"]) if rows["bf16"] else None
    for v in VARIANTS:
        if rows[v]:
            med, bw = statistics.median(rows[v]), statistics.median(bandwidth[v])
            vs = f"{med / ref:.2f}x" if ref else ""
            print(f"| {v} | {nbytes[v] / 1e6:.0f} | {bw / 1e9:.1f} | {med:.1f} | {vs} | "
                  f"{100 * med * nbytes[v] / bw:.0f}% |")
    if not args.no_agreement and smollm2.available():
        print("\nAgreement with bf16 greedy decoding on SmolLM2-135M-Instruct (48 tokens per prompt):\n")
        print("| model | top-1 equal at each position of bf16's completion | completions identical | "
              "tokens equal up to the first difference (per prompt) |")
        print("|---|---:|---:|---|")
        for v, r in agreement().items():
            print(f"| {v} | {r['forced_top1']:.1%} | {r['identical']}/{r['prompts']} | {r['agree_fraction']:.0%} "
                  f"({r['prefix_tokens']}) |")


if __name__ == "__main__":
    main()
