"""Checkpoints under faults: a bad, truncated, foreign or incomplete checkpoint is one clear error (exit 2 in a
CLI) or, for resume=auto, skipped with a warning; an interrupted re-save never loses the step."""
import dataclasses
import errno
import json
import logging
import shutil

import pytest
import torch

import engine.files
import engine.train.checkpoint as checkpoint_module
from cli.common import exit_on_user_error
from engine import ModelConfig, Transformer
from engine.config import TrainConfig
from engine.train.checkpoint import (CheckpointError, find_resume, list_checkpoints, load_model_weights,
                                     load_training_state, save_checkpoint)
from engine.train.loop import make_optimizer, train_step

TINY = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                   intermediate_size=64, max_position_embeddings=64)


def _trained(seed=0, config=TINY):
    """A tiny model and its kernels.AdamW after one step (so the optimizer has moments)."""
    torch.manual_seed(seed)
    model = Transformer(config)
    optimizer = make_optimizer(model, TrainConfig(lr=1e-2))
    x = torch.randint(0, 64, (2, 8))
    train_step(model, optimizer, [(x, torch.roll(x, -1, 1))], device=torch.device("cpu"))
    return model, optimizer


def _save(out_dir, step=2, model=None, optimizer=None):
    if model is None:
        model, optimizer = _trained()
    return save_checkpoint(out_dir, step, model, None, optimizer, None, {"step": step, "tokens_seen": 16 * step},
                           {"note": "test"})


def _one_line(capsys, fn):
    """Run `fn` as a CLI would: it must exit 2 with one `prog: error:` line and no traceback."""
    with pytest.raises(SystemExit) as stop:
        with exit_on_user_error("cli.train"):
            fn()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("cli.train: error: ") and err.count("\n") == 1, err
    return err


def _fresh():
    model, optimizer = _trained(seed=1)
    return model, optimizer, {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}


@pytest.mark.parametrize("change", ["smaller", "larger", "dtype"])
def test_optimizer_state_that_does_not_fit_the_params_is_refused_naming_file_and_parameter(tmp_path, capsys, change):
    path = _save(tmp_path)
    saved = torch.load(path / "optimizer.pt", weights_only=True)
    names = [n for n, _ in _trained()[0].named_parameters()]
    moment = saved["state"][3]["exp_avg"]  # optimizer index 3 is the 4th parameter of the first group
    saved["state"][3]["exp_avg"] = {"smaller": moment[:-1], "larger": torch.cat([moment, moment]),
                                    "dtype": moment.to(torch.int32)}[change]
    torch.save(saved, path / "optimizer.pt")
    model, optimizer, before = _fresh()
    err = _one_line(capsys, lambda: load_training_state(path, model, optimizer, None))
    first_group = [n for n in names if dict(model.named_parameters())[n].dim() >= 2]
    assert str(path / "optimizer.pt") in err and f"'{first_group[3]}'" in err and "exp_avg" in err
    assert ("int32" in err) if change == "dtype" else ("shape" in err)
    for p, state in optimizer.state.items():  # refused before anything was loaded
        assert all(torch.equal(v, before[id(p)][k]) for k, v in state.items())


def test_optimizer_state_of_another_model_is_refused_by_parameter_count(tmp_path, capsys):
    path = _save(tmp_path, model=None)
    bigger = dataclasses.replace(TINY, num_layers=3)
    model, optimizer = _trained(config=bigger)
    err = _one_line(capsys, lambda: load_training_state(path, model, optimizer, None))
    assert str(path / "optimizer.pt") in err and "parameter group 0 holds" in err


def test_resave_killed_between_the_renames_keeps_the_step(tmp_path, monkeypatch):
    _save(tmp_path, step=4)

    class Killed(BaseException):
        pass

    def crash(name):
        if name == "publish_dir:aside":  # the old copy is set aside, the new one not yet renamed in
            raise Killed
    monkeypatch.setattr(engine.files, "crash_point", crash)
    with pytest.raises(Killed):
        _save(tmp_path, step=4)
    root = tmp_path / "checkpoints"
    assert not (root / "step_000004").exists() and any(p.name.startswith(".old-") for p in root.iterdir())
    found = find_resume(tmp_path, "auto")  # puts the set-aside copy back
    assert found == root / "step_000004" and sorted(p.name for p in root.iterdir()) == ["step_000004"]
    load_training_state(found, *_trained(seed=1), None)


def test_resume_auto_skips_an_incomplete_checkpoint_with_a_warning(tmp_path, caplog):
    _save(tmp_path, step=2)
    half = _save(tmp_path, step=4)
    for name in ("model.safetensors", "optimizer.pt", "COMPLETE"):  # what the old rmtree-then-rename left
        (half / name).unlink(missing_ok=True)
    with caplog.at_level(logging.WARNING):
        assert find_resume(tmp_path, "auto").name == "step_000002"
    assert str(half) in caplog.text and "did not finish" in caplog.text
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002"]
    with pytest.raises(CheckpointError, match="incomplete"):
        find_resume(tmp_path, str(half))


def test_a_checkpoint_from_before_the_marker_still_resumes(tmp_path):
    path = _save(tmp_path, step=2)
    (path / "COMPLETE").unlink(missing_ok=True)  # written by an engine without the marker, all its files there
    assert find_resume(tmp_path, "auto") == path


