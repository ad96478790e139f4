"""A tiny corpus and run config: a whole training run in a second or two on CPU."""
from __future__ import annotations

import json
import random
from pathlib import Path

from engine.config import RunConfig, from_dict

WORDS = ("the model learns to predict the next token from the previous ones while the loss falls "
         "and the optimizer updates every weight a little at each step of training").split()


def write_corpus(directory: Path, n_files: int = 4, words_per_file: int = 1500, seed: int = 0) -> Path:
    """Text files of pseudo-sentences; returns the directory holding them."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        text = " ".join(rng.choice(WORDS) + ("." if rng.random() < 0.1 else "") for _ in range(words_per_file))
        (directory / f"doc{i}.txt").write_text(text)
    return directory


def tiny_run_dict(tmp_path: Path, **train) -> dict:
    corpus = write_corpus(tmp_path / "corpus")
    return {
        "model": {"architecture": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
                                   "head_dim": 16, "intermediate_size": 64, "max_position_embeddings": 64},
                  "bpe_vocab_size": 300},
        "data": {"train": str(corpus / "*.txt"), "seq_len": 32, "val_fraction": 0.1,
                 "processed_dir": str(tmp_path / "processed")},
        "train": {"batch_size": 4, "max_steps": 8, "lr": 3e-3, "warmup_steps": 2, "eval_every": 4,
                  "eval_batches": 2, "save_every": 4, "seed": 0, **train},
        "out_dir": str(tmp_path / "run"),
    }


def tiny_run_config(tmp_path: Path, **train) -> RunConfig:
    return from_dict(RunConfig, tiny_run_dict(tmp_path, **train), where="")


def write_config_file(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config))
    return path
