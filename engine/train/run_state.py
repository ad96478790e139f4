"""What a run carries from step to step (`RunState`), how it goes into and out of trainer_state.json, and the
errors that stop a run early."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


class TrainingStopped(RuntimeError):
    """The run stopped before max_steps for a reason it names in one line (no checkpoint of bad state)."""


class NonFiniteLoss(TrainingStopped):
    """The loss or the gradient norm was NaN/inf on more consecutive steps than train.max_nonfinite_steps."""


class CollectiveTimeout(TrainingStopped):
    """A collective waited longer than distributed.timeout_s for another rank."""


@dataclass
class RunState:
    """The counters a resumed run continues from; saved in every checkpoint's trainer_state.json."""

    step: int = 0  # optimizer steps taken (skipped non-finite steps count: their data is consumed)
    tokens_seen: int = 0
    val_loss: Optional[float] = None
    best_val_loss: Optional[float] = None
    nonfinite_streak: int = 0  # consecutive non-finite steps just before `step`

    def record_eval(self, val_loss: float) -> None:
        """Keep the latest val loss and the best finite one."""
        self.val_loss = val_loss if math.isfinite(val_loss) else None
        if self.val_loss is not None:
            self.best_val_loss = min(self.val_loss, self.best_val_loss if self.best_val_loss is not None else math.inf)

    def trainer_state(self, **extra) -> dict:
        """The trainer_state.json of a checkpoint at this state; `extra`: world_size, sampler, scheduler, ..."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "val_loss": self.val_loss,
                "best_val_loss": self.best_val_loss, "nonfinite_streak": self.nonfinite_streak, **extra}

    @classmethod
    def from_trainer_state(cls, saved: dict) -> "RunState":
        """The state a checkpoint's trainer_state.json describes (files written before a field existed
        lack it: the field's default)."""
        return cls(**{name: saved[name] for name in cls.__dataclass_fields__ if name in saved})


def finite_or_none(value):
    """`value`, or None when it is a NaN/inf float: JSON has no NaN (metrics.jsonl rows stay valid JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
