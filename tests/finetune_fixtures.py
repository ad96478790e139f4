"""Fine-tuning fixtures: a tiny pretrained model dir (transformers-written, with a tokenizer), SFT .jsonl files and
run configs for LoRA / SFT runs that finish in a second or two on CPU."""
from __future__ import annotations

import json
import random
from pathlib import Path

from engine.config import RunConfig, from_dict
from tests.hf_models import save_demo_model
from tests.train_fixtures import write_corpus


def pretrained_dir(directory: Path, family: str = "llama") -> Path:
    """A tiny random HF model of `family` plus its tokenizer (llama style: Llama-2 chat template with BOS)."""
    if not (directory / "config.json").is_file():
        save_demo_model(directory, family)
    return directory


def arithmetic_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        out.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    return out


def chat_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w},
                          {"role": "user", "content": "again"}, {"role": "assistant", "content": f"{w} {w}"}]}
            for w in (rng.choice(["cat", "dog", "tree", "sun"]) for _ in range(n))]


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def lora_run_dict(tmp_path: Path, model_dir: Path, sft: bool = False, lora: dict | None = None, **train) -> dict:
    """A LoRA run on `model_dir`: text windows, or SFT on arithmetic prompt/completion lines when `sft`."""
    if sft:
        data = {"format": "sft", "train": str(write_jsonl(tmp_path / "sft" / "train.jsonl", arithmetic_records(64))),
                "val": str(write_jsonl(tmp_path / "sft" / "val.jsonl", arithmetic_records(16, seed=1))),
                "seq_len": 48, "processed_dir": str(tmp_path / "processed")}
    else:
        corpus = write_corpus(tmp_path / "corpus", n_files=2, words_per_file=600)
        data = {"train": str(corpus / "*.txt"), "seq_len": 32, "val_fraction": 0.1,
                "processed_dir": str(tmp_path / "processed")}
    return {
        "model": {"from_pretrained": str(model_dir)},
        "data": data,
        "train": {"batch_size": 4, "max_steps": 8, "lr": 1e-2, "warmup_steps": 2, "eval_every": 4, "eval_batches": 2,
                  "save_every": 4, "seed": 0, "weight_decay": 0.0, **train},
        "lora": {"rank": 4, "alpha": 8, "targets": "all-linear", **(lora or {})},
        "out_dir": str(tmp_path / "run"),
    }


def lora_run_config(tmp_path: Path, model_dir: Path, **kwargs) -> RunConfig:
    return from_dict(RunConfig, lora_run_dict(tmp_path, model_dir, **kwargs), where="")
