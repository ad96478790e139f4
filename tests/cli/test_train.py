"""`python -m cli.train`: a real end-to-end run, and every config error exits 2 having written nothing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import ConfigError
from tests.train_fixtures import tiny_run_dict, write_config_file

ROOT = Path(__file__).resolve().parents[2]


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "cli.train", *args, "--no-progress"], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_end_to_end_run_trains_saves_and_samples(tmp_path):
    config = tiny_run_dict(tmp_path, max_steps=12, sample_prompt="the model", sample_tokens=8)
    result = _run(str(write_config_file(tmp_path / "run.json", config)), "--set", "train.lr=5e-3")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    assert (run / "final" / "model.safetensors").exists() and (run / "final" / "tokenizer.json").exists()
    assert json.loads((run / "run_config.json").read_text())["train"]["lr"] == 5e-3
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 12
    assert "train loss" in result.stdout and "--- sample" in result.stdout
    assert (run / "checkpoints" / "step_000012" / "optimizer.pt").exists()


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["train"].update(lrr=1e-3), "train.lrr: unknown key (did you mean 'train.lr'?)"),
    (lambda c: c["train"].update(lr=-1), "train.lr: expected a positive number, got -1.0"),
    (lambda c: c["train"].update(batch_size=0), "train.batch_size: expected an integer >= 1, got 0"),
    (lambda c: c["train"].update(max_steps="ten"), "train.max_steps: expected an integer"),
    (lambda c: c["data"].update(seq_len=4096), "data.seq_len: 4096 exceeds the model's max_position_embeddings 64"),
    (lambda c: c["model"]["architecture"].update(hiden_size=3),
     "model.architecture.hiden_size: unknown key (did you mean 'hidden_size'?)"),
    (lambda c: c.update(outdir="x"), "outdir: unknown key (did you mean 'out_dir'?)"),
    (lambda c: c["data"].update(train=str(Path("/nonexistent") / "*.txt")), "matches no files"),
])
def test_config_errors_exit_2_and_write_nothing(tmp_path, edit, message):
    config = tiny_run_dict(tmp_path)
    edit(config)
    result = _run(str(write_config_file(tmp_path / "bad.json", config)), timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_bad_override_and_missing_file_exit_2(tmp_path):
    result = _run(str(tmp_path / "missing.json"), timeout=120)
    assert result.returncode == 2 and "config file not found" in result.stderr
    config = write_config_file(tmp_path / "ok.json", tiny_run_dict(tmp_path))
    result = _run(str(config), "--set", "train.lr", timeout=120)
    assert result.returncode == 2 and "expected key.path=value" in result.stderr


def test_a_config_typo_under_torchrun_is_printed_once_and_named_in_torchruns_summary(tmp_path):
    """Every rank finds the typo; only rank 0 prints it (the others wait for torchrun to stop them). torchrun
    itself still ends with its ChildFailedError traceback and exit code 1 (it does not pass on the workers'
    codes); its summary's root cause is rank 0, exit code 2, pointing at the printed line."""
    config = tiny_run_dict(tmp_path)
    config["train"]["lrr"] = 1e-3
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "cli.train", str(write_config_file(tmp_path / "typo.json", config)),
                             "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    message = "cli.train: error: " + str(tmp_path / "typo.json") + ": train.lrr: unknown key"
    assert result.stderr.count(message) == 1, result.stderr[-3000:]
    assert result.returncode == 1  # torchrun's own exit code for any failed worker
    root_cause = result.stderr.split("Root Cause", 1)[1]
    assert "exitcode  : 2" in root_cause and "cli.train: exit code 2: a config or input error" in root_cause
    assert not (tmp_path / "run").exists()


def test_a_rank_above_0_with_a_config_error_waits_silently_and_leaves_with_code_2(tmp_path, monkeypatch, capsys):
    """The half of the torchrun race a 2-rank run cannot force: rank 1 finding the typo first must not exit
    (torchrun would then SIGTERM rank 0 before it prints); it waits, and torchrun's SIGTERM makes it exit 2."""
    import signal
    import time

    import cli.train as cli_train

    config = tiny_run_dict(tmp_path)
    config["train"]["lrr"] = 1e-3
    args = cli_train.parse_args([str(write_config_file(tmp_path / "typo.json", config))])
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    handlers, naps = {}, []
    monkeypatch.setattr(signal, "signal", lambda sig, handler: handlers.setdefault(sig, handler))
    monkeypatch.setattr(time, "sleep", naps.append)
    with pytest.raises(ConfigError, match="train.lrr: unknown key"):  # past the grace period it reports itself
        cli_train.load_checked_config(args)
    assert naps == [cli_train.RANK_ZERO_GRACE_S] and capsys.readouterr().err == ""
    monkeypatch.setattr(os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    with pytest.raises(SystemExit) as stop:
        handlers[signal.SIGTERM](signal.SIGTERM, None)  # torchrun stopping it once rank 0 has exited
    assert stop.value.code == 2
    monkeypatch.setenv("RANK", "0")  # rank 0 reports at once
    naps.clear()
    with pytest.raises(ConfigError, match="train.lrr: unknown key"):
        cli_train.load_checked_config(args)
    assert naps == []


def test_a_failed_huge_pages_restart_trains_on_without_them(monkeypatch, caplog):
    """restart_with_huge_pages: os.execve failing (no interpreter to re-run) is a warning, not an exit."""
    import logging
    from types import SimpleNamespace

    from cli import train as cli_train

    monkeypatch.setattr(cli_train, "huge_pages_env", lambda: {"THP_MEM_ALLOC_ENABLE": "1"})
    calls = []

    def fail(*args):
        calls.append(args)
        raise OSError("no such interpreter")

    monkeypatch.setattr(cli_train.os, "execve", fail)
    with caplog.at_level(logging.WARNING, logger="cli.train"):
        cli_train.restart_with_huge_pages(SimpleNamespace(lora=SimpleNamespace(base_dtype="nf4")))
    assert "could not restart with huge pages (no such interpreter)" in caplog.text
    cli_train.restart_with_huge_pages(SimpleNamespace(lora=None))  # dense: nothing to restart
    cli_train.restart_with_huge_pages(SimpleNamespace(lora=SimpleNamespace(base_dtype="bf16")))
    assert len(calls) == 1
