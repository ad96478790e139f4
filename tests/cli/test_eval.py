"""`python -m cli.eval`: lm-eval tasks from --include-path on a model (+ adapter), results JSON written atomically;
an unknown task or bad argument is one line, exit 2, nothing written."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli.common import load_for_inference
from engine.adapters.lora import apply_lora, lora_modules
from engine.adapters.peft_format import save_adapter
from engine.config import LoraConfig
from tests.eval.test_lm_eval import write_tasks
from tests.hf_models import save_demo_model

ROOT = Path(__file__).resolve().parents[2]


def _run(*args, env_cache: Path):
    import os

    env = {**os.environ, "HF_DATASETS_CACHE": str(env_cache)}
    return subprocess.run([sys.executable, "-m", "cli.eval", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_eval")
    save_demo_model(root / "model")
    model, _ = load_for_inference(root / "model")
    apply_lora(model, LoraConfig(rank=4, targets="all-linear"), base_name=str(root / "model"))
    torch.manual_seed(0)
    with torch.no_grad():
        for m in lora_modules(model).values():  # B starts at zero: make the adapter change the scores
            m.lora_B.weight.normal_(0, 0.5)
    save_adapter(model, root / "adapter")
    return root, write_tasks(root)


def test_eval_prints_metrics_and_writes_results_and_the_adapter_changes_them(setup, tmp_path):
    root, tasks = setup
    out = tmp_path / "results.json"
    base = _run("--model", root / "model", "--tasks", "tiny_mc,tiny_ppl", "--include-path", tasks, "--limit", "4",
                "--batch-size", "2", "--bootstrap-iters", "0", "--output", out, env_cache=tmp_path / "cache")
    assert base.returncode == 0, base.stderr
    lines = dict(line.split() for line in base.stdout.splitlines())
    assert {"tiny_mc/acc", "tiny_mc/acc_norm", "tiny_ppl/word_perplexity"} <= lines.keys()
    results = json.loads(out.read_text())
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(float(lines["tiny_mc/acc"]), abs=1e-4)
    assert results["configs"]["tiny_mc"]["task"] == "tiny_mc" and results["config"]["limit"] == 4
    adapted = _run("--model", root / "model", "--adapter", root / "adapter", "--tasks", "tiny_ppl", "--include-path",
                   tasks, "--limit", "4", "--bootstrap-iters", "0", env_cache=tmp_path / "cache")
    assert adapted.returncode == 0, adapted.stderr
    ppl = float(dict(line.split() for line in adapted.stdout.splitlines())["tiny_ppl/word_perplexity"])
    assert ppl != pytest.approx(float(lines["tiny_ppl/word_perplexity"]), rel=1e-3)


@pytest.mark.parametrize("args,message", [
    (["--tasks", "tiny_mcq"], "cli.eval: error: lm-eval task 'tiny_mcq' does not exist (did you mean 'tiny_mc'"),
    (["--tasks", " , "], "cli.eval: error: --tasks: expected one or more comma-separated lm-eval task names"),
    (["--tasks", "tiny_mc", "--limit", "2.5"], "cli.eval: error: --limit: expected a positive integer or a fraction"),
    (["--tasks", "tiny_mc", "--batch-size", "0"], "cli.eval: error: --batch-size: expected a positive integer"),
])
def test_bad_arguments_exit_2_with_one_line_and_write_nothing(setup, tmp_path, args, message):
    root, tasks = setup
    out = tmp_path / "results.json"
    result = _run("--model", root / "model", "--include-path", tasks, "--output", out, *args,
                  env_cache=tmp_path / "cache")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert not out.exists()
