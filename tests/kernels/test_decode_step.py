"""kernels.decode_plan (kernels/csrc/decode_step.cpp) against a float64 reference of one decode step, on
fresh random weights of odd sizes, rows at different cache positions, a sliding window, biases, q/k
norms, gated and plain MLPs. fp32 within 1e-4 relative to the largest logit (measured ~1e-6); bf16
within 5e-2 (the step rounds every intermediate to bf16 as the eager model does).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import kernels

pytestmark = pytest.mark.skipif(not kernels.info()["native"], reason="kernels._C is not built")

C, NH, NKV, HD, FF, V, L, MAXLEN, EPS = 70, 6, 2, 10, 51, 97, 2, 24, 1e-5
ACT = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


def _weights(gated: bool, bias: bool, qk_norm: bool, g: torch.Generator):
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 0.3  # noqa: E731
    layers = []
    for _ in range(L):
        w = dict(attn_norm=1 + r(C), q=r(NH * HD, C), k=r(NKV * HD, C), v=r(NKV * HD, C), o=r(C, NH * HD),
                 mlp_norm=1 + r(C), gate=r(FF, C) if gated else None, up=r(FF, C), down=r(C, FF))
        w.update(bq=r(NH * HD) if bias else None, bk=r(NKV * HD) if bias else None, bv=r(NKV * HD) if bias else None,
                 bo=r(C) if bias else None, bg=r(FF) if bias and gated else None, bu=r(FF) if bias else None,
                 bd=r(C) if bias else None, q_norm=1 + r(HD) if qk_norm else None,
                 k_norm=1 + r(HD) if qk_norm else None)
        layers.append(w)
    return dict(embed=r(V, C), final_norm=1 + r(C), layers=layers)


def _rounded(W, dtype):
    r = lambda x: None if x is None else x.to(dtype).double()  # noqa: E731
    return dict(embed=r(W["embed"]), final_norm=r(W["final_norm"]),
                layers=[{k: r(v) for k, v in w.items()} for w in W["layers"]])


def _tables():
    inv = 1.0 / (10000 ** (torch.arange(0, HD, 2, dtype=torch.float64) / HD))
    f = torch.outer(torch.arange(MAXLEN, dtype=torch.float64), inv)
    emb = torch.cat([f, f], -1)
    return emb.cos(), emb.sin()


def _norm(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def _rope(x, c, s):
    x1, x2 = x.chunk(2, -1)
    return x * c + torch.cat([-x2, x1], -1) * s


def _reference(W, ids, pos, ck, cv, windows, act, cos, sin):
    """Float64: logits [B, V] and the caches with this step's k/v written."""
    ck, cv = ck.clone(), cv.clone()
    h = W["embed"][ids]  # (B, C)
    lin = lambda x, w, b: x @ w.T + (0 if b is None else b)  # noqa: E731
    for li, w in enumerate(W["layers"]):
        x = _norm(h, w["attn_norm"])
        q = lin(x, w["q"], w["bq"]).view(-1, NH, HD)
        k = lin(x, w["k"], w["bk"]).view(-1, NKV, HD)
        v = lin(x, w["v"], w["bv"]).view(-1, NKV, HD)
        if w["q_norm"] is not None:
            q, k = _norm(q, w["q_norm"]), _norm(k, w["k_norm"])
        ys = []
        for b, p in enumerate(pos.tolist()):
            qb, kb = _rope(q[b], cos[p], sin[p]), _rope(k[b], cos[p], sin[p])
            ck[li, b, :, p], cv[li, b, :, p] = kb, v[b]
            first = max(0, p - windows[li] + 1) if windows[li] else 0
            keys, vals = ck[li, b, :, first:p + 1], cv[li, b, :, first:p + 1]  # (nkv, S, hd)
            keys, vals = keys.repeat_interleave(NH // NKV, 0), vals.repeat_interleave(NH // NKV, 0)
            att = (qb[:, None] @ keys.transpose(1, 2) / math.sqrt(HD)).softmax(-1)  # (nh, 1, S)
            ys.append((att @ vals).reshape(-1))
        h = h + lin(torch.stack(ys), w["o"], w["bo"])
        x = _norm(h, w["mlp_norm"])
        u = lin(x, w["up"], w["bu"])
        a = act(lin(x, w["gate"], w["bg"])) * u if w["gate"] is not None else act(u)
        h = h + lin(a, w["down"], w["bd"])
    return _norm(h, W["final_norm"]) @ W["embed"].T, ck, cv


def _plan(W, ck, cv, windows, act, dtype, cos, sin):
    t = lambda x: None if x is None else x.to(dtype).contiguous()  # noqa: E731
    layers = [(t(w["attn_norm"]), t(w["q"]), t(w["k"]), t(w["v"]), t(w["bq"]), t(w["bk"]), t(w["bv"]), t(w["o"]),
               t(w["bo"]), t(w["q_norm"]), t(w["k_norm"]), t(w["mlp_norm"]), t(w["gate"]), t(w["up"]), t(w["down"]),
               t(w["bg"]), t(w["bu"]), t(w["bd"]), cos.float().contiguous(), sin.float().contiguous())
              for w in W["layers"]]
    embed = t(W["embed"])
    return kernels.decode_plan(embed, t(W["final_norm"]), embed, ck, cv, layers, windows, NH, EPS, 0.0, 0.0, 0.0,
                               HD**-0.5, act)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gated,bias,qk_norm,act", [(True, False, False, "silu"), (True, True, True, "gelu_tanh"),
                                                    (False, True, False, "relu")])
