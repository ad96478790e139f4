"""Run reports: metrics.jsonl bookkeeping and the loss-curve PNG (matplotlib is optional)."""
import json
import logging
import math
import os
import sys

import pytest

import engine.files
import engine.train.metrics
from engine.train.metrics import MetricsError, MetricsLog, plot_losses, read_metrics


def _write_run(run_dir, steps=20, val_every=5):
    run_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_dir / "metrics.jsonl")
    for s in range(1, steps + 1):
        row = {"step": s, "loss": 5.0 / s, "lr": 1e-3, "tokens_per_s": 100.0}
        if s % val_every == 0:
            row["val_loss"] = 5.5 / s
        log.write(row)
    return run_dir


def test_loss_curves_of_several_runs_go_into_one_png(tmp_path):
    runs = [_write_run(tmp_path / name) for name in ("a", "b")]
    png = plot_losses(runs, tmp_path / "loss.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_matplotlib_logs_one_line_that_says_how_to_plot_and_skips(tmp_path, monkeypatch, caplog):
    run = _write_run(tmp_path / "a")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert plot_losses([run], tmp_path / "loss.png") is None
    out = "".join(r.getMessage() + "\n" for r in caplog.records)  # library code logs; the CLIs show it
    assert out.count("\n") == 1 and "matplotlib is not installed" in out
    assert f'pip install -e ".[plot]" then python -m cli.plot {run}' in out
    assert not (tmp_path / "loss.png").exists()


def test_resumed_metrics_drop_rows_past_the_checkpoint(tmp_path):
    path = _write_run(tmp_path / "a").joinpath("metrics.jsonl")
    MetricsLog(path, truncate_after=12)
    assert [r["step"] for r in read_metrics(path)] == list(range(1, 13))
    MetricsLog(path, truncate_after=0)  # a fresh run starts a fresh file
    assert read_metrics(path) == []


def test_log_every_keeps_eval_rows(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    for s in range(1, 11):
        log.write({"step": s, "loss": 1.0, **({"val_loss": 0.5} if s == 7 else {})}, every=5)
    assert [json.loads(line)["step"] for line in (tmp_path / "m.jsonl").read_text().splitlines()] == [5, 7, 10]


def test_a_torn_last_line_is_dropped_with_a_warning_on_resume(tmp_path, caplog):
    path = _write_run(tmp_path / "a", steps=8).joinpath("metrics.jsonl")
    with path.open("a") as f:
        f.write('{"step": 9, "loss": 0.5, "l')  # a kill in the middle of a row
    assert [r["step"] for r in read_metrics(path)] == list(range(1, 9))
    with caplog.at_level(logging.WARNING):
        log = MetricsLog(path, truncate_after=6)
    assert "torn last line" in caplog.text and f"{path}:9" in caplog.text
    log.write({"step": 7, "loss": 1.0})
    assert [r["step"] for r in read_metrics(path)] == list(range(1, 8))


def test_a_bad_line_before_the_last_is_one_error_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\nnot json\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(MetricsError, match=r"metrics.jsonl:2: not valid JSON"):
        MetricsLog(path, truncate_after=2)


def test_a_kill_while_trimming_leaves_every_row(tmp_path, monkeypatch):
    path = _write_run(tmp_path / "a", steps=8).joinpath("metrics.jsonl")
    before = path.read_text()

    class Killed(BaseException):
        pass

    def crash(name):
        if name == "atomic_write:metrics.jsonl":  # the trimmed copy is written, not yet renamed over
            raise Killed
    monkeypatch.setattr(engine.files, "crash_point", crash)
    with pytest.raises(Killed):
        MetricsLog(path, truncate_after=4)
    assert path.read_text() == before  # the old file: a truncate-then-write would have left it empty
    monkeypatch.undo()
    MetricsLog(path, truncate_after=4)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4] and os.listdir(path.parent) == ["metrics.jsonl"]


def test_non_finite_numbers_are_written_as_null(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    log.write({"step": 1, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-3})

    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    row = json.loads((tmp_path / "m.jsonl").read_text(), parse_constant=refuse)
    assert row == {"step": 1, "loss": None, "grad_norm": None, "lr": 1e-3}


def test_sync_fsyncs_the_file(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path / "m.jsonl")
    log.write({"step": 1, "loss": 1.0})
    synced = []
    monkeypatch.setattr(engine.train.metrics, "fsync_path", synced.append)
    log.sync()
    assert synced == [tmp_path / "m.jsonl", tmp_path]


def test_a_full_disk_while_logging_is_one_error_naming_the_file(tmp_path, monkeypatch):
    # A full disk can't be made here: the append fails as it would on one.
    import errno
    import pathlib

    log = MetricsLog(tmp_path / "m.jsonl")

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(pathlib.Path, "open", full)
    with pytest.raises(MetricsError, match=r"m.jsonl: disk full while logging step 3"):
        log.write({"step": 3, "loss": 1.0})
