"""Sustained read bandwidth of this machine, with torch's thread count, over a buffer of a given size.

    python bench/bench_bandwidth.py [--mb 16 64 256 1024] [--threads N]

Batch-1 decoding reads every weight once per token, so its speed limit is
(weight bytes per token) / (read bandwidth). A buffer that fits in the last-level cache reads at
cache speed, a larger one at DRAM speed, so the probe reads a buffer of the model's own weight size:
bench_generate.py reports each decode row as a share of the limit measured this way.

How: torch.sum over an fp32 buffer (one sequential read stream per thread, no writes; AVX-512/AVX2
adds are far faster than the loads), repeated until `min_seconds` have passed; the best rate of the
repeats is reported, as a streaming kernel at its best reaches it (other processes only slow it down).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def read_bandwidth(nbytes: int, threads: int | None = None, min_seconds: float = 0.3,
                   min_repeats: int = 5) -> float:
    """Best sustained read rate in bytes/s of a sum over an fp32 buffer of ~`nbytes` with `threads`
    (default: torch.get_num_threads()) threads."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        buf = torch.ones(max(nbytes // 4, 1024), dtype=torch.float32)  # touched: pages are resident
        buf.sum()  # warm-up: thread pool, and the buffer's first pass into cache
        best, repeats, start = float("inf"), 0, time.perf_counter()
        while repeats < min_repeats or time.perf_counter() - start < min_seconds:
            t0 = time.perf_counter()
            buf.sum()
            best = min(best, time.perf_counter() - t0)
            repeats += 1
        return buf.numel() * 4 / best
    finally:
        torch.set_num_threads(old)


def cpu_name() -> str:
    """The CPU's model name (lscpu / /proc/cpuinfo), else platform's guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, nargs="+", default=[8, 16, 64, 256, 1024], help="buffer sizes (MiB)")
    p.add_argument("--threads", type=int, default=None, help="threads (default: torch's)")
    p.add_argument("--trials", type=int, default=3, help="probes per size; the median of their best rates")
    args = p.parse_args(argv)
    threads = args.threads or torch.get_num_threads()
    print(f"{cpu_name()}, {threads} thread(s), torch {torch.__version__}\n")
    print("| buffer (MiB) | read GB/s |")
    print("|---:|---:|")
    for mb in args.mb:
        rates = [read_bandwidth(int(mb * 2**20), threads) for _ in range(args.trials)]
        print(f"| {mb:g} | {statistics.median(rates) / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()
