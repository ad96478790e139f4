"""Memory safety of the compiled entry points: a buffer of the wrong size, dtype, device or layout
is refused with a ValueError naming it, never read or written past its end. The bad calls run in
a subprocess, so a crash (as before the checks: SIGSEGV, or glibc's abort on a corrupted heap)
fails the test instead of killing pytest."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels

from .conftest import needs_native

ROOT = Path(kernels.__file__).parent.parent


def run_script(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)


def state_of_another_shape(rows: int, backend: str) -> str:
    """A script: a checkpoint's moments have `rows` rows where the param has 64, then step."""
    return f"""
import torch, kernels
p = torch.nn.Parameter(torch.randn(64, 32))
opt = kernels.AdamW([p], backend={backend!r})
sd = {{"state": {{0: {{"step": torch.tensor(3.0), "exp_avg": torch.zeros({rows}, 32),
                     "exp_avg_sq": torch.zeros({rows}, 32)}}}}, "param_groups": opt.state_dict()["param_groups"]}}
opt.load_state_dict(sd)
p.grad = torch.randn(64, 32)
try:
    opt.step()
except ValueError as e:
    print("ValueError:", e)
else:
    print("stepped")
"""


@needs_native
@pytest.mark.parametrize("rows", [16, 128], ids=["smaller", "larger"])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_adamw_refuses_a_checkpoint_whose_moments_do_not_match_the_params(rows, backend):
    out = run_script(state_of_another_shape(rows, backend))
    assert out.returncode == 0, f"rc {out.returncode}: {out.stderr[-2000:]}"
    msg = out.stdout.strip()
    assert msg.startswith("ValueError: kernels.AdamW: state of param 0"), msg
    assert "[64, 32]" in msg and f"[{rows}, 32]" in msg, msg


def test_adamw_state_checks_run_in_process_too():
    p = torch.nn.Parameter(torch.randn(8, 4))
    opt = kernels.AdamW([p], backend="torch")
    p.grad = torch.randn(8, 4)
    opt.step()
    opt.state[p]["exp_avg_sq"] = torch.zeros(4, 8)  # same numel, another shape
    with pytest.raises(ValueError, match=r"param 0: exp_avg_sq must have the param's shape \[8, 4\]"):
        opt.step()
    opt.state[p]["exp_avg_sq"] = torch.zeros(8, 4)
    opt.state[p]["step"] = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="step must be one floating-point tensor"):
        opt.step()


# Each case: (entry, argument the error must name, code building `call`, a zero-argument lambda).
# Shapes: logits [N=6, V=50], param [64, 32], linear weight [N=40, K=24], norm x [N=5, C=16],
# rope x [B=2, T=3, H=2, D=8].
_SETUP = """
import json, torch
from kernels import _C
f32, bf16 = torch.float32, torch.bfloat16
z, t, loss, g = torch.randn(6, 50), torch.randint(0, 50, (6,)), torch.empty(6), torch.empty(6, 50)
ce = dict(ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=0.0, scale=1.0, n_threads=1)
P = lambda: torch.randn(64, 32)
Z = lambda *s, d=f32: torch.zeros(*s, dtype=d)
def adamw(params=None, grads=None, m=None, v=None, masters=None, steps=None, **kw):
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, n_threads=1)
    hyper.update(kw)
    _C.adamw_cpu(params or [P()], grads or [P()], m or [Z(64, 32)], v or [Z(64, 32)],
                 masters or [None], steps or [torch.tensor(1.0)], **hyper)
x, w, b, y = torch.randn(2, 24), torch.randn(40, 24), torch.randn(40), torch.empty(2, 40)
xn, wn, on, rn = torch.randn(5, 16), torch.randn(16), torch.empty(5, 16), torch.empty(5)
xr, orr, cs = torch.randn(2, 3, 2, 8), torch.empty(2, 3, 2, 8), torch.randn(1, 3, 8)
"""

CASES = {
    "ce_short_targets": ("cross_entropy_cpu", "targets", "lambda: _C.cross_entropy_cpu(z, t[:2], loss, g, None, **ce)"),
    "ce_short_loss": ("cross_entropy_cpu", "loss", "lambda: _C.cross_entropy_cpu(z, t, loss[:1], g, None, **ce)"),
    "ce_small_grad": ("cross_entropy_cpu", "grad", "lambda: _C.cross_entropy_cpu(z, t, loss, g[:2], None, **ce)"),
    "ce_grad_dtype": ("cross_entropy_cpu", "grad", "lambda: _C.cross_entropy_cpu(z, t, loss, g.to(bf16), None, **ce)"),
    "ce_short_row_scale": ("cross_entropy_cpu", "row_scale",
                           "lambda: _C.cross_entropy_cpu(z, t, loss, g, torch.ones(2), **ce)"),
    "ce_float64": ("cross_entropy_cpu", "logits", "lambda: _C.cross_entropy_cpu(z.double(), t, loss, None, None, **ce)"),
    "ce_columns_strided": ("cross_entropy_cpu", "logits",
                           "lambda: _C.cross_entropy_cpu(torch.randn(50, 6).T, t, loss, None, None, **ce)"),
    "ce_int_targets": ("cross_entropy_cpu", "targets", "lambda: _C.cross_entropy_cpu(z, t.int(), loss, g, None, **ce)"),
    "ce_not_a_tensor": ("cross_entropy_cpu", "logits", "lambda: _C.cross_entropy_cpu(z.data_ptr(), t, loss, g, None, **ce)"),
    "sumsq_strided": ("grad_sumsq_cpu", "grads[1]", "lambda: _C.grad_sumsq_cpu([P(), P().T], 1)"),
    "sumsq_float64": ("grad_sumsq_cpu", "grads[0]", "lambda: _C.grad_sumsq_cpu([P().double()], 1)"),
    "sumsq_no_threads": ("grad_sumsq_cpu", "n_threads", "lambda: _C.grad_sumsq_cpu([P()], 0)"),
    "adamw_small_exp_avg": ("adamw_cpu", "exp_avgs[0]", "lambda: adamw(m=[Z(16, 32)])"),
    "adamw_large_exp_avg_sq": ("adamw_cpu", "exp_avg_sqs[0]", "lambda: adamw(v=[Z(128, 32)])"),
    "adamw_bf16_moments": ("adamw_cpu", "exp_avgs[0]", "lambda: adamw(m=[Z(64, 32, d=bf16)])"),
    "adamw_grad_dtype": ("adamw_cpu", "grads[0]", "lambda: adamw(grads=[P().to(bf16)])"),
    "adamw_small_grad": ("adamw_cpu", "grads[0]", "lambda: adamw(grads=[torch.randn(2, 32)])"),
    "adamw_master_shape": ("adamw_cpu", "masters[0]",
                           "lambda: adamw(params=[P().to(bf16)], grads=[P().to(bf16)], masters=[Z(8)])"),
    "adamw_step_int": ("adamw_cpu", "steps[0]", "lambda: adamw(steps=[torch.tensor(1)])"),
    "adamw_strided_param": ("adamw_cpu", "params[0]", "lambda: adamw(params=[torch.randn(32, 64).T])"),
    "adamw_lists_differ": ("adamw_cpu", "exp_avgs", "lambda: adamw(params=[P(), P()], grads=[P(), P()])"),
    "adamw_cuda_sumsq_on_cpu": ("adamw_cpu", "clip_sumsq", "lambda: adamw(clip_sumsq=torch.ones(1))"),
    "linear_small_out": ("linear_cpu", "out", "lambda: _C.linear_cpu(x, w, b, torch.empty(2, 4), 1)"),
    "linear_short_bias": ("linear_cpu", "bias", "lambda: _C.linear_cpu(x, w, b[:3], y, 1)"),
    "linear_strided_weight": ("linear_cpu", "weight", "lambda: _C.linear_cpu(x, torch.randn(24, 40).T, b, y, 1)"),
    "linear_wrong_k": ("linear_cpu", "x", "lambda: _C.linear_cpu(torch.randn(2, 7), w, b, y, 1)"),
    "linear_dtype_mix": ("linear_cpu", "x", "lambda: _C.linear_cpu(x.to(bf16), w, b, y, 1)"),
    "linear_float16": ("linear_cpu", "weight", "lambda: _C.linear_cpu(x.half(), w.half(), None, y.half(), 1)"),
    "norm_short_weight": ("rms_norm_cpu", "weight", "lambda: _C.rms_norm_cpu(xn, wn[:4], on, rn, 1e-6, 0.0, 1)"),
    "norm_short_rstd": ("rms_norm_cpu", "rstd", "lambda: _C.rms_norm_cpu(xn, wn, on, rn[:2], 1e-6, 0.0, 1)"),
    "norm_small_out": ("rms_norm_cpu", "out", "lambda: _C.rms_norm_cpu(xn, wn, on[:2], rn, 1e-6, 0.0, 1)"),
    "norm_float64": ("rms_norm_cpu", "x", "lambda: _C.rms_norm_cpu(xn.double(), wn, on, rn, 1e-6, 0.0, 1)"),
    "norm_bwd_short_grad": ("rms_norm_backward_cpu", "grad_out",
                            "lambda: _C.rms_norm_backward_cpu(on[:1], xn, wn, rn, None, None, 0.0, 1)"),
    "norm_bwd_grad_x_dtype": ("rms_norm_backward_cpu", "grad_x",
                              "lambda: _C.rms_norm_backward_cpu(on, xn, wn, rn, on.to(bf16), None, 0.0, 1)"),
    "norm_bwd_grad_w_shape": ("rms_norm_backward_cpu", "grad_weight",
                              "lambda: _C.rms_norm_backward_cpu(on, xn, wn, rn, None, torch.empty(3), 0.0, 1)"),
    "rope_short_table": ("rope_cpu", "cos", "lambda: _C.rope_cpu(xr, orr, cs[:, :1], cs, False, 1)"),
    "rope_sin_differs": ("rope_cpu", "sin", "lambda: _C.rope_cpu(xr, orr, cs, cs[:, :2], False, 1)"),
    "rope_small_out": ("rope_cpu", "out", "lambda: _C.rope_cpu(xr, orr[:1], cs, cs, False, 1)"),
    "rope_odd_head_dim": ("rope_cpu", "x", "lambda: _C.rope_cpu(xr[..., :7], orr, cs, cs, False, 1)"),
    "rope_float64_table": ("rope_cpu", "cos", "lambda: _C.rope_cpu(xr, orr, cs.double(), cs, False, 1)"),
}


