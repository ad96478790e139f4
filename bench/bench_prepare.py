"""Peak memory and speed of `cli.prepare` on one huge single-line text file (the worst case for memory).

    python bench/bench_prepare.py               # 200 MB generated file, byte-level BPE (vocab 8192)
    python bench/bench_prepare.py --mb 50 --bpe-on-all

The corpus is one line of random words (a Zipf-like mix from a fixed made-up vocabulary, with digits and
punctuation), written in chunks. A BPE is trained on an 8 MB sample (or, with --bpe-on-all, on the whole file,
which measures the BPE trainer's memory too), then `cli.prepare` runs in a fresh process that reports its
resident set after imports and its high-water mark (VmHWM). Prints one markdown row with the CPU name.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# Run in the child: VmRSS after the imports, then VmHWM after cli.prepare (both in KiB from /proc).
CHILD = """
import json, resource, sys
def status(key):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key + ':'))
from cli.prepare import main
base = status('VmRSS')
rc = main(sys.argv[1:])
use = resource.getrusage(resource.RUSAGE_SELF)
print('PEAK ' + json.dumps({'rc': rc, 'base_kib': base, 'peak_kib': status('VmHWM'),
                            'cpu_s': use.ru_utime + use.ru_stime}))
"""


def write_corpus(path: Path, mb: float, seed: int = 0, chunk_words: int = 1 << 20) -> Path:
    """One line of about `mb` MB of random words, digits and punctuation, written chunk by chunk."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkqjxz"))
    words = ["".join(rng.choice(letters, int(n))) for n in rng.integers(1, 11, 4000)]
    words += [str(i) for i in range(100)] + [",", ".", ";", "(x)", "—", "café", "東京"]
    p = 1.0 / np.arange(1, len(words) + 1)  # Zipf-like: a few words are most of the text
    p /= p.sum()
    target, written = int(mb * 1e6), 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            text = " ".join(np.array(words, dtype=object)[rng.choice(len(words), chunk_words, p=p)]) + " "
            text = text[:target - written]
            f.write(text)
            written += len(text.encode())
    return path


def run_prepare(config: Path, *extra: str, timeout: float = 3600) -> dict:
    """cli.prepare in a fresh process: {"rc", "base_mb", "peak_mb", "seconds", "cpu_s"} (cpu_s: user + system)."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, str(config), "--no-progress", *extra], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    line = next((l for l in out.stdout.splitlines() if l.startswith("PEAK ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"cli.prepare failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    r = json.loads(line[5:])
    return {"rc": r["rc"], "base_mb": r["base_kib"] / 1024, "peak_mb": r["peak_kib"] / 1024, "seconds": seconds,
            "cpu_s": r["cpu_s"]}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=200, help="size of the generated single-line file")
    parser.add_argument("--vocab", type=int, default=8192, help="BPE vocab size")
    parser.add_argument("--bpe-on-all", action="store_true", help="train the BPE on the whole file, not a sample")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from engine.data.bpe import train_bpe

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "corpus").mkdir()
        corpus = write_corpus(tmp / "corpus" / "big.txt", args.mb)
        run = {"model": {"architecture": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "head_dim": 16,
                                          "intermediate_size": 64, "max_position_embeddings": 64},
                         "bpe_vocab_size": args.vocab},
               "data": {"train": str(corpus), "seq_len": 32, "processed_dir": str(tmp / "processed")},
               "out_dir": str(tmp / "run")}
        if not args.bpe_on_all:
            train_bpe([str(write_corpus(tmp / "sample.txt", 8, seed=1))], args.vocab, tmp / "tok", progress=False)
            run["model"]["tokenizer"] = str(tmp / "tok")
        (tmp / "run.json").write_text(json.dumps(run))
        r = run_prepare(tmp / "run.json")
        size = corpus.stat().st_size / 1e6
    print("| file | tokenizer | peak RSS | after imports | growth | wall | CPU time | MB/s (wall) | CPU |\n"
          "|---|---|---|---|---|---|---|---|---|\n"
          f"| {size:.0f} MB, one line | BPE {args.vocab}{' (trained on it)' if args.bpe_on_all else ''} "
          f"| {r['peak_mb']:.0f} MB | {r['base_mb']:.0f} MB | {r['peak_mb'] - r['base_mb']:.0f} MB "
          f"| {r['seconds']:.1f} s | {r['cpu_s']:.1f} s | {size / r['seconds']:.1f} "
          f"| {cpu_name()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} |")


if __name__ == "__main__":
    main()
