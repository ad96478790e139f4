"""kernels.glu: the fused act(gate) * up against the float64 reference and torch's own bf16 ops, gradients included."""
import pytest
import torch

import kernels
from kernels import reference

from .conftest import assert_close, needs_native

F32, BF16 = torch.float32, torch.bfloat16


def _leaf(shape, dtype, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).requires_grad_()


def _run(fn, gate, up, grad_out):
    y = fn(gate, up)
    return (y.detach(), *torch.autograd.grad(y, (gate, up), grad_out))


@needs_native
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_glu_matches_float64(activation, dtype):
    # 3 * 5 * 700 elements: several OpenMP blocks and a ragged tail; scale 4 reaches tanh/sigmoid saturation
    gate, up = _leaf((3, 5, 700), dtype, 4.0), _leaf((3, 5, 700), dtype)
    grad_y = torch.randn(gate.shape, dtype=torch.float64).to(dtype)
    y, gg, gu = _run(lambda g, u: kernels.glu(g, u, activation), gate, up, grad_y)
    assert type(kernels.glu(gate, up, activation).grad_fn).__name__ == "GluFunctionBackward"
    exact = [t.detach().double().requires_grad_() for t in (gate, up)]
    ey, egg, egu = _run(lambda g, u: reference.glu(g, u, activation), *exact, grad_y.double())
    for what, a, e in (("y", y, ey), ("grad gate", gg, egg), ("grad up", gu, egu)):
        assert a.dtype == dtype, what
        assert_close(a, e, dtype, what)


@needs_native
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_glu_bf16_rounds_where_torch_rounds(activation):
    """bf16 under autocast: the kernel rounds act(gate) before the product as torch's two ops do, so it
    differs from them by at most one bf16 step, in a small fraction of elements (its own exp/tanh), or by
    fp32's cancellation in 1 + tanh(z) where act(gate) is ~0 (torch cancels there too, differently)."""
    gate, up = _leaf((64, 512), BF16, 3.0), _leaf((64, 512), BF16)
    grad_y = torch.randn(gate.shape).to(BF16)
    fused = _run(lambda g, u: kernels.glu(g, u, activation), gate, up, grad_y)
    torch_ops = _run(lambda g, u: reference.glu(g, u, activation), gate, up, grad_y)
    for what, a, e in zip(("y", "grad gate", "grad up"), fused, torch_ops):
        step = e.float().abs() * 2.0 ** -7 + 1e-6 * float(e.float().abs().max())  # one bf16 ulp of torch's
        assert bool(((a.float() - e.float()).abs() <= step).all()), what
        assert float((a != e).float().mean()) < 0.05, what


def test_glu_is_the_torch_ops_without_autograd_or_for_other_activations():
    gate, up = torch.randn(4, 16), torch.randn(4, 16)
    for activation in ("silu", "gelu_tanh", "gelu", "relu"):
        assert torch.equal(kernels.glu(gate, up, activation), reference.glu(gate, up, activation))
    gate.requires_grad_()
    y = kernels.glu(gate, up, "gelu")  # erf GELU: torch's ops even in training
    assert type(y.grad_fn).__name__ == "MulBackward0"
    with pytest.raises(ValueError, match="activation"):
        kernels.glu(gate, up, "tanh")


@needs_native
def test_glu_forced_native_lists_why_it_cannot_run():
    gate, up = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="share a dtype"):
        kernels.glu(gate, up, "silu", backend="native")
