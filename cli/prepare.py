"""Tokenize a corpus once: `python -m cli.prepare config.json [--set data.seq_len=1024 ...]`.

config.json (interim format, until the full run config lands):
    {"data": {DataConfig fields}, "tokenizer": "path/to/hf_tokenizer_dir"}
or, to train a byte-level BPE first (cached like the data):
    {"data": {...}, "tokenizer": {"train_bpe": {"files": ["{stdlib}/*.py"], "vocab_size": 4096, "dir": "..."}}}
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from engine.config import ConfigError, DataConfig
from engine.data import prepare
from engine.tokenizer import Tokenizer


def _parse_value(text: str):
    # JSON when it parses (numbers, lists, true/null), else the raw string: --set data.train=corpus/*.txt
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _load_config(path: str, overrides: list[str]) -> dict:
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: expected a JSON config file, could not read it: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("data"), dict) or "tokenizer" not in config:
        raise ConfigError(f'{path}: expected {{"data": {{...}}, "tokenizer": "<dir>"}}')
    for item in overrides:
        key, sep, value = item.partition("=")
        *parents, leaf = key.split(".")
        if not sep or not leaf:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. data.seq_len=1024")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[leaf] = _parse_value(value)
    return config


def _data_config(d: dict) -> DataConfig:
    known = DataConfig.__dataclass_fields__
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"data.{unknown[0]}: unknown key (expected one of {sorted(known)})")
    try:
        return DataConfig(**d)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"data: {e}") from None


def _tokenizer_dir(spec) -> Path:
    if isinstance(spec, str):
        return Path(spec)
    if isinstance(spec, dict) and isinstance(spec.get("train_bpe"), dict):
        from engine.bpe import train_bpe

        args = dict(spec["train_bpe"])
        if not {"files", "vocab_size", "dir"} <= set(args):
            raise ConfigError("tokenizer.train_bpe: expected keys files, vocab_size and dir")
        try:
            return train_bpe(args.pop("files"), args.pop("vocab_size"), args.pop("dir"), **args)
        except TypeError as e:
            raise ConfigError(f"tokenizer.train_bpe: {e}") from None
    raise ConfigError(f'tokenizer: expected a tokenizer dir or {{"train_bpe": {{...}}}}, got {spec!r}')


def main(argv=None) -> int:
    """Prepare the data of a config; prints a summary. Returns 0, or 2 on bad input (message on stderr)."""
    parser = argparse.ArgumentParser(prog="python -m cli.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", help="JSON config with a 'data' section and a 'tokenizer'")
    parser.add_argument("--config", dest="config_opt", metavar="PATH", help="same as the positional argument")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    path = args.config or args.config_opt
    if path is None:
        parser.error("a config file is required")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = _load_config(path, args.set)
        data_cfg = _data_config(config["data"])
        tok_dir = _tokenizer_dir(config["tokenizer"])
        data = prepare(data_cfg, Tokenizer.from_pretrained(tok_dir), tok_dir, progress=not args.no_progress)
    except (ValueError, OSError) as e:  # ConfigError, DataError, TokenizerError are ValueErrors
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    m = data.meta
    print(f"data: {'reused' if data.reused else 'prepared'} {data.dir}\n"
          f"  files  train {len(m['train_files'])}, val {len(m['val_files'])} (val from {m['val_source']})\n"
          f"  docs   train {m['train_docs']:,}, val {m['val_docs']:,}\n"
          f"  tokens train {m['train_tokens']:,}, val {m['val_tokens']:,} ({m['dtype']}, vocab {m['vocab_size']:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
