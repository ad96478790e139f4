"""engine.model.attention: chunked soft-capped / scaled / sliding-window attention vs a float64 eager
reference (transformers' eager_attention_forward written out), forward and backward, and in whole models."""
import pytest
import torch

from engine import Transformer
from engine.model import attention
from engine.model.attention import attend
from tests.hf_models import save_hf_model


def eager(q, k, v, mask, scale, softcap):
    """transformers' eager attention in float64: repeat kv, scale, cap, mask, softmax."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1) @ v


def causal(T, S, window=None, batch=None):
    q_pos = torch.arange(S - T, S)[:, None]
    k_pos = torch.arange(S)[None]
    m = k_pos <= q_pos
    return m & (k_pos > q_pos - window) if window else m


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("T,S", [(37, 37), (11, 50), (1, 23)], ids=["prefill", "cached", "decode"])
@pytest.mark.parametrize("given_mask", [False, True], ids=["causal", "mask"])
def test_chunked_matches_float64_eager(softcap, window, T, S, given_mask):
    torch.manual_seed(0)
    B, nh, nkv, hd = 2, 6, 2, 8
    q, k, v = (torch.randn(B, h, n, hd, dtype=torch.float64) * 2 for h, n in ((nh, T), (nkv, S), (nkv, S)))
    mask = causal(T, S, window)
    if given_mask:  # packed documents: the first 5 keys are another document for the later queries
        mask = mask.clone().expand(B, 1, T, S).clone()
        mask[1, :, -3:, :5] = False
    # the module's contract: mask None only for plain causal (T == S) or one query
    passed = mask if (given_mask or window or (T != S and T > 1)) else None
    scale = 0.3
    ref = leaves(q, k, v)
    want = eager(*ref, mask if mask.dim() == 4 else mask, scale, softcap)
    ours = leaves(*(t.float() for t in (q, k, v)))
    got = attend(*ours, passed, scale=scale, softcap=softcap, window=window, chunk=4)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)
    g = torch.randn_like(want)
    want.backward(g)
    got.backward(g.float())
    for name, a, b in zip("qkv", ours, ref):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=0, atol=5e-5, msg=f"grad {name}")


def test_bf16_chunked_stays_close_to_float64():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 29, 16), torch.randn(1, 2, 29, 16), torch.randn(1, 2, 29, 16)
    want = eager(q.double(), k.double(), v.double(), causal(29, 29), 0.25, 2.0)
    got = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, scale=0.25, softcap=2.0, chunk=8)
    assert got.dtype == torch.bfloat16 and (got.double() - want).abs().max() < 0.03  # bf16: ~3 digits


def test_sliding_window_chunks_read_only_the_window(monkeypatch):
    """A sliding layer at long T: each query chunk reads at most chunk + window - 1 keys, not all S."""
    seen = []
    real = attention.kernels.attention

    def spy(q, k, v, mask):
        seen.append(k.shape[2])
        return real(q, k, v, mask)

    monkeypatch.setattr(attention.kernels, "attention", spy)
    T, window, chunk = 300, 16, 32
    q, k, v = torch.randn(1, 2, T, 8), torch.randn(1, 2, T, 8), torch.randn(1, 2, T, 8)
    got = attend(q, k, v, causal(T, T, window), window=window, chunk=chunk)
    assert max(seen) <= chunk + window - 1 and len(seen) == -(-T // chunk)
    want = eager(q.double(), k.double(), v.double(), causal(T, T, window), 8 ** -0.5, None)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "smollm3"])
def test_small_chunks_keep_model_parity(tmp_path, monkeypatch, family):
    """Chunks smaller than the window and the sequence (soft-capped, scaled and plain sliding layers)."""
    monkeypatch.setattr(attention, "CHUNK", 4)
    hf = save_hf_model(family, tmp_path)
    model = Transformer.from_pretrained(tmp_path)
    ids = torch.randint(0, 211, (2, 37))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-4)
