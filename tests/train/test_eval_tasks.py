"""train.eval_tasks: lm-eval tasks at each eval step land in metrics.jsonl with the values cli.eval's code gives
for the same weights; bad task names fail before anything is written."""
import json
import math
from dataclasses import replace

import datasets
import pytest

from cli.common import load_for_inference
from engine.config import ConfigError, RunConfig, from_dict
from engine.eval.lm_eval_model import EngineLM, metrics_of, run_tasks
from engine.train.loop import train
from tests.eval.test_lm_eval import write_tasks
from tests.train_fixtures import tiny_run_dict


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))


def _config(tmp_path, **train) -> RunConfig:
    tasks = write_tasks(tmp_path / "lm_eval")
    config = tiny_run_dict(tmp_path, eval_tasks=["tiny_mc", "tiny_ppl"], eval_tasks_limit=3,
                           eval_tasks_include_path=str(tasks), log_every=3, **train)
    return from_dict(RunConfig, config, where="")


def test_eval_tasks_are_logged_at_eval_steps_with_the_values_of_the_saved_weights(tmp_path):
    cfg = _config(tmp_path)
    train(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/tiny_mc/acc" in r]
    assert [r["step"] for r in evals] == [4, 8]  # eval_every=4; logged although log_every=3
    assert {"eval/tiny_mc/acc_norm", "eval/tiny_ppl/word_perplexity", "eval/tiny_ppl/bits_per_byte"} <= evals[0].keys()
    model, tokenizer = load_for_inference(tmp_path / "run" / "final")
    again = metrics_of(run_tasks(EngineLM(model, tokenizer, batch_size=4), ["tiny_mc", "tiny_ppl"], limit=3,
                                 include_path=cfg.train.eval_tasks_include_path, bootstrap_iters=0))
    for name, value in again.items():
        assert math.isclose(evals[-1][f"eval/{name}"], value, rel_tol=1e-5), name


def test_unknown_eval_tasks_fail_before_anything_is_written(tmp_path):
    cfg = _config(tmp_path)
    cfg = replace(cfg, train=replace(cfg.train, eval_tasks=("tiny_mcq",)))
    with pytest.raises(ConfigError, match=r"train.eval_tasks: lm-eval task 'tiny_mcq' does not exist"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("train_keys,message", [
    ({"eval_tasks": ["tiny_mc"], "eval_every": 0}, "train.eval_tasks: runs at eval steps, and train.eval_every is 0"),
    ({"eval_tasks_limit": 0}, "train.eval_tasks_limit: expected an integer >= 1, got 0"),
])
def test_bad_eval_task_settings_are_config_errors(tmp_path, train_keys, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(RunConfig, tiny_run_dict(tmp_path, **train_keys), where="")
