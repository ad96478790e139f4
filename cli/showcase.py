"""The default main job's task and its before/after report (configs/smollm2_sft.json).

    python -m cli.showcase make-data --out configs/data/json_extract   # the committed train/val/test .jsonl

The task: turn one English sentence about a person into JSON with fixed keys, e.g.
`Meet Maria, a 27-year-old from Lisbon.` -> `{"name": "Maria", "age": 27, "city": "Lisbon"}`. Answers are checked by
exact match; SmolLM2-135M-Instruct answers in prose or with other keys before tuning, so accuracy has room to move.
Test sentences (person, age, city) never occur in train.

With `showcase` in the run config, cli.train calls `before(cfg)` ahead of training and `after(cfg, final_dir)` at
the end: exact-match accuracy on held-out examples and a chat sample, base vs tuned, then the merged HF model and
the GGUF file written into out_dir.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from cli.eval_sft import write_disjoint_splits

NAMES = ["Maria", "James", "Aisha", "Chen", "Olga", "Diego", "Priya", "Lukas", "Fatima", "Kenji", "Sofia", "Omar",
         "Emma", "Ravi", "Ingrid", "Mateo", "Yuki", "Noah", "Leila", "Pavel", "Grace", "Tomas", "Amara", "Hugo",
         "Nina", "Samuel", "Zara", "Felix", "Hana", "Victor", "Clara", "Ivan", "Lucia", "Ahmed", "Elena", "Marco"]
CITIES = ["Lisbon", "Toronto", "Nairobi", "Osaka", "Berlin", "Lima", "Mumbai", "Oslo", "Cairo", "Denver",
          "Madrid", "Seoul", "Dublin", "Quito", "Prague", "Austin", "Lagos", "Vienna", "Manila", "Perth",
          "Helsinki", "Santiago", "Hanoi", "Boston", "Krakow", "Accra", "Porto", "Geneva", "Tunis", "Leeds"]
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "Last year {name} moved to {city}. {name} is now {age}.",
    "{city} is home to {name}, who just turned {age}.",
    "At {age}, {name} still lives in {city}.",
    "Born and raised in {city}, {name} celebrated a {age}th birthday this week.",
    "Our new colleague {name} ({age}) joins us from {city}.",
    "{name}, aged {age}, works as a teacher in {city}.",
]
INSTRUCTION = ('Extract the person\'s name, age and city from the text. Answer with JSON only, with the keys '
               '"name", "age" and "city".\n\nText: ')


def make_example(rng: random.Random) -> dict:
    name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 79)
    text = rng.choice(TEMPLATES).format(name=name, city=city, age=age)
    return {"prompt": INSTRUCTION + text, "completion": json.dumps({"name": name, "age": age, "city": city})}


def make_data(out: Path, n_train: int = 2000, n_val: int = 100, n_test: int = 200, seed: int = 0) -> None:
    """Write train/val/test .jsonl with disjoint prompts (seeded: every machine writes the same files)."""
    write_disjoint_splits(out, make_example, {"test": n_test, "val": n_val, "train": n_train}, seed)


def chat_sample(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The greedy reply to one user message, rendered with the tokenizer's chat template."""
    from engine.infer.generate import generate

    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)
    out = generate(model, torch.tensor([ids]), max_new_tokens, eos_token_id=tokenizer.eos_token_id)[0, len(ids):]
    return tokenizer.decode(out.tolist(), skip_special_tokens=True).strip()


def _report(cfg, model, tokenizer, label: str, progress: bool) -> tuple[float, str]:
    from cli.eval_sft import accuracy
    from engine.data.sft import read_records

    sc = cfg.showcase
    records = list(read_records(Path(sc.test)))[: sc.n]
    acc = accuracy(model, tokenizer, records, max_new_tokens=sc.max_new_tokens, progress=progress, desc=label)
    return acc, chat_sample(model, tokenizer, sc.chat_prompt, sc.max_new_tokens)


def before(cfg, progress: bool = True) -> tuple[float, str]:
    """(accuracy, chat reply) of the untuned base model, printed."""
    from cli.common import load_for_inference

    model, tokenizer = load_for_inference(cfg.model.from_pretrained)
    acc, reply = _report(cfg, model, tokenizer, "base", progress)
    print(f"before fine-tuning: exact match {acc:.1%} on {cfg.showcase.n} held-out examples")
    return acc, reply


def after(cfg, final_dir: Path, base: tuple[float, str], progress: bool = True) -> None:
    """Accuracy and chat reply of the tuned model (adapter merged) next to the base's, then the exports."""
    from cli.common import load_for_inference
    from engine.model.gguf_write import write_gguf

    model, tokenizer = load_for_inference(final_dir, merge=True)
    acc, reply = _report(cfg, model, tokenizer, "fine-tuned", progress)
    n = cfg.showcase.n
    print(f"exact match on {n} held-out examples: base {base[0]:.1%} -> fine-tuned {acc:.1%}")
    print(f"\n--- chat sample (greedy) ---\nuser: {cfg.showcase.chat_prompt}\nbase: {base[1]}\nfine-tuned: {reply}\n---")
    out = Path(cfg.out_dir)
    merged = out / "merged"
    model.save_pretrained(merged)
    tokenizer.save_pretrained(merged)
    print(f"merged model: {merged}  (python -m cli.generate --model {merged} --chat)")
    if cfg.showcase.gguf_type:
        path = write_gguf(model, tokenizer, out / f"model-{cfg.showcase.gguf_type}.gguf", cfg.showcase.gguf_type)
        print(f"gguf: {path}  (llama-cli -m {path} -cnv)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="cli.showcase", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make-data", help="write the JSON-extraction set")
    m.add_argument("--out", default="configs/data/json_extract")
    args = p.parse_args(argv)
    make_data(Path(args.out))


if __name__ == "__main__":
    main()
