"""engine.files: atomic, durable publishing of files and directories, and recovery from a kill mid-swap."""
import os

import pytest

from engine.files import atomic_write, publish_dir, remove_stale_temps, temp_dir_beside, write_dir


def test_atomic_write_replaces_the_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.json"
    atomic_write(target, "old")
    atomic_write(target, b"new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["a.json"]


def test_publish_dir_swaps_a_whole_directory(tmp_path):
    final = tmp_path / "step_1"
    write_dir(final, lambda d: (d / "x").write_text("1"))
    write_dir(final, lambda d: (d / "y").write_text("2"))
    assert sorted(os.listdir(final)) == ["y"] and os.listdir(tmp_path) == ["step_1"]


def test_a_failing_fill_leaves_the_old_directory(tmp_path):
    final = tmp_path / "cache"
    write_dir(final, lambda d: (d / "x").write_text("1"))

    def fail(d):
        (d / "half").write_text("")
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        write_dir(final, fail)
    assert os.listdir(final) == ["x"] and os.listdir(tmp_path) == ["cache"]


def test_replace_false_keeps_what_another_process_published(tmp_path):
    final = tmp_path / "cache"
    write_dir(final, lambda d: (d / "first").write_text(""))
    tmp = temp_dir_beside(final)
    (tmp / "second").write_text("")
    assert publish_dir(tmp, final, replace=False) is False
    assert os.listdir(final) == ["first"] and not tmp.exists()


def test_a_kill_between_the_renames_is_recovered_from_the_old_copy(tmp_path):
    final = tmp_path / "step_2"
    write_dir(final, lambda d: (d / "model").write_text("complete"))
    os.rename(final, tmp_path / ".old-step_2-abcd1234")  # what a kill right after the first rename leaves
    (tmp_path / ".tmp-step_2-ffff0000").mkdir()
    removed = remove_stale_temps(tmp_path)
    assert (final / "model").read_text() == "complete"
    assert [p.name for p in removed] == [".tmp-step_2-ffff0000"] and os.listdir(tmp_path) == ["step_2"]
