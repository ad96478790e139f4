"""Peak training memory of a function, as the planner counts it: the high-water mark of live tensor bytes.

`peak_tensor_bytes(fn)` runs fn under the PyTorch profiler with profile_memory=True, which records every
allocation and free of the CPU allocator (signed sizes, in time order), and returns the highest running sum:
the CPU analog of torch.cuda.max_memory_allocated. Tensors alive before fn are not counted.

Why not RSS alone: RSS growth also holds the runtime's own memory (library code pages, glibc heap slack,
MKL/oneDNN buffers), which differs between machines. The same steps read 208 MiB here and 266 MiB on a CI
machine, while their tensor peak is the same everywhere. RSS growth is still reported next to it (`rss_growth`).

The allocation events come from `experimental_event_tree()` and `_EventType` (private profiler API, stable
across torch 2.x): the public `prof.events()` folds allocations made inside an op into that op's totals.
"""
import os
import resource
from pathlib import Path
from typing import Callable

import torch
from torch._C._profiler import _EventType


def rss() -> int:
    """This process's resident set now, in bytes."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:  # allocations sit anywhere in the op tree
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events, key=lambda e: e[0]):
        live += size  # negative for a free
        peak = max(peak, live)
    return peak


def measure_peaks(fn: Callable[[], object]) -> dict:
    """{"measured": tensor peak of fn, "rss_growth": ru_maxrss after fn minus RSS before}, in bytes (Linux)."""
    baseline = rss()
    measured = peak_tensor_bytes(fn)
    return {"measured": measured,
            "rss_growth": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline}  # KiB on Linux
