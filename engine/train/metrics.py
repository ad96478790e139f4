"""What a run reports: metrics.jsonl (always), a tqdm progress bar, and a loss-curve PNG (if matplotlib)."""
from __future__ import annotations

import errno
import json
import logging
import math
from pathlib import Path

from tqdm import tqdm

from engine.data.text import iter_jsonl
from engine.files import atomic_write, fsync_path, remove_stale_temps

logger = logging.getLogger("engine.train.metrics")


class MetricsLog:
    """Append one JSON object per optimizer step to metrics.jsonl (the run's permanent record).

    Each row is flushed as it is written and fsynced by sync() (at every checkpoint), so the rows a resume
    keeps survive a power loss. Non-finite floats are written as null (strict JSON).
    """

    def __init__(self, path, truncate_after: int = 0):
        self.path = Path(path)
        remove_stale_temps(self.path.parent, self.path.name)  # a rewrite killed before its rename
        if self.path.exists():  # a resumed run drops rows past its checkpoint, so steps never repeat
            rows, torn = _read_rows(self.path)
            kept = [r for r in rows if r.get("step", 0) <= truncate_after] if truncate_after else []
            if torn or len(kept) != len(rows):
                # temp + rename: a kill here leaves the old file or the trimmed one, never an empty one
                atomic_write(self.path, "".join(_dumps(r) + "\n" for r in kept))

    def write(self, row: dict, every: int = 1) -> None:
        if is_logged(row, every):
            try:
                with self.path.open("a") as f:
                    f.write(_dumps(row) + "\n")
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                raise MetricsError(f"{self.path}: disk full while logging step {row['step']}") from None

    def sync(self) -> None:
        """fsync metrics.jsonl (and its directory, which holds the file's creation): the rows written so far
        survive a power loss."""
        if self.path.exists():
            fsync_path(self.path)
            fsync_path(self.path.parent)

    def close(self) -> None:
        self.sync()


def _dumps(row: dict) -> str:
    """Strict JSON: NaN and inf (a diverged loss, an fp16 overflow) become null."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    return json.dumps(clean, allow_nan=False)


def is_logged(row: dict, every: int) -> bool:
    """Rows kept with train.log_every: every `every`-th step, and every eval step (val loss or eval tasks)."""
    return row["step"] % every == 0 or "val_loss" in row or any(k.startswith("eval/") for k in row)


def _read_rows(path: Path) -> tuple[list[dict], bool]:
    """The rows of a metrics.jsonl and whether its last line was torn (a kill mid-write), which is dropped
    with a warning. Any other line that is not JSON is a MetricsError naming file:line."""
    lines = [(n, raw) for n, raw in enumerate(path.read_bytes().split(b"\n"), 1) if raw.strip()]
    rows, torn = [], False
    for i, (lineno, raw) in enumerate(lines):
        try:
            rows.append(json.loads(raw))
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            if i < len(lines) - 1:
                raise MetricsError(f"{path}:{lineno}: not valid JSON ({e})") from None
            logger.warning("%s:%d: dropped a torn last line (%d bytes, left by a killed run)", path, lineno, len(raw))
            torn = True
    return rows, torn


def read_metrics(path) -> list[dict]:
    """Every row of a metrics.jsonl (a torn last line dropped with a warning)."""
    return _read_rows(Path(path))[0]


class MetricsError(ValueError):
    """A run directory has no usable metrics.jsonl; the message names the path."""


def load_run_metrics(run_dir) -> list[dict]:
    """The rows of RUN_DIR/metrics.jsonl, checked: MetricsError naming the path when the directory or file is
    missing, a line is not a JSON object with `step` and `loss` (null: a non-finite loss), or there are no rows
    yet. Strict, unlike read_metrics: a torn last line is reported here, not dropped."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise MetricsError(f"{run_dir}: not a directory (expected a run's out_dir)")
    if not path.is_file():
        raise MetricsError(f"{path}: missing (is {run_dir} a run's out_dir? cli.train writes it at the first step)")
    rows = []
    for row, where, _ in iter_jsonl(path):  # a line that is not JSON: DataError naming file:line
        loss = row.get("loss", "") if isinstance(row, dict) else ""
        if not (isinstance(row, dict) and isinstance(row.get("step"), int)
                and (loss is None or isinstance(loss, (int, float)))):
            raise MetricsError(f"{where}: expected an object with a 'step' and a 'loss', got {str(row)[:80]!r}")
        rows.append(row)
    if not rows:
        raise MetricsError(f"{path}: no rows yet (the run has not finished a step)")
    return rows


class ProgressBar:
    """A tqdm bar over optimizer steps showing loss, lr, tokens/s (ETA comes with tqdm)."""

    def __init__(self, total: int, initial: int, enabled: bool = True):
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
        self.val = None

    def update(self, row: dict) -> None:
        self.val = row.get("val_loss", self.val)
        post = {"loss": f"{row['loss']:.3f}", "lr": f"{row['lr']:.2e}", "tok/s": f"{row['tokens_per_s']:.0f}"}
        if self.val is not None:
            post["val"] = f"{self.val:.3f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


def plot_losses(run_dirs, png_path) -> Path | None:
    """Train and val loss of one or more runs (their metrics.jsonl) into one PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: skipping the loss-curve PNG; to draw it: pip install -e \".[plot]\" "
                       "then python -m cli.plot %s", " ".join(str(d) for d in run_dirs))
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for run_dir in run_dirs:
        rows = read_metrics(Path(run_dir) / "metrics.jsonl")
        name = Path(run_dir).name
        losses = [math.nan if r["loss"] is None else r["loss"] for r in rows]  # null: a non-finite loss
        line, = ax.plot([r["step"] for r in rows], losses, alpha=0.6, label=f"{name} train")
        val = [r for r in rows if r.get("val_loss") is not None]
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color=line.get_color(),
                    label=f"{name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)