@pytest.fixture(scope="module")
def outcomes():
    """Runs every case in one subprocess; case name -> "ValueError: ..." or what happened instead."""
    lines = [_SETUP, "out = {}"]
    for name, (_, _, call) in CASES.items():
        lines += [f"try:\n    ({call})()\n    out[{name!r}] = 'no error'",
                  f"except Exception as e:\n    out[{name!r}] = type(e).__name__ + ': ' + str(e)",
                  f"print(json.dumps({{{name!r}: out[{name!r}]}}), flush=True)"]
    proc = run_script("\n".join(lines))
    seen = {}
    for line in proc.stdout.splitlines():
        seen.update(json.loads(line))
    crash = f"crashed before answering (rc {proc.returncode}): {proc.stderr[-1500:]}"
    return {name: seen.get(name, crash) for name in CASES}


@needs_native
@pytest.mark.parametrize("case", list(CASES))
def test_bad_buffers_raise_a_value_error_naming_them(case, outcomes):
    entry, arg, _ = CASES[case]
    assert outcomes[case].startswith(f"ValueError: kernels._C.{entry}: {arg}: expected "), outcomes[case]


@needs_native
def test_good_buffers_still_run_after_the_checks():
    """The same calls with the right buffers: the checks accept what kernels/ops passes."""
    out = run_script(_SETUP + """
_C.cross_entropy_cpu(z, t, loss, g, torch.ones(6), **ce)
_C.cross_entropy_cpu(z, t, loss, z, None, **ce)  # grad over the logits, as inplace=True
print(_C.grad_sumsq_cpu([P(), P().to(bf16)], 1) > 0)
adamw(params=[P().to(bf16)], grads=[P().to(bf16)], masters=[Z(64, 32)])
adamw(clip_coef=0.5)
_C.linear_cpu(x, w, b, y, 1); _C.linear_cpu(torch.randn(0, 24), w, None, torch.empty(0, 40), 1)
_C.rms_norm_cpu(xn, wn.to(bf16), on.to(bf16), rn, 1e-6, 1.0, 1)
_C.rms_norm_backward_cpu(on, xn, wn, rn, torch.empty(5, 16), torch.empty(16), 0.0, 1)
_C.rope_cpu(xr, torch.empty(2, 2, 3, 8).transpose(1, 2), cs.expand(2, 3, 8).contiguous(), cs.expand(2, 3, 8).contiguous(), True, 1)
print("OK")
""")
    assert out.returncode == 0 and out.stdout.split() == ["True", "OK"], out.stderr[-2000:]
