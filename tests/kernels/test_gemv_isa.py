"""Each compiled path of the decoding GEMV (kernels/csrc/gemv.h) against a float64 reference.

gemv.h picks its ISA at compile time, so one build of kernels._C only ever runs one path. Here the
header is compiled twice into a small C harness (tests/kernels/test_gemv_harness.cpp): once with
-mavx2 -mfma -mno-avx512f (the AVX2 path a CPU without AVX-512 gets) and once with -march=native
(this CPU's path), then both run on fresh random fp32 and bf16 weights of odd sizes, 1 to 9 rows of x.

Tolerance: the rigorous bound of an fp32 dot product of length K, |out - ref| <= K * 2^-24 * (|W| @ |x|)
(any summation order), plus 1e-30 for the all-zero corner.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
HARNESS = Path(__file__).with_name("test_gemv_harness.cpp")
FLAGS = {"avx2": ["-mavx2", "-mfma", "-mno-avx512f"], "native": ["-march=native"]}
SHAPES = [(1, 37, 1), (1, 5, 7), (2, 19, 129), (3, 23, 250), (4, 31, 517), (5, 9, 1031), (9, 17, 576)]


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build_harness(flags: str, source: Path, tmp_path_factory) -> ctypes.CDLL:
    """`source` (a harness over a kernels/csrc header) compiled with FLAGS[flags] and loaded; skips where no
    compiler exists or this CPU can't run that ISA."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip(f"no C++ compiler to build {source.name}")
    if flags == "avx2" and not {"avx2", "fma"} <= _cpu_flags():
        pytest.skip("this CPU has no AVX2/FMA: the AVX2 build can't run here")
    lib = tmp_path_factory.mktemp(source.stem) / f"{source.stem}_{flags}.so"
    cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=fast", *FLAGS[flags],
           f"-I{ROOT / 'kernels' / 'csrc'}", str(source), "-o", str(lib)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(lib))


@pytest.fixture(scope="module", params=list(FLAGS))
def harness(request, tmp_path_factory):
    so = build_harness(request.param, HARNESS, tmp_path_factory)
    so.gemv_path.restype = ctypes.c_char_p
    return request.param, so


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def _check(out: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> None:
    w64, x64 = w.double(), x.double()
    ref = x64 @ w64.T  # [M, N]
    bound = w.shape[1] * 2.0**-24 * (x64.abs() @ w64.abs().T) + 1e-30
    err = (out.double() - ref).abs()
    assert (err <= bound).all(), f"max error {err.max():.3g} over a bound of {bound[err > bound].min():.3g}"


def test_harness_compiles_the_path_it_was_asked_for(harness):
    flags, so = harness
    path = so.gemv_path().decode()
    if flags == "avx2":
        assert path == "avx2"
    else:
        cpu = _cpu_flags()
        expected = ("avx512-bf16" if "avx512_bf16" in cpu else "avx512") if "avx512bw" in cpu else (
            "avx2" if {"avx2", "fma"} <= cpu else "portable")
        assert path == expected


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_fp32_gemv_matches_float64(harness, M, N, K):
    _, so = harness
    g = torch.Generator().manual_seed(M * 1000 + K)
    w, x = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g)
    out = torch.full((M, N), float("nan"))
    so.gemv_f32(_ptr(w), _ptr(x), ctypes.c_int64(M), ctypes.c_int64(N), ctypes.c_int64(K), _ptr(out))
    _check(out, w, x)


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_bf16_gemv_matches_float64(harness, M, N, K):
    _, so = harness
    g = torch.Generator().manual_seed(M * 1000 + K + 1)
    w = torch.randn(N, K, generator=g).bfloat16()
    x16 = torch.randn(M, K, generator=g).bfloat16()  # x in bf16 values: every path reads the same x
    x32 = x16.float()
    out = torch.full((M, N), float("nan"))
    so.gemv_bf16(_ptr(w.view(torch.int16)), _ptr(x32), _ptr(x16.view(torch.int16)), ctypes.c_int64(M),
                 ctypes.c_int64(N), ctypes.c_int64(K), _ptr(out))
    _check(out, w.float(), x32)
