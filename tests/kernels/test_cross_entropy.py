"""kernels.cross_entropy: native kernel vs float64 reference, vs the torch fallback, vs F.cross_entropy."""
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import reference

from .conftest import assert_close, needs_cuda, needs_native

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# V not a multiple of any vector width, N = 1, a large row, a row count not divisible by threads.
SHAPES = [(1, 7), (5, 17), (33, 1000), (2, 32001), (17, 4099)]


def make(n, v, dtype, ignore_frac=0.25, scale=3.0, device="cpu"):
    logits = (torch.randn(n, v, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    targets = torch.randint(0, v, (n,), device=device)
    targets[torch.rand(n, device=device) < ignore_frac] = -100
    return logits, targets


def run(fn, logits, targets, grad_out=None, **kw):
    """loss and d(loss)/d(logits) of fn on a fresh leaf copy of logits."""
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, targets, **kw)
    loss.backward(grad_out if grad_out is not None else torch.ones_like(loss))
    return loss.detach(), x.grad


def expected(logits, targets, grad_out=None, **kw):
    return run(reference.cross_entropy, logits.double(), targets,
               grad_out.double() if grad_out is not None else None, **kw)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_native_matches_float64_reference(n, v, dtype, reduction):
    logits, targets = make(n, v, dtype)
    grad_out = torch.rand(n, dtype=dtype) + 0.5 if reduction == "none" else None
    loss, grad = run(kernels.cross_entropy, logits, targets, grad_out, reduction=reduction, backend="native")
    loss64, grad64 = expected(logits, targets, grad_out, reduction=reduction)
    assert loss.dtype == dtype and grad.dtype == dtype
    assert_close(loss, loss64, dtype, "loss")
    assert_close(grad, grad64, dtype, "grad")


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [dict(label_smoothing=0.1), dict(z_loss=1e-3), dict(softcap=15.0),
                                     dict(label_smoothing=0.2, z_loss=1e-4, softcap=30.0)])
def test_native_options_match_float64_reference(dtype, options):
    logits, targets = make(9, 1531, dtype, scale=8.0)
    loss, grad = run(kernels.cross_entropy, logits, targets, backend="native", **options)
    loss64, grad64 = expected(logits, targets, **options)
    assert_close(loss, loss64, dtype, "loss")
    assert_close(grad, grad64, dtype, "grad")


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_native_matches_fallback(dtype):
    logits, targets = make(20, 3001, dtype)
    loss_n, grad_n = run(kernels.cross_entropy, logits, targets, backend="native", label_smoothing=0.05)
    loss_t, grad_t = run(kernels.cross_entropy, logits, targets, backend="torch", label_smoothing=0.05)
    assert_close(loss_n, loss_t.double(), dtype, "loss")
    assert_close(grad_n, grad_t.double(), dtype, "grad")


