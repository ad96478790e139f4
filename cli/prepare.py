"""python -m cli.prepare config.json [--set data.seq_len=1024 ...] : tokenize a run's corpus once.

Reads the same run config as cli.train; builds (or trains) its tokenizer, then writes
<data.processed_dir>/<hash>/{train,val}.bin + meta.json, or reuses them when nothing changed. SFT data
(data.format "sft") is tokenized into <data.processed_dir>/sft-<hash>/ the same way. Text corpora are read and
tokenized in bounded pieces, so memory does not grow with the file size; temp dirs a killed run left in
data.processed_dir are removed first (see engine.data.text and engine.data.cache).
"""
from __future__ import annotations

import argparse
import logging

from cli.common import add_set_argument, exit_on_user_error
from engine.train.run_factory import build_data, build_tokenizer
from engine.config import load_run_config


def main(argv=None) -> int:
    """Prepare the data of a run config and print a summary; exits 2 on bad input."""
    parser = argparse.ArgumentParser(prog="cli.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="run config JSON (the one cli.train takes)")
    add_set_argument(parser, example="data.seq_len=1024")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with exit_on_user_error("cli.prepare"):
        cfg = load_run_config(args.config, args.overrides)
        tokenizer, tokenizer_dir = build_tokenizer(cfg, progress=not args.no_progress)
        data = build_data(cfg, tokenizer, tokenizer_dir, progress=not args.no_progress)
    if cfg.data.format == "sft":
        print(f"data: {'reused' if data.reused else 'prepared'} {data.cache_dir}")
        for split, packed in (("train", data.train), ("val", data.val)):
            if packed is not None:
                print("  " + packed.stats.line(split))
        return 0
    m = data.meta
    print(f"data: {'reused' if data.reused else 'prepared'} {data.dir}\n"
          f"  files  train {len(m['train_files'])}, val {len(m['val_files'])} (val from {m['val_source']})\n"
          f"  docs   train {m['train_docs']:,}, val {m['val_docs']:,}\n"
          f"  tokens train {m['train_tokens']:,}, val {m['val_tokens']:,} ({m['dtype']}, vocab {m['vocab_size']:,})")
    return 0


if __name__ == "__main__":
    main()
