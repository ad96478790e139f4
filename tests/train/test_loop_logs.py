"""What a run tells its log: without the progress bar a line per logged step, eval and checkpoint (CI logs);
with it, checkpoints and evals too; settings that do nothing useful are warned about; rows carry wall-clock time."""
import json
import logging
import time

from engine.train.loop import train
from tests.train_fixtures import tiny_run_config


def test_without_the_bar_every_logged_step_eval_and_checkpoint_gets_a_line(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="engine.train")
    started = time.time()
    result = train(tiny_run_config(tmp_path, max_steps=4, eval_every=2, save_every=2, log_every=2), progress=False)
    lines = [r.getMessage() for r in caplog.records]
    steps = [line for line in lines if line.startswith("step ") and " | loss " in line]
    assert [line.split()[1] for line in steps] == ["2/4", "4/4"]  # train.log_every=2
    assert all("val_loss" in line and "tok/s" in line for line in steps)  # evals at 2 and 4
    assert any(line.startswith("step 2: saved checkpoint") and "step_000002" in line for line in lines)
    rows = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(started <= r["time"] <= time.time() for r in rows)  # unix seconds, on every row


def test_with_the_bar_checkpoints_and_evals_are_announced(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="engine.train")
    train(tiny_run_config(tmp_path, max_steps=2, eval_every=2, save_every=1), progress=True)
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("step 1: saved checkpoint") for line in lines)
    assert any(line.startswith("step 2: val loss ") for line in lines)
    assert not any(" | loss " in line for line in lines)  # the bar shows the steps


def test_fp16_on_cpu_and_fsdp_in_one_process_are_warned_about(tmp_path, caplog):
    import dataclasses

    from engine.config import DistributedConfig

    caplog.set_level(logging.WARNING, logger="engine.train")
    cfg = tiny_run_config(tmp_path, max_steps=1, eval_every=0, save_every=0, precision="fp16", device="cpu")
    train(dataclasses.replace(cfg, distributed=DistributedConfig(strategy="fsdp")), progress=False)
    assert "train.precision: fp16 on CPU" in caplog.text
    assert "distributed.strategy: 'fsdp' has no effect in one process" in caplog.text
