"""Atomic and durable writes: every file and directory the engine publishes goes through here.

A rename protects against a killed process; only fsync protects against power loss. So a published file
is written to a temp name beside its target, fsynced, renamed over the target, and the directory holding
it is fsynced (the rename itself lives in the directory's data). A published directory is filled under a
temp name, every file in it fsynced, then swapped in by rename-aside-then-rename: at every instant the
target is either the complete old copy or the complete new one (a `.old-*` or `.tmp-*` sibling may be left
by a kill; `remove_stale_temps` clears those).

`crash_point(name)` is a test-only hook: with ENGINE_CRASH_AT=name in the environment the process kills
itself (SIGKILL, like `kill -9`) at that point, so tests can aim a kill at a narrow window.
"""
from __future__ import annotations

import os
import shutil
import signal
import uuid
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")
TEMP_PREFIX, OLD_PREFIX = ".tmp-", ".old-"


def crash_point(name: str) -> None:
    """Die here, as `kill -9` would, when ENGINE_CRASH_AT names this point (fault-injection tests only)."""
    if os.environ.get("ENGINE_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_path(path: Path) -> None:
    """fsync one file or directory (a directory's fsync makes the renames and creations in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory, deepest first."""
    dirs = []
    for here, _, names in os.walk(root):
        dirs.append(Path(here))
        for name in names:
            fsync_path(Path(here) / name)
    for d in reversed(dirs):
        fsync_path(d)


def atomic_write(path, data: bytes | str) -> Path:
    """Write `data` to `path` so that a kill or power loss leaves the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.parent / f"{TEMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        crash_point(f"atomic_write:{path.name}")  # the temp is complete, the target still the old file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def atomic_write_with(path, fill: Callable[[Path], None]) -> Path:
    """atomic_write for a file another library writes to a path (too large to build in memory first):
    `fill(tmp)` writes the temp file beside `path`; it is then fsynced and renamed over `path`."""
    path = Path(path)
    tmp = path.parent / f"{TEMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        fill(tmp)
        fsync_path(tmp)
        crash_point(f"atomic_write:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def temp_dir_beside(final: Path) -> Path:
    """A fresh, empty `.tmp-<name>-<random>` directory next to `final` (never reused)."""
    tmp = final.parent / f"{TEMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def publish_dir(tmp: Path, final: Path, replace: bool = True) -> bool:
    """Make the fully written `tmp` become `final`, durably. Returns False if `final` was kept instead.

    replace=True: an existing `final` is renamed aside first and deleted only once the new one is in place.
    replace=False (caches): if another process published `final` first, that copy stays and `tmp` is removed.
    """
    fsync_tree(tmp)
    old = None
    if final.exists():
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        old = final.parent / f"{OLD_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        crash_point("publish_dir:aside")
    try:
        os.rename(tmp, final)
    except OSError:
        if replace or not final.exists():  # not a racing rank's finished copy: put the old one back
            if old is not None and not final.exists():
                os.rename(old, final)
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return True


def write_dir(final: Path, fill: Callable[[Path], T], replace: bool = True) -> T:
    """Run fill(tmp) on a fresh temp dir beside `final`, publish it as `final` and return fill's result.
    A failure in fill removes the temp dir and leaves `final` as it was."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(final)
    try:
        result = fill(tmp)
        publish_dir(tmp, final, replace=replace)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temps(parent: Path, name: str | None = None) -> list[Path]:
    """Clean what a killed process left in `parent` (for `name` only, if given) and return what was removed.

    A kill between the two renames of `publish_dir` leaves `.old-<name>-*` (the complete old copy) and no
    `<name>`: that copy is renamed back first. Then every `.tmp-*` / `.old-*` left is deleted. Call it only
    where no other live process can be writing there (before a run starts, on rank 0)."""
    removed = []
    if not parent.is_dir():
        return removed
    for old in sorted(parent.glob(f"{OLD_PREFIX}*")):
        target = parent / old.name[len(OLD_PREFIX):].rsplit("-", 1)[0]
        if (name is None or target.name == name) and not target.exists():
            os.rename(old, target)
    for p in parent.iterdir():
        for prefix in (TEMP_PREFIX, OLD_PREFIX):
            if p.name.startswith(prefix) and (name is None or p.name.startswith(f"{prefix}{name}-")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed
