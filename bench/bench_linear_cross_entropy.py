"""Linear + cross-entropy forward + backward at N=8192, V=32000, d=512 (fp32):
F.linear + F.cross_entropy vs kernels.linear_cross_entropy.

Goal (issue 4): time <= 0.9x and peak memory <= 1/4 of the unfused version. Peak memory is
measured in a fresh subprocess (VmHWM growth over the inputs) and stored in extra_info.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels

from .conftest import QUICK

SHAPES = [(2048, 32000, 512)] if QUICK else [(8192, 32000, 512)]
VARIANTS = ["torch", "fused"]

_PEAK = r"""
import json, sys, torch, torch.nn.functional as F, kernels
n, v, d, variant = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
h = torch.randn(n, d, requires_grad=True); w = (torch.randn(v, d) / d**0.5).requires_grad_()
t = torch.randint(0, v, (n,))
def status_kib(key):  # VmHWM is per address space, so not inherited from the parent like ru_maxrss
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))
before = status_kib("VmRSS:")
if variant == "torch":
    F.cross_entropy(F.linear(h, w), t).backward()
else:
    kernels.linear_cross_entropy(h, w, t, backend="native").backward()
print(json.dumps({"peak_growth_mib": (status_kib("VmHWM:") - before) / 1024}))
"""


def peak_growth_mib(n, v, d, variant) -> float:
    out = subprocess.run([sys.executable, "-c", _PEAK, str(n), str(v), str(d), variant], check=True,
                         capture_output=True, text=True, cwd=Path(kernels.__file__).parent.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mib"]


def run(variant, h, w, t):
    if variant == "torch":
        loss = F.cross_entropy(F.linear(h, w), t)
    else:
        loss = kernels.linear_cross_entropy(h, w, t, backend="native")
    loss.backward()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n,v,d", SHAPES)
def test_linear_cross_entropy_fwd_bwd(benchmark, n, v, d, variant):
    torch.manual_seed(0)
    h = torch.randn(n, d, requires_grad=True)
    w = (torch.randn(v, d) / d**0.5).requires_grad_()
    t = torch.randint(0, v, (n,))

    def step():
        h.grad = w.grad = None
        run(variant, h, w, t)

    benchmark.group = f"linear_cross_entropy fwd+bwd N={n} V={v} d={d} float32"
    benchmark.extra_info.update(n=n, v=v, d=d, variant=variant,
                                peak_growth_mib=round(peak_growth_mib(n, v, d, variant), 1))
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
