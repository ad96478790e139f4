"""torchrun on CPU: 2 real processes over gloo (nothing mocked), DDP and FSDP2.

Two ranks with micro-batch b take the same steps as one process with grad_accum 2 and micro-batch b;
checkpoints written by N ranks resume on a different number of ranks; a crash mid-save leaves the
previous checkpoint usable.
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import Transformer
from engine.train.checkpoint import list_checkpoints
from engine.config import RunConfig, from_dict
from engine.train.loop import train
from tests.train_fixtures import tiny_run_dict, write_config_file

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6


def _run_dict(tmp_path: Path, **extra) -> dict:
    return tiny_run_dict(tmp_path, max_steps=STEPS, save_every=3, eval_every=3, **extra)


def _torchrun(config: dict, path: Path, nproc: int = 2, script=("-m", "cli.train")) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "PYTHONFAULTHANDLER": "1"}  # a worker that aborts prints its Python stack
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script,
           str(write_config_file(path, config)), "--no-progress"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _before_torchrun_report(stderr: str) -> str:
    """The workers' stderr: everything before the first line torchrun's own agent logs. torch names its files
    by absolute path ('.../site-packages/torch/...') or relative to sys.path ('torch/...') depending on the
    venv, so the cut is on the module path inside torch, never on where torch is installed."""
    lines = stderr.splitlines(keepends=True)
    first = next((i for i, line in enumerate(lines)
                  if "torch/distributed/elastic" in line.replace("\\", "/") or "torch.distributed.elastic" in line),
                 len(lines))
    return "".join(lines[:first])


def _losses(run_dir: Path) -> tuple[list, list]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows], [r["val_loss"] for r in rows if "val_loss" in r]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, grad_accum 2 (run in this process)."""
    tmp = tmp_path_factory.mktemp("one")
    train(from_dict(RunConfig, _run_dict(tmp, grad_accum=2), where=""), progress=False)
    return tmp / "run"


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    result = _torchrun({**_run_dict(tmp), "distributed": {"strategy": "fsdp"}}, tmp / "fsdp.json")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run", result


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_with_accumulation(strategy, one_process, fsdp_run, tmp_path):
    if strategy == "fsdp":
        run, result = fsdp_run
    else:
        result = _torchrun({**_run_dict(tmp_path), "distributed": {"strategy": "ddp"}}, tmp_path / "ddp.json")
        assert result.returncode == 0, result.stderr[-3000:]
        run = tmp_path / "run"
    losses, val = _losses(run)
    ref_losses, ref_val = _losses(one_process)
    assert len(losses) == STEPS
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(val, ref_val, rtol=1e-5, atol=1e-6)
    # rank 0 alone reports; the final model is the full one, in HF layout
    assert result.stdout.count("train loss") == 1
    ours, ref = Transformer.from_pretrained(run / "final"), Transformer.from_pretrained(one_process / "final")
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert (run / "checkpoints" / "step_000006" / "dcp" / ".metadata").is_file()


def test_fsdp_bf16_gathers_in_bf16_and_tracks_one_process(tmp_path):
    """bf16: FSDP computes with bf16 gathered weights (MixedPrecisionPolicy), one process with autocast
    over fp32 weights; the same steps up to bf16 rounding."""
    train(from_dict(RunConfig, _run_dict(tmp_path / "one", grad_accum=2, precision="bf16"), where=""), progress=False)
    config = {**_run_dict(tmp_path / "two", precision="bf16"), "distributed": {"strategy": "fsdp"}}
    result = _torchrun(config, tmp_path / "fsdp_bf16.json")
    assert result.returncode == 0, result.stderr[-3000:]
    ours, ref = _losses(tmp_path / "two" / "run"), _losses(tmp_path / "one" / "run")
    torch.testing.assert_close(ours, ref, rtol=2e-3, atol=0)


def test_fsdp_checkpoint_resumes_in_one_process(one_process, fsdp_run, tmp_path):
    """2 ranks -> 1: torch.distributed.checkpoint reshards the model and optimizer state."""
    run, _ = fsdp_run
    cfg = from_dict(RunConfig, {**_run_dict(tmp_path, grad_accum=2), "resume": str(run / "checkpoints" / "step_000003")},
                    where="")
    resumed = train(cfg, progress=False)
    ref_losses, _ = _losses(one_process)
    torch.testing.assert_close([loss for _, loss in resumed.losses], ref_losses[3:], rtol=1e-5, atol=1e-6)


