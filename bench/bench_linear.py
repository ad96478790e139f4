"""Batch-1 decoding linears: F.linear vs kernels.linear (native GEMV), fp32 and bf16.

Shapes are the ~35M Llama's (bench/llama35m.py: d = 512, MLP 1536, 8 heads / 4 kv heads of 64,
V = 32000): one x row against the LM head [32000, 512] and each layer shape, plus a whole
decode step (6 layers x 7 matrices + the head, 43 distinct weights, 141 MB in fp32) run in
sequence. Every call reads a weight that is not in cache (pools larger than the 32 MiB L3 are
cycled), as in real decoding, where a step streams the whole model. extra_info["gb_per_s"]
is weight bytes / minimum time. Goal: native >= 2x torch on the whole step, fp32 and bf16.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

import kernels

from .conftest import QUICK

D, FF, V, LAYERS, KV = 512, 1536, 32000, 6, 256
LAYER_SHAPES = {"q": (D, D), "k": (KV, D), "v": (KV, D), "o": (D, D), "gate": (FF, D),
                "up": (FF, D), "down": (D, FF)}
SHAPES = {"lm_head": (V, D), "d512": (D, D), "kv256": (KV, D), "mlp_up": (FF, D), "mlp_down": (D, FF)}
CASES = ["lm_head", "decode_step"] if QUICK else [*SHAPES, "decode_step"]
POOL_BYTES = 96 * 2**20  # > L3, so a cycled pool of weights comes from DRAM

LINEARS = {"torch": F.linear, "native": lambda x, w: kernels.linear(x, w, backend="native")}


def weight_pool(n, k, dtype):
    count = max(2, -(-POOL_BYTES // (n * k * dtype.itemsize)))
    return [torch.randn(n, k).to(dtype) for _ in range(count)]


def decode_step_weights(dtype):
    """One distinct weight per matrix of every layer, then the head: the order a step reads them."""
    ws = [torch.randn(*LAYER_SHAPES[m]).to(dtype) for _ in range(LAYERS) for m in LAYER_SHAPES]
    return ws + [torch.randn(V, D).to(dtype)]


@pytest.mark.parametrize("backend", list(LINEARS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_linear_decode(benchmark, case, dtype, backend):
    torch.manual_seed(0)
    linear = LINEARS[backend]
    if case == "decode_step":
        weights = decode_step_weights(dtype)
        xs = {k: torch.randn(1, k).to(dtype) for k in (D, FF)}  # inputs of width d and MLP

        def step():
            for w in weights:  # the matmuls of a step, without attention/norms in between
                linear(xs[w.shape[1]], w)
        fn, nbytes, rounds = step, sum(w.numel() for w in weights) * dtype.itemsize, 20
    else:
        n, k = SHAPES[case]
        pool = itertools.cycle(weight_pool(n, k, dtype))
        x = torch.randn(1, k).to(dtype)

        def fn():
            linear(x, next(pool))
        nbytes, rounds = n * k * dtype.itemsize, 20 if case == "lm_head" else 300

    benchmark.group = f"linear decode {case} {str(dtype).replace('torch.', '')}"
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=3)
    benchmark.extra_info.update(case=case, dtype=str(dtype), backend=backend, weight_bytes=nbytes,
                                threads=torch.get_num_threads(),
                                gb_per_s=round(nbytes / benchmark.stats.stats.min / 1e9, 1))
