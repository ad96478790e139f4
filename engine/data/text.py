"""Data: tokenize a corpus once into <processed_dir>/<hash>/{train,val}.bin, then sample windows from a memmap.

A document is a whole text file (any extension, read as UTF-8, in memory at once: split huge corpora into
files or .jsonl lines) or one line of a .jsonl file (its `text_field`). `{stdlib}` in a path is the Python
standard library dir, so `{stdlib}/*.py` is a corpus every machine has (the offline quickstart).
Each document is stored as `[BOS] ids EOS`: EOS always closes it, BOS opens it only when the tokenizer's own
post-processor adds BOS (Llama style), so packed windows look like what the model sees at inference.
The cache key hashes every input's path, size and mtime (stat, not content: a 2 GB corpus re-hashes in
milliseconds; touching a file rebuilds), the tokenizer files' bytes, text_field and the val settings; seq_len
is not in it (the tokens do not depend on it). Without data.val files, val is the last val_fraction of the
tokens, moved back to start at a document boundary; val_fraction = 0 means no val split.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import sysconfig
import uuid
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.config import DataConfig
from engine.data.tokenizer import Tokenizer

logger = logging.getLogger("engine.data.text")
FORMAT_VERSION = 1  # bump when the .bin layout or meta.json changes, so old caches are not reused
CHUNK_BYTES = 8 << 20  # text per encode_batch call: enough documents to keep every core busy
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class DataError(ValueError):
    """An input path, file or line cannot be used; the message names it (file:line where it applies)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding ids in [0, vocab_size): uint16 up to 65536 ids, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def expand_paths(patterns, where: str = "data.train") -> list[Path]:
    """Files named by paths, globs (`**` recursive) or directories (every non-hidden file below, sorted)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = []
    for pattern in patterns:
        magic = any(c in pattern.replace("{stdlib}", "") for c in "*?[")
        path = os.path.expanduser(pattern.replace("{stdlib}", glob.escape(stdlib) if magic else stdlib))
        if magic:
            found = [Path(p) for p in sorted(glob.glob(path, recursive=True)) if os.path.isfile(p)]
        elif os.path.isdir(path):
            # Hidden entries (.git, .DS_Store) are never corpus text.
            found = sorted(p for p in Path(path).rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif os.path.isfile(path):
            found = [Path(path)]
        else:
            raise DataError(f"{where}: {pattern!r}: no such file or directory")
        if not found:
            raise DataError(f"{where}: {pattern!r} matches no files")
        files += found
    files = list(dict.fromkeys(p.resolve() for p in files))  # keep order, drop repeats
    if not files:
        raise DataError(f"{where}: no input files")
    return files


def _decode(raw: bytes, where: str, base: int = 0) -> str:
    # NUL never occurs in text, so it is the cheap tell of a binary file (.pyc, .so, images).
    if (nul := raw.find(b"\0")) >= 0:
        raise DataError(f"{where}: binary file (NUL byte at offset {base + nul}); expected UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: invalid UTF-8 at byte offset {base + e.start}: {e.reason}") from None


def iter_documents(path: Path, text_field: str = "text"):
    """Yield (text, where, n_bytes) per document: the whole file, or each non-blank line of a .jsonl."""
    if path.suffix != ".jsonl":
        raw = path.read_bytes()
        yield _decode(raw, str(path)), str(path), len(raw)
        return
    for record, where, n_bytes in iter_jsonl(path):
        if not isinstance(record, dict) or text_field not in record:
            raise DataError(f"{where}: expected a JSON object with a {text_field!r} field (data.text_field)")
        if not isinstance(record[text_field], str):
            raise DataError(f"{where}: {text_field!r}: expected a string, got {type(record[text_field]).__name__}")
        yield record[text_field], where, n_bytes


def iter_jsonl(path: Path):
    """Yield (parsed JSON, "file:line", n_bytes) for every non-blank line of a .jsonl file, UTF-8 checked."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            line, offset = _decode(raw, where, offset), offset + len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield record, where, len(raw)


def tokenizer_hash(tokenizer_dir) -> str:
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            h.update(name.encode() + b"\0" + (Path(tokenizer_dir) / name).read_bytes())
    return h.hexdigest()


