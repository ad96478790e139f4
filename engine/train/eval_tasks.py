"""`train.eval_tasks`: lm-evaluation-harness tasks run on the model at each eval step, as metrics rows.

The tasks are checked (names, lm-eval installed) when the run starts, before any step; at an eval step rank 0
runs them on the model (adapters and all) through engine.eval.lm_eval_model, with train.batch_size sequences
per forward pass, and the row gains "eval/<task>/<metric>" values for metrics.jsonl and the trackers. Other ranks
go on to the next step's collective and wait there, so an evaluation must finish within distributed.timeout_s.
FSDP shards the weights over the ranks, so rank 0 alone cannot run the model: refused there.
"""
from __future__ import annotations

import logging
import time

from engine.config import ConfigError, RunConfig
from engine.train.objectives import autocast

logger = logging.getLogger("engine.train.eval_tasks")


class TaskEval:
    """The run's lm-eval tasks, resolved once; `row(model, tokenizer)` evaluates them."""

    def __init__(self, cfg: RunConfig, world_size: int = 1):
        t = cfg.train
        if world_size > 1 and cfg.distributed.strategy == "fsdp":
            raise ConfigError("train.eval_tasks: not supported with distributed.strategy fsdp (rank 0 alone runs "
                              "lm-eval on the whole model); use ddp, or evaluate final/ with python -m cli.eval")
        try:
            from engine.eval import lm_eval_model
        except ImportError as e:
            raise ConfigError(f"train.eval_tasks: {e}") from None
        self.harness, self.cfg = lm_eval_model, t
        try:
            self.manager = lm_eval_model.task_manager(list(t.eval_tasks), t.eval_tasks_include_path)
        except ConfigError as e:
            raise ConfigError(f"train.eval_tasks: {e}") from None

    def row(self, model, tokenizer, device, precision: str) -> dict:
        """{"eval/<task>/<metric>": value} for the model as it is now (its train/eval mode is restored)."""
        t, started = self.cfg, time.perf_counter()
        lm = self.harness.EngineLM(model, tokenizer, batch_size=t.batch_size)
        with autocast(device, precision):
            results = self.harness.run_tasks(lm, list(t.eval_tasks), limit=t.eval_tasks_limit, manager=self.manager,
                                             bootstrap_iters=0)
        row = {f"eval/{k}": v for k, v in self.harness.metrics_of(results).items()}
        logger.info("eval tasks (%.1f s): %s", time.perf_counter() - started,
                    ", ".join(f"{k[5:]} {v:.4f}" for k, v in row.items()))
        return row
