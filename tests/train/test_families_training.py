"""Issue 14's dense families on the training paths: torchrun DDP (2 real processes over gloo) trains a tiny
Gemma 3 (sandwich norms, q/k norms, five sliding layers then a global one, two RoPE bases; windows of 8
tokens inside 32-token sequences) exactly as one process with grad_accum 2; the memory planner's estimate
for a Gemma 3-shaped config is within its stated tolerance of the measured peak."""
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from engine import Transformer
from engine.config import RunConfig, from_dict
from engine.model.families import config_from_hf
from engine.train.loop import train
from tests.finetune_fixtures import pretrained_dir
from tests.train.test_distributed import _losses, _torchrun
from tests.train.test_memory_plan import ARCH, MiB, ROOT, TOLERANCE, run_dict
from tests.train_fixtures import tiny_run_dict

STEPS = 6


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    return pretrained_dir(tmp_path_factory.mktemp("gemma3") / "base", family="gemma3")


def _gemma3_run_dict(tmp_path, model_dir, **train_keys) -> dict:
    d = tiny_run_dict(tmp_path, max_steps=STEPS, save_every=3, eval_every=3, **train_keys)
    d["model"] = {"from_pretrained": str(model_dir)}
    return d


def test_two_ddp_ranks_train_gemma3_like_one_process_with_accumulation(gemma3_dir, tmp_path):
    model = Transformer.from_pretrained(gemma3_dir)
    windows = [b.attn.window for b in model.layers]
    assert windows == [8] * 5 + [None] and model.layers[0].post_attn_norm is not None  # the features under test
    one = tmp_path / "one"
    train(from_dict(RunConfig, _gemma3_run_dict(one, gemma3_dir, grad_accum=2), where=""), progress=False)
    two = tmp_path / "two"
    result = _torchrun({**_gemma3_run_dict(two, gemma3_dir), "distributed": {"strategy": "ddp"}}, two / "run.json")
    assert result.returncode == 0, result.stderr[-3000:]
    losses, val = _losses(two / "run")
    ref_losses, ref_val = _losses(one / "run")
    assert len(losses) == STEPS and ref_losses[-1] < ref_losses[0]
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(val, ref_val, rtol=1e-5, atol=1e-6)
    ours, ref = Transformer.from_pretrained(two / "run" / "final"), Transformer.from_pretrained(one / "run" / "final")
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(two / "run" / "final").eval()  # still a Gemma 3 file
    ids = torch.randint(0, ours.config.vocab_size, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.eval()(ids), rtol=1e-4, atol=1e-4)


def _gemma3_arch() -> dict:
    """The planner test's ~9M model shaped as Gemma 3: 5 sliding (window 64 of 256 tokens) + 1 global layer,
    local/global RoPE bases, sandwich and q/k norms, GeGLU, tied embeddings, final soft cap."""
    hf = transformers.Gemma3TextConfig(
        vocab_size=ARCH["vocab_size"], hidden_size=ARCH["hidden_size"], num_hidden_layers=ARCH["num_layers"],
        num_attention_heads=ARCH["num_heads"], num_key_value_heads=ARCH["num_kv_heads"], head_dim=ARCH["head_dim"],
        intermediate_size=ARCH["intermediate_size"], max_position_embeddings=ARCH["max_position_embeddings"],
        sliding_window=64, query_pre_attn_scalar=ARCH["head_dim"], final_logit_softcapping=30.0).to_dict()
    hf["architectures"] = ["Gemma3ForCausalLM"]
    mc = config_from_hf(hf)
    assert mc.layer_sliding_windows == (64,) * 5 + (None,) and mc.post_attn_norm and mc.qk_norm
    return mc.to_dict()


@pytest.mark.skipif(sys.platform != "linux", reason="reads RSS from /proc; ru_maxrss units differ elsewhere")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_planner_estimate_for_gemma3_is_within_its_tolerance_of_the_measured_peak(precision):
    spec = {"run": run_dict({"precision": precision}), "arch": _gemma3_arch()}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}  # as test_memory_plan
    out = subprocess.run([sys.executable, "-m", "tests.train.test_memory_plan", json.dumps(spec)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = m["estimated"] / m["measured"]
    print(f"gemma3 {precision}: measured {m['measured'] / MiB:.1f} MiB, estimated {m['estimated'] / MiB:.1f} MiB "
          f"({ratio:.2f}x)")
    assert abs(ratio - 1) <= TOLERANCE, f"estimated {m['estimated'] / MiB:.1f} MiB vs measured {m['measured'] / MiB:.1f} MiB"
