"""Heap slack: glibc's malloc keeps freed memory of a QLoRA step resident unless told otherwise.

glibc serves allocations above a threshold (128 KiB at start) with their own mmap, returned to the OS on free;
but each such free *raises* the threshold (up to 32 MiB), so a step's transient activations (MB-sized: MLP
tiles, attention scores, dequantized weight tiles) soon come from the main heap instead, where the holes left
between long-lived tensors are never returned. Measured on a 4-layer Qwen2.5-0.5B-shaped QLoRA-NF4 step (2 x 512
tokens, AMD EPYC, shared 2 cores): peak RSS 1076 MB with the default, 881 MB with the threshold fixed at 64 KiB,
for ~10% more CPU time (page faults of fresh mappings). A quantized base exists to save memory, so
engine.quant.quantize fixes it (once per process; a no-op off glibc, and MALLOC_MMAP_THRESHOLD_ set in the
environment wins: the user chose).

The faults of those fresh mappings turned out to cost more than 10% at 0.5B scale: 1.0M faults, 2.8 s of system
time in a 6.6 s step (Intel Xeon with AMX), the OpenMP threads of each op waiting on the faulting one. Most are
the same few sizes again and again ([tokens, hidden] bf16), so the threshold comes with kernels.cache_cpu_blocks:
freed blocks from MMAP_THRESHOLD to 2 MB (where torch's huge pages take over) are kept for the next request of
their size, CACHE_LIMIT in all. Measured side by side (same step, 3 steps each, two rounds): 155 -> 174 tokens/s
(0.73x -> 0.82x of the bf16-base LoRA step), 1.0M -> 0.39M faults, peak RSS 959 -> 993 MiB; a 64 MiB bound
gave the same speed for 1011 MiB, glibc's heap for these sizes (MALLOC_MMAP_THRESHOLD_=2 MiB) 184 tokens/s for
1034 MiB. ENGINE_CPU_BLOCK_CACHE=0 turns the cache off.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)
MMAP_THRESHOLD = 64 * 1024  # bytes: allocations from here up get their own mapping, unmapped on free
_M_MMAP_THRESHOLD = -3  # glibc malloc.h
_M_TRIM_THRESHOLD = -1
_DEFAULT_TRIM_THRESHOLD = 128 * 1024  # glibc's, which a fixed mmap threshold leaves in place
QUANTIZE_MMAP_THRESHOLD = 64 * 2**20  # while quantizing a weight: its MB-sized temporaries come from the heap
THP_ENV = "THP_MEM_ALLOC_ENABLE"  # torch's CPU allocator: huge pages for tensors >= 2 MB, read once at start
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
CACHE_MAX_BYTES = 2 * 2**20  # from torch's huge-page cut (2 MB) up, tensors fault 2 MB at a time: not cached
CACHE_LIMIT = 40 * 2**20     # bytes of freed blocks kept in all (the bound on what the cache adds to the peak)
CACHE_PER_SIZE = 12          # freed blocks kept of any one size
_fixed = False  # fix_mmap_threshold set MMAP_THRESHOLD (so quantizing() may move it and put it back)
_done = False
_libc = None  # ctypes handle, once: False when there is no libc with malloc_trim


def _glibc():
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name) if name else None
        except OSError:
            lib = None
        _libc = lib if lib is not None and hasattr(lib, "malloc_trim") else False
    return _libc or None


def trim_heap() -> None:
    """Give the heap's free pages back to the OS (glibc malloc_trim(0); a no-op elsewhere).

    The training step calls it once per optimizer step, after the gradients are freed: their ~4 bytes
    per parameter, and the step's activations, otherwise stay resident as free heap (see above) and
    fragment the next step's allocations. Measured on bench/bench_moe.py (97M-parameter MoE, Intel
    Xeon): peak RSS 2141 -> 2095 MB, resident between steps 1878 -> 1529 MB; the cost is the page
    faults of memory touched again in the next step (engine/train/step.py cites the speed).
    """
    lib = _glibc()
    if lib is not None:
        lib.malloc_trim(0)


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD (disabling its upward drift); True if it was set now."""
    global _done, _fixed
    if _done or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    _done = True
    lib = _glibc()  # the one libc handle trim_heap and quantizing use too
    ok = lib is not None and hasattr(lib, "mallopt") and lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    if ok:
        _fixed = True
        log.info("malloc mmap threshold fixed at %d KiB (freed activations go back to the OS)", MMAP_THRESHOLD // 1024)
        _cache_blocks()
    return ok


def _cache_blocks() -> None:
    """The mmap threshold's companion: kernels.cache_cpu_blocks for the sizes it sends to fresh mappings."""
    if os.environ.get("ENGINE_CPU_BLOCK_CACHE", "1") == "0":
        return
    import kernels

    why_not = kernels.cache_cpu_blocks(MMAP_THRESHOLD, CACHE_MAX_BYTES, CACHE_LIMIT, CACHE_PER_SIZE)
    if why_not is None:
        log.info("CPU block cache on: freed blocks of %d KiB to %d MiB reused, %d MiB at most",
                 MMAP_THRESHOLD // 1024, CACHE_MAX_BYTES // 2**20, CACHE_LIMIT // 2**20)
    else:
        log.info("CPU block cache off (%s): fresh blocks are page-faulted in", why_not)


@contextlib.contextmanager
def quantizing():
    """Inside: glibc serves allocations up to QUANTIZE_MMAP_THRESHOLD from the heap and keeps freed ones there.

    Quantizing a weight works through ~20 MB of fp32 temporaries per 1M-element chunk (kernels.reference
    QUANTIZE_CHUNK). Under the 64 KiB threshold each was a fresh mapping, page-faulted in and unmapped again:
    loading SmolLM2-135M as NF4 took 4.0 s, 3.3 s of it system time (1.0M page faults). Here the next chunk
    reuses the last one's heap blocks; the loaders give the free heap back with trim_heap() when done. A
    no-op unless fix_mmap_threshold set the threshold (off glibc, or MALLOC_MMAP_THRESHOLD_ set by the user)."""
    lib = _glibc() if _fixed else None  # _fixed: mallopt worked on this libc
    if lib is None:
        yield
        return
    lib.mallopt(_M_TRIM_THRESHOLD, QUANTIZE_MMAP_THRESHOLD)  # no trimming of the heap top between chunks
    lib.mallopt(_M_MMAP_THRESHOLD, QUANTIZE_MMAP_THRESHOLD)
    try:
        yield
    finally:
        lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        lib.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)


def huge_pages_env() -> dict | None:
    """The environment for a process whose torch tensors of 2 MB and up sit on transparent huge pages, or None
    when this one has it already, the user chose (THP_MEM_ALLOC_ENABLE set either way, or ENGINE_THP=0), or the
    kernel gives none (not Linux, THP "never").

    Why: under the fixed mmap threshold every MB-sized activation of a QLoRA step is a fresh mapping, faulted
    in 4 KB at a time. Measured on a 0.5B QLoRA-NF4 step (2 x 512 tokens, Intel Xeon with AMX, 2 cores of a
    VM): 2.2M page faults and 3.9 s of system time per 7.6 s step; with huge pages 1.0M faults, ~15% more
    tokens/s, the same peak RSS (the mappings stay exact; only the alignment changes). torch reads the
    variable once, at its first allocation, so only a fresh process can take it: cli.train re-executes
    itself with it for a quantized base. A dense run is not given it: there its MB-sized tensors come from
    the heap, where 2 MB alignment raised the peak by ~100 MB (bf16-base LoRA, same machine)."""
    if THP_ENV in os.environ or os.environ.get("ENGINE_THP", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    try:
        if "[never]" in _THP_SETTING.read_text():
            return None
    except OSError:
        return None
    return {**os.environ, THP_ENV: "1"}
