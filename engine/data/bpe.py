"""Train a byte-level BPE tokenizer (GPT-2 style) on a corpus and save it as a Hugging Face tokenizer dir.

Byte-level means every byte has a token, so any text encodes without <unk>. There is no post-processor: encode()
adds nothing, and engine.data.prepare closes each document with EOS itself. The dir holds tokenizer.json and
tokenizer_config.json (written by engine.Tokenizer.save_pretrained, which transformers reloads identically; it
carries the minimal ChatML chat template of engine.data.tokenizer, so a model trained from it can chat after SFT)
and bpe_source.json, the cache key: same input files (path, size, mtime), settings and BPE_VERSION reuse the dir.
The corpus streams through the trainer in bounded pieces (engine.data.documents), never a whole file at once.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from engine.data.cache import clear_stale, fingerprint, publish_cache
from engine.data.documents import DataError, expand_paths, iter_pieces
from engine.data.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer

logger = logging.getLogger("engine.data.bpe")
EOS = "<|endoftext|>"
SOURCE_FILE = "bpe_source.json"
BPE_VERSION = 2  # bump when the saved dir changes for the same inputs (2: the ChatML chat template), to retrain
PIECE_CHARS = 1 << 14  # a long document reaches the trainer in pieces of about this many characters


def train_bpe(files, vocab_size: int, out_dir, special_tokens=(EOS,), *, min_frequency: int = 2,
              text_field: str = "text", progress: bool = True) -> Path:
    """Train byte-level BPE on `files` (paths, globs, dirs, .jsonl; as in engine.data.text) into out_dir; cached."""
    special_tokens = list(special_tokens)
    if EOS not in special_tokens:
        raise ValueError(f"special_tokens: must include {EOS!r}, the EOS that separates documents")
    # 256 byte tokens plus the special tokens are always in the vocab; merges fill the rest.
    floor = 256 + len(special_tokens)
    if not isinstance(vocab_size, int) or vocab_size <= floor:
        raise ValueError(f"vocab_size: expected an integer > {floor} (256 bytes + {len(special_tokens)} special "
                         f"tokens), got {vocab_size!r}")
    paths = expand_paths([files] if isinstance(files, (str, Path)) else [str(f) for f in files], "bpe files")
    source = {"version": BPE_VERSION, "files": fingerprint(paths), "vocab_size": vocab_size,
              "special_tokens": special_tokens, "min_frequency": min_frequency, "text_field": text_field}
    out = Path(out_dir)
    clear_stale(out, SOURCE_FILE)  # what a killed run left (a complete old copy is put back first)
    if (out / SOURCE_FILE).is_file() and json.loads((out / SOURCE_FILE).read_text()) == source:
        logger.info("bpe: reusing %s (same files and settings)", out)
        return out

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    # Pieces are cut where the byte-level pre-tokenizer ends a word anyway, so the word counts, and so the
    # merges, are those of whole documents.
    pieces = (text for p in paths for text, _, _, _ in iter_pieces(p, text_field, PIECE_CHARS))
    backend.train_from_iterator(pieces, trainer)
    if backend.get_vocab_size() <= floor:
        raise DataError(f"bpe files: the corpus ({len(paths)} file(s)) is too small to learn any merge")
    # GPT-2's convention: one token serves as BOS, EOS and pad; with no post-processor BOS is never added.
    config = {"bos_token": EOS, "eos_token": EOS, "pad_token": EOS, "clean_up_tokenization_spaces": False}
    extra = [t for t in special_tokens if t != EOS]
    if extra:
        config["extra_special_tokens"] = extra

    tokenizer = Tokenizer(backend, config, {"default": DEFAULT_CHAT_TEMPLATE}, source=str(out))

    def fill(tmp: Path) -> None:
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")

    publish_cache(out, fill, replace=True)  # a kill leaves the old dir or the new one, never a half one
    logger.info("bpe: trained %d tokens on %d file(s) into %s", backend.get_vocab_size(), len(paths), out)
    return out
