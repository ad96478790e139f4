"""Input documents: paths and globs to files, files to UTF-8 text read in bounded blocks, long texts to pieces.

A document is a whole text file (any extension) or one line of a .jsonl file (its `text_field`). `{stdlib}` in
a path is the Python standard library dir, so `{stdlib}/*.py` is a corpus every machine has.

Memory stays bounded by the piece size, not the file size: a text file is read READ_BYTES at a time, and a long
document is cut into pieces of about `max_chars` characters at *safe* points, where tokenizing the pieces one by
one gives exactly the ids of tokenizing the whole. A safe point is just before a space that follows a letter or
digit: every regex pre-tokenizer of byte-level BPE (GPT-2, Llama 3, Qwen 2) ends a pre-token there, and BPE never
merges across pre-tokens. `splits_safely` checks a tokenizer on a probe text before pieces are used; one that
fails (e.g. a normalizer that prepends "▁" to every call) gets whole documents. A .jsonl line is parsed whole,
so there the bound is the longest line; a stretch with no safe point is one piece.
"""
from __future__ import annotations

import glob
import json
import os
import sysconfig
from pathlib import Path

READ_BYTES = 1 << 20  # a text file is read this much at a time


class DataError(ValueError):
    """An input path, file or line cannot be used; the message names it (file:line where it applies)."""


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


def read_text_blocks(path: Path, block: int = READ_BYTES):
    """Yield (text, n_bytes) for consecutive blocks of a UTF-8 file, each cut at a character boundary."""
    base, carry = 0, b""
    with open(path, "rb") as f:
        while raw := f.read(block):
            data = carry + raw
            k = len(data) - 1  # back up over continuation bytes to the start of the last character
            while k > 0 and data[k] & 0xC0 == 0x80 and len(data) - k < 4:
                k -= 1
            cut = len(data) if data[k] < 0x80 else k  # a multi-byte last character may go on in the next block
            if cut:
                yield _decode(data[:cut], str(path), base), cut
            base, carry = base + cut, data[cut:]
    if carry:
        yield _decode(carry, str(path), base), len(carry)


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


def _cut(text: str, pos: int, max_chars: int) -> int | None:
    """The last safe point in (pos, pos + max_chars], else the first one after it, else None."""
    j = text.rfind(" ", pos + 1, pos + max_chars + 1)
    while j > pos:
        if text[j - 1].isalnum():
            return j
        j = text.rfind(" ", pos + 1, j)
    j = text.find(" ", pos + max_chars + 1)
    while j != -1 and not text[j - 1].isalnum():
        j = text.find(" ", j + 1)
    return None if j == -1 else j


def split_blocks(blocks, max_chars: int | None):
    """Yield (piece, n_bytes) from a stream of (text, n_bytes) blocks of one document, cut at safe points into
    pieces of about max_chars (None: one piece). n_bytes is what was read since the previous piece."""
    buf, pos, pending = "", 0, 0
    for text, n in blocks:
        buf, pos, pending = buf[pos:] + text, 0, pending + n
        while max_chars is not None and len(buf) - pos > max_chars:
            cut = _cut(buf, pos, max_chars)
            if cut is None:
                break  # no safe point yet: read on
            yield buf[pos:cut], pending
            pos, pending = cut, 0
    if len(buf) > pos or pending:
        yield buf[pos:], pending


def iter_pieces(path: Path, text_field: str = "text", max_chars: int | None = None):
    """Yield (piece, where, n_bytes, ends_document) over every document of a file (see the module doc).

    The pieces of a document come in order, the last with ends_document=True; an empty document is one "".
    """
    if path.suffix != ".jsonl":
        empty = True
        for (piece, n), last in _last_flagged(split_blocks(read_text_blocks(path), max_chars)):
            empty = False
            yield piece, str(path), n, last
        if empty:
            yield "", str(path), 0, True
        return
    for record, where, n_bytes in iter_jsonl(path):
        if not isinstance(record, dict) or text_field not in record:
            raise DataError(f"{where}: expected a JSON object with a {text_field!r} field (data.text_field)")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"{where}: {text_field!r}: expected a string, got {type(text).__name__}")
        for (piece, n), last in _last_flagged(split_blocks([(text, n_bytes)], max_chars)):
            yield piece, where, n, last


def _last_flagged(items):
    """(item, is_last) for each item of an iterator, lazily (one item of look-ahead)."""
    it, end = iter(items), object()
    prev = next(it, end)
    while prev is not end:
        nxt = next(it, end)
        yield prev, nxt is end
        prev = nxt


PROBE = ("Hello world, it's 2024: naïve café x1 y2 \n  indented  text\tand tabs; Dr. Smith's 3 cats (and 42 dogs)"
         " 東京 日本語 end. α β 7 q")


def splits_safely(tokenizer) -> bool:
    """Whether cutting text at safe points (see the module doc) keeps this tokenizer's ids, on a probe text."""
    cuts = [j for j in range(1, len(PROBE)) if PROBE[j] == " " and PROBE[j - 1].isalnum()]
    parts = [PROBE[a:b] for a, b in zip([0, *cuts], [*cuts, len(PROBE)])]
    whole = tokenizer.encode(PROBE, add_special_tokens=False)
    return [t for ids in tokenizer.encode_batch(parts, add_special_tokens=False) for t in ids] == whole
