"""Run reports: metrics.jsonl bookkeeping and the loss-curve PNG (matplotlib is optional)."""
import json
import sys

from engine.train.metrics import MetricsLog, plot_losses, read_metrics


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