def test_one_process_checkpoint_resumes_on_two_fsdp_ranks(one_process, tmp_path):
    config = {**_run_dict(tmp_path), "distributed": {"strategy": "fsdp"},
              "resume": str(one_process / "checkpoints" / "step_000003")}
    result = _torchrun(config, tmp_path / "resume.json")
    assert result.returncode == 0, result.stderr[-3000:]
    ref_losses, _ = _losses(one_process)
    torch.testing.assert_close(_losses(tmp_path / "run")[0], ref_losses[3:], rtol=1e-5, atol=1e-6)


CRASHING_TRAIN = """
import runpy, sys
import torch.distributed.checkpoint as dcp

save = dcp.save
def crash_at_step_6(state, checkpoint_id):
    if "step_000006" in str(checkpoint_id):
        raise RuntimeError("simulated crash mid-save")
    return save(state, checkpoint_id=checkpoint_id)
dcp.save = crash_at_step_6
runpy.run_module("cli.train", run_name="__main__")
"""


def test_crash_mid_save_leaves_the_previous_checkpoint_usable(one_process, tmp_path):
    script = tmp_path / "crashing_train.py"
    script.write_text(CRASHING_TRAIN)
    result = _torchrun({**_run_dict(tmp_path), "distributed": {"strategy": "ddp"}}, tmp_path / "ddp.json",
                       script=(str(script),))
    assert result.returncode != 0 and "simulated crash mid-save" in result.stderr
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["step_000003"]
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the half-written one was removed
    cfg = from_dict(RunConfig, {**_run_dict(tmp_path, grad_accum=2), "resume": "auto"}, where="")
    resumed = train(dataclasses.replace(cfg), progress=False)
    ref_losses, _ = _losses(one_process)
    torch.testing.assert_close([loss for _, loss in resumed.losses], ref_losses[3:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lora_sft_on_two_ranks_matches_one_process(strategy, tmp_path):
    """Packed SFT rows carry different numbers of target tokens per rank: the step's loss is normalized
    by the tokens of all ranks, so the steps still equal one process's; only the adapter is saved (FSDP:
    gathered from the shards), and the run resumes from it (here in one process). The two ranks checkpoint
    their activations (engine.model.recompute, replayed under DDP's and FSDP2's hooks); one process does not."""
    from tests.finetune_fixtures import lora_run_dict, pretrained_dir

    model_dir = pretrained_dir(tmp_path / "base")
    one = lora_run_dict(tmp_path / "one", model_dir, sft=True, max_steps=4, save_every=2, eval_every=2, grad_accum=2)
    train(from_dict(RunConfig, one, where=""), progress=False)
    two = {**lora_run_dict(tmp_path / "two", model_dir, sft=True, max_steps=4, save_every=2, eval_every=2,
                           activation_checkpointing=True),
           "distributed": {"strategy": strategy}}
    result = _torchrun(two, tmp_path / "lora.json")
    assert result.returncode == 0, result.stderr[-3000:]
    ours, ref = _losses(tmp_path / "two" / "run"), _losses(tmp_path / "one" / "run")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    final = tmp_path / "two" / "run" / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    # its step-2 checkpoint (dcp/ holds the adapters and their optimizer state only) resumes in one process
    resumed = train(from_dict(RunConfig, {**one, "out_dir": str(tmp_path / "resumed"), "resume": str(
        tmp_path / "two" / "run" / "checkpoints" / "step_000002")}, where=""), progress=False)
    torch.testing.assert_close([loss for _, loss in resumed.losses], ref[0][2:], rtol=1e-5, atol=1e-6)


def test_ctrl_c_under_torchrun_stops_every_rank_at_one_step_and_saves(tmp_path):
    """Ctrl-C in a terminal signals the whole process group: torchrun and both workers."""
    config = {**tiny_run_dict(tmp_path, max_steps=100000, save_every=0, eval_every=0), "distributed": {"strategy": "ddp"}}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cli.train",
           str(write_config_file(tmp_path / "long.json", config)), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    saved = list_checkpoints(tmp_path / "run")
    assert len(saved) == 1, err[-3000:]
    step = json.loads((saved[0] / "trainer_state.json").read_text())["step"]
    assert step == len(metrics.read_text().splitlines()) >= 3  # the last step every rank finished
    assert out.count("interrupted at step") == 1 and "resume with --set resume=auto" in err


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_accumulation_on_two_ranks_syncs_once_per_step(strategy, tmp_path):
    """2 ranks x grad_accum 2 (no_sync / set_requires_gradient_sync(False) on the first micro-batch)
    = one process x grad_accum 4."""
    train(from_dict(RunConfig, _run_dict(tmp_path / "one", grad_accum=4), where=""), progress=False)
    config = {**_run_dict(tmp_path / "two", grad_accum=2), "distributed": {"strategy": strategy}}
    result = _torchrun(config, tmp_path / "accum.json")
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(_losses(tmp_path / "two" / "run"), _losses(tmp_path / "one" / "run"),
                               rtol=1e-5, atol=1e-6)


def test_a_data_error_on_rank_0_stops_every_rank_with_its_message(tmp_path):
    """Rank 0 tokenizes first; its error (here: an empty corpus) stops every rank: rank 0 prints one line and
    every rank exits 2, instead of rank 1 failing in its next collective with a 'connection closed' traceback."""
    config = {**_run_dict(tmp_path), "distributed": {"strategy": "ddp"}}
    for f in (tmp_path / "corpus").glob("*.txt"):
        f.write_text("")
    result = _torchrun(config, tmp_path / "empty.json")
    assert result.returncode != 0
    assert result.stderr.count("cli.train: error: bpe files: the corpus (4 file(s)) is too small") == 1, \
        result.stderr[-3000:]
    workers = _before_torchrun_report(result.stderr)
    assert "cli.train: error: bpe files" in workers  # the cut kept the workers' own lines
    assert "Traceback" not in workers and "Connection closed" not in result.stderr
    assert result.stderr.count("exitcode  : 2") == 2  # torchrun's summary: both ranks exited 2


@pytest.mark.parametrize("torch_path", ["/venv/lib/python3.11/site-packages/torch", "torch", "C:\\venv\\torch"])
def test_the_workers_stderr_ends_where_torchrun_reports_wherever_torch_is_installed(torch_path):
    """torch logs its own files relative to sys.path in some venvs: the cut must not depend on the prefix."""
    sep = "\\" if "\\" in torch_path else "/"
    api = sep.join([torch_path, "distributed", "elastic", "multiprocessing", "api.py"])
    stderr = ("cli.train: error: bad\n"
              f"E1201 10:00:00.000 123 {api}:1002] failed (exitcode: 2)\n"
              'Traceback (most recent call last):\n')
    assert _before_torchrun_report(stderr) == "cli.train: error: bad\n"


HANGING_TRAIN = """
import os, runpy, signal, time
import engine.train.loop as loop

real_step, calls = loop.train_step, []
def rank_1_freezes_at_step_2(*args, **kwargs):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(143))  # torchrun's stop ends the frozen rank
        time.sleep(600)
    return real_step(*args, **kwargs)
loop.train_step = rank_1_freezes_at_step_2
runpy.run_module("cli.train", run_name="__main__")
"""


def test_a_frozen_rank_fails_the_job_after_distributed_timeout_s_with_one_line(tmp_path):
    """Without the timeout gloo would wait ~30 minutes; with distributed.timeout_s=5 rank 0 stops and names the key."""
    script = tmp_path / "hanging_train.py"
    script.write_text(HANGING_TRAIN)
    config = {**tiny_run_dict(tmp_path, max_steps=6, save_every=0, eval_every=0),
              "distributed": {"strategy": "ddp", "timeout_s": 5}}
    started = time.time()
    result = _torchrun(config, tmp_path / "hang.json", script=(str(script),))
    assert result.returncode != 0
    assert result.stderr.count("cli.train: error: distributed: rank 0 waited more than distributed.timeout_s=5 s") \
        == 1, result.stderr[-3000:]
    assert "Traceback" not in _before_torchrun_report(result.stderr)
    assert time.time() - started < 120  # bounded: the timeout fired, not gloo's default


def test_a_nan_loss_stops_every_rank_at_one_step_with_one_line(tmp_path):
    """The global loss is the same on every rank, so every rank stops at the same step; rank 0 prints the line."""
    config = {**tiny_run_dict(tmp_path, max_steps=40, save_every=2, eval_every=0, lr=1e3, warmup_steps=0),
              "distributed": {"strategy": "ddp"}}
    result = _torchrun(config, tmp_path / "nan.json")
    assert result.returncode != 0
    assert result.stderr.count("cli.train: error: non-finite ") == 1, result.stderr[-3000:]
    assert "Traceback" not in _before_torchrun_report(result.stderr)
    assert result.stderr.count("exitcode  : 1") == 2  # torchrun's summary: both ranks exited 1
    assert not (tmp_path / "run" / "final").exists()
    rows = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "NaN" not in rows and json.loads(rows.splitlines()[-1])["skipped"] is True
