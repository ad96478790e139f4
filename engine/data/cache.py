"""The data caches' keys and publishing: one fingerprint, one digest, one way to publish a cache dir.

A cache dir (<processed_dir>/<digest>, sft-<digest>, tokenizers/bpe<N>) is named by a digest of what it was
made from; it is published whole by engine.files.write_dir with replace=False, so a DDP rank that finished the
same cache first keeps its copy. Before building one, what a killed run left for that name (`.tmp-<name>-*`,
`.old-<name>-*`) is cleared: only the process about to build the name does it, so no live writer is disturbed
(under torchrun rank 0 prepares first and the others reuse its finished cache).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from engine.files import remove_stale_temps, write_dir

logger = logging.getLogger("engine.data.cache")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DONE_FILE = "meta.json"  # written last into every data cache: its presence marks a finished one


def fingerprint(files) -> list:
    """[[path, size, mtime_ns], ...]: what the caches key on (stat, not content)."""
    return [[str(p), (s := p.stat()).st_size, s.st_mtime_ns] for p in files]


def tokenizer_hash(tokenizer_dir) -> str:
    """sha256 of the tokenizer dir's files (those of TOKENIZER_FILES that exist)."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            h.update(name.encode() + b"\0" + (Path(tokenizer_dir) / name).read_bytes())
    return h.hexdigest()


def digest(key: dict) -> str:
    """16 hex digits naming a cache made from `key` (JSON-able; key order does not matter)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def clear_stale(out: Path, done_file: str = DONE_FILE) -> None:
    """Before building `out`: remove what a killed run left for it; a dir at `out` lacking done_file goes too."""
    for path in remove_stale_temps(out.parent, out.name):
        logger.info("data: removed %s (left by a killed run)", path)
    if out.is_dir() and not (out / done_file).is_file():
        shutil.rmtree(out)  # write_dir never leaves one: it is not a finished cache


def publish_cache(out: Path, fill):
    """fill(tmp) into a temp dir, then publish it as `out` unless another process published `out` first."""
    return write_dir(out, fill, replace=False)
