"""SIGTERM (a job scheduler's stop, `kill`) on a one-process run saves a checkpoint like Ctrl-C, and resume=auto
continues from it."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from engine.config import RunConfig, from_dict
from engine.train.checkpoint import list_checkpoints
from engine.train.loop import train
from tests.train_fixtures import tiny_run_dict, write_config_file

ROOT = Path(__file__).resolve().parents[2]


def test_sigterm_saves_a_checkpoint_and_resume_auto_continues(tmp_path):
    config = tiny_run_dict(tmp_path, max_steps=100000, save_every=0, eval_every=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "cli.train", str(write_config_file(tmp_path / "c.json", config)),
                             "--no-progress"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]  # like Ctrl-C: interrupted, resumable
    assert "interrupted at step" in out and "resume with --set resume=auto" in err
    saved = list_checkpoints(tmp_path / "run")
    step = json.loads((saved[-1] / "trainer_state.json").read_text())["step"]
    assert len(saved) == 1 and step == len(metrics.read_text().splitlines()) >= 3  # the last finished step
    cfg = from_dict(RunConfig, {**config, "resume": "auto"}, where="")
    rest = train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=step + 2)), progress=False)
    assert [s for s, _ in rest.losses] == [step + 1, step + 2]
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, step + 3))
