"""Experiment trackers beside metrics.jsonl: TensorBoard event files and Weights & Biases runs.

Both are optional extras (`pip install -e '.[track]'`) switched on by the run config's `logging` section.
A tracker whose package is missing logs one warning and is skipped; training never depends on one.
metrics.jsonl (engine.report.MetricsLog) stays the always-on record.
"""
from __future__ import annotations

import logging
import uuid
from pathlib import Path

from engine.config import LoggingConfig
from engine.files import atomic_write

logger = logging.getLogger("engine.train.tracking")

# metrics.jsonl key -> tracker tag
TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s",
        "val_loss": "val/loss", "val_ppl": "val/perplexity"}


class Trackers:
    """Sends each step's metrics row to the trackers `cfg` enables (rank 0 only: build it there)."""

    def __init__(self, cfg: LoggingConfig, out_dir, run_config: dict):
        self.tensorboard = self.wandb = None
        out_dir = Path(out_dir)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("logging.tensorboard: the tensorboard package is not installed (pip install -e "
                               "'.[track]'); skipping TensorBoard")
            else:
                self.tensorboard = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        if cfg.wandb is not None:
            try:
                import wandb
            except ImportError:
                logger.warning("logging.wandb: the wandb package is not installed (pip install -e '.[track]'); "
                               "skipping W&B")
            else:
                self.wandb = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, mode=cfg.wandb.mode,
                                        name=cfg.wandb.name or out_dir.resolve().name, dir=str(out_dir),
                                        id=_wandb_run_id(out_dir), resume="allow", config=run_config)

    def log(self, row: dict) -> None:
        step = row["step"]
        values = {TAGS.get(k, k): float(v) for k, v in row.items()
                  if (k in TAGS or k.startswith("eval/")) and v is not None}  # eval/<task>/<metric>: train.eval_tasks
        if self.tensorboard is not None:
            for tag, value in values.items():
                self.tensorboard.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_run_id(out_dir: Path) -> str:
    """One W&B run per out_dir: a resumed training run appends to the run it started."""
    path = out_dir / "wandb" / "run_id"
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:12]
    atomic_write(path, run_id)
    return run_id
