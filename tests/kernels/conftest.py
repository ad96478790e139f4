"""Shared helpers for the kernel tests: dtype-aware comparison and backend skips."""
import pytest
import torch

import kernels

NATIVE = kernels.info()["native"]
needs_native = pytest.mark.skipif(not NATIVE, reason=f"native kernels unavailable: {kernels.info()['reason']}")
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.info()["cuda"]),
                                reason="needs a CUDA GPU and kernels built with ENGINE_CUDA=1")

# Relative tolerance per storage dtype: a few units in the last place of the dtype
# (fp32 math gives ~1e-6; bf16 has 8 mantissa bits, fp16 11).
RTOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float64: 1e-10}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = ""):
    """Compare against a (float64) expectation with a tolerance scaled by the dtype and by the
    largest magnitude in `expected` (gradients span many orders of magnitude)."""
    rtol = RTOL[dtype]
    finite = expected[torch.isfinite(expected)]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol,
                               atol=rtol * max(scale, 1e-30), equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
