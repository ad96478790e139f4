"""Soft-capped and sliding-window attention, forward + backward: engine.model.attention's chunked path vs
transformers' eager attention (the whole [T, S] scores materialized) and vs SDPA, side by side in one run.

    python bench/bench_attention.py                  # the default table (about 2 minutes on 2 shared cores)
    python bench/bench_attention.py --T 512 2048     # fewer lengths
    python bench/bench_attention.py --flex           # adds compiled flex_attention, forward only (see below)

One layer's attention, B = 1, 4 query heads / 2 kv heads of 256 (Gemma 2's head_dim; half of Gemma 2 2B's
8 / 4 heads so the eager [T, T] case fits in memory at T = 4096), fp32 by default (--dtype bf16: the GEMMs in
bf16 as under autocast; ours keeps scores and softmax in fp32 either way). Soft cap 50 and scale 256**-0.5
as Gemma 2. Sliding: window 512, no cap, against SDPA with full causal attention (what a sliding layer costs
when it is treated as global) and SDPA with the band as a bool mask.

Columns: median seconds of fwd+bwd over interleaved rounds (machine noise hits every case alike; the first
round is warm-up), the speed of each case relative to the first row of its group (> 1: faster), the bytes
autograd saves for backward (what training holds per layer until backward; deduplicated by storage), and
the peak RSS rise during the case (sampled every millisecond; transient memory).

flex_attention (torch.nn.attention.flex_attention with a tanh score_mod): in torch 2.13 its backward raises
NotImplementedError on CPU and compiling the forward takes ~50 s, so it is off by default and forward-only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from engine.model.attention import attend  # noqa: E402

NH, NKV, HD, CAP, WINDOW = 4, 2, 256, 50.0, 512
SCALE = HD ** -0.5


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak RSS rise (bytes) over a with-block, sampled by a thread every millisecond."""

    def __enter__(self):
        self.base = self.peak = rss()
        self.done = False
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done:
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()
        self.peak = max(self.peak, rss())
        self.rise = self.peak - self.base


def saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward across fn()'s graph (distinct storages)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    del y
    return sum(seen.values())


def eager_capped(q, k, v, mask):
    """transformers' eager_attention_forward for Gemma 2: repeat kv, [T, S] scores, cap, mask, fp32 softmax."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.matmul(q, kk.transpose(-1, -2)) * SCALE
    s = torch.tanh(s / CAP) * CAP
    s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(s.softmax(-1, dtype=torch.float32).to(q.dtype), vv)


def cases_for(T: int, dtype, flex: bool) -> list[tuple[str, str, object, bool]]:
    """(group, label, fn() -> output, backward?) for one T."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, T, HD, dtype=dtype, requires_grad=True) for h in (NH, NKV, NKV))
    pos = torch.arange(T)
    causal = pos[None, :] <= pos[:, None]
    band = causal & (pos[None, :] > pos[:, None] - WINDOW)
    group = f"soft cap, T={T}"
    out = [(group, "transformers eager [T, T]", lambda: eager_capped(q, k, v, causal), True),
           (group, "ours chunked", lambda: attend(q, k, v, None, scale=SCALE, softcap=CAP), True)]
    if flex:
        out.append((group, "flex_attention compiled (fwd only)", flex_case(q, k, v, T), False))
    if T > WINDOW:
        group = f"window {WINDOW}, T={T}"
        out += [(group, "SDPA full causal", lambda: F.scaled_dot_product_attention(
                    q, k, v, is_causal=True, enable_gqa=True), True),
                (group, "SDPA + band mask", lambda: F.scaled_dot_product_attention(
                    q, k, v, attn_mask=band, enable_gqa=True), True),
                (group, "ours chunked band", lambda: attend(q, k, v, None, window=WINDOW), True)]
    return out


def flex_case(q, k, v, T):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention)
    block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device="cpu")
    qd, kd, vd = (t.detach() for t in (q, k, v))

    def run():
        return compiled(qd, kd, vd, score_mod=lambda s, b, h, qi, ki: torch.tanh(s / CAP) * CAP,
                        block_mask=block_mask, scale=SCALE, enable_gqa=True)
    return run


def run_case(fn, backward: bool) -> float:
    start = time.perf_counter()
    y = fn()
    if backward:
        y.float().sum().backward()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--T", type=int, nargs="+", default=[512, 2048, 4096])
    p.add_argument("--rounds", type=int, default=4, help="timed rounds after one warm-up round")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--flex", action="store_true")
    args = p.parse_args()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    print(f"attention fwd+bwd, B=1, {NH} query / {NKV} kv heads of {HD}, {args.dtype}, {cpu_model()}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds after 1 warm-up\n")
    print("| case | seconds | speed vs first row of group | saved for backward | peak RSS rise |")
    print("|---|---|---|---|---|")
    for T in args.T:
        cases = cases_for(T, dtype, args.flex)
        times = {label: [] for _, label, _, _ in cases}
        peaks = {}
        for r in range(args.rounds + 1):
            for _, label, fn, backward in cases:
                with PeakRSS() as peak:
                    times[label].append(run_case(fn, backward))
                peaks[label] = max(peaks.get(label, 0), peak.rise) if r else 0
        group_first = {}
        for group, label, fn, backward in cases:
            med = statistics.median(times[label][1:])
            first = group_first.setdefault(group, med)
            saved = saved_bytes(fn) if backward else 0
            print(f"| {group}: {label} | {med:.3f} | {first / med:.2f}x | {saved / 2**20:.0f} MiB | "
                  f"{peaks[label] / 2**20:.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
