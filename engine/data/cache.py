"""The data caches' keys and publishing: one fingerprint, one digest, one way to publish a cache dir.

A cache dir (<processed_dir>/<digest>, sft-<digest>, tokenizers/bpe<N>) is named by a digest of what it was
made from; it is filled in a temp dir and published whole by engine.files.publish_dir (replace=False for
caches, so a DDP rank that finished the same cache first keeps its copy).
What a killed run left there (`.tmp-*`, `.old-*`) is cleared by the next run, never what a live one is writing:
a builder holds a shared flock on the cache's parent dir from its temp dir's creation to its rename (a kill
releases it), and the cleaner clears only while it holds the exclusive lock, so only when nobody is building.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
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
    """sha256 of the tokenizer dir's files (those of TOKENIZER_FILES that exist); for a tokenizer inside one
    model file (a .gguf), of that file's path, size and mtime (hashing the whole weights file would be slow)."""
    h = hashlib.sha256()
    if Path(tokenizer_dir).is_file():
        st = Path(tokenizer_dir).stat()
        h.update(f"{Path(tokenizer_dir).resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            h.update(name.encode() + b"\0" + (Path(tokenizer_dir) / name).read_bytes())
    return h.hexdigest()


def digest(key: dict) -> str:
    """16 hex digits naming a cache made from `key` (JSON-able; key order does not matter)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _parent_lock(out: Path, exclusive: bool):
    """flock on out's parent dir: shared while building a cache there, exclusive (never waiting) while
    clearing. Yields whether the lock is held; a kill releases it."""
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def clear_stale(out: Path, done_file: str = DONE_FILE) -> None:
    """Before using `out`: unless another process is building beside it, remove what killed runs left in its
    parent (a complete `.old-*` copy whose target is missing is put back) and a dir at `out` lacking done_file."""
    if not out.parent.is_dir():
        return
    with _parent_lock(out, exclusive=True) as held:
        if not held:
            logger.debug("data: %s is being written by another process; stale temp dirs are left for later",
                         out.parent)
            return
        for path in remove_stale_temps(out.parent):
            logger.info("data: removed %s (left by a killed run)", path)
        if out.is_dir() and not (out / done_file).is_file():
            shutil.rmtree(out)  # publish_dir never leaves one: not a finished cache


def publish_cache(out: Path, fill, replace: bool = False):
    """fill(tmp) into a temp dir beside `out`, then publish it as `out` and return fill's result.
    replace=False: if another process published `out` first, that copy stays. A failure leaves `out` as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with _parent_lock(out, exclusive=False):  # until the rename: clear_stale must not take our temp dir for dead
        return write_dir(out, fill, replace=replace)


def load_or_build(cache, load, build, save, unchanged: str):
    """(splits, reused): load(cache) when a finished cache dir is there, else build() and save(cache, splits)
    when cache is not None (None: no caching, e.g. a tokenizer with no dir). Stale temps are cleared first."""
    if cache is not None:
        clear_stale(cache)  # what killed runs left (a restored complete copy is reused below)
    if cache is not None and (cache / DONE_FILE).is_file():
        logger.info("data: reusing %s (%s unchanged)", cache, unchanged)
        return load(cache), True
    splits = build()
    if cache is not None:
        save(cache, splits)
    return splits, False
