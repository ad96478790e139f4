"""Data: tokenize a corpus once into <processed_dir>/<hash>/{train,val}.bin, then sample windows from a memmap.

Documents are read as in engine.data.documents (a whole text file or one .jsonl line; `{stdlib}` paths), in
bounded pieces: memory does not grow with the file size (see `prepare`). A row of a Hugging Face dataset
(engine.data.hf_datasets: parquet/arrow/csv/json files, save_to_disk dirs, hf: Hub ids) is a document too.
Each document is stored as `[BOS] ids EOS`: EOS always closes it, BOS opens it only when the tokenizer's own
post-processor adds BOS (Llama style), so packed windows look like what the model sees at inference.
The cache key hashes every input's path, size and mtime (stat, not content: a 2 GB corpus re-hashes in
milliseconds; touching a file rebuilds), the tokenizer files' bytes, text_field and the val settings; seq_len
is not in it (the tokens do not depend on it). Without data.val files, val is the last val_fraction of the
tokens, moved back to start at a document boundary; val_fraction = 0 means no val split.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.config import DataConfig
from engine.data.cache import TOKENIZER_FILES, clear_stale, digest, fingerprint, publish_cache, tokenizer_hash
from engine.data.documents import DataError, expand_paths, iter_jsonl, iter_pieces, splits_safely
from engine.data.hf_datasets import (DatasetSource, check_text_column, expand_sources, iter_dataset_pieces,
                                     source_bytes, source_fingerprint)
from engine.data.sampler import Sampled
from engine.data.tokenizer import Tokenizer

# Re-exported: callers import these from here (cli.common, engine.train.metrics, tests).
__all__ = ["DataError", "PreparedData", "TOKENIZER_FILES", "TokenWindows", "expand_paths", "fingerprint",
           "iter_jsonl", "load_prepared", "prepare", "token_dtype", "tokenizer_hash"]

logger = logging.getLogger("engine.data.text")
FORMAT_VERSION = 1  # bump when the .bin layout or meta.json changes, so old caches are not reused
CHUNK_CHARS = 1 << 20  # text per encode_batch call (~100 bytes of memory per char): 64 pieces keep cores busy
PIECE_CHARS = 1 << 14  # a longer document is tokenized in pieces of about this many characters


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding ids in [0, vocab_size): uint16 up to 65536 ids, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


@dataclass(frozen=True)
class PreparedData:
    """A tokenized corpus on disk: dir/{train,val}.bin plus meta.json (dtype, counts, sources)."""

    dir: Path
    meta: dict
    reused: bool = False

    train_path = property(lambda self: self.dir / "train.bin")
    val_path = property(lambda self: self.dir / "val.bin")
    dtype = property(lambda self: np.dtype(self.meta["dtype"]))

    def windows(self, split: str, seq_len: int, seed: int = 0) -> "TokenWindows":
        """Memory-mapped windows of seq_len + 1 tokens over the 'train' or 'val' split."""
        if split not in ("train", "val"):
            raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
        return TokenWindows(self.dir / f"{split}.bin", seq_len, self.dtype, seed)


def load_prepared(directory) -> PreparedData:
    """Open a directory written by prepare()."""
    meta_file = Path(directory) / "meta.json"
    if not meta_file.is_file():
        raise DataError(f"{directory}: not a prepared dataset (no meta.json)")
    return PreparedData(Path(directory), json.loads(meta_file.read_text()), reused=True)


def _check_sizes(meta: dict, seq_len: int) -> None:
    need = seq_len + 1  # one window: seq_len inputs plus the shifted last target
    for split in ("train", "val"):
        n = meta[f"{split}_tokens"]
        if (split == "train" or meta["val_source"] != "none") and n < need:
            hint = " (raise data.val_fraction or list held-out files in data.val)" if split == "val" else ""
            raise DataError(f"data: the {split} split has {n} tokens, fewer than one window of data.seq_len + 1 = "
                            f"{need}; add data or lower data.seq_len{hint}")


def prepare(data_cfg: DataConfig, tokenizer: Tokenizer, tokenizer_dir, *, dtype=None,
            progress: bool = True) -> PreparedData:
    """Tokenize data_cfg's inputs once to <processed_dir>/<hash>/; reuse that dir when nothing changed.

    Memory is bounded independently of the corpus size: documents are read and tokenized in pieces of about
    PIECE_CHARS characters (cut where the ids stay those of the whole document), CHUNK_CHARS of text per
    encode_batch call, and the ids are appended to the .bin as they come.
    """
    # files, and dataset sources (engine.data.hf_datasets: their rows are documents)
    train_files = expand_sources(data_cfg.train, "data.train", data_cfg)
    val_files = expand_sources(data_cfg.val, "data.val", data_cfg, data_cfg.dataset.val_split) if data_cfg.val else []
    held_out = set(val_files)
    train_files = [p for p in train_files if p not in held_out]  # a held-out file must never be trained on
    if not train_files:
        raise DataError("data.train: every file is also listed in data.val; nothing is left to train on")
    eos, bos = tokenizer.eos_token_id, (tokenizer.bos_token_id if tokenizer.add_bos_token else None)
    if eos is None:
        raise DataError(f"tokenizer {tokenizer_dir}: has no eos_token, which separates packed documents")
    dtype = token_dtype(tokenizer.vocab_size) if dtype is None else np.dtype(dtype)
    key = {"format": FORMAT_VERSION, "train": source_fingerprint(train_files), "val": source_fingerprint(val_files),
           "val_fraction": data_cfg.val_fraction, "text_field": data_cfg.text_field, "dtype": dtype.name,
           "tokenizer": tokenizer_hash(tokenizer_dir)}
    name = digest(key)
    out = Path(data_cfg.processed_dir) / name
    clear_stale(out)  # what killed runs left (a restored complete copy is reused below)
    if (out / "meta.json").is_file():
        data = load_prepared(out)
        logger.info("data: reusing %s (inputs and tokenizer unchanged)", out)
        _check_sizes(data.meta, data_cfg.seq_len)
        return data
    check_text_column([*train_files, *val_files], data_cfg.text_field)  # before anything is written

    def fill(tmp: Path) -> dict:
        max_chars = PIECE_CHARS if splits_safely(tokenizer) else None
        if max_chars is None:
            logger.warning("data: tokenizer %s changes ids when text is cut at spaces; each document is tokenized "
                           "whole (memory grows with the longest document)", tokenizer_dir)
        enc = _Encoder(tokenizer, bos, eos, dtype, max_chars)
        meta = _write_splits(tmp, train_files, val_files, data_cfg, enc, progress)
        meta.update(hash=name, vocab_size=tokenizer.vocab_size, tokenizer_hash=key["tokenizer"],
                    tokenizer_dir=str(Path(tokenizer_dir).resolve()), train_files=[str(p) for p in train_files],
                    val_files=[str(p) for p in val_files])
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return meta

    meta = publish_cache(out, fill)
    _check_sizes(meta, data_cfg.seq_len)  # after saving: the tokens stay valid for a smaller seq_len
    return PreparedData(out, meta, reused=False)


@dataclass(frozen=True)
class _Encoder:
    tokenizer: Tokenizer
    bos: int | None
    eos: int
    dtype: np.dtype
    max_chars: int | None  # piece size (None: whole documents)


def _write_tokens(bin_path: Path, files, text_field, enc: _Encoder, pbar) -> tuple[int, int]:
    """Append [BOS] ids EOS for every document of `files` to bin_path; returns (tokens, documents)."""
    n_tokens = n_docs = 0
    limit = np.iinfo(enc.dtype).max
    head = () if enc.bos is None else (enc.bos,)

    def flush(pieces):  # [(text, where, starts_document, ends_document)]
        nonlocal n_tokens, n_docs
        ids = enc.tokenizer.encode_batch([p[0] for p in pieces], add_special_tokens=False)
        parts = [chain(head if first else (), d, (enc.eos,) if last else ()) for d, (_, _, first, last) in
                 zip(ids, pieces)]
        count = sum(map(len, ids)) + sum(len(head) * p[2] + p[3] for p in pieces)
        flat = np.fromiter(chain.from_iterable(parts), np.int64, count)
        if count and (flat.max() > limit or flat.min() < 0):
            bad = next(p[1] for p, d in zip(pieces, ids)
                       if any(not 0 <= t <= limit for t in chain(head, d, (enc.eos,))))
            raise DataError(f"{bad}: a token id does not fit {enc.dtype.name} (max {limit}); tokenizer vocab_size "
                            f"is {enc.tokenizer.vocab_size}")
        flat.astype(enc.dtype).tofile(f)
        n_tokens, n_docs = n_tokens + count, n_docs + sum(p[3] for p in pieces)

    with open(bin_path, "wb") as f:
        pieces, size, first = [], 0, True
        for path in files:
            pieces_of = iter_dataset_pieces if isinstance(path, DatasetSource) else iter_pieces
            for text, where, n_bytes, last in pieces_of(path, text_field, enc.max_chars):
                pbar.update(n_bytes)
                if text:  # an empty document (one empty piece) would only add a lone EOS
                    pieces.append((text, where, first, last))
                    size += len(text)
                first = last
                if size >= CHUNK_CHARS:
                    flush(pieces)
                    pieces, size = [], 0
        if pieces:
            flush(pieces)
    if n_tokens == 0:
        raise DataError(f"{files[0]}{f' (and {len(files) - 1} more)' if len(files) > 1 else ''}: empty corpus, "
                        "the files hold no text (zero tokens)")
    return n_tokens, n_docs


def _write_splits(tmp: Path, train_files, val_files, cfg: DataConfig, enc: _Encoder, progress) -> dict:
    total = sum(source_bytes(p) for p in [*train_files, *val_files])
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress) as pbar:
        n_train, train_docs = _write_tokens(tmp / "train.bin", train_files, cfg.text_field, enc, pbar)
        if val_files:
            n_val, val_docs = _write_tokens(tmp / "val.bin", val_files, cfg.text_field, enc, pbar)
            source = "files"
        elif cfg.val_fraction > 0:
            n_val, val_docs = _split_tail(tmp, n_train, cfg.val_fraction, enc.eos, enc.dtype)
            n_train, train_docs, source = n_train - n_val, train_docs - val_docs, "fraction"
        else:
            (tmp / "val.bin").write_bytes(b"")
            n_val, val_docs, source = 0, 0, "none"
    return {"format": FORMAT_VERSION, "dtype": enc.dtype.name, "eos_token_id": enc.eos, "bos_token_id": enc.bos,
            "train_tokens": n_train, "val_tokens": n_val, "train_docs": train_docs, "val_docs": val_docs,
            "val_source": source, "val_fraction": cfg.val_fraction, "text_field": cfg.text_field}


def _split_tail(tmp: Path, n: int, fraction: float, eos: int, dtype, block: int = 1 << 20) -> tuple[int, int]:
    """Move the last `fraction` of train.bin's tokens to val.bin; returns (val tokens, val documents)."""
    tokens = np.memmap(tmp / "train.bin", dtype, mode="r")
    target = n - int(np.ceil(fraction * n))
    # Start val at a document boundary (just after an EOS) at most one val-length earlier, so no document is
    # split between the two; with no boundary there (one huge document), cut at the exact token.
    cut, hi, lo = target, target, max(1, target - (n - target))
    while hi > lo:
        start = max(lo, hi - block)
        ends = np.flatnonzero(tokens[start - 1:hi] == eos)  # an EOS at index i is a boundary at i + 1
        if len(ends):
            cut = start + int(ends[-1])
            break
        hi = start
    docs = 0
    with open(tmp / "val.bin", "wb") as f:
        for start in range(cut, n, block):
            part = np.asarray(tokens[start:min(n, start + block)])
            docs += int(np.count_nonzero(part == eos))
            part.tofile(f)
    del tokens  # close the map before truncating the file under it
    os.truncate(tmp / "train.bin", cut * dtype.itemsize)
    return n - cut, docs


class TokenWindows(Sampled):
    """Packed windows of seq_len + 1 tokens over a memory-mapped .bin (B = batch, T = seq_len).

    Window i is tokens[i*T : i*T + T + 1]; neighbours share one token, so each token is a target once per epoch.
    Windows are drawn by engine.data.sampler (a fresh permutation per epoch, a pure function of seed and step):
    batch(step, micro, batch_size=, accum=, rank=, world_size=) -> (inputs, targets), both int64 [B, T] with
    targets = inputs shifted by one; eval_batches(...) goes through the windows in order.
    """

    def __init__(self, path, seq_len: int, dtype, seed: int = 0):
        path, self.seq_len, self.seed = Path(path), seq_len, seed
        size = path.stat().st_size // np.dtype(dtype).itemsize if path.is_file() else 0
        if size < seq_len + 1:
            raise DataError(f"{path}: {size} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}")
        self.tokens = np.memmap(path, dtype, mode="r")  # never read whole: pages come in as windows are used
        self.num_windows = (len(self.tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self.num_windows

    def _gather(self, windows) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        rows = np.stack([self.tokens[w * T:w * T + T + 1] for w in windows]).astype(np.int64)  # (B, T+1)
        rows = torch.from_numpy(rows)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
