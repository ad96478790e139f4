"""Serving throughput: aggregate generated tokens/s with 1, 4 and 16 concurrent clients vs the same requests
sent one at a time, against `python -m cli.serve` running the ~35M Llama.

    python bench/bench_serve.py [--clients 1 4 16] [--max-tokens 64] [--repeats 2] [--dtype fp32]

The server is a real subprocess on localhost; clients are threads posting /v1/completions (greedy, a
16-token id prompt each, different per client). The random-init model has no tokenizer of its own, so a
tiny test tokenizer is attached (ids outside its vocab decode to nothing; token counts come from `usage`).
Each repeat runs "one at a time" and "concurrent" back to back, so both see the same machine load.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.llama35m import write_llama35m  # noqa: E402
from tests.tokenizer_fixtures import write_tokenizer_dir  # noqa: E402

PROMPT_TOKENS = 16


def model_dir() -> Path:
    """The 35M checkpoint plus a tokenizer, in a dir of its own (links to the shared weights)."""
    base = write_llama35m()
    d = Path(tempfile.gettempdir()) / "engine-bench-llama35m-serve"
    d.mkdir(exist_ok=True)
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (base / name).exists() and not (d / name).exists():
            os.symlink(base / name, d / name)
    if not (d / "tokenizer.json").exists():
        write_tokenizer_dir(d, style="llama")
    return d


def start_server(directory: Path, dtype: str, max_batch: int, max_len: int, threads: int | None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cli.serve", "--model", str(directory), "--port", str(port),
                             "--dtype", dtype, "--max-batch", str(max_batch), "--max-model-len", str(max_len),
                             "--served-model-name", "llama35m", "--log-level", "warning",
                             *(["--threads", str(threads)] if threads else [])], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(url + "/health", timeout=1).raise_for_status()
            return proc, url
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("bench_serve: the server did not start")
            time.sleep(0.3)


def request(client: httpx.Client, url: str, i: int, max_tokens: int) -> int:
    prompt = [(7919 * (i + 1) * (j + 1)) % 31000 + 500 for j in range(PROMPT_TOKENS)]  # distinct per client
    body = {"model": "llama35m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    r = client.post(url + "/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]


def run(url: str, clients: int, max_tokens: int, concurrent: bool) -> float:
    """Aggregate completion tokens/s of `clients` requests, all at once or one after another."""
    with httpx.Client() as client:
        start = time.perf_counter()
        if concurrent:
            with ThreadPoolExecutor(clients) as pool:
                tokens = sum(pool.map(lambda i: request(client, url, i, max_tokens), range(clients)))
        else:
            tokens = sum(request(client, url, i, max_tokens) for i in range(clients))
        return tokens / (time.perf_counter() - start)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "unknown CPU"
    return f"{name}, {os.cpu_count()} cores"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="trials per cell; the median is reported")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None, help="the server's torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    proc, url = start_server(model_dir(), args.dtype, max(args.clients), PROMPT_TOKENS + args.max_tokens + 8,
                             args.threads)
    try:
        run(url, 2, 8, concurrent=True)  # warm-up: first-call allocations, thread pools
        rows = []
        for n in args.clients:
            one, together = [], []
            for _ in range(args.repeats):
                one.append(run(url, n, args.max_tokens, concurrent=False))
                together.append(run(url, n, args.max_tokens, concurrent=True))
            rows.append((n, statistics.median(one), statistics.median(together)))
            print(f"  {n} clients: one at a time {rows[-1][1]:.1f} tok/s, concurrent {rows[-1][2]:.1f} tok/s",
                  file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    threads = f"{args.threads} torch thread(s)" if args.threads else "torch's default threads"
    print(f"\n~35M Llama ({args.dtype}), {PROMPT_TOKENS}-token prompts, {args.max_tokens} new tokens each, greedy; "
          f"{cpu_name()}, {threads}; median of {args.repeats}\n")
    print("| clients | one at a time (tok/s) | concurrent, batched (tok/s) | speedup |")
    print("|---:|---:|---:|---:|")
    for n, one, together in rows:
        print(f"| {n} | {one:.1f} | {together:.1f} | {together / one:.2f}x |")


if __name__ == "__main__":
    main()
