"""kernels.cache_cpu_blocks (kernels/csrc/cpu_block_cache.cpp): torch's CPU allocator replaced by one that keeps
a bounded number of freed blocks per size and hands them out again. Installing it is process-wide, so each
test runs its probe in a fresh process."""
import subprocess
import sys
from pathlib import Path

import pytest

import kernels

ROOT = Path(kernels.__file__).parent.parent
built = pytest.mark.skipif(kernels.info()["cpu_block_cache"] != "built",
                           reason=f"kernels._cpu_cache: {kernels.info()['cpu_block_cache']}")


def _probe(code: str, env: dict | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


_REUSE = r"""
import resource, torch, kernels
KiB, MiB = 1024, 2**20
assert kernels.cache_cpu_blocks(64 * KiB, 2 * MiB, 8 * MiB, 3) is None
x = torch.randn(1000, 448, dtype=torch.bfloat16)  # 875 KiB: cached
ref = x * 3 + 1
kernels.release_cpu_blocks()
start = kernels.release_cpu_blocks()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    y = x * 3 + 1  # two blocks of one size: the temporary x * 3, then y (the last y is freed as y is rebound)
    assert torch.equal(y, ref)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
s = kernels.release_cpu_blocks()
print(s["hits"] - start["hits"], s["misses"] - start["misses"], faults, s["cached_bytes"])
"""


@built
def test_freed_blocks_of_a_size_are_handed_out_again_without_page_faults():
    hits, misses, faults, cached = map(int, _probe(_REUSE).split())
    assert misses <= 3 and hits >= 97  # 100 allocations of one size: all but the first ones reused
    assert faults < 50 * 220 / 4  # a fresh 875 KiB block each time would be ~220 faults per allocation
    assert cached == 0  # release_cpu_blocks gave them back


_BOUNDS = r"""
import torch, kernels
KiB, MiB = 1024, 2**20
assert kernels.cache_cpu_blocks(64 * KiB, 2 * MiB, 5 * MiB // 2, 2) is None
ts = [torch.empty(512 * KiB, dtype=torch.uint8) for _ in range(5)]
del ts
after_same = kernels._cpu_cache.stats()["cached_bytes"]    # per_size: 2 of the 5 kept
ts = [torch.empty(900 * KiB, dtype=torch.uint8) for _ in range(5)]
del ts
after_limit = kernels._cpu_cache.stats()["cached_bytes"]   # limit 2.5 MiB: one more 900 KiB block fits
small = [torch.empty(16 * KiB, dtype=torch.uint8) for _ in range(5)]
big = [torch.empty(3 * MiB, dtype=torch.uint8) for _ in range(2)]
del small, big
outside = kernels._cpu_cache.stats()["cached_bytes"]       # below min / above max: never kept
print(after_same, after_limit, outside)
"""


@built
def test_the_cache_keeps_at_most_per_size_blocks_of_a_size_and_limit_bytes_in_all():
    page = 4096
    block = lambda n: (n + 64 + page - 1) // page * page  # a 64-byte header, whole pages
    same, limit, outside = map(int, _probe(_BOUNDS).split())
    assert same == 2 * block(512 * 1024)
    assert limit == same + block(900 * 1024) and limit <= 5 * 2**20 // 2
    assert outside == limit


_RAW_AND_UNINSTALL = r"""
import torch, kernels
KiB, MiB = 1024, 2**20
assert kernels.cache_cpu_blocks(64 * KiB, 2 * MiB, 16 * MiB, 4) is None
for n in (0, 1, 100, 64 * KiB, 1 * MiB, 2 * MiB, 5 * MiB):  # raw_allocate/raw_deallocate, in and out of range
    kernels._cpu_cache.raw_roundtrip(n)
kept = torch.full((300, 1000), 7.0)                        # 1.1 MiB, made while installed
s = kernels.release_cpu_blocks(uninstall=True)
assert s["installed"] is False and s["cached_bytes"] == 0, s
fresh = torch.ones(300, 1000)                              # torch's own allocator again
del kept                                                   # freed through the cache's deleter, after uninstall
after = kernels._cpu_cache.stats()
assert after["cached_bytes"] == 0 and after["hits"] == s["hits"] and after["misses"] == s["misses"], after
assert fresh.sum().item() == 300000
assert kernels.cache_cpu_blocks(64 * KiB, 2 * MiB, 16 * MiB, 4) is None  # and back on
print("OK")
"""


@built
def test_raw_allocations_and_tensors_freed_after_uninstall_go_back_cleanly():
    assert _probe(_RAW_AND_UNINSTALL).strip() == "OK"


_THREADS = r"""
import threading, torch, kernels
KiB, MiB = 1024, 2**20
torch.manual_seed(0)
xs = [torch.randn(257, 600 + 40 * i) for i in range(4)]  # odd sizes, 0.6-0.8 MiB: all in range
refs = [(x @ x.T).sum(0) for x in xs]
assert kernels.cache_cpu_blocks(64 * KiB, 2 * MiB, 4 * MiB, 3) is None  # a small bound: kept and freed both
errors = []
def work(i):
    for _ in range(40):
        x = xs[i].clone()
        if not torch.equal((x @ x.T).sum(0), refs[i]):
            errors.append(i)
threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
for t in threads: t.start()
for t in threads: t.join()
s = kernels.release_cpu_blocks()
assert not errors and s["hits"] > 0, (errors, s)
print("OK")
"""


@built
def test_threads_allocating_and_freeing_at_once_get_correct_results():
    assert _probe(_THREADS).strip() == "OK"


_OTHER_TORCH = r"""
import torch
torch.__version__ = "0.0.1"
import kernels
why = kernels.cache_cpu_blocks(65536, 2**21, 2**20, 1)
assert why is not None and "built for torch" in why and "0.0.1" in why, why
assert kernels.info()["cpu_block_cache"] == why
assert kernels.release_cpu_blocks() == {}
print("OK")
"""


@built
def test_a_cache_built_for_another_torch_is_refused_with_the_reason():
    assert _probe(_OTHER_TORCH).strip() == "OK"


@pytest.mark.parametrize("args, message", [
    ((-1, 2, 3, 4), "min_bytes"), ((1, 2, 3.0, 4), "limit_bytes"), ((1, 2, 3, True), "per_size"),
    ((10, 2, 3, 4), "min_bytes 10 > max_bytes 2"),
])
def test_bad_bounds_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        kernels.cache_cpu_blocks(*args)
