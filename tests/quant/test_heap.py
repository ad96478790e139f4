"""engine.quant.heap: trim_heap gives freed heap memory back to the OS (glibc; a no-op elsewhere), and
quantizing() lets quantization temporaries reuse heap blocks under the fixed mmap threshold."""
import ctypes.util
import os
import subprocess
import sys

import pytest

_PROBE = """
import ctypes
from engine.quant.heap import trim_heap

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

# 96 KiB blocks stay under glibc's initial 128 KiB mmap threshold: they come from the heap, and a
# block kept after them pins the heap's top, so free() alone cannot shrink it.
blocks = [ctypes.create_string_buffer(96 * 1024) for _ in range(2000)]
keep = ctypes.create_string_buffer(96 * 1024)
full = rss_mb()
del blocks
freed = rss_mb()
trim_heap()
print(full, freed, rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not ctypes.util.find_library("c"), reason="glibc only")
def test_trim_heap_returns_freed_heap_pages():
    # a fresh process: the test run's own heap history would blur the numbers
    out = subprocess.run([sys.executable, "-c", _PROBE], check=True, capture_output=True, text=True, timeout=60)
    full, freed, trimmed = map(float, out.stdout.split())
    assert freed > full - 50  # free() kept most of the ~190 MB resident
    assert trimmed < freed - 100  # trim_heap gave it back


def test_trim_heap_is_safe_to_call_repeatedly():
    from engine.quant.heap import trim_heap

    for _ in range(3):
        trim_heap()


_QUANTIZING_PROBE = """
import ctypes, resource
from engine.quant.heap import fix_mmap_threshold, quantizing

def faults_of_20_buffers():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        buf = ctypes.create_string_buffer(4 * 2**20)  # zero-filled: every page touched
        del buf
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

assert fix_mmap_threshold()
fixed = faults_of_20_buffers()
with quantizing():
    faults_of_20_buffers()  # the first buffer may grow the heap
    inside = faults_of_20_buffers()
after = faults_of_20_buffers()
print(fixed, inside, after)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not ctypes.util.find_library("c"), reason="glibc only")
def test_quantizing_reuses_heap_blocks_and_puts_the_small_threshold_back():
    """Under the fixed 64 KiB threshold each 4 MiB temporary is a fresh mapping (~1k page faults); inside
    quantizing() the heap block of the last one is reused; after it, fresh mappings again."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}  # which would turn ours off
    out = subprocess.run([sys.executable, "-c", _QUANTIZING_PROBE], check=True, capture_output=True, text=True,
                         timeout=60, env=env)
    fixed, inside, after = map(int, out.stdout.split())
    assert fixed > 20 * 900  # 1024 pages per buffer
    assert inside < 2000
    assert after > 20 * 900


def test_huge_pages_env_is_asked_for_once_and_the_user_decides(monkeypatch, tmp_path):
    from engine.quant import heap

    setting = tmp_path / "enabled"
    monkeypatch.setattr(heap, "_THP_SETTING", setting)
    monkeypatch.delenv(heap.THP_ENV, raising=False)
    monkeypatch.delenv("ENGINE_THP", raising=False)
    setting.write_text("always [madvise] never\n")
    if sys.platform.startswith("linux"):
        assert heap.huge_pages_env()[heap.THP_ENV] == "1"
    setting.write_text("always madvise [never]\n")
    assert heap.huge_pages_env() is None  # the kernel gives none: no restart for nothing
    setting.unlink()
    assert heap.huge_pages_env() is None
    setting.write_text("[always] madvise never\n")
    monkeypatch.setenv("ENGINE_THP", "0")
    assert heap.huge_pages_env() is None
    monkeypatch.delenv("ENGINE_THP")
    monkeypatch.setenv(heap.THP_ENV, "0")  # set either way by the user, or by the restart itself: never again
    assert heap.huge_pages_env() is None
