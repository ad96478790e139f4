"""GRPO under torchrun (2 ranks, gloo, CPU, DDP; nothing mocked) equals one process with the equivalent accumulation.

Equal by construction: each micro-batch samples with a seed of (train.seed, generation, its slot in the step), and
the slot (engine.data.sampler: micro * world + rank) is also where its prompts come from, so 2 ranks x accum 1 sample
exactly the rollouts of 1 process x accum 2 (DDP keeps the weights equal on every rank); scale_rewards "batch"
takes its std over every rank's rewards (all_gather); the loss is normalized by the units of every rank (the loop).
The step losses agree to rtol 1e-5 / atol 1e-6 (fp32; DDP's gradient all-reduce sums in another order), the final
weights to rtol 1e-5 / atol 5e-5: Adam divides by sqrt(v), so last-bit differences in near-zero gradients become
weight differences up to ~1e-3 x lr (lr 3e-2 here; measured max 1.6e-5, on 5 of 36k embedding entries). FSDP is refused for GRPO (sampling needs whole weights on every rank; tests/train/test_grpo.py).
"""
import torch
from safetensors.torch import load_file

from engine.config import RunConfig, from_dict
from engine.train.loop import train
from tests.train.test_distributed import _torchrun
from tests.train.test_grpo import _run_dict, model_dir  # noqa: F401  (the module fixture)


def _losses(run_dir):
    import json

    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_two_ranks_equal_one_process_with_accumulation(model_dir, tmp_path):  # noqa: F811
    grpo = {"scale_rewards": "batch", "num_iterations": 2, "beta": 0.04}
    one = _run_dict(tmp_path / "one", model_dir, **grpo)
    one["train"].update(max_steps=4, save_every=0)
    result_one = train(from_dict(RunConfig, one, where=""), progress=False)
    two = _run_dict(tmp_path / "two", model_dir, **grpo)
    two["train"].update(max_steps=4, save_every=0, grad_accum=1)
    two["distributed"] = {"strategy": "ddp"}
    result = _torchrun(two, tmp_path / "two.json")
    assert result.returncode == 0, result.stderr[-3000:]
    ours, ref = _losses(tmp_path / "two" / "run"), _losses(tmp_path / "one" / "run")
    assert len(ref) == 4 and any(abs(x) > 1e-6 for x in ref)  # a run that learns something
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    mine = load_file(tmp_path / "two" / "run" / "final" / "model.safetensors")
    theirs = load_file(result_one.final_dir / "model.safetensors")
    assert mine.keys() == theirs.keys()
    for name, w in theirs.items():
        torch.testing.assert_close(mine[name], w, rtol=1e-5, atol=5e-5, msg=name)
    start = load_file(model_dir / "model.safetensors")
    assert any(not torch.equal(start[k], theirs[k]) for k in theirs if k in start)  # the weights moved
