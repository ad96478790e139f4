"""SFT data: instruction .jsonl -> token rows with loss masks, packed with per-example attention and positions.

A line is {"prompt": str, "completion": str} or {"messages": [{"role", "content"}, ...]}.
Rendering (`data.sft.template`):
  chat   the tokenizer's chat template; prompt/completion become a user and an assistant message. The text is
         rendered prefix by prefix (prompt with the generation prompt, then through each assistant turn), so
         every segment is tokenized exactly as at inference. Template text already holds BOS: ids are encoded
         without adding special tokens (no double BOS).
  plain  [BOS if the tokenizer adds one] prompt completion EOS (for tokenizers without a chat template).
  auto   chat when the tokenizer has a template, else plain.
Loss (`loss_on`): on completion / assistant tokens only (the template's end-of-turn tokens included), or on all.
An example of n tokens is n - 1 (input, target) positions. Longer than seq_len: dropped or cut to its first
seq_len + 1 tokens (`truncation`); an example left with no supervised target is dropped. Both are counted.
Packing puts several examples in one row of seq_len positions (best-fit decreasing); each keeps its own
positions (0, 1, ...) and attends only within itself, so its loss equals the loss of running it alone.
Rows are drawn by engine.data.sampler, as TokenWindows are: a fresh permutation per epoch, a pure function of
(seed, step).
Tokenized examples are cached in <processed_dir>/sft-<hash>/ (inputs' paths/sizes/mtimes, tokenizer files and
chat templates, seq_len and data.sft): a run that changes none of them skips rendering and tokenizing.
"""
from __future__ import annotations

import bisect
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.config import DataConfig, SFTConfig
from engine.data.cache import digest, load_or_build, publish_cache, tokenizer_hash
from engine.data.documents import DataError
from engine.data.formats import to_sft_record
from engine.data.hf_datasets import DatasetSource, expand_sources, iter_source_rows, source_fingerprint
from engine.data.sampler import IGNORE_INDEX, Sampled
from engine.data.text import token_dtype
from engine.data.tokenizer import Tokenizer, TokenizerError

logger = logging.getLogger("engine.data.sft")
__all__ = ["IGNORE_INDEX", "PackedExamples", "SFTData", "SFTStats", "pack", "prepare_sft", "prompt_ids",
           "read_records", "tokenize_examples"]


# ---------------------------------------------------------------------------- records -> segments


def read_records(path: Path, sft: SFTConfig | None = None):
    """Yield (record, "file:line") for every non-blank line of a .jsonl file (or row of a dataset source,
    engine.data.hf_datasets), in `data.sft.format`, checked."""
    for record, where in iter_source_rows(path):
        record = to_sft_record(record, where, sft)
        check_record(record, where)
        yield record, where


def check_record(record, where: str) -> None:
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages': expected a non-empty list of {{\"role\", \"content\"}} objects")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: messages[{i}]: expected an object with string 'role' and 'content'")
        return
    if isinstance(record, dict) and "prompt" in record and "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record[key], str):
                raise DataError(f"{where}: {key!r}: expected a string, got {type(record[key]).__name__}")
        return
    raise DataError(f'{where}: expected a JSON object with "prompt" and "completion", or "messages"')


def template_kind(tokenizer: Tokenizer, sft: SFTConfig) -> str:
    """'chat' or 'plain', as `data.sft.template` and the tokenizer's chat templates decide."""
    if sft.template == "chat" and not tokenizer.chat_templates:
        raise DataError(f'data.sft.template: "chat", but tokenizer {tokenizer.source} has no chat template')
    if sft.template == "auto":
        return "chat" if tokenizer.chat_templates else "plain"
    return sft.template


def _messages(record) -> list[dict]:
    if "messages" in record:
        return record["messages"]
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]


