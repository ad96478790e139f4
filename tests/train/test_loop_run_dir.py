"""One out_dir, one run: a fresh run refuses an out_dir holding another run unless told, `overwrite` replaces it,
and a checkpoint of a different model or data is not resumed silently."""
import dataclasses
import json
import logging

import pytest

from engine.config import ConfigError
from engine.train.checkpoint import list_checkpoints
from engine.train.loop import train
from tests.train_fixtures import tiny_run_config


def _rows(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_fresh_run_into_a_used_out_dir_is_refused_and_overwrite_replaces_it(tmp_path):
    cfg = tiny_run_config(tmp_path, max_steps=4, save_every=2, eval_every=0)
    train(cfg, progress=False)
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoints/ \(step_000002, step_000004\), "
                                          r"metrics.jsonl, final/\).*--set resume=auto.*--set overwrite=true"):
        train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=3)), progress=False)
    assert [r["step"] for r in _rows(tmp_path / "run")] == [1, 2, 3, 4]  # the refused run wrote nothing
    again = dataclasses.replace(cfg, overwrite=True, train=dataclasses.replace(cfg.train, max_steps=3, save_every=0))
    result = train(again, progress=False)
    assert [p.name for p in list_checkpoints(result.out_dir)] == ["step_000003"]  # the old run's are gone
    assert [r["step"] for r in _rows(result.out_dir)] == [1, 2, 3]
    # and a later resume=auto continues this run, not the old one (the steps 1, 2, 4)
    resumed = train(dataclasses.replace(again, overwrite=False, resume="auto",
                                        train=dataclasses.replace(again.train, max_steps=5)), progress=False)
    assert [s for s, _ in resumed.losses] == [4, 5]
    assert [r["step"] for r in _rows(result.out_dir)] == [1, 2, 3, 4, 5]


def test_resume_refuses_a_checkpoint_of_another_model_or_data_naming_the_keys(tmp_path, caplog):
    cfg = tiny_run_config(tmp_path, max_steps=2, save_every=0, eval_every=0)
    train(cfg, progress=False)
    auto = dataclasses.replace(cfg, resume="auto")
    other_data = dataclasses.replace(auto, data=dataclasses.replace(cfg.data, seq_len=16))
    with pytest.raises(ConfigError, match=r"step_000002 is a checkpoint of a different run \(data.seq_len: 32 -> 16;"
                                          r".*strict_resume=false"):
        train(other_data, progress=False)
    arch = {**cfg.model.architecture, "intermediate_size": 96}
    other_model = dataclasses.replace(auto, model=dataclasses.replace(cfg.model, architecture=arch))
    with pytest.raises(ConfigError, match=r"model.architecture.intermediate_size: 64 -> 96"):
        train(other_model, progress=False)
    # hyperparameters may change on resume
    longer = dataclasses.replace(auto, train=dataclasses.replace(cfg.train, max_steps=3, lr=1e-3))
    assert [s for s, _ in train(longer, progress=False).losses] == [3]
    # the explicit override resumes with a warning
    caplog.set_level(logging.WARNING, logger="engine.train.run_dir")
    lenient = dataclasses.replace(other_data, strict_resume=False, train=dataclasses.replace(cfg.train, max_steps=4))
    assert [s for s, _ in train(lenient, progress=False).losses] == [4]
    assert "data.seq_len: 32 -> 16" in caplog.text and "resuming anyway (strict_resume: false)" in caplog.text


def test_resume_auto_with_nothing_to_resume_says_it_starts_fresh(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="engine.train.run_dir")
    cfg = tiny_run_config(tmp_path, max_steps=2, save_every=0, eval_every=0)
    result = train(dataclasses.replace(cfg, resume="auto"), progress=False)
    assert [s for s, _ in result.losses] == [1, 2]
    assert "resume=auto: no checkpoint in" in caplog.text and "starting a fresh run" in caplog.text


def test_resuming_a_finished_run_says_there_is_nothing_to_train(tmp_path, caplog):
    cfg = tiny_run_config(tmp_path, max_steps=3, save_every=0, eval_every=0)
    train(cfg, progress=False)
    caplog.set_level(logging.WARNING, logger="engine.train.loop")
    shorter = dataclasses.replace(cfg, resume="auto", train=dataclasses.replace(cfg.train, max_steps=2))
    result = train(shorter, progress=False)
    assert result.losses == [] and result.step == 3
    assert "is at step 3, past the run's 2 steps" in caplog.text and "nothing to train" in caplog.text
    assert [p.name for p in list_checkpoints(cfg.out_dir)] == ["step_000003"]  # nothing re-saved
    assert [r["step"] for r in _rows(result.out_dir)] == [1, 2, 3]
