"""Durability: every file a checkpoint (or a saved model) holds is fsynced, and so is the directory the
rename happens in, after the rename. Recorded by wrapping os.fsync (a power loss can't be simulated here)."""
import os
import re
from pathlib import Path

import pytest
import torch

from engine import Transformer
from engine.train.checkpoint import save_final
from tests.train.test_checkpoint import TINY, _save


@pytest.fixture
def fsynced(monkeypatch):
    """The paths os.fsync was called on, in call order (a temp name for what was later renamed)."""
    calls = []
    real = os.fsync

    def record(fd):
        calls.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        return real(fd)
    monkeypatch.setattr(os, "fsync", record)
    return calls


def _as_published(path: Path, final: Path) -> Path:
    """`.tmp-<name>-<hex>/x` (and a per-file `.tmp-x-<hex>`) as the published final path."""
    parts = [re.sub(rf"^\.tmp-({re.escape(final.name)}|.+)-[0-9a-f]{{8}}$", r"\1", p) for p in path.parts]
    return Path(*parts)


def test_every_file_of_a_checkpoint_and_its_directories_are_fsynced(tmp_path, fsynced):
    final = _save(tmp_path, step=2)
    published = [_as_published(p, final) for p in fsynced]
    files = [p for p in final.rglob("*") if p.is_file()]
    assert {"model.safetensors", "config.json", "optimizer.pt", "trainer.pt", "trainer_state.json",
            "run_config.json", "COMPLETE"} <= {p.name for p in files}
    for p in files + [final]:
        assert p.resolve() in {q.resolve() for q in published}, f"{p} was never fsynced"
    # the rename into checkpoints/ is durable only once checkpoints/ itself is fsynced, after all the files
    last_root = max(i for i, p in enumerate(fsynced) if p == final.parent.resolve())
    assert all(i < last_root for i, p in enumerate(published) if p.resolve() in {f.resolve() for f in files})


def test_save_pretrained_and_the_final_export_fsync_what_they_write(tmp_path, fsynced):
    model = Transformer(TINY)
    model.save_pretrained(tmp_path / "hf", max_shard_size=20_000)  # sharded: index + several files
    written = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert "model.safetensors.index.json" in written and len(written) > 3
    names = {_as_published(p, tmp_path / "hf").name for p in fsynced}
    assert set(written) <= names and (tmp_path / "hf").resolve() in fsynced
    fsynced.clear()
    final = save_final(tmp_path / "final", model, None)
    assert {p.name for p in final.iterdir()} <= {_as_published(p, final).name for p in fsynced}
    assert tmp_path.resolve() in fsynced  # the directory the final/ rename happened in
    again = Transformer.from_pretrained(final)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_a_full_disk_during_the_final_export_is_one_error_and_keeps_the_old_copy(tmp_path, monkeypatch):
    # A full disk can't be made here: the safetensors write fails as it would on one.
    import errno

    import engine.model.hf_format as hf_format
    from engine.train.checkpoint import CheckpointError

    model = Transformer(TINY)
    final = save_final(tmp_path / "final", model, None)
    before = {p.name: p.read_bytes() for p in final.iterdir()}

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(hf_format, "atomic_write", full)
    with pytest.raises(CheckpointError, match=r"final: disk full while writing .*model.safetensors \(it needs about"):
        save_final(final, Transformer(TINY), None)
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before and os.listdir(tmp_path) == ["final"]