def test_decode_step_matches_float64_reference(dtype, tol, gated, bias, qk_norm, act):
    g = torch.Generator().manual_seed(1)
    W = _rounded(_weights(gated, bias, qk_norm, g), dtype)  # the reference sees the weights the kernel reads
    cos, sin = _tables()
    B, windows = 3, [0, 4]
    ck64 = torch.randn(L, B + 1, NKV, MAXLEN, HD, generator=g, dtype=torch.float64)  # earlier tokens: random
    cv64 = torch.randn(L, B + 1, NKV, MAXLEN, HD, generator=g, dtype=torch.float64)
    ck64, cv64 = ck64.to(dtype).double(), cv64.to(dtype).double()  # what the low-precision cache holds
    ids, pos = torch.tensor([5, 96, 0]), torch.tensor([0, 7, 19])
    ref, rk, rv = _reference(W, ids, pos, ck64, cv64, windows, ACT[act], cos, sin)
    ck, cv = ck64.to(dtype), cv64.to(dtype)
    logits = torch.empty(B, V, dtype=dtype)
    _plan(W, ck, cv, windows, act, dtype, cos, sin).step(ids, pos, logits, torch.get_num_threads())
    scale = ref.abs().max()
    assert float((logits.double() - ref).abs().max() / scale) < tol
    assert float((ck.double() - rk).abs().max() / rk.abs().max()) < tol  # k written (rotated) at each row's slot
    assert torch.equal(cv[:, B:], cv64[:, B:].to(dtype))  # the row past the batch is untouched


def test_plan_checks_every_tensor_once():
    g = torch.Generator().manual_seed(0)
    W = _weights(True, False, False, g)
    cos, sin = _tables()
    ck = torch.zeros(L, 1, NKV, MAXLEN, HD)
    W["layers"][1]["down"] = W["layers"][1]["down"][:, :-1]  # [C, F - 1]
    with pytest.raises(ValueError, match=r"layers\[1\]\.down_proj: expected a contiguous float32 \[70, 51\]"):
        _plan(W, ck, ck.clone(), [0, 0], "silu", torch.float32, cos, sin)
    with pytest.raises(ValueError, match="cache_v: expected a contiguous bfloat16"):
        _plan(W, ck.bfloat16(), ck, [0, 0], "silu", torch.bfloat16, cos, sin)
