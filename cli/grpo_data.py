"""python -m cli.grpo_data --out data/grpo_arith : the prompts of the offline GRPO example (configs/grpo_arith.json).

Two-number additions (a in [10, 49], b in [1, 9]) as chat prompts with an `answer` field, split into disjoint
train and held-out (val) pairs; deterministic in --seed. Every prompt has the same token length, so a
micro-batch's completions decode as one batch.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from engine.files import atomic_write

SYSTEM = "Answer briefly."


def rows(seed: int) -> list[dict]:
    pairs = [(a, b) for a in range(10, 50) for b in range(1, 10)]
    random.Random(seed).shuffle(pairs)
    return [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is {a} + {b}?"}],
             "answer": str(a + b)} for a, b in pairs]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="cli.grpo_data", description=__doc__)
    p.add_argument("--out", default="data/grpo_arith", help="directory for train.jsonl and val.jsonl")
    p.add_argument("--val", type=int, default=48, help="held-out prompts")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    args = p.parse_args(argv)
    data, out = rows(args.seed), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("val", data[:args.val]), ("train", data[args.val:])):
        atomic_write(out / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in part))
        print(f"{out / name}.jsonl: {len(part)} prompts")


if __name__ == "__main__":
    main()
