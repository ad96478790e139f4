"""kernels.AdamW vs torch.optim.AdamW (+ clip_grad_norm_), and state_dict interchange."""
import copy

import pytest
import torch

import kernels

from .conftest import needs_cuda, needs_native

BACKENDS = [pytest.param("native", marks=needs_native), "torch"]
SHAPES = [(37, 19), (1000,), (3, 5, 7), (1,), (64, 129)]


def make_params(dtype=torch.float32, device="cpu"):
    return [torch.randn(s, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_() for s in SHAPES]


def set_grads(params, step, scale=1.0):
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g, dtype=torch.float64) * scale).to(device=p.device, dtype=p.dtype)


def groups(params, weight_decay):
    # Two groups with different hyperparameters, as a fine-tuning recipe would use.
    return [{"params": params[:2], "lr": 3e-3, "weight_decay": weight_decay},
            {"params": params[2:], "lr": 1e-3, "weight_decay": 0.0, "betas": (0.8, 0.95)}]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_torch_adamw_over_many_steps(backend, weight_decay):
    ours_p, torch_p = make_params(), None
    torch_p = [p.detach().clone().requires_grad_() for p in ours_p]
    ours = kernels.AdamW(groups(ours_p, weight_decay), eps=1e-6, backend=backend)
    ref = torch.optim.AdamW(groups(torch_p, weight_decay), eps=1e-6)
    for step in range(30):
        set_grads(ours_p, step)
        set_grads(torch_p, step)
        assert ours.step() is None  # no clipping -> no norm
        ref.step()
    for a, b in zip(ours_p, torch_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours_p, torch_p):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours.state[a][key], ref.state[b][key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_norm,grad_scale", [(1.0, 1.0), (1e3, 1.0), (0.5, 10.0)])
def test_clipping_matches_clip_grad_norm_then_adamw(backend, max_norm, grad_scale):
    ours_p = make_params()
    torch_p = [p.detach().clone().requires_grad_() for p in ours_p]
    ours = kernels.AdamW(ours_p, lr=1e-2, max_grad_norm=max_norm, backend=backend)
    ref = torch.optim.AdamW(torch_p, lr=1e-2)
    for step in range(20):
        set_grads(ours_p, step, grad_scale)
        set_grads(torch_p, step, grad_scale)
        norm = ours.step()
        ref_norm = torch.nn.utils.clip_grad_norm_(torch_p, max_norm)
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
        assert ours.last_grad_norm is norm
        ref.step()
    for a, b in zip(ours_p, torch_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trips_with_torch(backend):
    ours_p = make_params()
    torch_p = [p.detach().clone().requires_grad_() for p in ours_p]
    ours = kernels.AdamW(groups(ours_p, 0.05), backend=backend)
    for step in range(5):
        set_grads(ours_p, step)
        ours.step()
    # ours -> torch: same keys, torch continues from our state.
    ref = torch.optim.AdamW(groups(torch_p, 0.05))
    sd = ours.state_dict()
    assert sd["param_groups"][0].keys() == ref.state_dict()["param_groups"][0].keys()
    with torch.no_grad():
        for a, b in zip(ours_p, torch_p):
            b.copy_(a)
    ref.load_state_dict(copy.deepcopy(sd))
    _step_both_and_compare(ours, ours_p, ref, torch_p, range(5, 10))
    # torch -> ours: a fresh kernels.AdamW continues from torch's state.
    again = kernels.AdamW(groups(ours_p, 0.05), backend=backend)
    again.load_state_dict(copy.deepcopy(ref.state_dict()))  # torch shares tensors otherwise
    with torch.no_grad():
        for a, b in zip(ours_p, torch_p):
            a.copy_(b)
    _step_both_and_compare(again, ours_p, ref, torch_p, range(10, 15))
    assert all(again.state[a]["step"].item() == 15 for a in ours_p)


def _step_both_and_compare(ours, ours_p, ref, torch_p, steps) -> None:
    """Step both optimizers on the same grads, then their params must agree."""
    for step in steps:
        set_grads(ours_p, step)
        set_grads(torch_p, step)
        ours.step()
        ref.step()
    for a, b in zip(ours_p, torch_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_params_use_fp32_master_weights(backend):
    """bf16 params: the update goes to an fp32 master copy (so it matches fp32 AdamW given the
    same grads) and the param is its rounding."""
    ours_p = make_params(torch.bfloat16)
    fp32_p = [p.detach().float().requires_grad_() for p in ours_p]
    ours = kernels.AdamW(ours_p, lr=1e-3, max_grad_norm=1.0, backend=backend)
    ref = torch.optim.AdamW(fp32_p, lr=1e-3)
    for step in range(20):
        set_grads(ours_p, step)
        for a, b in zip(ours_p, fp32_p):
            b.grad = a.grad.float()
        ours.step()
        torch.nn.utils.clip_grad_norm_(fp32_p, 1.0)
        ref.step()
    for a, b in zip(ours_p, fp32_p):
        master = ours.state[a]["master_param"]
        assert master.dtype == torch.float32 and ours.state[a]["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(master, b.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(a.detach(), master.to(torch.bfloat16))
    # Updates far below bf16 resolution still accumulate in the master.
    assert any(not torch.equal(ours.state[a]["master_param"], a.detach().float()) for a in ours_p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_state_dict_keeps_fp32_master_and_loads_into_torch(backend):
    params = make_params(torch.bfloat16)
    ours = kernels.AdamW(params, backend=backend)
    set_grads(params, 0)
    ours.step()
    sd = copy.deepcopy(ours.state_dict())
    again = kernels.AdamW(params, backend=backend)
    again.load_state_dict(sd)
    for p in params:
        for key in ("exp_avg", "exp_avg_sq", "master_param"):
            assert again.state[p][key].dtype == torch.float32
            assert torch.equal(again.state[p][key], ours.state[p][key])
    ref = torch.optim.AdamW(params)
    ref.load_state_dict(sd)  # torch casts the moments to bf16 and ignores master_param
    set_grads(params, 1)
    ref.step()
    back = kernels.AdamW(params, backend=backend)
    back.load_state_dict(copy.deepcopy(ref.state_dict()))  # bf16 moments from torch are upcast; master seeded
    set_grads(params, 2)
    back.step()
    assert all(back.state[p]["exp_avg"].dtype == torch.float32 for p in params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_without_grad_are_skipped(backend):
    params = make_params()
    opt = kernels.AdamW(params, backend=backend)
    set_grads(params, 0)
    params[1].grad = None
    before = params[1].detach().clone()
    opt.step()
    assert torch.equal(params[1].detach(), before) and params[1] not in opt.state
    assert opt.state[params[0]]["step"].item() == 1


@needs_native
def test_native_and_fallback_agree_bitwise_close():
    a, b = make_params(), None
    b = [p.detach().clone().requires_grad_() for p in a]
    opt_a = kernels.AdamW(a, max_grad_norm=2.0, backend="native")
    opt_b = kernels.AdamW(b, max_grad_norm=2.0, backend="torch")
    for step in range(10):
        set_grads(a, step)
        set_grads(b, step)
        opt_a.step()
        opt_b.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_errors():
    with pytest.raises(ValueError, match="kernels.AdamW: lr out of range"):
        kernels.AdamW(make_params(), lr=-1.0)
    with pytest.raises(ValueError, match="backend must be None, 'torch' or 'native'"):
        kernels.AdamW(make_params(), backend="fast")
    opt = kernels.AdamW(make_params())
    opt.param_groups[0]["amsgrad"] = True
    set_grads(opt.param_groups[0]["params"], 0)
    with pytest.raises(ValueError, match="amsgrad=True is not supported"):
        opt.step()


def test_forced_native_lists_reasons():
    params = [torch.randn(4, dtype=torch.float64, requires_grad=True)]
    opt = kernels.AdamW(params, backend="native")
    params[0].grad = torch.randn(4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float64 is not supported natively"):
        opt.step()


@needs_cuda
def test_cuda_matches_torch_with_clipping():
    ours_p = make_params(device="cuda")
    torch_p = [p.detach().clone().requires_grad_() for p in ours_p]
    ours = kernels.AdamW(ours_p, lr=1e-2, max_grad_norm=0.5, backend="native")
    ref = torch.optim.AdamW(torch_p, lr=1e-2, fused=True)
    for step in range(10):
        set_grads(ours_p, step, 10.0)
        set_grads(torch_p, step, 10.0)
        norm = ours.step()
        torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(torch_p, 0.5), rtol=1e-5, atol=0)
        ref.step()
    for a, b in zip(ours_p, torch_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
