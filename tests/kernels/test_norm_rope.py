"""kernels.rms_norm and kernels.rope: fused CPU kernels against the float64 reference, gradients included."""
import pytest
import torch

import kernels
from kernels import reference

from .conftest import assert_close, needs_native

F32, BF16 = torch.float32, torch.bfloat16


def _leaf(shape, dtype, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).requires_grad_()


def _run(fn, inputs, grad_out):
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = torch.autograd.grad(outs, [t for t in inputs if t.requires_grad], grad_out)
    return [o.detach() for o in outs], list(grads)


def _exact(inputs):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]


@needs_native
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
@pytest.mark.parametrize("x_dtype,w_dtype,out_dtype", [(F32, F32, None), (F32, F32, BF16), (BF16, BF16, None),
                                                       (BF16, F32, None), (F32, BF16, None)])
def test_rms_norm_matches_float64(x_dtype, w_dtype, out_dtype, offset):
    x, w = _leaf((3, 7, 77), x_dtype, 3.0), _leaf((77,), w_dtype, 0.5)
    y = kernels.rms_norm(x, w, 1e-5, offset, out_dtype)
    assert type(y.grad_fn).__name__ == "RMSNormFunctionBackward"
    expected_dtype = out_dtype or (x_dtype if offset else torch.promote_types(x_dtype, w_dtype))
    assert y.dtype == expected_dtype == reference.rms_norm(x, w, 1e-5, offset, out_dtype).dtype
    grad_y = torch.randn(y.shape, dtype=torch.float64).to(y.dtype)
    (y,), (gx, gw) = _run(lambda a, b: kernels.rms_norm(a, b, 1e-5, offset, out_dtype), (x, w), grad_y)
    (ey,), (ex, ew) = _run(lambda a, b: reference.rms_norm(a, b, 1e-5, offset), _exact((x, w)), grad_y.double())
    low = BF16 if BF16 in (x_dtype, w_dtype, out_dtype) else F32
    assert_close(y, ey, low, "y")
    assert_close(gx, ex, low, "grad x")
    assert_close(gw, ew, low, "grad weight")
    assert gx.dtype == x_dtype and gw.dtype == w_dtype


@needs_native
def test_rms_norm_reads_strided_rows_and_a_zero_row():
    x = _leaf((5, 2 * 33), F32)[:, :33]  # row stride 66
    x.retain_grad()
    w = _leaf((33,), F32)
    grad_y = torch.randn(5, 33)
    (y,), (gx, gw) = _run(lambda a, b: kernels.rms_norm(a, b, 1e-6), (x, w), grad_y)
    (ey,), (ex, ew) = _run(lambda a, b: reference.rms_norm(a, b, 1e-6), _exact((x, w)), grad_y.double())
    for what, a, e in (("y", y, ey), ("grad x", gx, ex), ("grad weight", gw, ew)):
        assert_close(a, e, F32, what)
    zero = torch.zeros(2, 8, requires_grad=True)
    out = kernels.rms_norm(zero, torch.ones(8, requires_grad=True), 1e-6)
    assert torch.equal(out, torch.zeros(2, 8))


def test_rms_norm_is_the_torch_op_without_autograd():
    x, w = torch.randn(4, 16), torch.randn(16)
    assert torch.equal(kernels.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))


@needs_native
@pytest.mark.parametrize("table_batch", [1, 2])
@pytest.mark.parametrize("dtype,out_dtype", [(F32, None), (BF16, None), (BF16, F32), (F32, BF16)])
def test_rope_matches_float64(dtype, out_dtype, table_batch):
    B, T, nh, nkv, hd = 2, 11, 6, 2, 18
    # q and k as the model makes them: views of Linear outputs (B, T, h * hd)
    q = _leaf((B, T, nh * hd), dtype).view(B, T, nh, hd)
    k = _leaf((B, T, nkv * hd), dtype).view(B, T, nkv, hd)
    angle = torch.randn(table_batch, T, hd // 2, dtype=torch.float64)
    cos, sin = torch.cat([angle.cos()] * 2, -1).to(dtype), torch.cat([angle.sin()] * 2, -1).to(dtype)
    grads = [torch.randn(B, h, T, hd, dtype=torch.float64).to(out_dtype or dtype) for h in (nh, nkv)]
    outs, gr = _run(lambda a, b: kernels.rope(a, b, cos, sin, out_dtype), (q, k), grads)
    assert type(kernels.rope(q, k, cos, sin, out_dtype)[0].grad_fn).__name__ == "RopeFunctionBackward"
    eouts, egr = _run(lambda a, b: reference.rope(a, b, cos.double(), sin.double()), _exact((q, k)),
                      [g.double() for g in grads])
    low = BF16 if BF16 in (dtype, out_dtype) else F32
    for what, a, e in zip(("q", "k", "grad q", "grad k"), outs + gr, eouts + egr):
        assert a.shape == e.shape, what
        assert_close(a, e, low, what)
    assert outs[0].dtype == (out_dtype or dtype) and gr[0].dtype == dtype


def test_rope_fallback_and_forced_native_errors(monkeypatch):
    q, k = torch.randn(1, 5, 2, 8, requires_grad=True), torch.randn(1, 5, 1, 8, requires_grad=True)
    cos, sin = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    monkeypatch.setenv("ENGINE_KERNELS", "torch")
    out = kernels.rope(q, k, cos, sin)
    assert "Rope" not in type(out[0].grad_fn).__name__
    monkeypatch.delenv("ENGINE_KERNELS")
    with pytest.raises(RuntimeError, match="need q .B, T, nh, hd."):
        kernels.rope(q, k, cos[:, :4], sin[:, :4], backend="native")
    with torch.no_grad(), pytest.raises(RuntimeError, match="no autograd"):
        kernels.rope(q, k, cos, sin, backend="native")
