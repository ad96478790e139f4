"""kernels.linear: the decoding GEMV vs a float64 reference and vs F.linear, and when it runs."""
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.ops import linear as gemv

from .conftest import assert_close, needs_native

DTYPES = [torch.float32, torch.bfloat16]
# Leading dims of x (1-D x, M = 1..8, 3-D inputs), then (N, K): K and N off the 16-wide vector
# (a masked tail only, tails after full vectors, after the unrolled loop), N = 1, K = 1.
LEADING = [(), (1,), (2,), (3,), (5,), (8,), (1, 1), (2, 3), (2, 4)]
NK = [(1, 1), (1, 37), (7, 16), (33, 17), (100, 64), (1000, 513), (3, 1536)]


def make(leading, n, k, dtype, bias=True):
    x = torch.randn(*leading, k).to(dtype)
    w = (torch.randn(n, k) / k**0.5).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    return x, w, b


def expected64(x, w, b):
    """F.linear in float64 of the (already rounded) inputs, and the bound on |fp32 sum - exact|
    scale: sum_k |w||x| + |b| (the accumulation error is a small multiple of eps times that)."""
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    mag = F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
    return y, mag


def assert_matches_float64(y, x, w, b):
    ref, mag = expected64(x, w, b)
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = (y.double() - ref).abs()
    # fp32 accumulation: a few eps of the magnitude sum. bf16 adds one rounding of the output
    # (half an ulp: 2^-9 relative).
    tol = 1e-6 * mag + (2.0**-8 * ref.abs() if y.dtype == torch.bfloat16 else 0)
    assert bool((err <= tol + 1e-30).all()), f"max err {err.max():.3g}, worst margin {(err - tol).max():.3g}"


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k", NK)
@pytest.mark.parametrize("leading", LEADING, ids=str)
def test_native_matches_float64_reference(leading, n, k, dtype):
    x, w, b = make(leading, n, k, dtype)
    with torch.no_grad():
        for bias in (None, b):
            assert_matches_float64(kernels.linear(x, w, bias, backend="native"), x, w, bias)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("leading", [(1,), (8,), (2, 3)], ids=str)
def test_native_matches_F_linear(leading, dtype):
    x, w, b = make(leading, 1000, 513, dtype)
    with torch.no_grad():
        for bias in (None, b):
            assert_close(kernels.linear(x, w, bias, backend="native"), F.linear(x, w, bias), dtype)


@needs_native
def test_empty_and_k0_shapes_match_F_linear():
    with torch.no_grad():
        for leading, n, k in [((0,), 5, 7), ((2,), 0, 7), ((3,), 4, 0)]:
            x, w, b = make(leading, n, k, torch.float32)
            for bias in (None, b):
                y = kernels.linear(x, w, bias, backend="native")
                torch.testing.assert_close(y, F.linear(x, w, bias))


@needs_native
def test_strided_x_runs_natively():
    x = torch.randn(4, 2, 64)[:, 1]  # (4, 64) with row stride 128
    w = torch.randn(10, 64)
    with torch.no_grad():
        assert_matches_float64(kernels.linear(x, w, backend="native"), x, w, None)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_result_does_not_depend_on_thread_count(dtype):
    # Each output is one thread's dot product in a fixed order, so the split can't change bits.
    x, w, b = make((3,), 4001, 700, dtype)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = kernels.linear(x, w, b, backend="native")
            torch.set_num_threads(max(2, threads))
            many = kernels.linear(x, w, b, backend="native")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


_PREFETCH_PROBE = """
import sys, torch, kernels
torch.manual_seed(0)
outs = []
for dtype in (torch.float32, torch.bfloat16):
    for m, n, k in ((1, 300, 700), (3, 257, 513), (6, 129, 2048)):
        x, w = torch.randn(m, k).to(dtype), (torch.randn(n, k) / k**0.5).to(dtype)
        outs.append(kernels.linear(x, w, backend="native"))
torch.save(outs, sys.argv[1])
"""


@needs_native
def test_software_prefetch_does_not_change_a_bit(tmp_path):
    # ENGINE_GEMV_PREFETCH (gemv.h: on by default on Intel) only adds prefetch instructions; the
    # sums are the same instructions in the same order, so both settings must agree bitwise.
    import os
    import subprocess
    import sys

    results = []
    for setting in ("0", "1"):
        out = tmp_path / f"prefetch{setting}.pt"
        env = dict(os.environ, ENGINE_GEMV_PREFETCH=setting)
        subprocess.run([sys.executable, "-c", _PREFETCH_PROBE, str(out)], check=True, env=env, timeout=120)
        results.append(torch.load(out))
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.fixture
def launches(monkeypatch):
    """Counts native GEMV launches."""
    calls = []
    launch = gemv.launch
    monkeypatch.setattr(gemv, "launch", lambda *a, **kw: calls.append(1) or launch(*a, **kw))
    return calls


