"""Preference data: .jsonl pairs -> chosen and rejected token rows with completion masks (DPO and its variants).

A line is one of (TRL's preference formats)
  {"prompt": str, "chosen": str, "rejected": str}                          standard
  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}    conversational, explicit prompt
  {"chosen": [messages], "rejected": [messages]}                          conversational, implicit prompt: the
                                                                          longest shared prefix of messages
Each side is rendered as SFT renders prompt + completion (engine.data.sft: the chat template prefix by prefix, or
plain [BOS] prompt completion EOS; `data.preference.template` as data.sft.template), so a pair is tokenized exactly
as an SFT example and as at inference. Only the completion's tokens (its assistant turns, the template's
end-of-turn tokens included) are targets: the log-probs an objective sums.
Truncation (`data.preference.truncation`): a side of more than seq_len positions drops the pair ("drop") or is cut
to its first seq_len + 1 tokens ("truncate"); a side left with no completion token drops the pair. Counted per
split in one summary line, like SFT's.
A batch of B pairs is {"input_ids" [2B, T], "targets" [2B, T] (IGNORE_INDEX off the completions)}: rows 0..B-1 are
the chosen sides, B..2B-1 the rejected ones (one forward), T the longest side in the batch, right-padded (causal
attention never reads the padding); with precomputed reference log-probs also "ref_logps" [2B] fp32 in that order.
Pairs are drawn by engine.data.sampler like every row (a pure function of seed and step).
Tokenized pairs are cached in <processed_dir>/pref-<hash>/ (inputs' paths/sizes/mtimes, tokenizer files and chat
templates, seq_len, data.preference): a run that changes none of them skips rendering and tokenizing.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from engine.config import DataConfig
from engine.data.cache import digest, fingerprint, load_or_build, publish_cache, tokenizer_hash
from engine.data.documents import DataError, expand_paths, iter_jsonl
from engine.data.sampler import IGNORE_INDEX, Sampled
from engine.data.sft import encode_pieces, segments, template_kind
from engine.data.text import token_dtype
from engine.data.tokenizer import Tokenizer

logger = logging.getLogger("engine.data.preference")
PREF_CACHE_VERSION = 1
SIDES = ("chosen", "rejected")


# ---------------------------------------------------------------------------- lines -> (prompt, chosen, rejected)


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                           and isinstance(m.get("content"), str) for m in value)


def split_pair(record, where: str):
    """(prompt, chosen, rejected) of a line: three strings, or three message lists (prompt possibly empty)."""
    if not (isinstance(record, dict) and "chosen" in record and "rejected" in record):
        raise DataError(f'{where}: expected a JSON object with "chosen" and "rejected" (and "prompt")')
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    if isinstance(chosen, str) or isinstance(rejected, str):
        for key, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, str):
                raise DataError(f"{where}: {key!r}: expected a string (as 'chosen' is), got "
                                f"{type(value).__name__ if value is not None else 'nothing'}")
        return prompt, chosen, rejected
    for key, value in (("chosen", chosen), ("rejected", rejected)) + ((("prompt", prompt),) if prompt is not None else ()):
        if not _is_messages(value) or (key != "prompt" and not value):
            raise DataError(f"{where}: {key!r}: expected a non-empty list of {{\"role\", \"content\"}} objects")
    if prompt is None:  # implicit prompt: the shared leading messages
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise DataError(f"{where}: 'chosen' and 'rejected' share no prompt (their first messages differ); "
                            "give a 'prompt' or start both with the same messages")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["role"] == "assistant" for m in value):
            raise DataError(f"{where}: {key!r}: no assistant message after the prompt (nothing to score)")
    return prompt, chosen, rejected


def side_records(prompt, completion) -> tuple[dict, int]:
    """One side as an SFT record, and the index of its first supervised message (0 for strings)."""
    if isinstance(prompt, str):
        return {"prompt": prompt, "completion": completion}, 0
    return {"messages": list(prompt) + list(completion)}, len(prompt)


# ---------------------------------------------------------------------------- tokenize


@dataclass
class PreferenceStats:
    pairs: int = 0  # lines read
    kept: int = 0
    truncated: int = 0  # pairs with a side cut to seq_len + 1 tokens
    dropped_too_long: int = 0
    dropped_unsupervised: int = 0
    tokens: int = 0  # (input, target) positions of both sides
    completion_tokens: int = 0  # of which are scored

    def line(self, split: str) -> str:
        pct = 100 * self.completion_tokens / max(self.tokens, 1)
        dropped = self.dropped_too_long + self.dropped_unsupervised
        return (f"preference {split}: {self.kept}/{self.pairs} pairs, {self.tokens} tokens, {pct:.1f}% scored, "
                f"{self.truncated} truncated, {dropped} dropped ({self.dropped_too_long} too long, "
                f"{self.dropped_unsupervised} with an empty completion)")


def tokenize_pairs(records, tokenizer: Tokenizer, cfg: DataConfig, stats: PreferenceStats) -> list:
    """[(chosen ids int64 [n], chosen scored bool [n], rejected ids, rejected scored)] for [(record, where)]."""
    opts, seq_len = cfg.preference, cfg.seq_len
    kind = template_kind(tokenizer, opts)
    pieces = []
    for record, where in records:
        prompt, *sides = split_pair(record, where)
        for completion in sides:
            sft_record, first = side_records(prompt, completion)
            pieces.append(segments(sft_record, where, tokenizer, kind, first_supervised=first))
    encoded = encode_pieces(pieces, tokenizer, kind)
    out = []
    for i in range(0, len(encoded), 2):
        stats.pairs += 1
        pair = [(np.asarray(ids, np.int64), np.asarray(sup, bool)) for ids, sup in encoded[i:i + 2]]
        if max(len(ids) for ids, _ in pair) - 1 > seq_len:
            if opts.truncation == "drop":
                stats.dropped_too_long += 1
                continue
            pair = [(ids[:seq_len + 1], sup[:seq_len + 1]) for ids, sup in pair]
            stats.truncated += 1
        if any(len(ids) < 2 or not sup[1:].any() for ids, sup in pair):  # the first token is never a target
            stats.dropped_unsupervised += 1
            continue
        stats.kept += 1
        stats.tokens += sum(len(ids) - 1 for ids, _ in pair)
        stats.completion_tokens += sum(int(sup[1:].sum()) for _, sup in pair)
        out.append((pair[0][0], pair[0][1], pair[1][0], pair[1][1]))
    return out


# ---------------------------------------------------------------------------- batches


@dataclass
class PreferencePairs(Sampled):
    """Tokenized pairs; batches as in the module doc. `ref_logps` [N, 2] fp32 (chosen, rejected) when precomputed."""

    pairs: list  # [(chosen ids, chosen scored, rejected ids, rejected scored)]
    pad_id: int
    seed: int = 0
    stats: PreferenceStats = field(default_factory=PreferenceStats)
    ref_logps: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.pairs)

    def _gather(self, indices) -> dict:
        indices = list(indices)
        sides = [(self.pairs[i][0], self.pairs[i][1]) for i in indices] + \
                [(self.pairs[i][2], self.pairs[i][3]) for i in indices]
        T = max(len(ids) for ids, _ in sides) - 1
        x = np.full((len(sides), T), self.pad_id, np.int64)
        y = np.full((len(sides), T), IGNORE_INDEX, np.int64)
        for r, (ids, sup) in enumerate(sides):
            n = len(ids) - 1
            x[r, :n] = ids[:-1]
            y[r, :n] = np.where(sup[1:], ids[1:], IGNORE_INDEX)
        batch = {"input_ids": torch.from_numpy(x), "targets": torch.from_numpy(y)}
        if self.ref_logps is not None:
            ref = self.ref_logps[indices]  # (B, 2)
            batch["ref_logps"] = torch.from_numpy(np.ascontiguousarray(np.concatenate([ref[:, 0], ref[:, 1]])))
        return batch

    # batch(step, micro, batch_size=, accum=, rank=, world_size=) and eval_batches(...) come from Sampled.


@dataclass
class PreferenceData:
    train: PreferencePairs
    val: PreferencePairs | None
    cache_dir: Path | None = None  # where the tokenized pairs are cached (None: not cached)
    reused: bool = False
    key: dict = field(default_factory=dict)  # what the cache is keyed on (the reference cache extends it)


def prepare_preference(cfg: DataConfig, tokenizer: Tokenizer, seed: int = 0, tokenizer_dir=None) -> PreferenceData:
    """Read, render and tokenize data.train (and data.val, else the last val_fraction of pairs); with
    `tokenizer_dir` the tokenized pairs are cached under cfg.processed_dir (see the module doc)."""
    train_files = _jsonl_files(cfg.train, "data.train")
    val_files = _jsonl_files(cfg.val, "data.val") if cfg.val else []
    key = {"format": f"pref-{PREF_CACHE_VERSION}", "train": fingerprint(train_files), "val": fingerprint(val_files),
           "val_fraction": None if val_files else cfg.val_fraction, "seq_len": cfg.seq_len,
           "preference": dataclasses.asdict(cfg.preference), "chat_templates": tokenizer.chat_templates,
           "tokenizer": tokenizer_hash(tokenizer_dir) if tokenizer_dir is not None else None}
    cache = Path(cfg.processed_dir) / f"pref-{digest(key)}" if tokenizer_dir is not None else None
    splits, reused = load_or_build(
        cache, _load_pairs, lambda: _tokenize_splits(cfg, tokenizer, train_files, val_files),
        lambda out, splits: _save_pairs(out, splits, token_dtype(len(tokenizer))),
        "inputs, tokenizer and data.preference")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out = []
    for split in ("train", "val"):
        pairs, stats, n_records = splits[split]
        out.append(PreferencePairs(pairs, pad_id, seed if split == "train" else 0, stats) if pairs else None)
        if n_records:
            logger.info(stats.line(split))
    return PreferenceData(*out, cache_dir=cache, reused=reused, key=key)


def _jsonl_files(patterns, where: str) -> list[Path]:
    files = expand_paths(patterns, where)
    for f in files:
        if f.suffix != ".jsonl":
            raise DataError(f"{f}: preference data must be .jsonl (one JSON object per line)")
    return files


def _read(files) -> list:
    return [(record, where) for f in files for record, where, _ in iter_jsonl(f)]


def _tokenize_splits(cfg: DataConfig, tokenizer: Tokenizer, train_files, val_files) -> dict:
    train_records = _read(train_files)
    if val_files:
        val_records = _read(val_files)
    else:
        n_val = int(np.ceil(cfg.val_fraction * len(train_records))) if len(train_records) > 1 else 0
        train_records, val_records = train_records[:len(train_records) - n_val], train_records[len(train_records) - n_val:]
    splits = {}
    for split, records in (("train", train_records), ("val", val_records)):
        stats = PreferenceStats()
        pairs = tokenize_pairs(records, tokenizer, cfg, stats)
        if split == "train" and not pairs:
            raise DataError(f"data.train: {', '.join(cfg.train)}: no usable preference pairs ({stats.pairs} read, "
                            f"{stats.dropped_too_long} longer than data.seq_len={cfg.seq_len}, "
                            f"{stats.dropped_unsupervised} with an empty completion)")
        splits[split] = (pairs, stats, len(records))
    return splits


def _save_pairs(cache: Path, splits: dict, dtype: np.dtype) -> None:
    """One .npz per split (both sides' ids as `dtype`, scored masks, lengths) plus meta.json; atomic."""
    def fill(tmp: Path) -> None:
        meta = {}
        for split, (pairs, stats, n_records) in splits.items():
            arrays = {}
            for k, side in enumerate(SIDES):
                ids = [p[2 * k] for p in pairs]
                arrays[f"{side}_ids"] = (np.concatenate(ids) if ids else np.zeros(0, np.int64)).astype(dtype)
                arrays[f"{side}_scored"] = np.concatenate([p[2 * k + 1] for p in pairs]) if pairs else np.zeros(0, bool)
                arrays[f"{side}_lengths"] = np.array([len(i) for i in ids], np.int64)
            np.savez(tmp / f"{split}.npz", **arrays)
            meta[split] = {"stats": dataclasses.asdict(stats), "records": n_records}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

    publish_cache(cache, fill)


def _load_pairs(cache: Path) -> dict:
    meta, splits = json.loads((cache / "meta.json").read_text()), {}
    for split, info in meta.items():
        with np.load(cache / f"{split}.npz") as f:
            cols = []
            for side in SIDES:
                bounds = np.cumsum(f[f"{side}_lengths"])[:-1]
                cols += [np.split(f[f"{side}_ids"].astype(np.int64), bounds), np.split(f[f"{side}_scored"], bounds)]
        pairs = list(zip(*cols)) if info["stats"]["kept"] else []  # np.split of nothing is [[]]
        splits[split] = (pairs, PreferenceStats(**info["stats"]), info["records"])
    return splits