@pytest.mark.parametrize("backend", [None, "torch"])
@pytest.mark.parametrize("options", [{}, dict(label_smoothing=0.1), dict(reduction="sum"), dict(reduction="none")])
def test_matches_torch_cross_entropy(backend, options):
    logits, targets = make(40, 997, torch.float32)
    loss, grad = run(kernels.cross_entropy, logits, targets, backend=backend, **options)
    loss_ref, grad_ref = run(F.cross_entropy, logits, targets, **options)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("backend", [None, "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_matches_torch(backend, reduction):
    """Every target ignored: mean is 0/0 = NaN (as torch), sum is 0, gradients are all 0."""
    logits = torch.randn(4, 50)
    targets = torch.full((4,), -100)
    loss, grad = run(kernels.cross_entropy, logits, targets, reduction=reduction, backend=backend)
    loss_ref, grad_ref = run(F.cross_entropy, logits, targets, reduction=reduction)
    torch.testing.assert_close(loss, loss_ref, equal_nan=True)
    assert torch.equal(grad, torch.zeros_like(grad)) and torch.equal(grad_ref, grad)


@pytest.mark.parametrize("backend", [None, "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_logits_near_1e4(backend, dtype):
    logits = (torch.rand(6, 2003, dtype=torch.float64) * 2e4 - 1e4).to(dtype)
    logits[:, 7] = 1e4  # ties at the max
    targets = torch.tensor([7, 0, 2002, -100, 5, 7])
    loss, grad = run(kernels.cross_entropy, logits, targets, reduction="none", backend=backend)
    loss64, grad64 = expected(logits, targets, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_close(loss, loss64, dtype, "loss")
    assert_close(grad, grad64, dtype, "grad")


@pytest.mark.parametrize("backend", [None, "torch"])
def test_inf_and_nan_behave_like_torch(backend):
    """Documented: a NaN or +inf logit makes its row's loss and gradient NaN (as torch);
    -inf logits are masked tokens (p = 0); a -inf target logit gives loss +inf. One deliberate
    difference: an ignored row gets a zero gradient even if its logits are NaN (torch: NaN)."""
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([[inf, 0.0, 1.0], [0.0, -inf, 1.0], [nan, 0.0, 0.0], [0.0, -inf, 2.0], [nan, 1.0, 2.0]])
    targets = torch.tensor([1, 1, 1, 2, -100])
    loss, grad = run(kernels.cross_entropy, logits, targets, reduction="none", backend=backend)
    loss_ref, grad_ref = run(F.cross_entropy, logits, targets, reduction="none")
    torch.testing.assert_close(loss, loss_ref, equal_nan=True)
    torch.testing.assert_close(grad[:4], grad_ref[:4], equal_nan=True)
    assert torch.isnan(grad_ref[4]).all() and torch.equal(grad[4], torch.zeros(3))


@needs_native
def test_bf16_true_class_gradient_keeps_precision():
    """Confident rows have p_t close to 1; p_t - 1 must be formed in fp32 (Liger #1329), not as
    bf16(p_t) - 1, which rounds to 0 or a multiple of 2^-8."""
    n, v = 8, 4096
    logits = torch.zeros(n, v, dtype=torch.bfloat16)
    targets = torch.arange(n)
    logits[targets, targets] = torch.linspace(9.0, 14.0, n).to(torch.bfloat16)
    _, grad = run(kernels.cross_entropy, logits, targets, reduction="sum", backend="native")
    _, grad64 = expected(logits, targets, reduction="sum")
    true_class, true_class64 = grad[targets, targets].double(), grad64[targets, targets]
    assert (true_class64.abs() < 0.5).all()  # really p_t close to 1
    torch.testing.assert_close(true_class, true_class64, rtol=2 ** -8, atol=0)


@needs_native
@pytest.mark.parametrize("shift", [0.0, 40.0, -1e4])
def test_bf16_logits_keep_an_fp32_accurate_loss(shift):
    """bf16 rows use a shorter exp than fp32 rows (kernels/csrc/cross_entropy.cpp); the per-row
    losses stay fp32-accurate, which a bf16 training loop's fp32 loss relies on. Read as fp32
    through linear_cross_entropy with an identity head (its GEMM reproduces the logits exactly)."""
    n, v = 37, 301
    logits, targets = make(n, v, torch.bfloat16, ignore_frac=0.0, scale=4.0)
    logits = (logits.double() + shift).to(torch.bfloat16)
    eye = torch.eye(v, dtype=torch.bfloat16)
    rows = kernels.linear_cross_entropy(logits, eye, targets, reduction="none", out_dtype=torch.float32,
                                        backend="native")
    rows64 = reference.cross_entropy(logits.double(), targets, reduction="none")
    torch.testing.assert_close(rows.double(), rows64, rtol=2e-6, atol=2e-6)


@needs_native
def test_gradient_is_scaled_by_non_uniform_grad_output():
    logits, targets = make(6, 300, torch.float32, ignore_frac=0)
    grad_out = torch.tensor([0.0, 1.0, -2.0, 3.5, 1e-3, 7.0])
    _, grad = run(kernels.cross_entropy, logits, targets, grad_out, reduction="none", backend="native")
    _, grad64 = expected(logits, targets, grad_out, reduction="none")
    assert_close(grad, grad64, torch.float32, "grad")
    # A non-1 scalar upstream gradient for mean.
    _, grad = run(kernels.cross_entropy, logits, targets, torch.tensor(0.3), backend="native")
    _, grad64 = expected(logits, targets, torch.tensor(0.3))
    assert_close(grad, grad64, torch.float32, "grad")


@needs_native
def test_logits_are_overwritten_only_with_inplace_true():
    hidden = torch.randn(8, 16, requires_grad=True)
    weight = torch.randn(100, 16)
    targets = torch.randint(0, 100, (8,))
    F.cross_entropy(hidden @ weight.T, targets).backward()
    grad_ref, hidden.grad = hidden.grad, None
    kernels.cross_entropy(hidden @ weight.T, targets, inplace=True).backward()  # temporary: overwritten
    torch.testing.assert_close(hidden.grad, grad_ref)
    hidden.grad = None
    logits = hidden @ weight.T
    before = logits.detach().clone()
    kernels.cross_entropy(logits, targets).backward()  # default inplace=False: left alone
    assert torch.equal(logits.detach(), before)
    torch.testing.assert_close(hidden.grad, grad_ref)
    logits = hidden @ weight.T
    kernels.cross_entropy(logits.view(8, 100), targets).backward()  # a view: left alone too
    assert torch.equal(logits.detach(), before)
    with pytest.raises(ValueError, match="inplace must be True or False"):
        kernels.cross_entropy(logits, targets, inplace=None)


@needs_native
def test_forced_inplace_overwrites_and_guards_saved_tensors():
    hidden = torch.randn(4, 8, requires_grad=True)
    logits = hidden @ torch.randn(8, 30)
    loss = kernels.cross_entropy(logits, torch.randint(0, 30, (4,)), inplace=True)
    loss.backward()
    assert hidden.grad is not None
    capped = torch.tanh(hidden @ torch.randn(8, 30))  # tanh saves its output for backward
    loss = kernels.cross_entropy(capped, torch.randint(0, 30, (4,)), inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with pytest.raises(ValueError, match="leaf"):
        kernels.cross_entropy(torch.randn(2, 5, requires_grad=True), torch.zeros(2, dtype=torch.long), inplace=True)


@needs_native
def test_threads_do_not_change_results():
    logits, targets = make(37, 2111, torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(kernels.cross_entropy, logits, targets, backend="native")
        torch.set_num_threads(max(2, before))
        many = run(kernels.cross_entropy, logits, targets, backend="native")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[1], many[1])


@needs_native
def test_strided_rows_and_no_grad():
    big = torch.randn(10, 600)
    logits = big[:, :513]  # row stride 600
    targets = torch.randint(0, 513, (10,))
    loss, grad = run(kernels.cross_entropy, logits, targets, backend="native")
    loss64, grad64 = expected(logits, targets)
    assert_close(grad, grad64, torch.float32, "grad")
    with torch.no_grad():
        assert_close(kernels.cross_entropy(logits, targets, backend="native"), loss64, torch.float32, "loss")


@needs_native
def test_second_backward_is_refused():
    x = torch.randn(3, 10, requires_grad=True)
    loss = kernels.cross_entropy(x * 1.0, torch.tensor([1, 2, 3]), backend="native")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_errors_name_the_argument():
    x = torch.randn(8, 10)
    with pytest.raises(ValueError, match=r"kernels.cross_entropy: targets must be int64 of shape \[N\]=\[8\], got torch.int32 \[8\]"):
        kernels.cross_entropy(x, torch.zeros(8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"targets must be in \[0, V\)=\[0, 10\) or ignore_index=-100, got 10"):
        kernels.cross_entropy(x, torch.full((8,), 10))
    with pytest.raises(ValueError, match="logits must be a floating tensor"):
        kernels.cross_entropy(torch.randn(8), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction must be one of"):
        kernels.cross_entropy(x, torch.zeros(8, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match="backend must be None, 'torch' or 'native'"):
        kernels.cross_entropy(x, torch.zeros(8, dtype=torch.long), backend="cuda")


def test_forced_native_lists_every_reason(monkeypatch):
    monkeypatch.setenv("ENGINE_KERNELS", "torch")
    with pytest.raises(RuntimeError) as err:
        kernels.cross_entropy(torch.randn(2, 5, dtype=torch.float64), torch.zeros(2, dtype=torch.long), backend="native")
    assert "(1)" in str(err.value) and "ENGINE_KERNELS=torch" in str(err.value)
    assert "torch.float64 is not supported natively" in str(err.value)


def test_env_forces_fallback(monkeypatch):
    monkeypatch.setenv("ENGINE_KERNELS", "torch")
    x = torch.randn(3, 10, requires_grad=True)
    loss = kernels.cross_entropy(x, torch.tensor([1, 2, 3]))
    assert "CrossEntropyFunction" not in type(loss.grad_fn).__name__
    assert kernels.info()["native"] is False and "ENGINE_KERNELS" in kernels.info()["reason"]


def test_float64_falls_back_to_exact_reference():
    logits, targets = make(5, 40, torch.float64)
    loss, grad = run(kernels.cross_entropy, logits, targets)
    torch.testing.assert_close((loss, grad), run(F.cross_entropy, logits, targets))


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [{}, dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0), dict(reduction="none")])
def test_cuda_matches_float64_reference(dtype, options):
    logits, targets = make(33, 32001, dtype, device="cuda")
    loss, grad = run(kernels.cross_entropy, logits, targets, backend="native", **options)
    loss64, grad64 = expected(logits, targets, **options)
    assert_close(loss.cpu(), loss64.cpu(), dtype, "loss")
    assert_close(grad.cpu(), grad64.cpu(), dtype, "grad")
