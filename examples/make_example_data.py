"""python examples/make_example_data.py [--out data/examples] : the SFT quickstart's tasks in every source and
format the configs/*.yaml examples read (deterministic; needs pip install -e ".[datasets]").

    alpaca.parquet          Alpaca rows (instruction / input / output) in a parquet file
    sharegpt.jsonl          ShareGPT conversations (from: human / gpt), with a system turn
    messages/               OpenAI "messages" rows, a DatasetDict saved with save_to_disk (train + validation)
    qa.csv                  any columns (question, answer): read through data.sft.columns
    text.parquet            plain documents in a "content" column, for data.format "text"
    repl_test.jsonl         held-out prompts and answers for the lm-eval task in examples/lm_eval_tasks/
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo's cli/ and engine/

from cli.eval_sft import make_example  # noqa: E402  (the quickstart's Python REPL tasks)
from engine.files import atomic_write  # noqa: E402

SYSTEM = "You are a Python REPL. Reply with the value only."


def examples(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [make_example(rng) for _ in range(n)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="examples/make_example_data.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/examples", help="output dir (default: data/examples)")
    p.add_argument("--n", type=int, default=2000, help="training examples per file (default: 2000)")
    args = p.parse_args(argv)
    import datasets

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, val = examples(args.n, seed=0), examples(100, seed=1)
    held = {ex["prompt"] for ex in train}
    test = [ex for ex in examples(400, seed=2) if ex["prompt"] not in held][:100]
    strip = lambda s: s.rstrip("\n")  # noqa: E731  (the chat template ends each turn itself)
    alpaca = [{"instruction": "Evaluate this Python expression.", "input": strip(ex["prompt"][4:]),
               "output": strip(ex["completion"])} for ex in train]
    datasets.Dataset.from_list(alpaca).to_parquet(str(out / "alpaca.parquet"))
    sharegpt = [{"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": strip(ex["prompt"])},
                                   {"from": "gpt", "value": strip(ex["completion"])}]} for ex in train]
    atomic_write(out / "sharegpt.jsonl", "".join(json.dumps(r) + "\n" for r in sharegpt))

    def messages(rows):
        return [{"messages": [{"role": "user", "content": strip(ex["prompt"])},
                              {"role": "assistant", "content": strip(ex["completion"])}]} for ex in rows]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(messages(train)),
                          "validation": datasets.Dataset.from_list(messages(val))}).save_to_disk(str(out / "messages"))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["question", "answer"])
    writer.writeheader()
    writer.writerows({"question": ex["prompt"], "answer": ex["completion"]} for ex in train)
    atomic_write(out / "qa.csv", buf.getvalue())
    text = [{"content": "".join(ex["prompt"] + ex["completion"] for ex in train[i:i + 20])}
            for i in range(0, len(train), 20)]
    datasets.Dataset.from_list(text).to_parquet(str(out / "text.parquet"))
    atomic_write(out / "repl_test.jsonl", "".join(json.dumps({"prompt": ex["prompt"], "answer": strip(ex["completion"])})
                                                 + "\n" for ex in test))
    print(f"wrote {out}/: alpaca.parquet, sharegpt.jsonl, messages/, qa.csv, text.parquet, repl_test.jsonl")


if __name__ == "__main__":
    main()