def segments(record, where: str, tokenizer: Tokenizer, kind: str, first_supervised: int = 0) -> list[tuple[str, bool]]:
    """The example as [(text, is_completion)] pieces, each to be tokenized on its own, in order; assistant
    messages before index `first_supervised` count as prompt (a preference pair's shared turns)."""
    if kind == "plain":
        if "messages" in record:
            raise DataError(f"{where}: 'messages' needs a chat template, and tokenizer {tokenizer.source} has none "
                            "(use prompt/completion lines, or a tokenizer with a chat template)")
        return [(record["prompt"], False), (record["completion"], True)]
    messages, out, done = _messages(record), [], ""
    try:
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
            full = tokenizer.apply_chat_template(messages[:i + 1])
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise DataError(f"{where}: the chat template does not render messages[:{i + 1}] as an extension of "
                                f"messages[:{i}]; cannot tell assistant tokens apart (try a single-turn example)")
            out += [(prompt[len(done):], False), (full[len(prompt):], i >= first_supervised)]
            done = full
        rest = tokenizer.apply_chat_template(messages)
        if not rest.startswith(done):
            raise DataError(f"{where}: the chat template does not render the whole conversation as an extension "
                            "of its assistant turns")
        out.append((rest[len(done):], False))
    except TokenizerError as e:
        raise DataError(f"{where}: {e}") from None
    return out


def prompt_ids(record, tokenizer: Tokenizer, sft: SFTConfig) -> list[int]:
    """Token ids to generate a completion from (what training saw before the completion)."""
    kind = template_kind(tokenizer, sft)
    if kind == "plain":
        bos = [tokenizer.bos_token_id] if tokenizer.add_bos_token else []
        return bos + tokenizer.encode(record["prompt"], add_special_tokens=False)
    messages = _messages(record)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


# ---------------------------------------------------------------------------- tokenize


@dataclass
class SFTStats:
    examples: int = 0  # lines read
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_unsupervised: int = 0
    positions: int = 0  # (input, target) pairs kept
    supervised: int = 0  # of which carry a loss
    rows: int = 0
    row_positions: int = 0  # rows * seq_len (padding included)

    def line(self, split: str) -> str:
        pct = 100 * self.supervised / max(self.positions, 1)
        fill = 100 * self.positions / max(self.row_positions, 1)
        dropped = self.dropped_too_long + self.dropped_unsupervised
        return (f"sft {split}: {self.kept}/{self.examples} examples, {self.positions} tokens, {pct:.1f}% supervised, "
                f"{self.truncated} truncated, {dropped} dropped ({self.dropped_too_long} too long, "
                f"{self.dropped_unsupervised} with no supervised tokens), {self.rows} rows ({fill:.1f}% filled)")


def encode_pieces(pieces, tokenizer: Tokenizer, kind: str) -> list[tuple[list[int], list[bool]]]:
    """[(ids, supervised)] of examples given as `segments` pieces, before truncation: each piece tokenized on its
    own, plain examples framed by [BOS] ... EOS (EOS supervised)."""
    eos = tokenizer.eos_token_id
    if kind == "plain" and eos is None:
        raise DataError(f"tokenizer {tokenizer.source}: has no eos_token, which ends each plain-template example")
    bos = [tokenizer.bos_token_id] if kind == "plain" and tokenizer.add_bos_token else []
    flat = tokenizer.encode_batch([text for segs in pieces for text, _ in segs], add_special_tokens=False)
    out, k = [], 0
    for segs in pieces:
        ids, sup = list(bos), [False] * len(bos)
        for _, is_completion in segs:
            ids += flat[k]
            sup += [is_completion] * len(flat[k])
            k += 1
        if kind == "plain":
            ids.append(eos)
            sup.append(True)
        out.append((ids, sup))
    return out


def tokenize_examples(records, tokenizer: Tokenizer, cfg: DataConfig, stats: SFTStats):
    """[(ids int64 [n], supervised bool [n])] for `records` [(record, where)], after truncation and drops."""
    sft, seq_len = cfg.sft, cfg.seq_len
    kind = template_kind(tokenizer, sft)
    out = []
    for ids, sup in encode_pieces([segments(r, where, tokenizer, kind) for r, where in records], tokenizer, kind):
        stats.examples += 1
        if len(ids) - 1 > seq_len:
            if sft.truncation == "drop":
                stats.dropped_too_long += 1
                continue
            ids, sup = ids[:seq_len + 1], sup[:seq_len + 1]
            stats.truncated += 1
        ids, sup = np.asarray(ids, np.int64), np.asarray(sup, bool)
        if sft.loss_on == "all":
            sup[:] = True
        n_sup = int(sup[1:].sum())  # the first token is never a target
        if len(ids) < 2 or n_sup == 0:
            stats.dropped_unsupervised += 1
            continue
        stats.kept += 1
        stats.positions += len(ids) - 1
        stats.supervised += n_sup
        out.append((ids, sup))
    return out


