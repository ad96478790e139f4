"""Weight-only quantized decoding: batch-1 KV-cache decode tokens/s with a bf16, int8 and NF4 base, and greedy
agreement of the quantized models with bf16 on the real SmolLM2-135M-Instruct.

    python bench/bench_quant_decode.py                 # both parts, markdown
    python bench/bench_quant_decode.py --one bf16      # one speed row (JSON), in this process

Speed: a random Qwen2.5-0.5B-shaped model (bench/bench_finetune.py's QWEN05B) in bf16, its block linears then
quantized with engine.quantize (int8 / nf4; the tied embedding + LM head stays bf16, so it is read every token in
every variant). Each variant decodes in its own process, interleaved over TRIALS rounds; the median counts.
Decode: DECODE_TOKENS new tokens after an 8-token prompt, greedy, no EOS, minus the time of the prompt's step.
Agreement: for each prompt, the chat template, 48 greedy tokens in bf16 and in the quantized model; reported:
the tokens equal position by position up to the first difference, and prompts whose completions are identical.
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
from bench.bench_finetune import QWEN05B  # noqa: E402

VARIANTS = ("bf16", "int8", "nf4")
DECODE_TOKENS, TRIALS = 32, 1  # one trial on the shared machine (raise it where the CPU is yours)
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a GPU is in one sentence.",
           "List three prime numbers.", "How do I boil an egg?", "What is 12 times 7?"]


def build(variant: str):
    import torch

    from engine import ModelConfig, Transformer, quantize

    with torch.device("meta"):
        model = Transformer(ModelConfig(**QWEN05B))
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    model.tie_weights()
    torch.manual_seed(0)
    model.reset_parameters()
    if variant != "bf16":
        quantize(model, variant)
    return model.eval()


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
            "threads": torch.get_num_threads()}


def measure(variant: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", variant], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        return {"variant": variant, "error": (out.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def agreement() -> dict:
    import torch

    from engine import Tokenizer, Transformer, generate

    tok = Tokenizer.from_pretrained(smollm2.hf_dir())
    prompts = [torch.tensor([tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                     tokenize=True)]) for p in PROMPTS]
    outs = {}
    for variant in VARIANTS:
        model = Transformer.from_pretrained(smollm2.hf_dir(), dtype=torch.bfloat16, quantize=None if variant == "bf16" else variant)
        with torch.inference_mode():
            outs[variant] = [generate(model, p, 48, eos_token_id=[])[0, p.shape[1]:].tolist() for p in prompts]
        del model
    result = {}
    for variant in VARIANTS[1:]:
        prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                  for x, y in zip(outs["bf16"], outs[variant])]
        result[variant] = {"prefix_tokens": prefix, "identical": sum(p == 48 for p in prefix), "prompts": len(prefix),
                           "agree_fraction": sum(prefix) / (48 * len(prefix))}
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--one", choices=VARIANTS)
    p.add_argument("--no-agreement", action="store_true")
    args = p.parse_args()
    if args.one:
        print(json.dumps(speed_one(args.one)))
        return
    rows = {v: [] for v in VARIANTS}
    for _ in range(TRIALS):
        for v in VARIANTS:
            r = measure(v)
            if "error" in r:
                print(f"{v}: failed: {r['error']}")
                continue
            rows[v].append(r["tokens_per_s"])
    print(f"0.5B-shaped model, batch-1 decode of {DECODE_TOKENS} tokens, median of {TRIALS} interleaved trials\n")
    print("| base | decode tokens/s | vs bf16 |")
    print("|---|---|---|")
    ref = statistics.median(rows["bf16"]) if rows["bf16"] else None
    for v in VARIANTS:
        if rows[v]:
            med = statistics.median(rows[v])
            print(f"| {v} | {med:.1f} | {med / ref:.2f}x |" if ref else f"| {v} | {med:.1f} | |")
    if not args.no_agreement and smollm2.available():
        print("\nGreedy agreement with bf16 on SmolLM2-135M-Instruct (48 tokens per prompt):")
        for v, r in agreement().items():
            print(f"- {v}: {r['identical']}/{r['prompts']} completions identical; tokens equal up to the first "
                  f"difference: {r['agree_fraction']:.0%} (per prompt {r['prefix_tokens']})")


if __name__ == "__main__":
    main()
