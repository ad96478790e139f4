"""AdamW step on transformer-shaped parameter lists of ~25M and ~125M fp32 params:
torch.optim.AdamW(fused=True) vs kernels.AdamW, alone and with global-norm clipping
(torch: clip_grad_norm_ then fused AdamW; ours: max_grad_norm folded into the step).

Goal (issue 4): >= 1.0x fused torch alone, >= 1.3x with clipping.
"""
import pytest
import torch

import kernels

from .conftest import QUICK

MODELS = {"25M": (512, 3), "125M": (768, 14)}  # (d_model, layers) with a 32000-token embedding
SIZES = ["25M"] if QUICK else ["25M", "125M"]
VARIANTS = ["torch_fused", "kernels"]
MAX_NORM = 1.0


def make_params(size):
    d, layers = MODELS[size]
    shapes = [(32000, d)] + [s for _ in range(layers)
                             for s in [(d, d)] * 4 + [(4 * d, d), (d, 4 * d), (d,), (d,)]]
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    return params


def make_step(variant, params, clip):
    if variant == "torch_fused":
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

        def step():
            if clip:
                torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
            opt.step()
        return step
    opt = kernels.AdamW(params, lr=1e-4, max_grad_norm=MAX_NORM if clip else None, backend="native")
    return opt.step


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("clip", [False, True], ids=["step", "clip+step"])
@pytest.mark.parametrize("size", SIZES)
def test_adamw(benchmark, size, clip, variant):
    params = make_params(size)
    n = sum(p.numel() for p in params)
    benchmark.group = f"adamw {'clip+step' if clip else 'step'} {size} ({n / 1e6:.1f}M fp32 params)"
    benchmark.extra_info.update(params=n, variant=variant, clip=clip)
    benchmark.pedantic(make_step(variant, params, clip), rounds=10 if size == "25M" else 5, warmup_rounds=1)


def interleaved(size: str, clip: bool, steps: int = 25, skip: int = 3) -> tuple[float, float]:
    """Median ms per step of torch_fused and kernels, alternating step by step in one process, so both
    sides see the same machine load (pytest-benchmark runs them one after the other)."""
    import statistics
    import time

    steppers = [make_step(variant, make_params(size), clip) for variant in VARIANTS]
    times = [[], []]
    for _ in range(steps):
        for step, acc in zip(steppers, times):
            start = time.perf_counter()
            step()
            acc.append(time.perf_counter() - start)
    return tuple(statistics.median(t[skip:]) * 1e3 for t in times)


if __name__ == "__main__":  # python -m bench.bench_adamw: the README's table
    print(f"| params | op | torch fused AdamW | kernels.AdamW | speed-up |\n|---|---|---|---|---|")
    for size in SIZES:
        for clip in (False, True):
            ours_torch, ours = interleaved(size, clip)
            print(f"| {size} | {'clip+step' if clip else 'step'} | {ours_torch:.1f} ms | {ours:.1f} ms | "
                  f"{ours_torch / ours:.2f}x |")