# ---------------------------------------------------------------------------- packing


def pack(lengths: list[int], seq_len: int, packing: bool = True) -> list[list[int]]:
    """Rows of example indices whose lengths (positions) sum to <= seq_len: best-fit decreasing, deterministic."""
    if not packing:
        return [[i] for i in range(len(lengths))]
    rows: list[list[int]] = []
    free: dict[int, list[int]] = {}  # remaining capacity -> rows with that much room
    caps: list[int] = []  # sorted capacities that have rows
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        j = bisect.bisect_left(caps, n)
        if j < len(caps):  # the tightest row it fits in
            cap = caps[j]
            row = free[cap].pop()
            if not free[cap]:
                del free[cap]
                caps.pop(j)
        else:
            cap, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(i)
        left = cap - n
        if left > 0:
            if left not in free:
                bisect.insort(caps, left)
            free.setdefault(left, []).append(row)
    return rows


def packed_attention_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Bool mask [B, 1, T, T]: a position attends to positions of its own example (the model adds causality)."""
    return doc_ids[:, None, :, None] == doc_ids[:, None, None, :]


@dataclass
class PackedExamples(Sampled):
    """Tokenized examples packed into rows of seq_len positions; batches are (inputs, targets, positions, mask)."""

    examples: list  # [(ids [n], supervised [n])]
    rows: list  # [[example index, ...]]
    seq_len: int
    pad_id: int
    seed: int = 0
    stats: SFTStats = field(default_factory=SFTStats)

    def __len__(self) -> int:
        return len(self.rows)

    def _gather(self, row_indices) -> tuple[torch.Tensor, ...]:
        B, T = len(row_indices), self.seq_len
        x = np.full((B, T), self.pad_id, np.int64)
        y = np.full((B, T), IGNORE_INDEX, np.int64)
        pos = np.tile(np.arange(T, dtype=np.int64), (B, 1))
        doc = np.full((B, T), -1, np.int64)  # padding is its own "document", so no row of the mask is empty
        for b, r in enumerate(row_indices):
            t = 0
            for d, e in enumerate(self.rows[r]):
                ids, sup = self.examples[e]
                n = len(ids) - 1
                x[b, t:t + n] = ids[:-1]
                y[b, t:t + n] = np.where(sup[1:], ids[1:], IGNORE_INDEX)
                pos[b, t:t + n] = np.arange(n)
                doc[b, t:t + n] = d
                t += n
            pos[b, t:] = np.arange(T - t)
        doc = torch.from_numpy(doc)
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(pos), packed_attention_mask(doc)

    # batch(step, micro, batch_size=, accum=, rank=, world_size=) -> (inputs, targets, position_ids [B, T] int64,
    # attn_mask [B, 1, T, T] bool) and eval_batches(...) come from engine.data.sampler.Sampled.


@dataclass
class SFTData:
    train: PackedExamples
    val: PackedExamples | None
    cache_dir: Path | None = None  # where the tokenized examples are cached (None: not cached)
    reused: bool = False  # loaded from cache_dir rather than tokenized now


def _packed(examples, cfg: DataConfig, pad_id: int, seed: int, stats: SFTStats) -> PackedExamples:
    rows = pack([len(ids) - 1 for ids, _ in examples], cfg.seq_len, cfg.sft.packing)
    stats.rows, stats.row_positions = len(rows), len(rows) * cfg.seq_len
    return PackedExamples(examples, rows, cfg.seq_len, pad_id, seed, stats)


def prepare_sft(cfg: DataConfig, tokenizer: Tokenizer, seed: int = 0, tokenizer_dir=None) -> SFTData:
    """Read, render, tokenize and pack data.train (and data.val, else the last val_fraction of examples).
    With `tokenizer_dir` the tokenized examples are cached under cfg.processed_dir (see the module doc)."""
    train_files = _jsonl_files(cfg.train, "data.train", cfg)
    val_files = _jsonl_files(cfg.val, "data.val", cfg, cfg.dataset.val_split) if cfg.val else []
    cache = _cache_dir(cfg, tokenizer, tokenizer_dir, train_files, val_files) if tokenizer_dir is not None else None
    splits, reused = load_or_build(
        cache, _load_examples, lambda: _tokenize_splits(cfg, tokenizer, train_files, val_files),
        lambda out, splits: _save_examples(out, splits, token_dtype(len(tokenizer))),
        "inputs, tokenizer and data.sft")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out = []
    for split in ("train", "val"):
        examples, stats, n_records = splits[split]
        out.append(_packed(examples, cfg, pad_id, seed if split == "train" else 0, stats) if examples else None)
        if n_records:
            logger.info(stats.line(split))
    return SFTData(*out, cache_dir=cache, reused=reused)


def _jsonl_files(patterns, where: str, cfg: DataConfig, split=None) -> list:
    files = expand_sources(patterns, where, cfg, split)  # .jsonl files and dataset sources
    for f in files:
        if not isinstance(f, DatasetSource) and f.suffix != ".jsonl":
            raise DataError(f"{f}: SFT data must be .jsonl (one JSON object per line) or a dataset (.parquet, .arrow, "
                            ".csv, .json, a save_to_disk dir, hf:<id>)")
    return files


def _tokenize_splits(cfg: DataConfig, tokenizer: Tokenizer, train_files, val_files) -> dict:
    """{"train"/"val": (examples, stats, records read)}; no usable training example is a DataError."""
    train_records = [r for f in train_files for r in read_records(f, cfg.sft)]
    if val_files:
        val_records = [r for f in val_files for r in read_records(f, cfg.sft)]
    else:
        n_val = int(np.ceil(cfg.val_fraction * len(train_records))) if len(train_records) > 1 else 0
        train_records, val_records = train_records[:len(train_records) - n_val], train_records[len(train_records) - n_val:]
    splits = {}
    for split, recs in (("train", train_records), ("val", val_records)):
        stats = SFTStats()
        examples = tokenize_examples(recs, tokenizer, cfg, stats)
        if split == "train" and not examples:
            files = ", ".join(cfg.train)
            raise DataError(f"data.train: {files}: no usable SFT examples ({stats.examples} read, "
                            f"{stats.dropped_too_long} longer than data.seq_len={cfg.seq_len}, "
                            f"{stats.dropped_unsupervised} with no supervised tokens)")
        splits[split] = (examples, stats, len(recs))
    return splits


# ---------------------------------------------------------------------------- the on-disk cache

SFT_CACHE_VERSION = 1


def _cache_dir(cfg: DataConfig, tokenizer: Tokenizer, tokenizer_dir, train_files, val_files) -> Path:
    key = {"format": f"sft-{SFT_CACHE_VERSION}", "train": source_fingerprint(train_files),
           "val": source_fingerprint(val_files),
           "val_fraction": None if val_files else cfg.val_fraction, "seq_len": cfg.seq_len,
           "sft": dataclasses.asdict(cfg.sft), "tokenizer": tokenizer_hash(tokenizer_dir),
           "chat_templates": tokenizer.chat_templates}  # chat_template.jinja files are not in the hashed files
    return Path(cfg.processed_dir) / f"sft-{digest(key)}"


def _save_examples(cache: Path, splits: dict, dtype: np.dtype) -> None:
    """One .npz per split (ids as `dtype`, supervised mask, lengths) plus meta.json with the stats; atomic."""
    def fill(tmp: Path) -> None:
        meta = {}
        for split, (examples, stats, n_records) in splits.items():
            lengths = np.array([len(ids) for ids, _ in examples], np.int64)
            ids = np.concatenate([ids for ids, _ in examples]) if examples else np.zeros(0, np.int64)
            sup = np.concatenate([sup for _, sup in examples]) if examples else np.zeros(0, bool)
            np.savez(tmp / f"{split}.npz", ids=ids.astype(dtype), supervised=sup, lengths=lengths)
            meta[split] = {"stats": dataclasses.asdict(stats), "records": n_records}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

    publish_cache(cache, fill)


def _load_examples(cache: Path) -> dict:
    meta, splits = json.loads((cache / "meta.json").read_text()), {}
    for split, info in meta.items():
        with np.load(cache / f"{split}.npz") as f:
            ids, sup, lengths = f["ids"].astype(np.int64), f["supervised"], f["lengths"]
        bounds = np.cumsum(lengths)[:-1]
        examples = list(zip(np.split(ids, bounds), np.split(sup, bounds))) if len(lengths) else []
        splits[split] = (examples, SFTStats(**info["stats"]), info["records"])
    return splits
