"""engine.quant.heap: trim_heap gives freed heap memory back to the OS (glibc; a no-op elsewhere), and
quantizing() lets quantization temporaries reuse heap blocks under the fixed mmap threshold."""
import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

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


_CACHED_STEP_PROBE = r"""
import torch, kernels
from engine import ModelConfig, Transformer
from engine.adapters.lora import apply_lora
from engine.config import LoraConfig
from engine.quant import quantize
torch.manual_seed(0)
# [tokens, hidden] bf16 = 512 x 384 x 2 = 384 KiB: activations in the cached range (64 KiB - 2 MB)
cfg = ModelConfig(vocab_size=512, hidden_size=384, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=64,
                  intermediate_size=1024, max_position_embeddings=256)
model = Transformer(cfg).to(torch.bfloat16)
quantize(model, "nf4")
apply_lora(model, LoraConfig(rank=8, alpha=16, targets="all-linear", base_dtype="nf4"))
ids = torch.randint(0, 512, (2, 257))
for _ in range(3):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
s = kernels.release_cpu_blocks()
print(loss.item(), grads.double().sum().item(), grads.abs().double().sum().item(), s.get("installed"), s.get("hits", 0))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not ctypes.util.find_library("c"), reason="glibc only")
def test_quantize_turns_the_block_cache_on_and_results_do_not_change():
    """engine.quant.quantize fixes the mmap threshold and installs kernels.cache_cpu_blocks beside it (off with
    ENGINE_CPU_BLOCK_CACHE=0): the same three QLoRA forward/backward passes give bitwise the same loss and grads."""
    import kernels

    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    runs = {}
    for flag in ("1", "0"):
        out = subprocess.run([sys.executable, "-c", _CACHED_STEP_PROBE], capture_output=True, text=True, timeout=300,
                             env={**env, "ENGINE_CPU_BLOCK_CACHE": flag}, cwd=Path(kernels.__file__).parent.parent)
        assert out.returncode == 0, out.stderr
        runs[flag] = out.stdout.split()
    assert runs["1"][:3] == runs["0"][:3]
    if kernels.info()["cpu_block_cache"] == "built":
        assert runs["1"][3] == "True" and int(runs["1"][4]) > 100
    assert runs["0"][3] in ("False", "None") and int(runs["0"][4]) == 0
