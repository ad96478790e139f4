"""Each compiled path of the weight-only quantized GEMV rows (kernels/csrc/quant_gemv.h) against float64.

The header picks its ISA at compile time, so one build of kernels._C only ever runs one path. Here it is
compiled twice into a small C harness (tests/kernels/test_quant_gemv_harness.cpp): with -mavx2 -mfma
-mno-avx512f (the portable rows a CPU without AVX-512 runs) and with -march=native (this CPU's), then both run
on fresh random NF4 and int8 weights of odd row counts, 1 to 11 rows of x (more than one pass of kMaxRows).

Reference: x (as quant_x rounds it: fp32 for NF4, int16 blocks for int8) times W dequantized by
kernels/reference.py, in float64. Tolerance: a few fp32 eps of the magnitude sum |x| @ |W| (any summation
order), as tests/kernels/test_quant_linear.py.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from kernels import reference as R

from .test_gemv_isa import FLAGS, _cpu_flags, build_harness
from .test_quant_linear import int16_rounded

HARNESS = Path(__file__).with_name("test_quant_gemv_harness.cpp")
SHAPES = [(1, 7, 64), (2, 19, 128), (3, 33, 448), (5, 9, 1024), (8, 17, 192), (11, 5, 320)]  # M, N, K
INT8_SHAPES = [(1, 3, 1), (2, 5, 63), (4, 9, 100), (9, 3, 130)]  # int8 takes any K (NF4: whole 64-blocks)


@pytest.fixture(scope="module", params=list(FLAGS))
def harness(request, tmp_path_factory):
    return request.param, build_harness(request.param, HARNESS, tmp_path_factory)


def _ptr(t):
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def _run(so, kind, t, n, k, x):
    out = torch.full((x.shape[0], n), float("nan"))
    nf4 = kind == "nf4"
    so.qgemv_rows(ctypes.c_int(0 if nf4 else 1), _ptr(t["codes"] if nf4 else t["qweight"]),
                  _ptr(t.get("qabsmax")), _ptr(t.get("absmax2")), _ptr(R.DYNAMIC_MAP.float().contiguous()),
                  _ptr(R.NF4_CODE.float().contiguous()), ctypes.c_float(float(t["offset"]) if nf4 else 0.0),
                  _ptr(t.get("scale")), ctypes.c_int64(n), ctypes.c_int64(k), _ptr(x), ctypes.c_int64(x.shape[0]),
                  _ptr(out))
    return out


def test_harness_compiles_the_path_it_was_asked_for(harness):
    flags, so = harness
    expected = flags == "native" and {"avx512f", "avx512bw", "avx512vl"} <= _cpu_flags()
    assert so.qgemv_avx512() == int(expected)


@pytest.mark.parametrize("kind,M,N,K", [("nf4", *s) for s in SHAPES] + [("int8", *s) for s in SHAPES + INT8_SHAPES])
def test_rows_match_float64(harness, kind, M, N, K):
    _, so = harness
    g = torch.Generator().manual_seed(M * 1000 + K)
    w = torch.randn(N, K, generator=g) * torch.logspace(-2, 1, K)  # blocks of different scales
    x = torch.randn(M, K, generator=g)
    if kind == "nf4":
        t = R.nf4_quantize(w)
        dense = R.nf4_dequantize(t["codes"], t["qabsmax"], t["absmax2"], t["offset"], (N, K))
        xr = x.double()
    else:
        t = R.int8_quantize(w)
        dense = R.int8_dequantize(t["qweight"], t["scale"])
        xr = int16_rounded(x)
    out = _run(so, kind, t, N, K, x)
    w64 = dense.reshape(N, K).double()
    ref, mag = xr @ w64.T, xr.abs() @ w64.abs().T
    err = (out.double() - ref).abs()
    assert bool((err <= 2e-6 * mag + 1e-30).all()), f"max err {err.max():.3g}"
