"""The training loop runs its loss and optimizer through `kernels`; native and fallback agree."""
import dataclasses

import pytest

import kernels
from kernels.ops import linear_cross_entropy as fused_linear_ce
from engine.train.loop import train
from tests.train_fixtures import tiny_run_config


@pytest.mark.skipif(not kernels.info()["native"] and kernels.info()["env"] != "torch",
                    reason="the compiled kernels are not built: nothing to compare the fallback with")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_native_kernels_and_torch_fallback_train_to_the_same_losses(tmp_path, monkeypatch, precision):
    cfg = tiny_run_config(tmp_path, max_steps=10, precision=precision, grad_accum=2, eval_every=0)
    monkeypatch.setenv("ENGINE_KERNELS", "native")
    native = train(dataclasses.replace(cfg, out_dir=str(tmp_path / "native")), progress=False)
    assert getattr(fused_linear_ce._workspace, "buf", None) is None  # the loss's logits buffer is freed at the end
    monkeypatch.setenv("ENGINE_KERNELS", "torch")
    fallback = train(dataclasses.replace(cfg, out_dir=str(tmp_path / "torch")), progress=False)
    tol = 1e-4 if precision == "fp32" else 2e-2
    for (s1, a), (s2, b) in zip(native.losses, fallback.losses):
        assert s1 == s2 and a == pytest.approx(b, rel=tol), (s1, a, b)
