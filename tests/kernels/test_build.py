"""Build and backend selection: CUDA sources compile, info() is truthful, and a missing
extension degrades to the fallback with exactly one log line."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels

CSRC = Path(kernels.__file__).parent / "csrc"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    """Compile-only check (no GPU needed), one architecture to keep it quick; both files in parallel."""
    procs = [subprocess.Popen(["nvcc", "-std=c++17", "-O2", "-arch=sm_80", "-c", str(src),
                               "-o", str(tmp_path / (src.stem + ".o"))],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for src in sorted((CSRC / "cuda").glob("*.cu"))]
    assert len(procs) >= 2  # cross_entropy, adamw, and the kernels added since (quant_linear)
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out


def test_info_describes_the_build():
    info = kernels.info()
    assert set(info) >= {"native", "reason", "cpu_isa", "openmp", "threads", "cuda", "cuda_arch"}
    assert info["threads"] == torch.get_num_threads()
    if info["native"]:
        assert info["reason"] is None and info["cpu_isa"] and info["openmp"]
    else:
        assert info["reason"]


_WITHOUT_EXTENSION = r"""
import importlib.abc, logging, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "kernels._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
logging.basicConfig(level=logging.INFO, format="LOG %(message)s")
import torch, kernels
assert kernels.info()["native"] is False and "not available" in kernels.info()["reason"]
x = torch.randn(6, 11, requires_grad=True)
t = torch.randint(0, 11, (6,))
kernels.cross_entropy(x, t).backward()
torch.testing.assert_close(x.grad, torch.func.grad(lambda z: torch.nn.functional.cross_entropy(z, t))(x))
w = torch.randn(11, 4, requires_grad=True)
kernels.linear_cross_entropy(torch.randn(6, 4), w, t).backward()
with torch.no_grad():
    torch.testing.assert_close(kernels.linear(x[:1], w.T.contiguous()), x[:1] @ w)
opt = kernels.AdamW([w], max_grad_norm=1.0)
opt.step()
try:
    kernels.cross_entropy(x, t, backend="native")
except RuntimeError as e:
    assert "(1) compiled extension kernels._C is not available" in str(e), e
else:
    raise AssertionError("backend='native' should raise")
print("OK")
"""


def test_missing_extension_falls_back_and_logs_once():
    out = subprocess.run([sys.executable, "-c", _WITHOUT_EXTENSION], capture_output=True, text=True,
                         timeout=120, cwd=Path(kernels.__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("OK")
    logs = [line for line in out.stderr.splitlines() if line.startswith("LOG kernels")]
    assert len(logs) == 1 and "fallback" in logs[0], out.stderr