@pytest.mark.parametrize("name", ["optimizer.pt", "trainer.pt"])
def test_a_truncated_pt_file_is_one_line(tmp_path, capsys, name):
    path = _save(tmp_path)
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[: len(data) // 2])
    err = _one_line(capsys, lambda: find_resume(tmp_path, "auto"))  # the marker's sizes catch it first
    assert str(path / name) in err and "truncated" in err
    (path / "COMPLETE").unlink(missing_ok=True)  # without the marker, torch.load's failure is the one line
    err = _one_line(capsys, lambda: load_training_state(path, *_trained(seed=1), None))
    assert str(path / name) in err and "truncated or corrupt" in err


class NotATensor:
    pass


def test_a_pickled_object_is_not_a_checkpoint_this_engine_wrote(tmp_path, capsys):
    path = _save(tmp_path)
    (path / "COMPLETE").unlink(missing_ok=True)
    torch.save({"scaler": None, "rng": NotATensor()}, path / "trainer.pt")
    err = _one_line(capsys, lambda: load_training_state(path, *_trained(seed=1), None))
    assert str(path / "trainer.pt") in err and "not a checkpoint file this engine wrote" in err
    assert "weights_only" not in err


@pytest.mark.parametrize("text,message", [("{\"step\": 4,", "not valid JSON"), ('{"step": -1, "tokens_seen": 0}', "'step'"),
                                          ("[4]", "expected a JSON object"), ('{"step": 2}', "'tokens_seen'")])
def test_a_malformed_trainer_state_is_one_line(tmp_path, capsys, text, message):
    path = _save(tmp_path)
    (path / "COMPLETE").unlink(missing_ok=True)  # as if damaged by hand; the marker would report the size change first
    (path / "trainer_state.json").write_text(text)
    err = _one_line(capsys, lambda: find_resume(tmp_path, str(path)))
    assert str(path / "trainer_state.json") in err and message in err


def test_a_full_disk_is_one_line_with_the_bytes_needed_and_the_old_checkpoint_intact(tmp_path, monkeypatch, capsys):
    # A full disk can't be made here (no root, no loop device): the write fails as a full disk's would.
    old = _save(tmp_path, step=2)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    monkeypatch.setattr(checkpoint_module.torch, "save", full)
    err = _one_line(capsys, lambda: _save(tmp_path, step=4))
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert "disk full" in err and "step_000004" in err and "MB" in err and "needs about" in err and "intact" in err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002"]
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    model, optimizer = _trained(seed=1)
    load_model_weights(old, model)
    load_training_state(find_resume(tmp_path, "auto"), model, optimizer, None)


def test_torch_saves_write_failure_on_a_full_disk_is_reported_as_one(tmp_path, monkeypatch, capsys):
    # torch.save's C++ writer raises a RuntimeError without the errno; the free space tells it apart
    def full(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")
    monkeypatch.setattr(checkpoint_module.torch, "save", full)
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    err = _one_line(capsys, lambda: _save(tmp_path, step=4))
    assert "disk full" in err and "0.0 MB free" in err
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 0, 10**12))
    with pytest.raises(RuntimeError, match="PytorchStreamWriter"):  # space left: not a full disk, left as it is
        _save(tmp_path, step=4)


def test_the_marker_lists_every_file_and_its_size(tmp_path):
    path = _save(tmp_path)
    marker = json.loads((path / "COMPLETE").read_text())
    files = {p.name: p.stat().st_size for p in path.iterdir() if p.name != "COMPLETE"}
    assert marker == {"step": 2, "files": files}


def _save_sharded_one_process(tmp_path):
    """A checkpoint with dcp/ as torchrun writes it (here from one process: the same files, unsharded)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optimizer = _trained()
    path = _save(tmp_path, model=model, optimizer=optimizer)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path / "dcp")
    (path / "COMPLETE").unlink(missing_ok=True)  # the files changed after the save: only the dcp/ checks are under test here
    return path, model


def test_a_sharded_checkpoint_of_other_shapes_is_refused_naming_the_parameter(tmp_path, capsys):
    path, saved = _save_sharded_one_process(tmp_path)
    model, optimizer = _trained(seed=1)
    load_training_state(path, model, optimizer, None)  # the matching model loads its weights from dcp/
    assert all(torch.equal(a, b) for a, b in zip(saved.parameters(), model.parameters()))
    wider = dataclasses.replace(TINY, intermediate_size=96)
    err = _one_line(capsys, lambda: load_training_state(path, *_trained(seed=1, config=wider), None))
    assert str(path / "dcp") in err and "'layers.0.mlp.gate_proj.weight' has shape [64, 32]" in err
    deeper = dataclasses.replace(TINY, num_layers=3)  # tensors dcp/ lacks: dcp.load's own failure, as one line
    err = _one_line(capsys, lambda: load_training_state(path, *_trained(seed=1, config=deeper), None))
    assert str(path / "dcp") in err and "cannot load the sharded state" in err and "layers.2" in err
    (path / "dcp" / ".metadata").write_bytes(b"\x80")  # truncated
    err = _one_line(capsys, lambda: load_training_state(path, *_trained(seed=1), None))
    assert str(path / "dcp" / ".metadata") in err and "truncated or corrupt" in err