@needs_native
def test_decoding_without_grad_runs_natively(launches):
    x, w, b = make((1,), 50, 32, torch.float32)
    w.requires_grad_()  # a model parameter, under no_grad / inference_mode
    with torch.no_grad():
        kernels.linear(x, w, b)
    with torch.inference_mode():
        kernels.linear(x, w, b)
    kernels.linear(x, w.detach(), b)  # grad mode on, but nothing requires grad
    assert len(launches) == 3


@pytest.mark.parametrize("case", ["backend_torch", "too_many_rows", "float16", "float64",
                                  "transposed_weight", "dtype_mismatch"])
def test_fallback_is_exactly_F_linear(case, launches):
    dtype = {"float16": torch.float16, "float64": torch.float64}.get(case, torch.float32)
    x, w, b = make((gemv.LINEAR_MAX_ROWS + 1,) if case == "too_many_rows" else (2,), 24, 40, dtype)
    if case == "transposed_weight":
        w = w.T.contiguous().T
    if case == "dtype_mismatch":
        b = b.double()
    backend = "torch" if case == "backend_torch" else None
    with torch.no_grad():
        if case == "dtype_mismatch":  # torch's own error, unchanged
            with pytest.raises(RuntimeError) as ours:
                kernels.linear(x, w, b, backend=backend)
            with pytest.raises(RuntimeError) as theirs:
                F.linear(x, w, b)
            assert str(ours.value) == str(theirs.value)
        else:
            assert torch.equal(kernels.linear(x, w, b, backend=backend), F.linear(x, w, b))
    assert not launches


@pytest.mark.parametrize("which", ["x", "weight", "bias"])
def test_autograd_inputs_fall_back_with_correct_grads(which, launches):
    x, w, b = make((1,), 30, 20, torch.float32)
    leaf = {"x": x, "weight": w, "bias": b}[which].requires_grad_()
    grad_out = torch.randn(1, 30)
    (g_ours,) = torch.autograd.grad(kernels.linear(x, w, b), leaf, grad_out)
    (g_torch,) = torch.autograd.grad(F.linear(x, w, b), leaf, grad_out)
    assert torch.equal(g_ours, g_torch)
    assert not launches


@needs_native
def test_native_backend_lists_every_reason():
    x = torch.randn(gemv.LINEAR_MAX_ROWS + 1, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 5, dtype=torch.float64).T  # [5, 8], not contiguous
    with pytest.raises(RuntimeError) as err:
        kernels.linear(x, w, backend="native")
    msg = str(err.value)
    assert msg.startswith("kernels.linear: backend='native' cannot run: (1) ")
    for words in ["all be float32 or all bfloat16", f"{gemv.LINEAR_MAX_ROWS + 1} rows",
                  "weight must be contiguous", "requires grad"]:
        assert words in msg, msg
    with pytest.raises(RuntimeError, match=r"\(1\) bias must be \[N\]=\[5\], got \[4\]"):
        kernels.linear(torch.randn(8), torch.randn(5, 8), torch.randn(4), backend="native")
    with pytest.raises(RuntimeError, match=r"x must be \[..., K\] and weight \[N, K\]"):
        kernels.linear(torch.randn(7), torch.randn(5, 8), backend="native")


def test_bad_backend_names_the_choices():
    with pytest.raises(ValueError, match="kernels.linear: backend must be None, 'torch' or 'native'"):
        kernels.linear(torch.randn(3), torch.randn(2, 3), backend="mkl")


@needs_native
def test_env_native_does_not_break_training_or_prefill(monkeypatch, launches):
    # ENGINE_KERNELS=native demands the kernel where it should run; autograd and many rows are
    # F.linear by design, so they still work (an explicit backend="native" raises instead).
    monkeypatch.setenv("ENGINE_KERNELS", "native")
    x, w, _ = make((gemv.LINEAR_MAX_ROWS + 1,), 6, 4, torch.float32)
    torch.testing.assert_close(kernels.linear(x, w.requires_grad_()), F.linear(x, w))
    assert not launches
    with pytest.raises(RuntimeError, match="all be float32 or all bfloat16"):
        with torch.no_grad():
            kernels.linear(x[:1].half(), w.half())


def test_env_torch_forces_the_fallback(monkeypatch, launches):
    monkeypatch.setenv("ENGINE_KERNELS", "torch")
    x, w, b = make((1,), 6, 4, torch.float32)
    with torch.no_grad():
        assert torch.equal(kernels.linear(x, w, b), F.linear(x, w, b))
        with pytest.raises(RuntimeError, match="ENGINE_KERNELS=torch"):
            kernels.linear(x, w, b, backend="native")
    assert not launches


def test_info_reports_the_row_cutoff():
    assert kernels.info()["linear_max_rows"] == gemv.LINEAR_MAX_ROWS


@needs_native
def test_module_parameters_take_the_gemv(monkeypatch):
    """A model's weights are nn.Parameter: decoding must reach the GEMV with them, not F.linear."""
    lin = torch.nn.Linear(40, 24)
    x = torch.randn(1, 40)
    calls = []
    real = gemv.launch
    monkeypatch.setattr(gemv, "launch", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        out = kernels.linear(x, lin.weight, lin.bias)
    assert calls and torch.allclose(out, torch.nn.functional.linear(x, lin.weight, lin.bias), atol=1e-5)
