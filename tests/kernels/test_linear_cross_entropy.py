"""kernels.linear_cross_entropy: chunked loss/gradients vs the materializing float64 reference."""
import pytest
import torch

import kernels
import torch.nn.functional as F
from kernels import reference

from .conftest import assert_close, needs_cuda, needs_native

BACKENDS = [pytest.param("native", marks=needs_native), "torch"]


def make(n, d, v, dtype, bias=True, ignore_frac=0.2, device="cpu"):
    hidden = torch.randn(n, d, dtype=torch.float64).to(device=device, dtype=dtype)
    weight = (torch.randn(v, d, dtype=torch.float64) / d**0.5).to(device=device, dtype=dtype)
    b = torch.randn(v, dtype=torch.float64).to(device=device, dtype=dtype) if bias else None
    targets = torch.randint(0, v, (n,), device=device)
    targets[torch.rand(n, device=device) < ignore_frac] = -100
    return hidden, weight, b, targets


def run(fn, hidden, weight, bias, targets, grad_out=None, **kw):
    """loss and grads (hidden, weight, bias) on fresh leaf copies."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    loss = fn(*leaves[:2], targets, leaves[2], **kw)
    loss.backward(grad_out if grad_out is not None else torch.ones_like(loss))
    return loss.detach(), [t.grad if t is not None else None for t in leaves]


def expected(hidden, weight, bias, targets, grad_out=None, **kw):
    as64 = [t.double() if t is not None else None for t in (hidden, weight, bias)]
    return run(reference.linear_cross_entropy, *as64, targets,
               grad_out.double() if grad_out is not None else None, **kw)


def check(got, want, dtype):
    assert_close(got[0], want[0], dtype, "loss")
    for name, g, w in zip(("hidden", "weight", "bias"), got[1], want[1]):
        assert (g is None) == (w is None), name
        if g is not None:
            assert g.dtype == dtype
            assert_close(g, w, dtype, f"grad_{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d,v,chunk", [(1, 8, 33, None), (13, 16, 257, 4), (64, 32, 1000, 7), (50, 24, 3001, None)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_float64_reference(backend, dtype, n, d, v, chunk, reduction):
    inputs = make(n, d, v, dtype)
    got = run(kernels.linear_cross_entropy, *inputs, reduction=reduction, chunk_size=chunk, backend=backend)
    check(got, expected(*inputs, reduction=reduction), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reduction_none_with_non_uniform_upstream_gradient(backend, dtype):
    """The case Liger #678 got wrong: per-row grad_output must weight each row's contribution to
    grad_weight/grad_bias, not just be applied to grad_hidden."""
    inputs = make(23, 16, 501, dtype)
    grad_out = (torch.randn(23, dtype=torch.float64) * 3).to(dtype)
    got = run(kernels.linear_cross_entropy, *inputs, grad_out, reduction="none", chunk_size=5, backend=backend)
    check(got, expected(*inputs, grad_out, reduction="none"), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scalar_upstream_gradient_and_no_bias(backend):
    inputs = make(30, 16, 333, torch.float32, bias=False)
    got = run(kernels.linear_cross_entropy, *inputs, torch.tensor(-2.5), chunk_size=8, backend=backend)
    check(got, expected(*inputs, torch.tensor(-2.5)), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_only_grads_hidden(backend):
    hidden, weight, _, targets = make(12, 8, 100, torch.float32, bias=False)
    h = hidden.clone().requires_grad_()
    kernels.linear_cross_entropy(h, weight, targets, backend=backend).backward()
    h64 = hidden.double().requires_grad_()
    reference.linear_cross_entropy(h64, weight.double(), targets).backward()
    assert_close(h.grad, h64.grad, torch.float32, "grad_hidden")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_matches_torch(backend):
    hidden, weight, bias, _ = make(6, 8, 50, torch.float32)
    targets = torch.full((6,), -100)
    loss, grads = run(kernels.linear_cross_entropy, hidden, weight, bias, targets, chunk_size=4, backend=backend)
    assert torch.isnan(loss)  # 0/0, as F.cross_entropy
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@needs_native
def test_native_and_fallback_agree_with_custom_ignore_index():
    inputs = list(make(40, 16, 700, torch.float32, ignore_frac=0))
    inputs[3][::3] = 5  # class 5 is the ignored one here
    got = run(kernels.linear_cross_entropy, *inputs, ignore_index=5, chunk_size=9, backend="native")
    want = run(kernels.linear_cross_entropy, *inputs, ignore_index=5, chunk_size=9, backend="torch")
    check(got, [want[0].double(), [g.double() for g in want[1]]], torch.float32)


def test_errors_name_the_argument():
    hidden, weight, bias, targets = make(4, 8, 20, torch.float32)
    with pytest.raises(ValueError, match=r"weight must be \[V, d=\(8\)\]"):
        kernels.linear_cross_entropy(hidden, weight.T, targets)
    with pytest.raises(ValueError, match=r"bias must be None or \[V\]=\[20\]"):
        kernels.linear_cross_entropy(hidden, weight, targets, bias[:5])
    with pytest.raises(ValueError, match=r"targets must be int64 of shape \[N\]=\[4\]"):
        kernels.linear_cross_entropy(hidden, weight, targets[:2])
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        kernels.linear_cross_entropy(hidden, weight, targets, chunk_size=0)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_float64_reference(dtype):
    inputs = make(100, 64, 5003, dtype, device="cuda")
    grad_out = torch.rand(100, device="cuda", dtype=dtype)
    got = run(kernels.linear_cross_entropy, *inputs, grad_out, reduction="none", chunk_size=32, backend="native")
    want = expected(*inputs, grad_out, reduction="none")
    check([got[0].cpu(), [g.cpu() for g in got[1]]], [want[0].cpu(), [g.cpu() for g in want[1]]], dtype)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_bf16_inputs_can_return_an_fp32_loss_with_the_same_gradients(backend):
    if backend == "native" and not kernels.info()["native"]:
        pytest.skip("native kernels not built")
    torch.manual_seed(0)
    h = torch.randn(300, 48, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(517, 48, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 517, (300,))
    loss32 = kernels.linear_cross_entropy(h, w, t, reduction="sum", backend=backend, out_dtype=torch.float32)
    assert loss32.dtype == torch.float32
    ref = F.cross_entropy((h.double() @ w.double().T), t, reduction="sum")
    assert float(loss32) == pytest.approx(float(ref), rel=1e-3)  # bf16 would keep ~3 digits of a sum this size
    loss32.backward()
    g32 = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    kernels.linear_cross_entropy(h, w, t, reduction="sum", backend=backend).backward()
    assert torch.equal(g32[0], h.grad) and torch.equal(g32[1], w.grad)


def test_cpu_logits_buffer_is_reused_across_calls_until_released():
    from kernels.ops import linear_cross_entropy as fused_linear_ce

    hidden, weight, bias, targets = make(37, 16, 301, torch.float32)
    kernels.release_workspace()
    run(kernels.linear_cross_entropy, hidden, weight, bias, targets)
    first = fused_linear_ce._workspace.buf
    assert first is not None and first.numel() >= 37 * 301
    run(kernels.linear_cross_entropy, hidden[:20], weight, bias, targets[:20])  # fewer rows: same buffer
    assert fused_linear_ce._workspace.buf is first
    kernels.release_workspace()
    assert fused_linear_ce._workspace.buf is None
    check(run(kernels.linear_cross_entropy, hidden, weight, bias, targets), expected(hidden, weight, bias, targets),
          torch.float32)
    kernels.release_workspace()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_softcap_matches_float64_reference(backend, dtype, reduction):
    """Gemma 2's final-logit cap inside the chunks: logits scaled up so tanh(logits / 2) really bends."""
    hidden, weight, bias, targets = make(37, 16, 301, dtype)
    hidden = (hidden.double() * 4).to(dtype)
    grad_out = torch.rand(37, dtype=dtype) if reduction == "none" else None
    got = run(kernels.linear_cross_entropy, hidden, weight, bias, targets, grad_out, reduction=reduction,
              chunk_size=5, backend=backend, softcap=2.0)
    want = expected(hidden, weight, bias, targets, grad_out, reduction=reduction, softcap=2.0)
    check(got, want, dtype)
    uncapped = expected(hidden, weight, bias, targets, grad_out, reduction=reduction)
    assert (want[0] - uncapped[0]).abs().max() > 0.1  # the cap changes the loss: the test can tell


def test_softcap_must_be_positive():
    hidden, weight, bias, targets = make(4, 8, 11, torch.float32)
    with pytest.raises(ValueError, match="softcap must be None or > 0"):
        kernels.linear_cross_entropy(hidden, weight, targets, softcap=0.0)
