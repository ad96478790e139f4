"""Fault drills: kill `python -m cli.train` (SIGKILL, as `kill -9` or the OOM killer would) at named points of
the save path, or at random times, then relaunch with resume=auto until it finishes. The finished run must
match an uninterrupted one bit for bit (final weights, every logged loss), with every step in metrics.jsonl
exactly once. Kills are aimed with ENGINE_CRASH_AT (engine.files.crash_point):

    checkpoint:written:step_N   the temp dir of step N is complete (COMPLETE marker in), not yet renamed
    publish_dir:aside           a re-saved step's old copy is renamed aside, the new one not yet in place
                                (a re-save: SIGTERM right after a periodic save)
    atomic_write:metrics.jsonl  the trimmed metrics.jsonl is written to its temp, not yet renamed over
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.train_fixtures import tiny_run_dict, write_config_file

ROOT = Path(__file__).resolve().parents[2]  # the checkout whose cli/ and engine/ the subprocesses run
STEPS = 8
KILLED = -signal.SIGKILL


def _train(cfg: Path, out_dir: Path, crash: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "ENGINE_CRASH_AT": crash or ""}
    return subprocess.run([sys.executable, "-m", "cli.train", str(cfg), "--no-progress", "--set", f"out_dir={out_dir}",
                           "--set", "resume=auto"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _rows(out_dir: Path) -> list[dict]:
    """metrics.jsonl without the timing columns (the only ones that differ between identical runs)."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "time")} for r in rows]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One uninterrupted run; the processed data and tokenizer it caches are shared by every drill."""
    base = tmp_path_factory.mktemp("faults")
    config = tiny_run_dict(base, max_steps=STEPS, save_every=2, eval_every=4)
    cfg = write_config_file(base / "cfg.json", config)
    done = _train(cfg, base / "straight")
    assert done.returncode == 0, done.stderr
    return {"cfg": cfg, "dir": base / "straight", "rows": _rows(base / "straight"),
            "weights": (base / "straight" / "final" / "model.safetensors").read_bytes()}


def _assert_same_as(baseline, out_dir: Path) -> None:
    rows = _rows(out_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # every step exactly once
    assert rows == baseline["rows"]  # exact floats: loss, lr, grad_norm, val_loss
    assert (out_dir / "final" / "model.safetensors").read_bytes() == baseline["weights"]
    assert not [p for p in (out_dir / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".old-"))]


# Runs cli.train in-process with one test-only change: SIGTERM arrives right after the first periodic save, as a
# scheduler's would at the worst moment. The loop then stops after that step and saves it again (a re-save).
SIGTERM_AFTER_FIRST_SAVE = """
import os, signal, sys
import engine.train.loop as loop
save, sent = loop.save_checkpoint, []
def save_then_sigterm(*args, **kwargs):
    path = save(*args, **kwargs)
    if not sent:
        sent.append(os.kill(os.getpid(), signal.SIGTERM))
    return path
loop.save_checkpoint = save_then_sigterm
from cli.train import main
sys.argv = ["cli.train", *sys.argv[1:]]
main()
"""


def test_kill_between_the_renames_of_a_resave_loses_nothing(baseline, tmp_path):
    # Ctrl-C / SIGTERM right after a periodic save re-saves that step: its old copy goes aside first
    run = tmp_path / "run"
    env = {**os.environ, "ENGINE_CRASH_AT": "publish_dir:aside"}
    killed = subprocess.run([sys.executable, "-c", SIGTERM_AFTER_FIRST_SAVE, str(baseline["cfg"]), "--no-progress",
                             "--set", f"out_dir={run}", "--set", "resume=auto"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == KILLED, killed.stderr
    assert not (run / "checkpoints" / "step_000002").exists()  # only the set-aside copy and the new temp
    done = _train(baseline["cfg"], run)
    assert done.returncode == 0, done.stderr
    assert "no model.safetensors" not in done.stderr
    assert f"resumed from {run / 'checkpoints' / 'step_000002'} at step 2" in done.stderr  # the set-aside copy
    _assert_same_as(baseline, run)


def test_relaunching_a_finished_run_saves_nothing_again(baseline, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(baseline["dir"], run)
    before = {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")}
    done = _train(baseline["cfg"], run, crash="publish_dir:aside")  # a re-save would be killed here
    assert done.returncode == 0 and "nothing to train" in done.stderr, done.stderr
    assert {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")} == before


def test_kills_after_the_temp_dir_is_written_and_while_metrics_are_trimmed_lose_nothing(baseline, tmp_path):
    run = tmp_path / "run"
    assert _train(baseline["cfg"], run, crash="checkpoint:written:step_000006").returncode == KILLED
    saved = [p.name for p in (run / "checkpoints").iterdir()]
    assert "step_000004" in saved and "step_000006" not in saved  # step 6 only as a complete temp dir
    assert [r["step"] for r in _rows(run)] == list(range(1, 7))  # rows 5 and 6 are past checkpoint 4
    # the resume trims them: killed with the trimmed copy written but not renamed, the file is still whole
    assert _train(baseline["cfg"], run, crash="atomic_write:metrics.jsonl").returncode == KILLED
    assert [r["step"] for r in _rows(run)] == list(range(1, 7))
    done = _train(baseline["cfg"], run)
    assert done.returncode == 0, done.stderr
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]
    _assert_same_as(baseline, run)


def test_a_truncated_optimizer_state_exits_2_with_one_line(baseline, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(baseline["dir"], run)
    opt = run / "checkpoints" / "step_000008" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])
    failed = _train(baseline["cfg"], run)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    error = [line for line in failed.stderr.splitlines() if line.startswith("cli.train: error:")]
    assert len(error) == 1 and str(opt) in error[0] and "truncated" in error[0]


def _kill_at_a_random_instant(proc: subprocess.Popen, metrics: Path, rng: random.Random) -> bool:
    """SIGKILL `proc` a random 0-0.3 s after metrics.jsonl holds a random number of rows (0: at start-up), so the
    kill lands anywhere in a run whatever the machine's speed; False if it finished first."""
    target, started = rng.randint(0, STEPS - 1), time.monotonic()
    while proc.poll() is None and time.monotonic() - started < 60:
        rows = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        if rows >= target:
            time.sleep(rng.uniform(0.0, 0.3))
            break
        time.sleep(0.02)
    if proc.poll() is not None:
        return False
    proc.kill()
    return True


def test_random_kills_then_resume_auto_match_the_uninterrupted_run(baseline, tmp_path):
    seed = random.randrange(10**6)  # printed in every failure message: rerun a failure with this seed
    rng = random.Random(seed)
    run, kills, deadline = tmp_path / "run", 0, time.monotonic() + 60
    while True:
        proc = subprocess.Popen([sys.executable, "-m", "cli.train", str(baseline["cfg"]), "--no-progress", "--set",
                                 f"out_dir={run}", "--set", "resume=auto"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "ENGINE_CRASH_AT": ""})
        if kills < 3 and time.monotonic() < deadline:
            kills += _kill_at_a_random_instant(proc, run / "metrics.jsonl", rng)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            break
        assert proc.returncode == KILLED, f"seed {seed}: {err}"
    assert kills >= 1, f"seed {seed}: every launch finished before its kill"
    _assert_same_as(baseline, run)
