"""`python -m cli.plot RUN_DIR [RUN_DIR ...]`: loss curves of several runs in one PNG; bad run dirs exit 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli.plot import main

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, steps: int = 20, val_every: int = 5, scale: float = 5.0) -> Path:
    """A run dir with the metrics.jsonl rows cli.train writes (val_loss on eval steps)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(1, steps + 1):
        row = {"step": s, "loss": scale / s, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0, "tokens_seen": 64 * s}
        if s % val_every == 0:
            row["val_loss"] = 1.1 * scale / s
        rows.append(row)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def _plot(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
        raise SystemExit(0)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def test_two_runs_go_into_one_png_with_a_summary_each(tmp_path, capsys):
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b", steps=10, scale=4.0)
    png = tmp_path / "compare.png"
    code, out, err = _plot(capsys, a, b, "--out", png)
    assert code == 0, err
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert f"{a}: 20 steps, train loss 5.000 -> 0.250, best val 0.275 (step 20)" in out
    assert f"{b}: 10 steps, train loss 4.000 -> 0.400, best val 0.440 (step 10)" in out
    assert f"loss curves: {png}" in out


def test_default_output_goes_into_the_first_run_dir_not_the_working_directory(tmp_path, capsys, monkeypatch):
    run = write_run(tmp_path / "run", val_every=100)  # no eval rows: train curve only, no "best val"
    other = write_run(tmp_path / "other")
    monkeypatch.chdir(tmp_path)
    code, out, _ = _plot(capsys, run)
    assert code == 0
    assert (run / "loss.png").read_bytes()[:8] == PNG_MAGIC  # one run: the loss.png cli.train would have drawn
    assert "best val" not in out
    code, out, _ = _plot(capsys, run, other)
    assert code == 0 and f"loss curves: {run / 'compare.png'}" in out
    assert (run / "compare.png").read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob("*.png"))  # nothing lands in the working directory (the repo root)


@pytest.mark.parametrize("metrics,message", [  # metrics.jsonl's text; None: no run dir; False: no file in it
    (None, "not a directory (expected a run's out_dir)"),
    (False, "metrics.jsonl: missing"),
    ("\n", "metrics.jsonl: no rows yet"),
    ('{"step": 1, "loss": 2.0}\n{"step": 2, "lo', "metrics.jsonl:2: not valid JSON"),
    ('{"step": 1}\n', "metrics.jsonl:1: expected an object with a 'step' and a 'loss'"),
])
def test_bad_run_dirs_exit_2_and_write_nothing(tmp_path, capsys, metrics, message):
    good, bad = write_run(tmp_path / "good"), tmp_path / "bad"
    if metrics is not None:
        bad.mkdir()
        if metrics is not False:
            (bad / "metrics.jsonl").write_text(metrics)
    png = tmp_path / "out.png"
    code, out, err = _plot(capsys, good, bad, "--out", png)
    assert code == 2 and message in err and str(bad) in err
    assert err.startswith("cli.plot: error: ") and "Traceback" not in err
    assert not png.exists() and out == ""


def test_missing_output_directory_exits_2(tmp_path, capsys):
    code, _, err = _plot(capsys, write_run(tmp_path / "a"), "--out", tmp_path / "nowhere" / "x.png")
    assert code == 2 and "directory" in err and "does not exist" in err


def test_missing_matplotlib_exits_1_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    code, out, _ = _plot(capsys, write_run(tmp_path / "a"), "--out", tmp_path / "x.png")
    assert code == 1 and "matplotlib is not installed" in out
    assert not (tmp_path / "x.png").exists()


def test_runs_as_a_module(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cli.plot", str(write_run(tmp_path / "a")), str(tmp_path / "none")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "cli.plot: error:" in result.stderr and "Traceback" not in result.stderr
