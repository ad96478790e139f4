"""GRPO's sampling phase vs the engine's own decoder: generated tokens/s on the same ~35M Llama.

    python bench/bench_grpo.py [--trials 5] [--model DIR]   # interleaved trials -> markdown table with ratios

Rows compared (every row decodes DECODE_TOKENS new tokens after a PROMPT-token prompt, no EOS):
  decode, batch 1        engine.infer.generate greedy: bench_generate.py's decode figure
  decode, batch G*P      engine.infer.generate greedy over the same rows the sampler decodes
  grpo sampling          engine.train.rollouts.sample: P prompts x G completions, temperature 1, top_p 1
                         (what GRPO.prepare runs each generation)
The goal (issue 16): the sampler is not slower than our decoder at the same batch (ratio >= ~1.0; its only
extra work is softmax + multinomial per row).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.llama35m import write_llama35m  # noqa: E402
from engine import Transformer, generate  # noqa: E402
from engine.train.rollouts import sample  # noqa: E402

DECODE_TOKENS, PROMPT, PROMPTS, G = 32, 24, 2, 8


def cases(model) -> dict:
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (PROMPTS, PROMPT), generator=g)
    rows = prompts.repeat_interleave(G, dim=0)
    return {
        "decode, batch 1": (lambda: generate(model, rows[:1], DECODE_TOKENS, eos_token_id=[]), DECODE_TOKENS),
        f"decode, batch {PROMPTS * G}": (lambda: generate(model, rows, DECODE_TOKENS, eos_token_id=[]),
                                         DECODE_TOKENS * PROMPTS * G),
        f"grpo sampling ({PROMPTS} prompts x G={G})": (
            lambda: sample(model, prompts.tolist(), G, DECODE_TOKENS, eos=(), temperature=1.0, seed=0),
            DECODE_TOKENS * PROMPTS * G),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--model", default=None, help="HF model dir (default: the random ~35M Llama)")
    args = p.parse_args(argv)
    model = Transformer.from_pretrained(args.model or write_llama35m()).eval()
    fns = cases(model)
    rates = {name: [] for name in fns}
    for fn, _ in fns.values():
        fn()  # warm-up
    for _ in range(args.trials):
        for name, (fn, tokens) in fns.items():
            t0 = time.perf_counter()
            fn()
            rates[name].append(tokens / (time.perf_counter() - t0))
    med = {name: statistics.median(r) for name, r in rates.items()}
    same_batch = med[f"decode, batch {PROMPTS * G}"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.trials} trials (median)\n")
    print("| phase | generated tok/s | vs decode at the same batch |")
    print("|---|---|---|")
    for name, rate in med.items():
        print(f"| {name} | {rate:.0f} | {rate / same_batch:.2f}x |")


if __name__ == "__main__":
    main()
