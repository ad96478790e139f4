"""python -m cli.eval_sft make-data | eval : the offline SFT example (configs/sft_quickstart.json).

    python -m cli.eval_sft make-data --out data/sft_quickstart      # train/val/test .jsonl, deterministic
    python -m cli.eval_sft eval --base runs/quickstart/final --adapter runs/sft_quickstart/final \\
        --data data/sft_quickstart/test.jsonl                        # exact-match accuracy, before vs after

The tasks are Python REPL lines with checkable answers (the quickstart model was pretrained on Python source):
`>>> max([3, 9, 4])` -> `9`, also min, len, sorted and single-digit sums. Test prompts never occur in train.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tqdm import tqdm

from cli.common import exit_on_user_error, load_for_inference
from engine.adapters.peft_format import ADAPTER_CONFIG
from engine.config import SFTConfig
from engine.data.sft import prompt_ids, read_records
from engine.data.tokenizer import Tokenizer
from engine.files import atomic_write
from engine.infer.generate import generate

TASKS = ("max", "min", "len", "sorted", "sum")


def make_example(rng: random.Random) -> dict:
    task = rng.choice(TASKS)
    if task == "sum":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        expr, answer = f"{a} + {b}", a + b
    else:
        xs = [rng.randint(0, 9) for _ in range(rng.randint(2, 5))]
        expr, answer = f"{task}({xs})", {"max": max, "min": min, "len": len, "sorted": sorted}[task](xs)
    return {"prompt": f">>> {expr}\n", "completion": f"{answer}\n"}


def make_data(out: Path, n_train: int = 6000, n_val: int = 200, n_test: int = 200, seed: int = 0) -> None:
    """Write train/val/test .jsonl with disjoint prompts (seeded: every machine writes the same files)."""
    write_disjoint_splits(out, make_example, {"test": n_test, "val": n_val, "train": n_train}, seed)


def write_disjoint_splits(out: Path, make_example, sizes: dict, seed: int = 0) -> None:
    """Draw sizes[split] examples per split (in the dict's order) from make_example(rng), held-out prompts unique
    and never in train, and write out/{train,val,test}.jsonl atomically."""
    rng, held, splits = random.Random(seed), set(), {}
    for split, n in sizes.items():
        rows = []
        while len(rows) < n:
            ex = make_example(rng)
            if ex["prompt"] in held:  # held-out prompts are unique and never trained on
                continue
            if split != "train":
                held.add(ex["prompt"])
            rows.append(ex)
        splits[split] = rows
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        atomic_write(out / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in splits[split]))
        print(f"wrote {out / f'{split}.jsonl'} ({len(splits[split])} examples)")


@torch.no_grad()
def accuracy(model, tokenizer: Tokenizer, records, max_new_tokens: int = 16, progress: bool = False,
             desc: str = "eval") -> float:
    """Exact match of the greedy completion (up to EOS), stripped, with the expected one; `progress`: a tqdm bar."""
    right = 0
    bar = tqdm(records, desc=desc, unit="ex", disable=not progress, dynamic_ncols=True)
    for i, (record, _) in enumerate(bar, 1):
        ids = prompt_ids(record, tokenizer, SFTConfig())
        out = generate(model, torch.tensor([ids]), max_new_tokens, eos_token_id=tokenizer.eos_token_id)[0, len(ids):]
        text = tokenizer.decode(out.tolist(), skip_special_tokens=True)
        right += text.strip() == record["completion"].strip()
        bar.set_postfix(acc=f"{right / i:.1%}", refresh=False)
    return right / max(len(records), 1)


def is_full_model(directory) -> bool:
    """A fully fine-tuned model dir (config.json, no adapter_config.json): --adapter then replaces --base."""
    return (Path(directory) / "config.json").is_file() and not (Path(directory) / ADAPTER_CONFIG).is_file()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="cli.eval_sft", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make-data", help="write the instruction set")
    m.add_argument("--out", default="data/sft_quickstart")
    e = sub.add_parser("eval", help="exact-match accuracy of the base model and of base + adapter")
    e.add_argument("--base", required=True)
    e.add_argument("--adapter", help="LoRA adapter dir (or a fully fine-tuned model dir)")
    e.add_argument("--data", required=True)
    e.add_argument("--n", type=int, default=100, help="held-out examples to score (default: 100)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars (e.g. in CI logs)")
    args = p.parse_args(argv)
    with exit_on_user_error("cli.eval_sft"):
        if args.command == "make-data":
            make_data(Path(args.out))
            return
        records = list(read_records(Path(args.data)))[: args.n]
        progress = not args.no_progress
        before = accuracy(*load_for_inference(args.base), records, progress=progress, desc="base")
        if args.adapter is None:
            print(f"accuracy on {len(records)} held-out examples: {before:.1%}")
            return
        tuned = (args.adapter, None) if is_full_model(args.adapter) else (args.base, args.adapter)
        after = accuracy(*load_for_inference(*tuned), records, progress=progress, desc="fine-tuned")
        print(f"accuracy on {len(records)} held-out examples: base {before:.1%} -> fine-tuned {after:.1%}")


if __name__ == "__main__":
    main()