def publish_dir(out: Path, fill):
    """Run fill(tmp) on a fresh temp dir beside `out`, then rename it to `out` and return fill's result. Atomic:
    a crash before the rename leaves only a .tmp-* dir, which is never reused. If another process (a DDP
    rank) published a complete `out` (one holding meta.json) first, that one stays."""
    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        result = fill(tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "meta.json").is_file():
                raise
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fingerprint(files) -> list:
    """[[path, size, mtime_ns], ...]: what the caches key on (stat, not content)."""
    return [[str(p), (s := p.stat()).st_size, s.st_mtime_ns] for p in files]


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
    """Tokenize data_cfg's inputs once to <processed_dir>/<hash>/; reuse that dir when nothing changed."""
    train_files = expand_paths(data_cfg.train, "data.train")
    val_files = expand_paths(data_cfg.val, "data.val") if data_cfg.val else []
    held_out = set(val_files)
    train_files = [p for p in train_files if p not in held_out]  # a held-out file must never be trained on
    if not train_files:
        raise DataError("data.train: every file is also listed in data.val; nothing is left to train on")
    eos, bos = tokenizer.eos_token_id, (tokenizer.bos_token_id if tokenizer.add_bos_token else None)
    if eos is None:
        raise DataError(f"tokenizer {tokenizer_dir}: has no eos_token, which separates packed documents")
    dtype = token_dtype(tokenizer.vocab_size) if dtype is None else np.dtype(dtype)
    key = {"format": FORMAT_VERSION, "train": fingerprint(train_files), "val": fingerprint(val_files),
           "val_fraction": data_cfg.val_fraction, "text_field": data_cfg.text_field, "dtype": dtype.name,
           "tokenizer": tokenizer_hash(tokenizer_dir)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    out = Path(data_cfg.processed_dir) / digest
    if (out / "meta.json").is_file():
        data = load_prepared(out)
        logger.info("data: reusing %s (inputs and tokenizer unchanged)", out)
        _check_sizes(data.meta, data_cfg.seq_len)
        return data

    def fill(tmp: Path) -> dict:
        meta = _write_splits(tmp, train_files, val_files, data_cfg, tokenizer, bos, eos, dtype, progress)
        meta.update(hash=digest, vocab_size=tokenizer.vocab_size, tokenizer_hash=key["tokenizer"],
                    tokenizer_dir=str(Path(tokenizer_dir).resolve()), train_files=[str(p) for p in train_files],
                    val_files=[str(p) for p in val_files])
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return meta

    meta = publish_dir(out, fill)
    _check_sizes(meta, data_cfg.seq_len)  # after saving: the tokens stay valid for a smaller seq_len
    return PreparedData(out, meta, reused=False)


def _write_tokens(bin_path: Path, files, text_field, tokenizer, bos, eos, dtype, pbar) -> tuple[int, int]:
    """Append [BOS] ids EOS for every document of `files` to bin_path; returns (tokens, documents)."""
    n_tokens = n_docs = 0
    limit = np.iinfo(dtype).max

    def flush(texts, wheres):
        nonlocal n_tokens, n_docs
        ids = tokenizer.encode_batch(texts, add_special_tokens=False)
        head = () if bos is None else (bos,)
        count = sum(map(len, ids)) + len(ids) * (1 + len(head))
        flat = np.fromiter(chain.from_iterable(chain(head, d, (eos,)) for d in ids), np.int64, count)
        if count and (flat.max() > limit or flat.min() < 0):
            bad = next(w for w, d in zip(wheres, ids) if any(not 0 <= t <= limit for t in chain(head, d, (eos,))))
            raise DataError(f"{bad}: a token id does not fit {dtype.name} (max {limit}); tokenizer vocab_size is "
                            f"{tokenizer.vocab_size}")
        flat.astype(dtype).tofile(f)
        n_tokens, n_docs = n_tokens + count, n_docs + len(ids)

    with open(bin_path, "wb") as f:
        texts, wheres, size = [], [], 0
        for path in files:
            for text, where, n_bytes in iter_documents(path, text_field):
                pbar.update(n_bytes)
                if text:  # an empty document would only add a lone EOS
                    texts.append(text)
                    wheres.append(where)
                    size += len(text)
                if size >= CHUNK_BYTES:
                    flush(texts, wheres)
                    texts, wheres, size = [], [], 0
        if texts:
            flush(texts, wheres)
    if n_tokens == 0:
        raise DataError(f"{files[0]}{f' (and {len(files) - 1} more)' if len(files) > 1 else ''}: empty corpus, "
                        "the files hold no text (zero tokens)")
    return n_tokens, n_docs


def _write_splits(tmp: Path, train_files, val_files, cfg: DataConfig, tokenizer, bos, eos, dtype, progress) -> dict:
    total = sum(p.stat().st_size for p in [*train_files, *val_files])
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress) as pbar:
        n_train, train_docs = _write_tokens(tmp / "train.bin", train_files, cfg.text_field, tokenizer, bos, eos,
                                            dtype, pbar)
        if val_files:
            n_val, val_docs = _write_tokens(tmp / "val.bin", val_files, cfg.text_field, tokenizer, bos, eos, dtype,
                                            pbar)
            source = "files"
        elif cfg.val_fraction > 0:
            n_val, val_docs = _split_tail(tmp, n_train, cfg.val_fraction, eos, dtype)
            n_train, train_docs, source = n_train - n_val, train_docs - val_docs, "fraction"
        else:
            (tmp / "val.bin").write_bytes(b"")
            n_val, val_docs, source = 0, 0, "none"
    return {"format": FORMAT_VERSION, "dtype": dtype.name, "eos_token_id": eos, "bos_token_id": bos,
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


class TokenWindows:
    """Packed windows of seq_len + 1 tokens over a memory-mapped .bin (B = batch, T = seq_len).

    Window i is tokens[i*T : i*T + T + 1]; neighbours share one token, so each token is a target once per epoch.
    Sample g of the run (a global counter) is window perm(seed, g // n)[g % n]: a fresh permutation per epoch.
    Nothing else is stored, so batch(step, ...) depends only on its arguments and a resumed run replays exactly.
    """

    def __init__(self, path, seq_len: int, dtype, seed: int = 0):
        path, self.seq_len, self.seed = Path(path), seq_len, seed
        size = path.stat().st_size // np.dtype(dtype).itemsize if path.is_file() else 0
        if size < seq_len + 1:
            raise DataError(f"{path}: {size} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}")
        self.tokens = np.memmap(path, dtype, mode="r")  # never read whole: pages come in as windows are used
        self.num_windows = (len(self.tokens) - 1) // seq_len
        self._perms = {}  # cache of derived data only (the permutation of an epoch), never state

    def __len__(self) -> int:
        return self.num_windows

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch spans at most two epochs
                self._perms.pop(next(iter(self._perms)))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        return self._perms[epoch]

    def _gather(self, windows) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        rows = np.stack([self.tokens[w * T:w * T + T + 1] for w in windows]).astype(np.int64)  # (B, T+1)
        rows = torch.from_numpy(rows)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def batch(self, step: int, micro: int = 0, *, batch_size: int, accum: int = 1, rank: int = 0,
              world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both int64 [B, T], for micro-batch `micro` of `step` on `rank`; targets = inputs >> 1.

        A step consumes batch_size * accum * world_size windows; each (micro, rank) takes its own slice of them.
        """
        if not (0 <= micro < accum and 0 <= rank < world_size and batch_size > 0 and step >= 0):
            raise ValueError(f"batch: need step >= 0, 0 <= micro < accum, 0 <= rank < world_size, batch_size > 0; "
                             f"got step={step}, micro={micro}, accum={accum}, rank={rank}, world_size={world_size}, "
                             f"batch_size={batch_size}")
        start = (step * accum * world_size + micro * world_size + rank) * batch_size
        g = np.arange(start, start + batch_size)
        epochs, pos = np.divmod(g, self.num_windows)
        return self._gather([self._perm(int(e))[p] for e, p in zip(epochs, pos)])

    def epoch_at(self, step: int, batch_size: int, accum: int = 1, world_size: int = 1) -> float:
        """Epochs completed (fractional) before `step`."""
        return step * batch_size * accum * world_size / self.num_windows

    def eval_batches(self, batch_size: int, max_batches: int | None = None, rank: int = 0, world_size: int = 1):
        """Yield (inputs, targets) over the windows in order, the last batch possibly short; rank takes every
        world_size-th batch."""
        starts = range(0, self.num_windows, batch_size)
        for i, start in enumerate(starts[: max_batches]):
            if i % world_size == rank:
                yield self._gather(range(start, min(start + batch_size, self.num_windows)))
