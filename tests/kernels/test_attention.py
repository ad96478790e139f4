"""kernels.attention: the grouped path against SDPA in float64, gradients included, and when it runs."""
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import reference
from kernels.ops.attention import MAX_KEYS

from .conftest import assert_close


def _qkv(B, nh, nkv, T, S, hd, dtype=torch.float64):
    make = lambda h, n: torch.randn(B, h, n, hd, dtype=torch.float64).to(dtype).requires_grad_()  # noqa: E731
    return make(nh, T), make(nkv, S), make(nkv, S)


def _masks(B, T):
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    window = causal & ~torch.ones(T, T, dtype=torch.bool).tril(-4)  # sliding window of 4
    doc = torch.arange(T) * 3 // T  # three packed documents per row, shifted in row 1
    doc = torch.stack([doc, (doc + (torch.arange(T) >= 2)).clamp(max=2)])[:B]
    packed = causal & (doc[:, :, None] == doc[:, None, :])[:, None]  # (B, 1, T, T)
    return {"causal": None, "window": window, "packed": packed}


def _grads(fn, q, k, v, grad_y):
    y = fn(q, k, v)
    return (y.detach(), *torch.autograd.grad(y, (q, k, v), grad_y))


@pytest.mark.parametrize("mask_kind", ["causal", "window", "packed"])
@pytest.mark.parametrize("nh,nkv", [(6, 2), (3, 3), (4, 1)])
def test_grouped_attention_matches_sdpa_in_float64(nh, nkv, mask_kind):
    B, T, hd = 2, 13, 24
    q, k, v = _qkv(B, nh, nkv, T, T, hd)
    mask = _masks(B, T)[mask_kind]
    grad_y = torch.randn(B, nh, T, hd, dtype=torch.float64)
    expected = _grads(lambda *a: reference.attention(*a, mask), q, k, v, grad_y)
    actual = _grads(lambda *a: kernels.attention(*a, mask, backend="native"), q, k, v, grad_y)
    for what, a, e in zip(("y", "dq", "dk", "dv"), actual, expected):
        assert_close(a, e, torch.float64, what)


def test_bf16_training_takes_the_grouped_path_and_stays_close_to_float64():
    B, nh, nkv, T, hd = 2, 8, 4, 37, 32
    q, k, v = _qkv(B, nh, nkv, T, T, hd, torch.bfloat16)
    grad_y = torch.randn(B, nh, T, hd).bfloat16()
    y = kernels.attention(q, k, v)
    assert type(y.grad_fn).__name__ == "GroupedAttentionBackward"
    actual = (y.detach(), *torch.autograd.grad(y, (q, k, v), grad_y))
    exact = _grads(lambda *a: reference.attention(*a), *(t.detach().double().requires_grad_() for t in (q, k, v)),
                   grad_y.double())
    for what, a, e in zip(("y", "dq", "dk", "dv"), actual, exact):
        # scores and probabilities are rounded to bf16: a few bf16 ulps of the largest value
        torch.testing.assert_close(a.double(), e, rtol=0, atol=4e-2 * float(e.abs().max()), msg=what)


def test_grouped_path_under_autocast_casts_like_sdpa():
    q, k, v = _qkv(1, 4, 2, 9, 9, 16, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kernels.attention(q, k, v)
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert y.dtype == expected.dtype == torch.bfloat16
    assert type(y.grad_fn).__name__ == "GroupedAttentionBackward"
    torch.testing.assert_close(y.float(), expected.float(), rtol=0, atol=3e-2)


@pytest.mark.parametrize("case", ["fp32", "no_grad", "kv_cache", "empty_row", "env_torch", "long"])
def test_sdpa_runs_where_the_grouped_path_should_not(case, monkeypatch):
    dtype = torch.float32 if case == "fp32" else torch.bfloat16
    T = S = MAX_KEYS + 1 if case == "long" else 9
    S = 12 if case == "kv_cache" else S
    q, k, v = _qkv(1, 4, 2, T, S, 16, dtype)
    mask = None
    if case == "empty_row":
        mask = torch.ones(9, 9, dtype=torch.bool).tril()
        mask[3] = False
    if case == "env_torch":
        monkeypatch.setenv("ENGINE_KERNELS", "torch")
    with torch.set_grad_enabled(case != "no_grad"):
        y = kernels.attention(q, k, v, mask)
        if case != "no_grad":
            assert "GroupedAttention" not in type(y.grad_fn).__name__
        torch.testing.assert_close(y, reference.attention(q, k, v, mask), rtol=0, atol=0)


def test_forced_grouped_path_lists_every_reason():
    q, k, v = _qkv(1, 4, 3, 9, 12, 16)
    with pytest.raises(RuntimeError, match=r"\(1\) need q .*\(2\) causal attention with T=9"):
        kernels.attention(q, k, v, backend="native")
