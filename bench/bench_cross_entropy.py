"""Cross-entropy forward + backward: F.cross_entropy vs kernels.cross_entropy (native).

Each round starts from a fresh leaf copy of the logits made in untimed setup, so every variant
pays for the buffers it allocates itself (F.cross_entropy: log_softmax output + gradient;
fused: the gradient; fused_inplace: nothing, the gradient overwrites the logits).
Goal (issue 4): fused >= 10x F.cross_entropy at N in {2048, 8192}, V in {32000, 128256}.
"""
import pytest
import torch
import torch.nn.functional as F

import kernels

from .conftest import QUICK, require_memory

SHAPES = [(2048, 32000)] if QUICK else [(2048, 32000), (2048, 128256), (8192, 32000), (8192, 128256)]
DTYPES = [torch.float32, torch.bfloat16]
VARIANTS = ["torch", "fused", "fused_inplace"]


def loss_fn(variant):
    if variant == "torch":
        return lambda x, t: F.cross_entropy(x, t)
    if variant == "fused":
        return lambda x, t: kernels.cross_entropy(x, t, backend="native", inplace=False)
    # A view of the fresh leaf is not itself a leaf, so the gradient may overwrite it.
    return lambda x, t: kernels.cross_entropy(x.view(x.shape), t, backend="native", inplace=True)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,v", SHAPES)
def test_cross_entropy_fwd_bwd(benchmark, n, v, dtype, variant):
    size_gib = n * v * dtype.itemsize / 2**30
    require_memory(size_gib * (5 if variant == "torch" else 3) + 1)
    torch.manual_seed(0)
    base = torch.randn(n, v, dtype=dtype)
    targets = torch.randint(0, v, (n,))
    fn = loss_fn(variant)

    def setup():
        return (base.clone().requires_grad_(), targets), {}

    def step(x, t):
        fn(x, t).backward()

    benchmark.group = f"cross_entropy fwd+bwd N={n} V={v} {str(dtype).replace('torch.', '')}"
    benchmark.extra_info.update(n=n, v=v, dtype=str(dtype), variant=variant, threads=torch.get_num_threads())
    rounds = 3 if size_gib > 1 else 7
    benchmark.pedantic(step, setup=setup, rounds=rounds, warmup_rounds=1)
